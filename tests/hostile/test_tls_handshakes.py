"""Handshakes that never finish, on the TLS listener: counted against
``max_connections`` from accept (as plain TCP connections are), closed at
``header_timeout``, and bounded in the gateway's memory and open files,
measured on the real CLI's process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path

import pytest

from tests.conftest import TOKEN, StartGateway, wait_for
from tests.hostile.conftest import hostile_config
from tests.hostile.pki import Issued, Pki
from tests.support.client import RawClient, raw_client
from tests.support.process import GatewayProcess
from tests.support.upstreams import RawUpstream
from tests.support.wire import request


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def _server(cert: Issued, header_timeout: float) -> str:
    return f"""
header_timeout_seconds = {header_timeout}
body_idle_timeout_seconds = 0.5
keepalive_timeout_seconds = 2.0

[server.tls]
cert_file = "{cert.cert}"
key_file = "{cert.key}"
"""


def _limits(max_connections: int) -> str:
    return f"[limits]\nmax_connections = {max_connections}\n"


_HELLO = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_HELLO.check_hostname = False
_HELLO.verify_mode = ssl.CERT_NONE


def client_hello() -> bytes:
    """A real TLS ClientHello (fresh key share each time), as the first
    flight of a client that will never send anything else."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = _HELLO.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        sslobj.do_handshake()
    return outgoing.read()


async def _served(port: int, pki: Pki) -> int:
    ctx = pki.client_context()
    async with raw_client(port, ssl=ctx, server_hostname="localhost") as conn:
        await conn.send(request("POST", "/api/v1/write", b"served", token=TOKEN))
        return (await conn.response()).status


async def _refused_at_once(port: int, pki: Pki) -> bool:
    """A TLS client over the limit: the connection ends without a handshake."""
    try:
        async with asyncio.timeout(3.0):
            await _served(port, pki)
    except (ssl.SSLError, ConnectionError, OSError, EOFError):
        return True
    return False


async def test_handshaking_connections_count_against_max_connections(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """40 TCP connects that never start their handshake, max_connections = 3:
    3 are held (until header_timeout), 37 are refused at accept, and a real
    client is refused too while the 3 are held, served once they are gone."""
    gw = await start_gateway(
        hostile_config(strict_upstream, server=_server(pki.server("gw"), 30.0), extra=_limits(3))
    )
    silent = [await RawClient.open(gw.port) for _ in range(40)]
    try:
        await wait_for(lambda: gw.stats.limit_rejections.get("connections", 0) >= 37)
        assert gw.stats.open_connections == 3
        assert gw.stats.limit_rejections == {"connections": 37}
        closed = await asyncio.gather(*(c.closed(2.0) for c in silent))
        assert closed.count(True) == 37, "the refused ones are closed at once"
        assert await _refused_at_once(gw.port, pki)
        assert gw.stats.open_connections == 3
    finally:
        for conn in silent:
            conn.abort()
    await wait_for(lambda: gw.stats.open_connections == 0)
    assert await _served(gw.port, pki) == 204
    assert [r.body for r in strict_upstream.requests] == [b"served"]


@pytest.mark.parametrize("first_flight", ["client_hello", "garbage", "nothing"])
async def test_failed_and_abandoned_handshakes_are_uncounted(
    first_flight: str, pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """However a handshake ends (refused, the client gone mid-way), its slot
    is given back at once: max_connections = 2, many rounds."""
    gw = await start_gateway(
        hostile_config(strict_upstream, server=_server(pki.server("gw"), 30.0), extra=_limits(2))
    )
    data = {"client_hello": client_hello(), "garbage": b"GET / HTTP/1.1\r\n\r\n", "nothing": b""}
    for _ in range(20):
        conn = await RawClient.open(gw.port)
        try:
            await wait_for(lambda: gw.stats.open_connections == 1)
            if data[first_flight]:
                await conn.send(data[first_flight])
            if first_flight == "garbage":
                assert await conn.closed(3.0), "a ClientHello that is not one ends it"
        finally:
            conn.abort()
        await wait_for(lambda: gw.stats.open_connections == 0)
    assert gw.stats.limit_rejections == {}
    assert await _served(gw.port, pki) == 204


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_never_finishing_handshakes_are_bounded_in_memory_files_and_time(
    pki: Pki, tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """The real CLI, one process.  400 clients each send a real ClientHello
    (the gateway answers with its whole first flight and keeps the
    handshake state) and then never finish, with max_connections = 50:
    the gateway holds at most 50 of them (open files), its memory grows by
    a bounded amount, every one is closed by header_timeout, and a real
    client is served afterwards."""
    header_timeout = 2.0
    config = tmp_path / "gateway.toml"
    server = _server(pki.server("gw"), header_timeout)
    config.write_text(hostile_config(strict_upstream, server=server, extra=_limits(50)))
    proc = GatewayProcess(config, args=("--workers", "1"))
    stalled: list[RawClient] = []
    try:
        await proc.start()
        assert proc.proc is not None
        pid = proc.proc.pid
        assert await _served(proc.port, pki) == 204  # warm: first-use allocations done
        fds_before, rss_before = _open_fds(pid), proc.status()["VmRSS"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(400):
            conn = await RawClient.open(proc.port)
            await conn.send(client_hello())
            stalled.append(conn)
        opened = loop.time() - started
        held_fds = _open_fds(pid) - fds_before
        rss_growth_kib = proc.status()["VmRSS"] - rss_before
        # Refused ones are closed at accept; held ones at header_timeout.
        closed = await asyncio.gather(*(c.closed(header_timeout + 8.0) for c in stalled))
        elapsed = loop.time() - started
        await asyncio.sleep(0.5)
        fds_after = _open_fds(pid)
        print(
            f"400 stalled handshakes (opened in {opened:.1f} s): +{held_fds} fds, "
            f"+{rss_growth_kib} KiB RSS, all closed {elapsed:.1f} s after the first"
        )
        assert held_fds <= 50 + 5, f"{held_fds} open files for 50 allowed connections"
        assert rss_growth_kib < 16 * 1024, f"RSS grew {rss_growth_kib} KiB"
        assert all(closed), f"{closed.count(False)} handshakes outlived header_timeout"
        assert fds_after <= fds_before + 2
        assert await _served(proc.port, pki) == 204
    finally:
        for conn in stalled:
            conn.abort()
        await proc.stop()
