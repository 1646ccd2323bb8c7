"""Active health checks: each worker probes the backends of every route
that has a ``health_check``, off the data path.

The process's sweeper calls ``Prober.tick`` a few times a second; a
backend whose probe is due gets one task: a new TCP (or TLS) connection,
``GET <path>`` with ``Connection: close``, and a 2xx status line within
the probe's timeout is a pass; anything else (refused, reset, timeout,
another status, garbage) a failure.  ``Balancer.probed`` turns results
into transitions, which are counted and logged here.  A probe never
touches a pooled connection, so the pools see only real traffic.

Must not know: exchanges, clients, the config file.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from gateway.policy.balance import Transition

if TYPE_CHECKING:
    from gateway.datapath.shared import Shared
    from gateway.policy.backends import Probe, Upstream
    from gateway.policy.balance import Balancer, Lane

__all__ = ["Prober", "probe_once"]

# Enough for any status line; a longer one is not an HTTP answer.
_STATUS_LINE_MAX = 4096


async def probe_once(
    up: Upstream, path: bytes, timeout: float, tls: ssl.SSLContext | None = None
) -> bool:
    """Whether the backend answers ``GET path`` with a 2xx within ``timeout``."""
    request = b"".join(
        (
            b"GET ",
            path,
            b" HTTP/1.1\r\nHost: ",
            up.host_header,
            b"\r\nUser-Agent: obs-gateway-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        )
    )
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                up.host,
                up.port,
                ssl=tls,
                server_hostname=up.host if tls is not None else None,
                limit=_STATUS_LINE_MAX,
            )
            writer.write(request)
            line = await reader.readline()
    except Exception:  # noqa: BLE001  (whatever went wrong, the probe failed)
        return False
    finally:
        if writer is not None:
            writer.transport.abort()  # nothing more to read; no lingering socket
    parts = line.split(b" ", 2)
    return (
        len(parts) >= 2
        and parts[0].startswith(b"HTTP/1.")
        and len(parts[1]) == 3
        and parts[1].startswith(b"2")
        and parts[1].isdigit()
    )


class Prober:
    """Runs the due probes of the generation in force, one at a time per backend."""

    __slots__ = ("_tasks", "_tls", "shared")

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls: ssl.SSLContext | None = None

    def tick(self, now: float) -> None:
        for bal in self.shared.gen.balancers:
            probe = bal.set.probe
            if probe is None:
                continue
            for lane in bal.lanes:
                state = lane.state
                if state.probing or now < state.probe_due:
                    continue
                state.probing = True
                state.probe_due = now + probe.interval
                task = self.shared.loop.create_task(self._probe(bal, lane, probe))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _probe(self, bal: Balancer, lane: Lane, probe: Probe) -> None:
        up = lane.backend.upstream
        tls = None
        if up.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            ok = await probe_once(up, probe.path, probe.timeout, tls)
        finally:
            lane.state.probing = False
        if lane.state.probe != probe:
            return  # a reload changed or dropped the check meanwhile: not its verdict
        stats = lane.stats
        stats.add(stats.probes, "ok" if ok else "failed")
        transition = bal.probed(lane.state, ok, self.shared.loop.time())
        if transition is None:
            return
        log: Any = self.shared.log
        if transition == Transition.PROBE_DOWN:
            stats.add(stats.ejections, "probe")
            log.warning("backend_down", route=bal.route, backend=lane.backend.label)
        else:
            log.info("backend_up", route=bal.route, backend=lane.backend.label)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
