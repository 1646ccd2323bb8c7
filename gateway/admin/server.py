"""The admin listener (aiohttp): ``/metrics``, ``/status``, ``/livez``,
``/readyz``.

Loopback only by default and never proxied: it tells the state of the
process, not of the upstreams.  Used by the single-process gateway and by
the supervisor of several workers (which sums the workers' snapshots).
``/status`` is the operator's view as JSON (``status.py``), from the same
snapshot plus samples kept every few seconds for the last minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.admin.exposition import GatewayCollector, build_registry
from gateway.admin.status import SAMPLE_SECONDS, History, status_view
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
        self._collect = collect
        self._gauges = gauges
        self._registry = build_registry(GatewayCollector(collect, gauges))
        self._ready = ready
        self._refresh = refresh
        self._runner: web.AppRunner | None = None
        self._history = History()
        self._sampler: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            if self._refresh is not None:
                await self._refresh()
            body = generate_latest(self._registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def status(request: web.Request) -> web.Response:
            if self._refresh is not None:
                await self._refresh()
            view = status_view(self._collect(), self._gauges(), self._history, time.time())
            return web.Response(
                body=orjson.dumps(view),
                headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
            )

        async def livez(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(request: web.Request) -> web.Response:
            if self._ready():
                return web.Response(text="ready\n")
            return web.Response(status=503, text="not ready\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/status", status)
        app.router.add_get("/livez", livez)
        app.router.add_get("/readyz", readyz)
        return app

    async def _sample(self) -> None:
        """Every few seconds, a snapshot for /status's last-minute figures."""
        while True:
            with contextlib.suppress(Exception):  # a slow worker must not end sampling
                if self._refresh is not None:
                    await self._refresh()
                self._history.add(time.time(), self._collect())
            await asyncio.sleep(SAMPLE_SECONDS)

    async def start(self, host: str, port: int) -> int:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        return int(runner.addresses[0][1])

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
