"""A ``Generation``: everything derived from one config that a request
needs (route table, authenticator, rendered errors, client policy,
per-credential rules and forwarding, the limits as plain attributes).

Immutable and replaced as a whole on reload, so an exchange that captured
one at its start finishes on it.  The one exception is by design: each
route's balancer points at the worker's backend states, which outlive
generations (a reload keeps what the worker knows of a backend's health).
Built from validated ``Settings``; no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policy.auth import Authenticator
from gateway.policy.balance import BackendRegistry, Balancer
from gateway.policy.clients import ClientPolicy, networks, within
from gateway.policy.errors import ErrorRenderer
from gateway.policy.routing import RouteTable
from gateway.policy.tenancy import Tenancy

if TYPE_CHECKING:
    from gateway.config.credentials import Credential
    from gateway.config.loader import Settings

__all__ = ["CredentialRules", "Generation"]


class CredentialRules:
    """Per-credential conditions checked after authentication."""

    __slots__ = ("networks", "subjects")

    def __init__(self, cred: Credential) -> None:
        self.networks = networks(cred.allow_cidrs)
        self.subjects = cred.client_cert_subjects

    def permits(self, address: str) -> bool:
        return within(address, self.networks)


class Generation:
    """Everything derived from one config; replaced whole on reload."""

    __slots__ = (
        "auth",
        "body_idle_timeout",
        "clients",
        "connect_timeout",
        "credentials",
        "errors",
        "header_timeout",
        "keepalive_timeout",
        "max_connections",
        "max_header_bytes",
        "max_header_count",
        "max_raw_head",
        "max_url_bytes",
        "min_body_grace",
        "min_body_rate",
        "pool_idle_timeout",
        "replay_memory_bytes",
        "response_timeout",
        "routes",
        "settings",
        "tenancy",
        "throttle_strict",
        "underscores_in_headers",
    )

    def __init__(self, settings: Settings, backends: BackendRegistry | None = None) -> None:
        self.settings = settings
        # Balancers bound to the worker's backend states (a fresh registry
        # when none is given: a generation that serves nothing, e.g. a test's).
        registry = backends if backends is not None else BackendRegistry()
        self.routes = RouteTable(settings.routes, settings.upstream, registry)
        # Per credential with a forward table: its plans, pre-rendered (its
        # own backends, if it has some, share the registry's states).
        specs = {r.name: r for r in settings.routes}
        self.tenancy = {
            c.name: Tenancy(c, self.routes, specs, settings.upstream, registry)
            for c in settings.credentials
            if c.forward is not None
        }
        self.auth = Authenticator(settings.credentials, self.tenancy)
        self.errors = ErrorRenderer(settings.server.realm)
        self.clients = ClientPolicy(settings.clients)
        self.credentials = {c.name: CredentialRules(c) for c in settings.credentials}
        # Copied out so the hot path reads one attribute, not nested settings.
        s, u, lim = settings.server, settings.upstream, settings.limits
        self.header_timeout = s.header_timeout_seconds
        self.body_idle_timeout = s.body_idle_timeout_seconds
        self.keepalive_timeout = s.keepalive_timeout_seconds
        self.connect_timeout = u.connect_timeout_seconds
        self.response_timeout = u.response_timeout_seconds
        self.pool_idle_timeout = u.pool_idle_timeout_seconds
        self.replay_memory_bytes = u.replay_memory_bytes
        self.max_connections = lim.max_connections
        self.max_header_bytes = s.max_header_bytes
        self.max_header_count = s.max_header_count
        self.max_url_bytes = s.max_url_bytes
        self.underscores_in_headers = s.underscores_in_headers
        # Raw bytes a head spread over several reads may take: the limits
        # plus one full read (256 KiB in uvloop) that may carry body bytes.
        self.max_raw_head = s.max_header_bytes + s.max_url_bytes + 256 * 1024
        self.min_body_rate = lim.min_body_rate_bytes_per_second
        self.min_body_grace = lim.min_body_rate_grace_seconds
        # The exchange skips authentication for a throttled address (decide.py).
        self.throttle_strict = lim.auth_throttle_mode == "strict"

    @property
    def balancers(self) -> list[Balancer]:
        """Every balancer the HTTP/1.1 data path may use: the routes' own and
        those of credentials with backends of their own."""
        out = self.routes.balancers
        for tenancy in self.tenancy.values():
            out += tenancy.balancers
        return out

    @classmethod
    def build(cls, settings: Settings, backends: BackendRegistry | None = None) -> Generation:
        return cls(settings, backends)
