"""``GET /health``: proof that a credential works, and optionally that every
upstream accepts connections (``?deep=1``): the principal's own where its
forward table replaces a route's.

The body names the credential, token id, scopes and seconds to expiry, and
for a deep check each route's reachability by route name: never a secret,
never an upstream address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import orjson

from gateway.policy.auth import Principal
from gateway.policy.routing import Route, Upstream

__all__ = [
    "DEEP_TIMEOUT_SECONDS",
    "check_upstreams",
    "health_answer",
    "health_response",
    "upstreams_of",
    "wants_deep",
]

# A deep probe answers quickly even when an upstream black-holes SYNs.
DEEP_TIMEOUT_SECONDS = 2.0


def wants_deep(query: bytes) -> bool:
    return b"deep=1" in query.split(b"&")


def upstreams_of(principal: Principal, routes: Iterable[Route]) -> list[tuple[str, Upstream]]:
    """(route name, the upstream this principal's requests go to)."""
    targets = principal.targets or {}
    out = []
    for route in routes:
        if route.upstream is not None:
            target = targets.get(route.name)
            out.append((route.name, target.upstream if target is not None else route.upstream))
    return out


async def check_upstreams(
    upstreams: Iterable[tuple[str, Upstream]], timeout: float
) -> dict[str, bool]:
    """route name → whether its upstream accepted a TCP connection."""
    loop = asyncio.get_running_loop()

    async def reachable(up: Upstream) -> bool:
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(asyncio.Protocol, up.host, up.port)
        except (OSError, TimeoutError):
            return False
        transport.close()
        return True

    listed = list(upstreams)
    results = await asyncio.gather(*(reachable(up) for _, up in listed))
    return {name: ok for (name, _), ok in zip(listed, results, strict=True)}


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
