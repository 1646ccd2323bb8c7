"""Accounting: the metrics and the one access-log line of a finished request.

Called exactly once per request, after its response ended or its client
went away.  Everything logged is a name from config (routes, credentials,
backend labels), a number, a fixed word, the client address or the request
path (truncated; never the query string): never a header value, so never
a token.  ``tenant`` is the labels and headers the credential forwarded
with, as the config writes them (a claim's value stays ``{claim:…}``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.datapath.ports import Finished
    from gateway.datapath.shared import Shared

__all__ = ["account", "record_rejected"]

_perf: Final = time.perf_counter
# Logged paths are cut here: a path is client input, and one line per
# request must stay small whatever a client sends.
MAX_LOGGED_PATH: Final = 200


def account(shared: Shared, ex: Finished, grpc_status: str | None = None) -> None:
    """``grpc_status``: a gRPC call's outcome (its trailers'), for the access line."""
    duration = _perf() - ex.head.t0
    stats = shared.stats
    rstats = ex.rstats
    if rstats is None:
        rstats = stats.route(ex.route_name)
    rstats.duration.observe(duration)
    if ex.upstream_seconds >= 0:
        rstats.upstream.observe(ex.upstream_seconds)
        # Never negative: the upstream's time lies within the exchange's.
        rstats.added.observe(duration - ex.upstream_seconds)
    rstats.response_bytes += ex.bytes_out
    # A refused token's credential is named in the log line, not here: a
    # request counts under a credential only once it authenticated.
    pair = stats.pair(ex.route_name, ex.credential if ex.principal is not None else "none")
    pair.codes[ex.status] = pair.codes.get(ex.status, 0) + 1
    pair.request_bytes += ex.body_in
    if ex.principal is not None:
        tstats = stats.token(ex.credential, ex.token_id)
        tstats.last_used = time.time()
        tstats.requests += 1
        tstats.request_bytes += ex.body_in
    access = shared.access
    if access is not None:
        head = ex.head
        label = ex.label
        target = ex.target
        access.info(
            "request",
            request_id=head.request_id.decode("ascii", "replace"),
            method=head.method.decode("latin-1"),
            http=head.version,
            # The raw bytes (latin-1: one character each, nothing decoded or
            # normalised), which the JSON renderer escapes.
            path=head.path[:MAX_LOGGED_PATH].decode("latin-1"),
            route=ex.route_name,
            credential=ex.credential,
            token_id=ex.token_id or None,
            status=ex.status,
            bytes_in=ex.body_in,
            bytes_out=ex.bytes_out,
            duration_ms=round(duration * 1000, 3),
            upstream_ms=round(ex.upstream_seconds * 1000, 3) if ex.upstream_seconds >= 0 else None,
            # The backends tried, in order, and why each but the last was left.
            backends=ex.history or ([label] if label else None),
            retried=ex.retried,
            client=ex.client,
            error=ex.error or None,
            grpc_status=grpc_status,
            tenant=target.tenant if target is not None else None,
        )


def record_rejected(shared: Shared, status: int, error: str, peer: str, t0: float) -> None:
    """Account a request refused before its head was complete (414, 431, 400)."""
    duration = _perf() - t0 if t0 else 0.0
    stats = shared.stats
    stats.route("unmatched").duration.observe(duration)
    pair = stats.pair("unmatched", "none")
    pair.codes[status] = pair.codes.get(status, 0) + 1
    if shared.access is not None:
        shared.access.info(
            "request",
            route="unmatched",
            credential="none",
            status=status,
            duration_ms=round(duration * 1000, 3),
            client=peer,
            error=error,
        )
