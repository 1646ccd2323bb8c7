"""Assembly and lifecycle of one serving process.

``Gateway`` builds the shared state from settings, opens the public
listener (raw uvloop protocols, see ``gateway.datapath``) and the admin listener
(aiohttp: /metrics, /livez, /readyz), runs the sweeper that enforces every
deadline, swaps config generations on reload and drains on shutdown:
stop accepting → /readyz fails → idle keep-alive connections close →
in-flight exchanges finish (new requests on open connections get 503) up
to the drain timeout → everything left is closed → logs flushed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast

from gateway.config.loader import Settings
from gateway.datapath.connection import ClientConnection
from gateway.datapath.probes import Prober
from gateway.datapath.shared import Shared
from gateway.datapath.upstream import Pools
from gateway.policy.balance import BackendRegistry
from gateway.policy.generation import Generation
from gateway.process.gauges import config_gauges, process_sample
from gateway.process.sockets import claim_port, listen_socket, split_hostport
from gateway.telemetry import log
from gateway.telemetry.counters import Stats
from gateway.telemetry.snapshot import Gauges, Snapshot

__all__ = ["Gateway"]

# How often deadlines are checked: fine enough for second-scale timeouts,
# coarse enough that thousands of idle connections cost next to nothing.
_MAX_TICK = 0.25
_MIN_TICK = 0.02


class Gateway:
    """One process's public and admin listeners."""

    def __init__(
        self,
        settings: Settings,
        *,
        admin: bool = True,
        sock: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.admin = admin
        self._sock = sock
        self.shared: Shared | None = None
        self.stats = Stats()
        # What this process knows of each backend's health: kept across reloads.
        self.backends = BackendRegistry()
        self._prober: Prober | None = None
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = self.started_at = time.time()
        self.last_reload_ok = True
        self.last_reload_attempt = 0.0
        self._server: asyncio.Server | None = None
        self._admin: Any = None
        self._ticker: asyncio.Task[None] | None = None
        self._claim: socket.socket | None = None
        self._ready = False
        self.port = 0
        self.admin_port = 0
        self.log: Any = log.get_logger()

    # -- start --------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        access = log.access_logger().bind() if s.log.access else None
        self.shared = shared = Shared(
            loop,
            Generation.build(s, self.backends),
            self.stats,
            Pools(loop, s.upstream.pool_max_idle),
            access,
            self.log,
            backends=self.backends,
        )
        self._prober = Prober(shared)
        # Workers hand in their own SO_REUSEPORT socket (the supervisor holds
        # the claim); a single process binds here, exclusively.
        sock = self._sock
        if sock is None:
            sock = listen_socket(s.server.listen, reuse_port=False)
            try:
                self._claim = claim_port(sock, probe=False)
            except OSError:
                sock.close()
                raise
        # No ssl= on the listener: connections are counted from accept and
        # each one handshakes with the context in force then
        # (datapath/handshake.py).
        shared.tls = s.tls_context
        server = await loop.create_server(
            # A protocol by shape, not by base class (see ClientConnection).
            lambda: cast(asyncio.Protocol, ClientConnection(shared)),
            sock=sock,
            backlog=2048,
        )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._ticker = loop.create_task(self._tick())
        if self.admin:
            await self._start_admin()
        self._ready = True

    async def _start_admin(self) -> None:
        # Imported here: worker processes never load aiohttp or
        # prometheus-client (about 25 MB of resident memory each).
        from gateway.admin.server import AdminServer  # noqa: PLC0415

        admin = AdminServer(self.snapshot, self._gauges, lambda: self._ready)
        self.admin_port = await admin.start(*split_hostport(self.settings.server.admin_listen))
        self._admin = admin

    def snapshot(self) -> Snapshot:
        """This process's counters, with the health of each backend of the
        config in force (what /metrics and the supervisor read)."""
        snap = self.stats.snapshot()
        if self.shared is not None:
            snap.health = self.shared.backend_health()
        return snap

    def _gauges(self) -> Gauges:
        return config_gauges(
            self.settings,
            self.reloads,
            self.last_reload_success,
            1,
            self.last_reload_ok,
            [process_sample(0)],
            last_attempt=self.last_reload_attempt,
            started_at=self.started_at,
        )

    # -- run ----------------------------------------------------------------
    def _tick_interval(self) -> float:
        s, u = self.settings.server, self.settings.upstream
        shortest = min(
            s.header_timeout_seconds,
            s.body_idle_timeout_seconds,
            s.keepalive_timeout_seconds,
            u.response_timeout_seconds,
            u.pool_idle_timeout_seconds,
        )
        return max(_MIN_TICK, min(_MAX_TICK, shortest / 5))

    async def _tick(self) -> None:
        shared = self.shared
        assert shared is not None
        loop = shared.loop
        last_second = 0
        while True:
            await asyncio.sleep(self._tick_interval())
            now = loop.time()
            for conn in list(shared.connections):
                if conn.deadline_kind and now >= conn.deadline:
                    try:
                        conn.on_deadline(now)
                    except Exception as exc:
                        self.log.error("deadline_fault", error=type(exc).__name__, exc_info=exc)
            shared.pools.expire(now)
            if shared.h2pools is not None:
                shared.h2pools.expire(now, self.settings.upstream.pool_idle_timeout_seconds)
            if self._prober is not None:
                self._prober.tick(now)
            second = int(time.time())
            if second != last_second:
                last_second = second
                shared.tick_date()
            log.flush()

    def reload(self, settings: Settings) -> None:
        """Swap in a validated config; exchanges in flight keep theirs."""
        self.commit(settings, self.prepare(settings))

    def prepare(self, settings: Settings) -> Generation:
        """Everything a config needs to be served, built without serving it:
        may raise, and then nothing is served differently (states it made
        for new backends are forgotten by the next commit that lacks them)."""
        return Generation.build(settings, self.backends)

    def commit(self, settings: Settings, gen: Generation) -> None:
        """Serve a prepared config; cannot fail."""
        shared = self.shared
        assert shared is not None
        shared.tls = settings.tls_context  # new handshakes only; open connections keep theirs
        shared.admission.configure(settings.limits, settings.credentials, shared.loop.time())
        shared.install(gen)
        self.settings = settings
        self.reloads["success"] += 1
        self.last_reload_success = self.last_reload_attempt = time.time()
        self.last_reload_ok = True

    def reload_failed(self) -> None:
        self.reloads["failure"] += 1
        self.last_reload_ok = False
        self.last_reload_attempt = time.time()

    # -- stop ---------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> None:
        shared = self.shared
        if shared is None:
            return
        timeout = self.settings.server.drain_timeout_seconds if timeout is None else timeout
        self._ready = False
        shared.draining = True
        if self._server is not None:
            self._server.close()
        loop = shared.loop
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            busy = False
            for conn in list(shared.connections):
                if not conn.busy():
                    conn.close_now()
                else:
                    busy = True
            if not busy:
                break
            await asyncio.sleep(0.05)
        for conn in list(shared.connections):
            conn.abort()
        await asyncio.sleep(0)
        await self.close()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._prober is not None:
            self._prober.close()
        if self._server is not None:
            self._server.close()
        if self.shared is not None:
            self.shared.pools.close()
            if self.shared.h2pools is not None:
                self.shared.h2pools.close()
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        if self._claim is not None:
            self._claim.close()
            self._claim = None
        log.flush()
