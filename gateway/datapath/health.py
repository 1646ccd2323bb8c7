"""``GET /health``: proof that a credential works, and optionally that every
upstream accepts connections (``?deep=1``): the principal's own where its
forward table replaces a route's.

The body names the credential, token id, scopes and seconds to expiry, and
for a deep check each route's reachability by route name and each of its
backends' by position in its list: never a secret, never an upstream
address (nor a backend label, which may be one).

A deep check is not a lever on the upstreams: ``UpstreamProbe`` runs one
probe at a time per process, shared by every caller that asks meanwhile,
and reuses its result for ``PROBE_REUSE_SECONDS``, so however fast clients
ask, each upstream sees at most about one connect per second per worker.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable

import orjson

from gateway.policy.auth import Principal
from gateway.policy.routing import Route, Upstream

__all__ = [
    "DEEP_TIMEOUT_SECONDS",
    "PROBE_REUSE_SECONDS",
    "UpstreamProbe",
    "check_upstreams",
    "health_answer",
    "health_response",
    "upstreams_of",
    "wants_deep",
]

# A deep probe answers quickly even when an upstream black-holes SYNs.
DEEP_TIMEOUT_SECONDS = 2.0
# How long a probe's result answers later deep checks.
PROBE_REUSE_SECONDS = 1.0
# (route name, its backends in order), in route order
Probed = tuple[tuple[str, tuple[Upstream, ...]], ...]
# Sets of upstreams remembered at once (one per credential with backends of
# its own, plus the routes'); reloads make new ones, so the table starts over.
_MAX_PROBED_SETS = 256


def wants_deep(query: bytes) -> bool:
    return b"deep=1" in query.split(b"&")


def upstreams_of(principal: Principal, routes: Iterable[Route]) -> Probed:
    """(route name, the backends this principal's requests go to), in order."""
    plans = principal.targets or {}
    out = []
    for route in routes:
        plan = plans.get(route.name, route.plan)
        if plan is not None:
            out.append((route.name, tuple(t.upstream for t in plan.targets)))
    return tuple(out)


async def check_upstreams(upstreams: Probed, timeout: float) -> dict[str, list[bool]]:
    """route name → whether each of its backends accepted a TCP connection."""
    loop = asyncio.get_running_loop()

    async def reachable(up: Upstream) -> bool:
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(asyncio.Protocol, up.host, up.port)
        except (OSError, TimeoutError):
            return False
        transport.close()
        return True

    results = await asyncio.gather(*(reachable(up) for _, ups in upstreams for up in ups))
    out: dict[str, list[bool]] = {}
    at = 0
    for name, ups in upstreams:
        out[name] = list(results[at : at + len(ups)])
        at += len(ups)
    return out


def _route_status(oks: list[bool]) -> str:
    if all(oks):
        return "ok"
    return "degraded" if any(oks) else "unreachable"


class UpstreamProbe:
    """One deep probe in flight per set of upstreams, its result reused for
    ``PROBE_REUSE_SECONDS``.

    A credential with its own backends (``[credentials.forward.upstreams]``)
    probes its own set, so results are kept per set: at most one per
    credential, plus the routes' own.  Callers wait on the probe shielded:
    one that goes away does not cancel it for the others.
    """

    __slots__ = ("_probes",)

    def __init__(self) -> None:
        # set → (loop time of the result, result, the probe running or None)
        self._probes: dict[
            Probed, tuple[float, dict[str, list[bool]], asyncio.Task[dict[str, list[bool]]] | None]
        ] = {}

    async def check(self, upstreams: Probed, timeout: float) -> dict[str, list[bool]]:
        loop = asyncio.get_running_loop()
        at, result, running = self._probes.get(upstreams, (float("-inf"), {}, None))
        if loop.time() - at < PROBE_REUSE_SECONDS:
            return result
        if running is None:
            if len(self._probes) >= _MAX_PROBED_SETS:
                self._probes.clear()  # a reload made new sets: start over
            running = loop.create_task(check_upstreams(upstreams, timeout))
            running.add_done_callback(functools.partial(self._finished, upstreams))
            self._probes[upstreams] = (at, result, running)
        return await asyncio.shield(running)

    def _finished(self, upstreams: Probed, task: asyncio.Task[dict[str, list[bool]]]) -> None:
        # Here, not in a caller: the caller that started it may be gone.
        at, result, _ = self._probes.get(upstreams, (float("-inf"), {}, None))
        if not task.cancelled() and task.exception() is None:
            at, result = task.get_loop().time(), task.result()
        self._probes[upstreams] = (at, result, None)


def health_response(
    principal: Principal, now: float, upstreams: dict[str, list[bool]] | None
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
        # A route is served while one backend is reachable: 503 only when
        # some route has none; "degraded" whenever any backend is down.
        doc["upstreams"] = {name: _route_status(oks) for name, oks in upstreams.items()}
        doc["backends"] = {
            name: ["ok" if ok else "unreachable" for ok in oks] for name, oks in upstreams.items()
        }
        if not all(all(oks) for oks in upstreams.values()):
            doc["status"] = "degraded"
        if not all(any(oks) for oks in upstreams.values()):
            status = 503
    return status, orjson.dumps(doc)


def health_answer(
    principal: Principal,
    now: float,
    upstreams: dict[str, list[bool]] | None,
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
