"""Assembly and lifecycle of one serving process.

``Gateway`` builds the shared state from settings, opens the public
listener (raw uvloop protocols, see ``server.py``) and the admin listener
(aiohttp: /metrics, /livez, /readyz), runs the sweeper that enforces every
deadline, swaps config generations on reload and drains on shutdown:
stop accepting → /readyz fails → idle keep-alive connections close →
in-flight exchanges finish (new requests on open connections get 503) up
to the drain timeout → everything left is closed → logs flushed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__, log
from gateway.config import Settings
from gateway.metrics import GatewayCollector, Snapshot, Stats, build_registry
from gateway.runtime import Generation, Shared
from gateway.server import ClientConnection
from gateway.upstream import Pools

__all__ = ["Gateway", "config_gauges", "make_admin_app", "split_hostport"]

# How often deadlines are checked: fine enough for second-scale timeouts,
# coarse enough that thousands of idle connections cost next to nothing.
_MAX_TICK = 0.25
_MIN_TICK = 0.02


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def config_gauges(
    settings: Settings, reloads: dict[str, int], last_success: float, workers: int = 1
) -> Snapshot:
    """Metric values that come from config rather than traffic."""
    return {
        "tokens": [[c.name, t.id] for c in settings.credentials for t in c.tokens],
        "expiry": [
            [c.name, t.id, t.not_after]
            for c in settings.credentials
            for t in c.tokens
            if t.not_after is not None
        ],
        "reloads": dict(reloads),
        "last_reload_success": last_success,
        "version": __version__,
        "workers": workers,
    }


def make_admin_app(render: Callable[[], Any], ready: Callable[[], bool]) -> web.Application:
    """The admin listener: never exposed publicly (DESIGN §1)."""

    async def metrics(request: web.Request) -> web.Response:
        body = await render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


class Gateway:
    """One process's public and admin listeners."""

    def __init__(
        self,
        settings: Settings,
        *,
        reuse_port: bool = False,
        admin: bool = True,
        sock: Any = None,
    ) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.admin = admin
        self._sock = sock
        self.shared: Shared | None = None
        self.stats = Stats()
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = time.time()
        self._server: asyncio.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
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
            Generation.build(s),
            self.stats,
            Pools(loop, s.upstream.pool_max_idle),
            access,
            self.log,
        )
        if self._sock is not None:
            server = await loop.create_server(
                lambda: ClientConnection(shared), sock=self._sock, backlog=2048
            )
        else:
            host, port = split_hostport(s.server.listen)
            server = await loop.create_server(
                lambda: ClientConnection(shared),
                host,
                port,
                reuse_port=self.reuse_port,
                backlog=2048,
            )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._ticker = loop.create_task(self._tick())
        if self.admin:
            await self._start_admin()
        self._ready = True

    async def _start_admin(self) -> None:
        registry = build_registry(GatewayCollector(self.stats.snapshot, self._gauges))

        async def render() -> bytes:
            return generate_latest(registry)

        runner = web.AppRunner(
            make_admin_app(render, lambda: self._ready),
            access_log=None,
            handle_signals=False,
        )
        await runner.setup()
        host, port = split_hostport(self.settings.server.admin_listen)
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._admin_runner = runner
        self.admin_port = runner.addresses[0][1]

    def _gauges(self) -> Snapshot:
        return config_gauges(self.settings, self.reloads, self.last_reload_success)

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
            second = int(time.time())
            if second != last_second:
                last_second = second
                shared.tick_date()
            log.flush()

    def reload(self, settings: Settings) -> None:
        """Swap in a validated config; exchanges in flight keep theirs."""
        assert self.shared is not None
        self.shared.gen = Generation.build(settings)
        self.settings = settings
        self.reloads["success"] += 1
        self.last_reload_success = time.time()

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
                if conn.active is None:
                    conn.close_now()
                else:
                    busy = True
            if not busy:
                break
            await asyncio.sleep(0.05)
        for conn in list(shared.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        await self.close()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._server is not None:
            self._server.close()
        if self.shared is not None:
            self.shared.pools.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        log.flush()
