"""Workers forked from the supervisor (gateway/process/fork.py): they share
its memory, hold none of its descriptors, and stay apart from its signals.

Black box over the real CLI: memory and descriptors from /proc, signals
with os.kill, answers over loopback sockets.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.conftest import config_text, wait_for
from tests.support.client import raw_request
from tests.support.process import GatewayProcess
from tests.support.wire import request_bytes

# A worker started by exec shares no anonymous memory with the supervisor
# (a few KiB at most); forked after the imports it shares megabytes.
MIN_SHARED_ANON_KIB = 4 * 1024


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _sockets(pid: int) -> dict[int, str]:
    """Descriptor → socket inode ("socket:[123]") of a process."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out[int(fd)] = target
    return out


async def _serves(port: int) -> bool:
    resp = await raw_request(port, request_bytes("GET", "/health"))
    return resp.status == 200


async def _start(tmp_path: Path) -> GatewayProcess:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text())
    gw = GatewayProcess(config, ("--workers", "2"))
    await gw.start()
    await wait_for(lambda: len(gw.pids()) == 3, timeout=10)
    return gw


async def test_workers_share_the_supervisors_memory(tmp_path: Path) -> None:
    gw = await _start(tmp_path)
    try:
        # Same command line as the supervisor; named by index.
        names = {_comm(pid) for pid in gw.pids()[1:]}
        assert names == {"obsgw-worker-0", "obsgw-worker-1"}
        for pid in gw.pids()[1:]:
            rollup = _rollup(pid)
            # Anonymous pages mapped by more than this process: the heap it
            # was forked with, not yet written.
            shared_anon = rollup["Anonymous"] - rollup["Private_Dirty"]
            assert shared_anon > MIN_SHARED_ANON_KIB, rollup
            assert rollup["Pss"] < rollup["Rss"] * 0.75, rollup
    finally:
        await gw.stop()


async def test_a_worker_holds_no_socket_of_the_supervisor(tmp_path: Path) -> None:
    gw = await _start(tmp_path)
    try:
        supervisor, *workers = gw.pids()
        held = _sockets(supervisor)
        # The test reads the gateway's output through socketpairs: stdio
        # (and the logger's copy of it) is meant to be shared.
        stdio = {held.get(fd) for fd in (0, 1, 2)}
        theirs = set(held.values()) - stdio
        for pid in workers:
            # The supervisor's listeners, its ends of the control channels
            # and its event loop's sockets: none of them (the two ends of a
            # socketpair are different inodes, so the worker's own end is
            # not among them).
            assert set(_sockets(pid).values()) & theirs == set()
    finally:
        await gw.stop()


async def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    gw = await _start(tmp_path)
    try:
        supervisor, *workers = gw.pids()
        os.kill(supervisor, signal.SIGKILL)
        await gw.proc.wait()

        def gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() for pid in workers)

        # Each worker sees its channel close (no other process holds the
        # supervisor's end) and drains: idle, it exits at once.
        await wait_for(gone, timeout=15)
    finally:
        await gw.stop()


async def test_sigterm_to_a_worker_stops_only_that_worker(tmp_path: Path) -> None:
    gw = await _start(tmp_path)
    try:
        _, victim, other = gw.pids()
        os.kill(victim, signal.SIGTERM)

        def replaced() -> bool:
            now = gw.pids()[1:]
            return len(now) == 2 and victim not in now

        await wait_for(replaced, timeout=15)
        [exited] = gw.find("worker_exited")
        assert exited["code"] == 0  # it drained and exited cleanly
        assert gw.proc.returncode is None
        assert not gw.find("draining")  # the supervisor did not take it as its own
        assert other in gw.pids()
        for _ in range(6):  # new connections reach both workers
            assert await _serves(gw.port)
        await asyncio.sleep(0)
    finally:
        await gw.stop()
