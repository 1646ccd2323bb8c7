"""The admin listener (aiohttp): ``/metrics``, ``/livez``, ``/readyz``.

Loopback only by default and never proxied: it tells the state of the
process, not of the upstreams.  Used by the single-process gateway and by
the supervisor of several workers (which sums the workers' snapshots).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.admin.exposition import GatewayCollector, build_registry
from gateway.telemetry.snapshot import Gauges, Snapshot

__all__ = ["AdminServer"]


class AdminServer:
    """Renders ``collect()`` (sync, or awaited first via ``refresh``) at scrape."""

    def __init__(
        self,
        collect: Callable[[], Snapshot],
        gauges: Callable[[], Gauges],
        ready: Callable[[], bool],
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._registry = build_registry(GatewayCollector(collect, gauges))
        self._ready = ready
        self._refresh = refresh
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            if self._refresh is not None:
                await self._refresh()
            body = generate_latest(self._registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def livez(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(request: web.Request) -> web.Response:
            if self._ready():
                return web.Response(text="ready\n")
            return web.Response(status=503, text="not ready\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/livez", livez)
        app.router.add_get("/readyz", readyz)
        return app

    async def start(self, host: str, port: int) -> int:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        return int(runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
