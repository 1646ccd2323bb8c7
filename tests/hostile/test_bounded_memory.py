"""Memory per connection stays bounded whatever the client does: answers it
never reads, a trailer that never ends, heads that never end (issue 10).

Each attack runs against the real CLI (``python -m gateway run``) as a
subprocess and measures the gateway's peak resident memory (VmHWM) from
/proc, before and after.  Every loop that sends is bounded by bytes and by
time: on a gateway that kept buffering, the attack stops at its cap and the
growth shows in the measurement instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import TOKEN, config_text
from tests.support.client import raw_client
from tests.support.metrics import scrape
from tests.support.process import GatewayProcess, memory_kib
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import ParsedRequest, request

MiB = 1024 * 1024
# What one connection may add to the gateway's peak memory.  The attacks
# below send up to 16-32 MiB; a gateway that buffered them would grow by that much
# or (unread 401s, about 7x the request bytes) far more.
GROWTH_BOUND_KIB = 16 * 1024
BODY_IDLE = 1.0  # also the write deadline: a client must read within this
SLACK = 3.0  # a loaded CI box; the sweeper ticks every timeout / 5
STALL = 2.0  # a send blocked this long means the gateway stopped reading


@contextlib.asynccontextmanager
async def _gateway(
    tmp_path: Path, up: RawUpstream, server: str = ""
) -> AsyncIterator[GatewayProcess]:
    text = config_text(
        up.url + "/api/v1/write",
        up.url + "/v1/traces",
        server=server
        or (
            f"header_timeout_seconds = 5\nbody_idle_timeout_seconds = {BODY_IDLE}\n"
            "keepalive_timeout_seconds = 30"
        ),
        # The worst case: no auth-failure throttle to end a tokenless flood.
        extra="[limits]\nauth_failure_limit = 0",
    ).replace('level = "debug"', 'level = "info"\naccess = false')
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    # One process: it serves the port itself, so its /proc is the one to read
    # (with workers, the pid we started is the supervisor).
    gw = GatewayProcess(config, args=("--workers", "1"))
    try:
        await gw.start()
        # Warm up (first-request imports, pools, allocator arenas).
        async with raw_client(gw.port) as conn:
            await conn.send(request("POST", "/api/v1/write", b"warm", token=TOKEN))
            assert (await conn.response()).status == 204
        yield gw
    finally:
        await gw.stop()


class PeakRss:
    """The gateway's resident memory, sampled every 20 ms while in use: the
    growth is the highest sample over the one taken on entry, in KiB."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.base = 0
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakRss:
        self.base = self.peak = memory_kib(self.gw.proc.pid)["VmRSS"]
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._take()

    def _take(self) -> None:
        with contextlib.suppress(OSError, KeyError):
            self.peak = max(self.peak, memory_kib(self.gw.proc.pid)["VmRSS"])

    async def _sample(self) -> None:
        while True:
            self._take()
            await asyncio.sleep(0.02)

    @property
    def grown(self) -> int:
        return self.peak - self.base


async def _open_connections(gw: GatewayProcess) -> float:
    return (await scrape(gw.admin_port)).value("gateway_open_connections")


async def _closed_within(gw: GatewayProcess, timeout: float) -> float:
    """Seconds until the gateway holds no connection (at most ``timeout``)."""
    t0 = time.monotonic()
    while await _open_connections(gw) > 0 and time.monotonic() - t0 < timeout:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def _send_until_stalled(sock: socket.socket, data: bytes, cap: int) -> int:
    """Send ``data`` repeatedly until ``cap`` bytes, a stall, or a close."""
    loop = asyncio.get_running_loop()
    sent = 0
    while sent < cap:
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, data), STALL)
        except (TimeoutError, OSError):
            break
        sent += len(data)
    return sent


async def _raw_socket(port: int, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_answers_the_client_never_reads_are_not_buffered(
    tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """Pipelined ``GET /x`` without a token, a 4 KiB receive buffer, never
    read: the gateway stops reading once its answers back up, and closes the
    connection when the client has not read for the write deadline."""
    async with _gateway(tmp_path, strict_upstream) as gw, PeakRss(gw) as rss:
        sock = await _raw_socket(gw.port, rcvbuf=4096)
        try:
            one = b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n"
            cap = 16 * MiB  # the kernel buffers take about 4 MiB of it here
            sent = await _send_until_stalled(sock, one * (65536 // len(one)), cap)
            closed_after = await _closed_within(gw, 2 * SLACK)
        finally:
            sock.close()
    grown = rss.grown
    measured = f"sent {sent} B, peak RSS +{grown} KiB, closed after {closed_after:.1f} s"
    print("unread answers:", measured)
    # It stopped reading: what the client could send is what the kernel's
    # buffers hold, not the whole attack.
    assert sent < cap, measured
    assert grown < GROWTH_BOUND_KIB, measured
    # Closed by the write deadline (the client never read), not kept alive.
    assert closed_after < BODY_IDLE + SLACK, measured


async def test_a_trailer_that_never_ends_is_refused(
    tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """A chunked body, then ``0\\r\\nX-Trailer: aaaa…`` without an end of line
    (valid token): refused by the head limits, the upstream never sees the
    request complete, and the gateway's memory stays flat."""
    async with _gateway(tmp_path, strict_upstream) as gw, PeakRss(gw) as rss:
        async with raw_client(gw.port) as conn:
            head = request("POST", "/api/v1/write", b"", token=TOKEN, chunked=True)
            head = head.removesuffix(b"0\r\n\r\n") + b"5\r\nhello\r\n0\r\nX-Trailer: "
            await conn.send(head)
            cap = 32 * MiB
            with contextlib.suppress(OSError):
                for _ in range(cap // (64 * 1024)):
                    conn.writer.write(b"a" * (64 * 1024))
                    await asyncio.wait_for(conn.writer.drain(), STALL)
            resp = await conn.response(timeout=SLACK)
        closed_after = await _closed_within(gw, SLACK)
    grown = rss.grown
    print(f"endless trailer: peak RSS +{grown} KiB, answered {resp.status}")
    assert closed_after < SLACK
    assert grown < GROWTH_BOUND_KIB, f"peak RSS grew by {grown} KiB; answered {resp.status}"
    # Refused by the head limits, not by the body idle timeout once the
    # attack paused.
    assert resp.status in (431, 400)
    assert resp.header("Connection") == "close"
    assert [r.body for r in strict_upstream.requests] == [b"warm"]
    assert strict_upstream.errors == []


async def _hold(conn: UpConn, req: ParsedRequest) -> None:
    if req.body == b"hold":
        await asyncio.sleep(3.0)
    await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")


@pytest.mark.parametrize("where", ["fresh", "pipelined"])
async def test_a_head_that_never_ends_is_refused(
    where: str, tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """A header line that never ends, on a fresh connection or pipelined
    behind a request the upstream holds: cut at the head limits, memory flat."""
    strict_upstream.responder = _hold
    async with _gateway(tmp_path, strict_upstream) as gw, PeakRss(gw) as rss:
        async with raw_client(gw.port) as conn:
            first = request("POST", "/api/v1/write", b"hold", token=TOKEN)
            await conn.send(
                (first if where == "pipelined" else b"")
                + b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nX-Endless: "
            )
            sent = 0
            with contextlib.suppress(OSError):
                while sent < 32 * MiB:
                    conn.writer.write(b"a" * (64 * 1024))
                    await asyncio.wait_for(conn.writer.drain(), STALL)
                    sent += 64 * 1024
            resp = await conn.response(timeout=SLACK + 3.0)
        closed_after = await _closed_within(gw, SLACK)
    grown = rss.grown
    print(f"endless head ({where}): peak RSS +{grown} KiB, answered {resp.status}")
    assert closed_after < SLACK
    # Fresh: 431.  Pipelined: the held request is answered, then the close.
    assert resp.status == (204 if where == "pipelined" else 431)
    assert grown < GROWTH_BOUND_KIB, f"peak RSS grew by {grown} KiB"
    assert [r.body for r in strict_upstream.requests] == [b"warm"] + (
        [b"hold"] if where == "pipelined" else []
    )
