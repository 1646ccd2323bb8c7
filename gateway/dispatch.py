"""Dispatch: the decision sequence for one request head (DESIGN §3 order).

    malformed head → client address (trusted proxies) → global allow/deny →
    authenticate (a failure from a throttled address: 429/503, else 401) →
    credential conditions (client certificate, CIDRs) → route → method →
    /health → scope → draining → framing → body size → rate limits →
    concurrency (short queue) → proxy

Each refusal is one ``Kind`` answered by the exchange; the status per
protocol comes from ``errors.py``.  Unauthenticated callers learn nothing
about routes: the credential is checked before the path means anything.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.auth import Failure
from gateway.errors import Kind
from gateway.routing import HEALTH

if TYPE_CHECKING:
    from gateway.proxy import Exchange
    from gateway.request import RequestHead
    from gateway.runtime import Generation

__all__ = ["dispatch"]


def dispatch(ex: Exchange, gen: Generation, head: RequestHead) -> None:
    shared = ex.shared
    stats = shared.stats
    if head.malformed:
        ex.close = True
        ex.refuse(Kind.BAD_REQUEST, "bad_request")
        return
    route = gen.routes.get(head.path)
    if route is not None:
        ex.route = route
        ex.route_name = route.name
        ex.protocol = route.protocol
    policy = gen.clients
    client = ex.client
    if policy.proxied:
        client = ex.client = policy.resolve(ex.conn.peer, head.client_ip)
    if policy.filtering and not policy.permitted(client):
        stats.limit_rejection("client_denied")
        ex.refuse(Kind.FORBIDDEN, "client_denied")
        return
    admission = shared.admission
    mono = shared.loop.time()
    principal = gen.auth.authenticate(head.authorization, time.time())
    if isinstance(principal, Failure):
        _auth_failed(ex, principal, head, mono)
        return
    ex.principal = principal
    ex.credential = principal.credential
    ex.token_id = principal.token_id
    cred = gen.credentials[principal.credential]
    if cred.subjects and ex.conn.cert_subject not in cred.subjects:
        _auth_failed(
            ex, Failure("client_cert", principal.credential, principal.token_id), head, mono
        )
        return
    if cred.networks and not cred.permits(client):
        stats.limit_rejection("client_denied")
        ex.refuse(Kind.FORBIDDEN, "client_denied")
        return
    if route is None:
        ex.answer(Kind.NOT_FOUND)
        return
    if head.method not in route.methods:
        ex.answer(Kind.METHOD, route.allow_line)
        return
    if route is HEALTH:
        ex.health(principal)
        return
    if route.name not in principal.routes:
        stats.auth_failure("scope", principal.credential, principal.token_id)
        ex.refuse(Kind.SCOPE, "scope")
        return
    if shared.draining:
        ex.refuse(Kind.DRAINING, "draining")
        return
    if head.bad_framing:
        ex.refuse(Kind.BAD_REQUEST, "bad_framing")
        return
    if head.content_length is not None and head.content_length > route.max_body_bytes:
        ex.refuse(Kind.TOO_LARGE, "body_too_large")
        return
    requests = admission.request_rate.get(principal.credential)
    if requests is not None and not requests.take(1.0, mono):
        stats.limit_rejection("rate")
        ex.refuse(Kind.OVERLOADED, "rate_limited")
        return
    body_bytes = admission.byte_rate.get(principal.credential)
    if body_bytes is not None and not body_bytes.positive(mono):
        stats.limit_rejection("byte_rate")
        ex.refuse(Kind.OVERLOADED, "byte_rate_limited")
        return
    ex.admit(route)


def _auth_failed(ex: Exchange, failure: Failure, head: RequestHead, mono: float) -> None:
    stats = ex.shared.stats
    # Counted with its reason even when throttled: revoked / expired / not
    # yet valid name the token id, so the operator learns which sender still
    # holds an old secret, however often it retries.
    stats.auth_failure(failure.reason, failure.credential, failure.token_id)
    # The access line names the token the config knows (revoked, expired,
    # ...) as the metric does: the operator hunting a forgotten sender reads
    # the log first.  Request counters still count it as unauthenticated.
    ex.credential = failure.credential or "none"
    ex.token_id = failure.token_id
    throttle = ex.shared.admission.throttle
    if throttle.limit and throttle.blocked(ex.client, mono):
        # Checked after the token (~1 µs): senders sharing an address
        # (Cloudflare, a NAT, a load balancer) keep working while one of
        # them presents a bad token; only the failures get 429/503.
        stats.limit_rejection("auth_throttle")
        ex.refuse(Kind.OVERLOADED, "auth_" + failure.reason)
        return
    throttle.failed(ex.client, mono)
    kind = Kind.AUTH_MISSING if head.authorization is None else Kind.AUTH_INVALID
    ex.refuse(kind, "auth_" + failure.reason)
