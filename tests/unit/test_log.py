"""Log rendering: an exception's traceback never carries local variables.

The lifecycle tier proves it for the real processes (tests/lifecycle/
test_log_secrets.py); this is the same rule for each way ``configure`` is
called (one process, a worker's pipe-safe writer) and each logger.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from gateway.telemetry import log

SECRET = "local-secret-value-0123456789"


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    yield
    log.configure("debug")


def _fail(token: str) -> None:
    key = SECRET.encode()
    raise RuntimeError(f"failed with {len(token) + len(key)} bytes in scope")


@pytest.mark.parametrize("pipe_safe", [False, True], ids=["process", "worker"])
@pytest.mark.parametrize("logger", [log.get_logger, log.access_logger])
def test_tracebacks_have_frames_but_no_locals(pipe_safe: bool, logger: Callable[[], Any]) -> None:
    out = io.BytesIO()
    writer = log.configure("info", out, pipe_safe=pipe_safe)
    try:
        _fail(SECRET)
    except RuntimeError as exc:
        logger().error("internal_error", exc_info=exc)
    writer.flush()
    [line] = out.getvalue().splitlines()
    assert SECRET.encode() not in line
    [rendered] = orjson.loads(line)["exception"]
    assert rendered["exc_value"] == f"failed with {2 * len(SECRET)} bytes in scope"
    frames = rendered["frames"]
    assert frames[-1]["name"] == "_fail"
    assert all(set(f) == {"filename", "lineno", "name"} for f in frames), frames
