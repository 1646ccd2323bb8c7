"""``GET /health``: proof that a credential works, and optionally that every
upstream accepts connections (``?deep=1``).

The body names the credential, token id, scopes and seconds to expiry, and
for a deep check each route's reachability by route name: never a secret,
never an upstream address.

A deep check is not a lever on the upstreams: ``UpstreamProbe`` runs one
probe at a time per process, shared by every caller that asks meanwhile,
and reuses its result for ``PROBE_REUSE_SECONDS``, so however fast clients
ask, each upstream sees at most about one connect per second per worker.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

import orjson

from gateway.policy.auth import Principal
from gateway.policy.routing import Route

__all__ = [
    "DEEP_TIMEOUT_SECONDS",
    "PROBE_REUSE_SECONDS",
    "UpstreamProbe",
    "check_upstreams",
    "health_answer",
    "health_response",
    "wants_deep",
]

# A deep probe answers quickly even when an upstream black-holes SYNs.
DEEP_TIMEOUT_SECONDS = 2.0
# How long a probe's result answers later deep checks.
PROBE_REUSE_SECONDS = 1.0


def wants_deep(query: bytes) -> bool:
    return b"deep=1" in query.split(b"&")


async def check_upstreams(routes: Sequence[Route], timeout: float) -> dict[str, bool]:
    """route name → whether its upstream accepted a TCP connection."""
    loop = asyncio.get_running_loop()

    async def reachable(route: Route) -> bool:
        up = route.upstream
        assert up is not None
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(asyncio.Protocol, up.host, up.port)
        except (OSError, TimeoutError):
            return False
        transport.close()
        return True

    proxied = [r for r in routes if r.upstream is not None]
    results = await asyncio.gather(*(reachable(r) for r in proxied))
    return {r.name: ok for r, ok in zip(proxied, results, strict=True)}


class UpstreamProbe:
    """One deep probe in flight per process, its result reused for a while.

    Keyed by the route table (a reload brings a new one, probed afresh).
    Callers wait on the probe shielded: one that goes away does not cancel
    it for the others.
    """

    __slots__ = ("_at", "_result", "_routes", "_running")

    def __init__(self) -> None:
        self._routes: Sequence[Route] | None = None
        self._result: dict[str, bool] = {}
        self._at = float("-inf")
        self._running: asyncio.Task[dict[str, bool]] | None = None

    async def check(self, routes: Sequence[Route], timeout: float) -> dict[str, bool]:
        loop = asyncio.get_running_loop()
        if routes is self._routes:
            if loop.time() - self._at < PROBE_REUSE_SECONDS:
                return self._result
            if self._running is not None:
                return await asyncio.shield(self._running)
        self._routes = routes
        self._at = float("-inf")
        task = self._running = loop.create_task(check_upstreams(routes, timeout))
        task.add_done_callback(functools.partial(self._finished, routes))
        return await asyncio.shield(task)

    def _finished(self, routes: Sequence[Route], task: asyncio.Task[dict[str, bool]]) -> None:
        # Here, not in a caller: the caller that started it may be gone.
        if self._running is task:
            self._running = None
        if task.cancelled() or task.exception() is not None:
            return
        if routes is self._routes:
            self._result, self._at = task.result(), task.get_loop().time()


def health_response(
    principal: Principal, now: float, upstreams: dict[str, bool] | None
) -> tuple[int, bytes]:
    expires_in = None
    if principal.not_after is not None:
        expires_in = max(0, int(principal.not_after - now))
    doc: dict[str, object] = {
        "status": "ok",
        "credential": principal.credential,
        "token_id": principal.token_id,
        "routes": sorted(principal.routes),
        "expires_in_seconds": expires_in,
    }
    status = 200
    if upstreams is not None:
        doc["upstreams"] = {name: "ok" if ok else "unreachable" for name, ok in upstreams.items()}
        if not all(upstreams.values()):
            doc["status"] = "degraded"
            status = 503
    return status, orjson.dumps(doc)


def health_answer(
    principal: Principal,
    now: float,
    upstreams: dict[str, bool] | None,
    date_line: bytes,
    close: bool,
    head_only: bool,
) -> tuple[int, bytes, int]:
    """(status, the whole HTTP/1.1 response, body bytes sent)."""
    status, body = health_response(principal, now, upstreams)
    reason = b"OK" if status == 200 else b"Service Unavailable"
    sent = b"" if head_only else body
    out = b"".join(
        (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n" % (status, reason),
            b"Cache-Control: no-store\r\nContent-Length: %d\r\n" % len(body),
            date_line,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            sent,
        )
    )
    return status, out, len(sent)
