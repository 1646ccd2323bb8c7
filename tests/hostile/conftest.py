"""Fixtures of the hostile tier: a raw recording upstream and a gateway in
front of it with short timeouts, so every attack ends in well under a second."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import config_text
from tests.support.upstreams import RawUpstream

# Short, but well above the sweeper's tick (timeout / 5, at least 20 ms).
FAST_SERVER = """
header_timeout_seconds = 0.5
body_idle_timeout_seconds = 0.5
keepalive_timeout_seconds = 2.0
"""
FAST_UPSTREAM = """
connect_timeout_seconds = 1.0
response_timeout_seconds = 0.5
"""


@pytest.fixture
async def strict_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    await up.start()
    yield up
    await up.stop()


def hostile_config(
    up: RawUpstream,
    *,
    server: str = FAST_SERVER,
    upstream: str = FAST_UPSTREAM,
    extra: str = "",
    credentials: str | None = None,
    max_body_bytes: int = 1024 * 1024,
) -> str:
    return config_text(
        up.url + "/api/v1/write",
        up.url + "/v1/traces",
        server=server,
        upstream=upstream,
        extra=extra,
        credentials=credentials,
        max_body_bytes=max_body_bytes,
    )
