"""One public port, one gateway: `obs-gateway run` (real CLI, real sockets)
refuses to start on a port another gateway or program already serves, and
says which address.  SO_REUSEPORT is shared only among one supervisor's own
workers; without the check, a second supervisor of the same user would bind
the port next to the first, log ``listening`` and take half the traffic."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import config_text
from tests.support.client import raw_request
from tests.support.process import GatewayProcess
from tests.support.wire import request_bytes


def on_port(port: int) -> str:
    return config_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1)


class Attempt:
    """`obs-gateway run` expected to give up: its exit code (None: it was
    serving and was killed) and output."""

    def __init__(self, config: Path, workers: int) -> None:
        self.config = config
        self.workers = workers
        self.code: int | None = None
        self.out = ""
        self.err = ""
        self.decided = asyncio.Event()  # it serves, or it has exited

    async def run(self, timeout: float = 15.0, hold: asyncio.Event | None = None) -> None:
        """``hold``: once serving, keep serving until it is set (a rival
        starting at the same time must meet it serving, not killed)."""
        out, err = self.config.with_suffix(".out"), self.config.with_suffix(".err")
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "gateway", "run", "--config", str(self.config)),
                *("--workers", str(self.workers)),
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Until it exits, or it serves (the defect, unless the test expects
        # one of two to serve): then stop it and its workers.
        while proc.returncode is None and loop.time() < deadline:
            if '"event":"listening"' in out.read_text():
                break
            await asyncio.sleep(0.05)
        self.decided.set()
        if hold is not None and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.wait(), max(0.0, deadline - loop.time()))
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
        code = await proc.wait()
        self.code = None if code == -signal.SIGKILL else code
        self.out, self.err = out.read_text(), err.read_text()


def assert_refused(attempt: Attempt, address: str) -> None:
    assert attempt.code == 1, f"still serving, or rc={attempt.code}: {attempt.out}"
    assert '"event":"listening"' not in attempt.out
    assert '"event":"listen_failed"' in attempt.out
    assert f"cannot listen on {address}" in attempt.out
    assert f"cannot listen on {address}" in attempt.err
    assert "Traceback" not in attempt.err


@pytest.mark.parametrize(("first", "second"), [(2, 2), (2, 1), (1, 2), (1, 1)])
async def test_a_second_gateway_on_a_serving_port_refuses_to_start_naming_it(
    tmp_path: Path, first: int, second: int
) -> None:
    a = tmp_path / "a.toml"
    a.write_text(config_text())
    gw = GatewayProcess(a, ("--workers", str(first)))
    try:
        await gw.start()
        b = tmp_path / "b.toml"  # same public port, its own admin port
        b.write_text(on_port(gw.port))
        attempt = Attempt(b, second)
        await attempt.run()
        assert_refused(attempt, f"127.0.0.1:{gw.port}")
        # Every new connection still reaches the first gateway.
        for _ in range(20):
            resp = await raw_request(gw.port, request_bytes("GET", "/health"))
            assert resp.status == 200
        await asyncio.sleep(0.3)  # access lines are flushed a few times a second
        assert len([e for e in gw.events if e.get("route") == "health"]) == 20
    finally:
        await gw.stop()


async def test_two_gateways_started_together_one_serves_one_refuses(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    attempts = []
    for name in ("a", "b"):
        config = tmp_path / f"{name}.toml"
        config.write_text(on_port(port))
        attempts.append(Attempt(config, 2))
    # Neither has workers listening when the other checks the port: only
    # the claim both race for tells them apart.  The one that serves keeps
    # serving until the other has decided (forked workers make serving
    # quick enough to be killed before the rival even tries its claim).
    both = asyncio.Event()

    async def decided() -> None:
        await asyncio.gather(*(a.decided.wait() for a in attempts))
        both.set()

    await asyncio.gather(decided(), *(a.run(hold=both) for a in attempts))
    codes = sorted(a.code for a in attempts if a.code is not None)
    assert codes == [1], [(a.code, a.out) for a in attempts]
    served = next(a for a in attempts if a.code is None)
    refused = next(a for a in attempts if a.code == 1)
    assert '"event":"listening"' in served.out
    assert_refused(refused, f"127.0.0.1:{port}")


async def test_a_port_another_program_shares_with_so_reuseport_is_refused(
    tmp_path: Path,
) -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        port = other.getsockname()[1]
        config = tmp_path / "gateway.toml"
        config.write_text(on_port(port))
        attempt = Attempt(config, 2)
        await attempt.run()
    assert_refused(attempt, f"127.0.0.1:{port}")
