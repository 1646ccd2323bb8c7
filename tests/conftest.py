"""Shared fixtures: uvloop for every async test, config builders, an in-process
gateway on real loopback sockets, and a recording fake upstream."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import structlog
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from gateway.config.loader import Settings, loads
from gateway.process.gateway import Gateway
from gateway.telemetry import log

if TYPE_CHECKING:
    from tests.support.upstreams import Behaviour, RawUpstream

TOKEN = "test-token-0123456789abcdef-ingest"
OTHER_TOKEN = "test-token-0123456789abcdef-other"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    # The gateway runs on uvloop in production; so do its tests.
    return {"uvloop": uvloop.new_event_loop}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TWO_CREDENTIALS = f"""
[[credentials]]
name = "ingest"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["remote_write"]
"""


def config_text(
    rw_upstream: str = "http://127.0.0.1:9/api/v1/write",
    otlp_upstream: str = "http://127.0.0.1:9/v1/traces",
    *,
    max_body_bytes: int = 64 * 1024 * 1024,
    server: str = "",
    upstream: str = "",
    extra: str = "",
    credentials: str | None = None,
) -> str:
    """A complete config: two routes, credential "ingest" (TOKEN) on both and
    "other" (OTHER_TOKEN) scoped to remote_write only."""
    if credentials is None:
        credentials = TWO_CREDENTIALS
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}

[upstream]
{upstream}

[log]
level = "debug"

[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "{rw_upstream}"
max_body_bytes = {max_body_bytes}

[[routes]]
name = "otlp_traces"
path = "/v1/traces"
protocol = "otlp-http"
upstream = "{otlp_upstream}"
max_body_bytes = {max_body_bytes}
{extra}
{credentials}
"""


@pytest.fixture
def log_capture(start_gateway: StartGateway) -> Iterator[list[MutableMapping[str, Any]]]:
    """Every structlog event the gateway emits during the test, as dicts.

    Depends on ``start_gateway`` so that capture begins after the gateway's
    ``log.configure`` (which would otherwise replace the capturing processors).
    """
    with structlog.testing.capture_logs() as events:
        yield events


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Start gateways in-process on free ports; drained at teardown."""
    started: list[Gateway] = []

    async def start(text: str | Settings | None = None, **kwargs: Any) -> Gateway:
        settings = text if isinstance(text, Settings) else loads(text or config_text(**kwargs))
        gw = Gateway(settings)
        await gw.start()
        started.append(gw)
        return gw

    log.configure("debug")
    yield start
    for gw in started:
        await gw.drain(timeout=1.0)


@dataclass
class Recorded:
    """One request as the upstream saw it, filled in while its body streams.

    ``complete`` is set only when the upstream's HTTP parser saw the whole
    body (final chunk, or Content-Length bytes); a request the gateway
    aborted ends with ``error`` set instead.
    """

    method: str
    path_qs: str
    # Case-insensitive: aiohttp canonicalises some names (X-Request-ID).
    headers: CIMultiDict[str]
    raw_headers: list[tuple[bytes, bytes]]
    chunked: bool
    body: bytes = b""
    received: int = 0
    sha256: str = ""
    complete: bool = False
    error: str | None = None


@dataclass
class RecordingUpstream:
    """A real aiohttp server that records what reaches it.

    Set ``hold`` to keep answers back until ``release`` is set (a slow
    upstream); ``keep_bodies=False`` keeps only length and sha256.
    """

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    status: int = 204
    response_body: bytes = b""
    response_headers: dict[str, str] = field(default_factory=dict)
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    keep_bodies: bool = True
    hold: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def complete(self) -> list[Recorded]:
        return [r for r in self.requests if r.complete]


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[RecordingUpstream]:
    rec = RecordingUpstream()

    async def handle(request: web.Request) -> web.StreamResponse:
        if rec.handler is not None:
            return await rec.handler(request)
        seen = Recorded(
            request.method,
            request.path_qs,
            CIMultiDict(request.headers),
            list(request.raw_headers),
            request.headers.get("Transfer-Encoding", "").lower() == "chunked",
        )
        rec.requests.append(seen)
        hasher = hashlib.sha256()
        parts: list[bytes] = []
        try:
            async for chunk in request.content.iter_any():
                seen.received += len(chunk)
                hasher.update(chunk)
                if rec.keep_bodies:
                    parts.append(chunk)
        except BaseException as exc:  # the gateway aborted the request mid-body
            seen.error = type(exc).__name__
            raise
        seen.body = b"".join(parts)
        seen.sha256 = hasher.hexdigest()
        seen.complete = True
        if rec.hold:
            await rec.release.wait()
        return web.Response(status=rec.status, body=rec.response_body, headers=rec.response_headers)

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app, auto_decompress=False)
    rec.url = f"http://127.0.0.1:{server.port}"
    yield rec
    rec.release.set()  # never leave a held handler behind for server shutdown


StartRawUpstream = Callable[["Behaviour"], Awaitable["RawUpstream"]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[StartRawUpstream]:
    """Start raw upstreams, each driven by a behaviour; stopped at teardown."""
    from tests.support.upstreams import RawUpstream  # noqa: PLC0415  (support imports this module: no cycle at import time)

    started: list[RawUpstream] = []

    async def start(behaviour: Behaviour) -> RawUpstream:
        up = RawUpstream(behaviour)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait on a condition with a deadline (never a bare sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met within timeout")
        await asyncio.sleep(0.01)
