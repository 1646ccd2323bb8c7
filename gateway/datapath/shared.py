"""Per-process state shared by every connection: the config generation in
force, counters, admission state, upstream pools, the backends' health
(``BackendRegistry``), the open connections, the deep-health probe, the
clock line and the request-id source.  One instance per process.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Final

from gateway.datapath.health import UpstreamProbe
from gateway.policy.balance import BackendRegistry
from gateway.policy.limits import Admission
from gateway.telemetry.snapshot import HealthSnap

if TYPE_CHECKING:
    import ssl

    from gateway.datapath.h2upstream import H2Pool, H2Pools
    from gateway.datapath.ports import Tracked, UpstreamPools
    from gateway.policy.generation import Generation
    from gateway.policy.routing import Upstream
    from gateway.telemetry.counters import Stats

__all__ = ["Shared"]


_DAYS: Final = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS: Final = (
    b"Jan",
    b"Feb",
    b"Mar",
    b"Apr",
    b"May",
    b"Jun",
    b"Jul",
    b"Aug",
    b"Sep",
    b"Oct",
    b"Nov",
    b"Dec",
)


def http_date(ts: float) -> bytes:
    """IMF-fixdate (RFC 9110 §5.6.7), as email.utils.formatdate(usegmt=True)
    writes it, without loading the email package into every worker."""
    t = time.gmtime(ts)
    return b"%s, %02d %s %d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday],
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


class Shared:
    """Mutable process-wide state; one instance per worker process."""

    __slots__ = (
        "_id_counter",
        "_id_prefix",
        "access",
        "admission",
        "backends",
        "connections",
        "date_line",
        "draining",
        "gen",
        "h2pools",
        "log",
        "loop",
        "pools",
        "probe",
        "stats",
        "tls",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        gen: Generation,
        stats: Stats,
        pools: UpstreamPools,
        access: Any,
        log: Any,
        *,
        tls: ssl.SSLContext | None = None,
        backends: BackendRegistry | None = None,
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.pools = pools
        # The registry ``gen`` was built with (its balancers' states).
        self.backends = backends if backends is not None else BackendRegistry()
        self.gen = gen
        self.install(gen)
        self.h2pools: H2Pools | None = None  # made with the first gRPC call
        self.access = access  # a structlog logger, or None when access logs are off
        self.log = log
        # The server context for new connections (None: plain HTTP); replaced
        # on reload, so each handshake takes the newest config's settings.
        self.tls = tls
        self.draining = False
        self.admission = Admission()
        self.admission.configure(gen.settings.limits, gen.settings.credentials, loop.time())
        self.connections: set[Tracked] = set()
        self.probe = UpstreamProbe()  # deep /health, shared by every caller
        self.date_line = b""
        self.tick_date()
        # Request ids: a random per-process prefix and a counter, unique
        # across workers and restarts without a syscall per request.
        self._id_prefix = os.urandom(6).hex().encode()
        self._id_counter = 0

    def install(self, gen: Generation) -> None:
        """Bind a generation's balancers to this process's pools and
        counters (once, so a request reads them from its lane), and forget
        the health of backends it no longer has.  Then it may serve."""
        stats = self.stats
        balancers = gen.balancers
        for bal in balancers:
            bal.rstats = stats.route(bal.route)
            for lane in bal.lanes:
                lane.pool = self.pools.get(lane.backend.upstream)
                lane.stats = stats.backend(bal.route, lane.backend.label)
        self.backends.keep(balancers)
        self.gen = gen

    def backend_health(self) -> list[HealthSnap]:
        """Each backend of the config in force as this worker sees it now
        (once per route and label: a credential's backends may repeat the
        route's)."""
        now = self.loop.time()
        out: dict[tuple[str, str], HealthSnap] = {}
        for bal in self.gen.balancers:
            for lane in bal.lanes:
                key = (bal.route, lane.backend.label)
                if key in out:
                    continue
                state = lane.state
                out[key] = HealthSnap(
                    bal.route,
                    lane.backend.label,
                    lane.backend.index,
                    int(state.healthy(now)),
                    1,
                    int(state.ejected_until > now),
                    int(not state.probe_ok),
                    state.outstanding,
                    lane.backend.named,
                )
        return list(out.values())

    def h2pool(self, upstream: Upstream) -> H2Pool:
        pools = self.h2pools
        if pools is None:
            # Imported with the first gRPC call: h2 stays unloaded until then.
            from gateway.datapath.h2upstream import H2Pools  # noqa: PLC0415

            pools = self.h2pools = H2Pools(self.loop)
        return pools.get(upstream)

    def tick_date(self) -> None:
        self.date_line = b"Date: " + http_date(time.time()) + b"\r\n"

    def next_request_id(self) -> bytes:
        self._id_counter += 1
        return b"%s-%x" % (self._id_prefix, self._id_counter)
