"""Decide: what the gateway does with one authenticated-or-not request head.

The exchange finds the route, resolves the client address and
authenticates (a malformed head skips those: it is refused unattributed);
``decide`` then applies the rules in this order (DESIGN §3) and returns a
value:

    malformed head (400) → global allow/deny (403) → authentication (not
    checked, strict throttle: OVERLOADED; a failure from a throttled
    address: OVERLOADED; else 401) → client certificate (401) →
    credential CIDRs (403) → route known (404) → method (405) → /health →
    scope (403) → tenant claims (403) → draining (503) → framing (400) →
    declared body size (413) → request rate → byte rate (429/503) → proxy

The auth throttle counts failures per address.  By default it only turns a
throttled address's failures into OVERLOADED (checked after the token, so
senders sharing the address keep working).  In strict mode
(``[limits] auth_throttle_mode``) the exchange does not authenticate a
throttled address at all and passes ``UNCHECKED``, refused here first
among the failures.

Unauthenticated callers learn nothing about routes: the credential is
checked before the path means anything.  The only state it touches is the
admission state it is given (token buckets, the failure throttle); every
``Refuse`` is built once at import, so deciding allocates nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gateway.policy.auth import Failure, Principal
from gateway.policy.errors import Kind
from gateway.policy.routing import HEALTH

if TYPE_CHECKING:
    from gateway.policy.generation import Generation
    from gateway.policy.limits import Admission
    from gateway.policy.request import RequestHead
    from gateway.policy.routing import Route

__all__ = [
    "HEALTH_CHECK",
    "MALFORMED",
    "PROXY",
    "UNCHECKED",
    "Decision",
    "HealthCheck",
    "Proxy",
    "Refuse",
    "attribution",
    "decide",
    "identify",
]


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer ``kind`` without proxying.

    ``error`` is the access line's word ("" for a plain 404/405), ``limit``
    a ``gateway_limit_rejections_total`` reason to count, ``auth`` a
    ``gateway_auth_failures_total`` reason to count under the presented
    credential, ``allow`` adds the route's ``Allow`` header, ``close`` ends
    the connection after the answer; ``anonymous`` refusals come before
    authentication, so the request is not attributed to any credential;
    ``otlp`` answers in OTLP's encoding although no route says so.
    """

    kind: Kind
    error: str = ""
    limit: str = ""
    auth: str = ""
    allow: bool = False
    close: bool = False
    anonymous: bool = False
    otlp: bool = False


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Answer ``/health`` for the authenticated principal."""

    anonymous: bool = False


@dataclass(frozen=True, slots=True)
class Proxy:
    """Admit the request to its route's upstream."""

    anonymous: bool = False


Decision = Refuse | HealthCheck | Proxy

HEALTH_CHECK: Final = HealthCheck()
PROXY: Final = Proxy()
MALFORMED: Final = Refuse(Kind.BAD_REQUEST, "bad_request", close=True, anonymous=True)
CLIENT_DENIED: Final = Refuse(
    Kind.FORBIDDEN, "client_denied", limit="client_denied", anonymous=True
)
CIDR_DENIED: Final = Refuse(Kind.FORBIDDEN, "client_denied", limit="client_denied")
# Strict mode: refused before authentication, so no credential and no
# auth-failure reason; the access line's error is this word.
AUTH_THROTTLED: Final = Refuse(
    Kind.OVERLOADED, "auth_throttled", limit="auth_throttle", anonymous=True
)
# What the exchange passes for ``who`` when the strict throttle made it
# skip authentication (``Generation.throttle_strict``).
UNCHECKED: Final = Failure("unchecked")
NOT_FOUND: Final = Refuse(Kind.NOT_FOUND)
# An OTLP exporter on a signal that has no route (/v1/metrics, /v1/logs)
# reads a google.rpc.Status in its own encoding.
NOT_FOUND_OTLP: Final = Refuse(Kind.NOT_FOUND, otlp=True)
METHOD: Final = Refuse(Kind.METHOD, allow=True)
SCOPE: Final = Refuse(Kind.SCOPE, "scope", auth="scope")
# A JWT whose claim a forward value needs is missing it, or its value is
# not allowed (tenancy.py): its data would land nowhere it may go.
CLAIM_MISSING: Final = Refuse(Kind.TENANT, "claim_missing", auth="claim_missing")
CLAIM_INVALID: Final = Refuse(Kind.TENANT, "claim_invalid", auth="claim_invalid")
DRAINING: Final = Refuse(Kind.DRAINING, "draining")
BAD_FRAMING: Final = Refuse(Kind.BAD_REQUEST, "bad_framing")
TOO_LARGE: Final = Refuse(Kind.TOO_LARGE, "body_too_large")
RATE: Final = Refuse(Kind.OVERLOADED, "rate_limited", limit="rate")
BYTE_RATE: Final = Refuse(Kind.OVERLOADED, "byte_rate_limited", limit="byte_rate")

_AUTH_REASONS: Final = (
    "missing",
    "malformed",
    "unknown",
    "revoked",
    "expired",
    "not_yet_valid",
    "jwt_invalid",
    "client_cert",
)


def _auth_refusals(reason: str) -> tuple[Refuse, Refuse, Refuse]:
    """(no Authorization header, a bad one, throttled) for one failure reason.

    Throttled failures are still counted with their reason: revoked /
    expired / not yet valid name the token id, so the operator learns which
    sender still holds an old secret, however often it retries.
    """
    error = "auth_" + reason
    return (
        Refuse(Kind.AUTH_MISSING, error, auth=reason),
        Refuse(Kind.AUTH_INVALID, error, auth=reason),
        Refuse(Kind.OVERLOADED, error, limit="auth_throttle", auth=reason),
    )


_AUTH: Final = {reason: _auth_refusals(reason) for reason in _AUTH_REASONS}


def _auth_failed(
    reason: str, head: RequestHead, client: str, admission: Admission, now: float
) -> Refuse:
    missing, invalid, throttled = _AUTH.get(reason) or _auth_refusals(reason)
    throttle = admission.throttle
    if throttle.limit and throttle.blocked(client, now):
        # Checked after the token (~1 µs): senders sharing an address
        # (Cloudflare, a NAT, a load balancer) keep working while one of
        # them presents a bad token; only the failures get 429/503.
        return throttled
    throttle.failed(client, now)
    return missing if head.authorization is None else invalid


# One branch per rule, in the docstring's order: the order is the contract,
# and it reads top to bottom.
def decide(  # noqa: PLR0912
    head: RequestHead,
    route: Route | None,
    client: str,
    who: Principal | Failure,
    cert_subject: str,
    gen: Generation,
    admission: Admission,
    now: float,
    draining: bool,
) -> Decision:
    """``now`` is the event loop's clock (token buckets, the throttle window)."""
    if head.malformed:
        return MALFORMED
    policy = gen.clients
    if policy.filtering and not policy.permitted(client):
        return CLIENT_DENIED
    if isinstance(who, Failure):
        if who is UNCHECKED:
            return AUTH_THROTTLED
        return _auth_failed(who.reason, head, client, admission, now)
    rules = gen.credentials[who.credential]
    if rules.subjects and cert_subject not in rules.subjects:
        return _auth_failed("client_cert", head, client, admission, now)
    if rules.networks and not rules.permits(client):
        return CIDR_DENIED
    if route is None:
        return NOT_FOUND_OTLP if head.otlp_encoded else NOT_FOUND
    if head.method not in route.methods:
        return METHOD
    if route is HEALTH:
        return HEALTH_CHECK
    if route.name not in who.routes:
        return SCOPE
    refused = who.refused
    if refused is not None and route.name in refused:
        return CLAIM_MISSING if refused[route.name] == "claim_missing" else CLAIM_INVALID
    if draining:
        return DRAINING
    if head.bad_framing:
        return BAD_FRAMING
    if head.content_length is not None and head.content_length > route.max_body_bytes:
        return TOO_LARGE
    requests = admission.request_rate.get(who.credential)
    if requests is not None and not requests.take(1.0, now):
        return RATE
    body_bytes = admission.byte_rate.get(who.credential)
    if body_bytes is not None and not body_bytes.positive(now):
        return BYTE_RATE
    return PROXY


def identify(
    head: RequestHead, client: str, gen: Generation, admission: Admission, now: float
) -> Principal | Failure:
    """Who presents the request: its token checked, unless the strict auth
    throttle refuses the address first (``UNCHECKED``: a JWT verify costs
    tens of microseconds, and ``decide`` says where that refusal ranks)."""
    if gen.throttle_strict and admission.throttle.blocked(client, now):
        return UNCHECKED
    return gen.auth.authenticate(head.authorization, time.time())


def attribution(who: Principal | Failure) -> tuple[Principal | None, str, str]:
    """(principal, credential, token id) of a request not refused before
    authentication.  A revoked or expired token's access line names its
    credential and token id, as the metric does: the operator hunting a
    forgotten sender reads the log first.  Counters still count it as
    unauthenticated: they key on the principal, None here."""
    if isinstance(who, Failure):
        return None, who.credential or "none", who.token_id
    return who, who.credential, who.token_id
