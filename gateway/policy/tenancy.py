"""Tenancy: the ``Plan`` each route of a credential sends upstream with,
built from its ``[credentials.forward]`` table: the route's backends or
the credential's own (``forward.upstreams``, a ``BackendSet`` under the
route's balance, failover and health check, whose states the worker's
registry shares with the route's wherever a URL is the same), and on each
the pinned labels and headers.

Values from config are rendered once per generation (``Tenancy.static``);
values a JWT claim supplies are rendered once per verified token (the
authenticator caches the principal that carries them) and, for tokens that
share their claim values, once per set of values.  A claim value is used
only if it is visible ASCII, at most 128 characters, and matches the
credential's ``claim_pattern``; otherwise, or when it is missing, the
routes that need it are refused for that token (``decide``: 403).  A claim
value is never a metric label and never logged: the access line names the
values from config, and a claim by its ``{claim:…}`` template.

Must not know: sockets, metrics, the secrets of a credential.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.config.forward import CLAIM_VALUE, Part, parse_template
from gateway.policy.backends import backend_set
from gateway.policy.errors import Protocol
from gateway.policy.forward import PinnedHeaders, label_arg
from gateway.policy.routing import Plan, Route, make_plan

if TYPE_CHECKING:
    from gateway.config.credentials import Credential
    from gateway.config.forward import ForwardSpec
    from gateway.config.routes import RouteSpec
    from gateway.config.schema import UpstreamSpec
    from gateway.policy.balance import BackendRegistry, Balancer
    from gateway.policy.routing import RouteTable

__all__ = ["CLAIM_INVALID", "CLAIM_MISSING", "Tenancy"]

CLAIM_MISSING = "claim_missing"
CLAIM_INVALID = "claim_invalid"
# Claim-value sets remembered per credential; beyond, the memo starts over.
_MEMO_SIZE = 4096

Template = tuple[Part, ...]
Refused = Mapping[str, str]


class _RoutePlan:
    """One route of a credential: where it goes and what it pins."""

    __slots__ = ("balancer", "claims", "headers", "keep_query", "labels", "own")

    def __init__(self, route: Route, fwd: ForwardSpec, balancer: Balancer, own: bool) -> None:
        self.balancer = balancer
        # Backends of the credential's own, used by the HTTP/1.1 data path
        # (a gRPC route's go to the HTTP/2 upstream).
        self.own = own and route.protocol is not Protocol.GRPC
        self.keep_query = route.keep_query
        self.labels: list[tuple[str, Template]] = []
        if route.protocol is Protocol.REMOTE_WRITE:
            self.labels = [(n, parse_template(v)) for n, v in fwd.extra_labels.items()]
        self.headers = [(n, parse_template(v)) for n, v in fwd.headers.items()]
        self.claims = frozenset(
            p.text for _, t in (*self.labels, *self.headers) for p in t if p.claim
        )

    def plan(self, claims: Mapping[str, str]) -> Plan:
        def value(template: Template) -> str:
            return "".join(claims[p.text] if p.claim else p.text for p in template)

        def shown(template: Template) -> str:
            return "".join("{claim:" + p.text + "}" if p.claim else p.text for p in template)

        labels = b"&".join(label_arg(n, value(t)) for n, t in self.labels)
        pinned = PinnedHeaders([(n, value(t)) for n, t in self.headers]) if self.headers else None
        tenant = {
            "labels": {n: shown(t) for n, t in self.labels},
            "headers": {n: shown(t) for n, t in self.headers},
        }
        shown_tenant = {k: v for k, v in tenant.items() if v} or None
        return make_plan(self.balancer, self.keep_query, labels, pinned, shown_tenant)


class Tenancy:
    """The forwarding of one credential, for one config generation."""

    __slots__ = ("_memo", "_pattern", "_plans", "claims", "static")

    def __init__(
        self,
        cred: Credential,
        routes: RouteTable,
        specs: Mapping[str, RouteSpec],
        upstream: UpstreamSpec,
        registry: BackendRegistry,
    ) -> None:
        fwd = cred.forward
        assert fwd is not None
        self._pattern = re.compile(fwd.claim_pattern)
        self._plans: dict[str, _RoutePlan] = {}
        for r in routes.routes:
            if r.name not in cred.routes or r.plan is None:
                continue
            entries = fwd.backends(r.name)
            if entries is None:
                balancer = r.plan.balancer
            else:
                bset = backend_set(entries, specs[r.name], upstream)
                balancer = registry.balancer(r.name, bset)
            self._plans[r.name] = _RoutePlan(r, fwd, balancer, entries is not None)
        self.claims = frozenset(c for p in self._plans.values() for c in p.claims)
        # Routes whose target needs no claim; the others wait for a token.
        self.static: dict[str, Plan] = {
            name: plan.plan({}) for name, plan in self._plans.items() if not plan.claims
        }
        self._memo: dict[tuple[str, ...], tuple[dict[str, Plan], Refused | None]] = {}

    @property
    def balancers(self) -> list[Balancer]:
        """The balancers over this credential's own backends (HTTP/1.1 routes)."""
        return [p.balancer for p in self._plans.values() if p.own]

    def for_claims(self, claims: Mapping[str, Any]) -> tuple[dict[str, Plan], Refused | None]:
        """The targets of a verified token with these claims, and the routes
        it is refused on (route → CLAIM_MISSING / CLAIM_INVALID), if any."""
        names = sorted(self.claims)
        values: dict[str, str] = {}
        bad: dict[str, str] = {}
        for name in names:
            raw = claims.get(name)
            checked = None if raw is None else self._valid(raw)
            if checked is None:
                bad[name] = CLAIM_MISSING if raw is None else CLAIM_INVALID
            else:
                values[name] = checked
        key = tuple(values.get(n, "\x00" + bad.get(n, "")) for n in names)
        memo = self._memo.get(key)
        if memo is not None:
            return memo
        targets = dict(self.static)
        refused: dict[str, str] = {}
        for route, plan in self._plans.items():
            if not plan.claims:
                continue
            missing = [bad[c] for c in sorted(plan.claims) if c in bad]
            if missing:
                refused[route] = CLAIM_MISSING if CLAIM_MISSING in missing else CLAIM_INVALID
            else:
                targets[route] = plan.plan(values)
        result = (targets, refused or None)
        if len(self._memo) >= _MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = result
        return result

    def _valid(self, raw: object) -> str | None:
        """A claim value as forwarded (numbers as digits: account ids), or None."""
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            return None
        if isinstance(raw, int) and raw.bit_length() > 128:
            return None  # str() of a huge int is slow, and no id is that long
        text = str(raw)
        if not CLAIM_VALUE.fullmatch(text) or not self._pattern.fullmatch(text):
            return None
        return text
