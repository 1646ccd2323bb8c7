"""The config schema: msgspec Structs for every TOML key, with types,
defaults, per-field rules and unknown-key rejection (routes and their
backends in ``routes.py``, what both share in ``fields.py``).

Field rules raised from ``__post_init__`` start with the field name
(``"upstream: not an http(s) URL"``); ``config.py`` turns msgspec's error
path and that prefix into the dotted key path of the message.  No I/O here.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from gateway.config.fields import (
    NAME,
    RESERVED_NAMES,
    RESERVED_PATHS,
    ConfigError,
    Positive,
    PositiveInt,
)
from gateway.config.forward import ForwardSpec
from gateway.config.routes import BackendSpec, HealthCheckSpec, RouteSpec

__all__ = [
    "RESERVED_PATHS",
    "AuthSpec",
    "BackendSpec",
    "ClientsSpec",
    "ConfigError",
    "CredentialSpec",
    "ForwardSpec",
    "HealthCheckSpec",
    "JwtSpec",
    "LimitsSpec",
    "LogSpec",
    "ReloadSpec",
    "RevokedSpec",
    "RouteSpec",
    "ServerSpec",
    "SettingsSpec",
    "TlsSpec",
    "TokenSpec",
    "UpstreamSpec",
]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_NAMES = RESERVED_NAMES
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the TOML schema (as ``fields.Spec``; declared here so that
    linters see the msgspec Struct whose defaults are never shared)."""


def _check_listen(value: str, key: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{key}: expected HOST:PORT")


def _check_cidrs(values: tuple[str, ...], key: str) -> None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{key}: not an IP address or CIDR") from None


class TlsSpec(_Spec, frozen=True):
    """TLS on the public listener; files are re-read on every reload."""

    cert_file: str
    key_file: str
    # Client certificates (e.g. Cloudflare Authenticated Origin Pulls).
    client_ca_file: str | None = None
    client_auth: Literal["none", "optional", "required"] = "none"

    def __post_init__(self) -> None:
        if self.client_auth != "none" and self.client_ca_file is None:
            raise ValueError("client_ca_file: required when client_auth is optional or required")


class ServerSpec(_Spec, frozen=True):
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9091"
    # Worker processes sharing the public port (SO_REUSEPORT); 0 means one
    # per CPU.  `obs-gateway run --workers N` overrides it.
    workers: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    # SIGTERM: how long in-flight requests may take to finish before exit.
    drain_timeout_seconds: Positive = 20.0
    # Slowloris defence: the whole request head must arrive within this.
    header_timeout_seconds: Positive = 10.0
    # Idle keep-alive connections are closed after this (nginx's default).
    keepalive_timeout_seconds: Positive = 75.0
    # A client that sends no body bytes for this long gets 408 / 503.
    body_idle_timeout_seconds: Positive = 30.0
    # Caps on the request head; beyond them the answer is 431 / 414.
    max_header_bytes: PositiveInt = 16384
    max_header_count: PositiveInt = 100
    max_url_bytes: PositiveInt = 8192
    # Header names with "_" are dropped (nginx's underscores_in_headers off):
    # backends that fold "_" into "-" would read Transfer_Encoding as
    # Transfer-Encoding.  On: kept, unless one folds into a field the gateway
    # handles or into another field of the same request.
    underscores_in_headers: bool = False
    # realm= in WWW-Authenticate (RFC 6750 §3).
    realm: str = "obs-gateway"
    tls: TlsSpec | None = None

    def __post_init__(self) -> None:
        _check_listen(self.listen, "listen")
        _check_listen(self.admin_listen, "admin_listen")
        if not re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e ]{1,64}", self.realm):
            raise ValueError("realm: 1-64 printable ASCII characters, no quotes or backslashes")


class UpstreamSpec(_Spec, frozen=True):
    # Explicit timeouts: aiohttp's and most clients' 300 s defaults would hold
    # sender queues hostage when VictoriaMetrics or Jaeger hangs.
    connect_timeout_seconds: Positive = 5.0
    # Longest silence from the upstream once the request is sent (to headers,
    # and between response body reads).  vmagent's own send timeout is 1m.
    response_timeout_seconds: Positive = 60.0
    # Idle pooled connections are closed before the upstream's own idle
    # timeout (Go servers: 1m-3m) so a reused socket is rarely already dead.
    pool_idle_timeout_seconds: Positive = 30.0
    pool_max_idle: PositiveInt = 64
    # Replay copies of request bodies (routes' replay_buffer_bytes) held at
    # once by one worker; beyond, requests stream without a copy (counted).
    replay_memory_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 * 1024 * 1024
    # Passive health: this many failures in a row (connect, reset, timeout,
    # a 5xx) eject a backend of a route with several; each ejection in a row
    # lasts twice the one before, from base to max.
    eject_after_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    eject_base_seconds: Positive = 1.0
    eject_max_seconds: Positive = 10.0

    def __post_init__(self) -> None:
        if self.eject_max_seconds < self.eject_base_seconds:
            raise ValueError("eject_max_seconds: must not be below eject_base_seconds")


class LogSpec(_Spec, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One JSON line per request; off only for benchmarks that compare with an
    # nginx that logs nothing either.
    access: bool = True


class AuthSpec(_Spec, frozen=True):
    # Tokens whose not_after falls within this window are logged at start
    # and on reload.
    expiry_warning_days: Annotated[float, msgspec.Meta(ge=0)] = 14.0


class ClientsSpec(_Spec, frozen=True):
    """Who the client is, and who may connect at all."""

    # Peers whose forwarding header is believed (e.g. Cloudflare's ranges).
    # From anyone else the header is ignored and replaced upstream.
    trusted_proxies: tuple[str, ...] = ()
    client_ip_header: Literal["X-Forwarded-For", "CF-Connecting-IP", "X-Real-IP"] = (
        "X-Forwarded-For"
    )
    # Client addresses (after the trusted-proxy step); deny wins; an empty
    # allow list allows everyone.  Refused with 403.
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_cidrs(self.trusted_proxies, "trusted_proxies")
        _check_cidrs(self.allow, "allow")
        _check_cidrs(self.deny, "deny")


class LimitsSpec(_Spec, frozen=True):
    """Per worker process.  Refusals are 429 (remote-write) / 503 (OTLP) with
    Retry-After, never a sleep that holds the connection."""

    # Beyond this, new connections get a 503 and are closed.
    max_connections: PositiveInt = 10_000
    # Requests being proxied at once; more wait in a short FIFO queue.
    max_concurrent_requests: PositiveInt = 1024
    queue_size: Annotated[int, msgspec.Meta(ge=0)] = 256
    queue_timeout_seconds: Positive = 1.0
    # After this many auth failures from one client address (IPv6: its /64)
    # within the window, its further failures get 429/503 instead of 401;
    # valid credentials are still served (0: off).  "strict": every request
    # from the address is refused before its token is checked.
    auth_failure_limit: Annotated[int, msgspec.Meta(ge=0)] = 30
    auth_failure_window_seconds: Positive = 60.0
    auth_throttle_mode: Literal["failures", "strict"] = "failures"
    # Slow-body defence: after the grace period a body must average at
    # least this rate (0: off).  1 KiB/s passes any real sender.
    min_body_rate_bytes_per_second: Annotated[int, msgspec.Meta(ge=0)] = 1024
    min_body_rate_grace_seconds: Positive = 10.0


class ReloadSpec(_Spec, frozen=True):
    # SIGHUP always reloads.  With watch on, a change to the config file or
    # any token/key file it names reloads too (polled: no inotify needed,
    # works for Kubernetes Secret symlink swaps).
    watch: bool = False
    watch_interval_seconds: Positive = 2.0


class TokenSpec(_Spec, frozen=True):
    id: str
    sha256: str | None = None
    env: str | None = None
    file: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None

    def __post_init__(self) -> None:
        if not NAME.match(self.id):
            raise ValueError("id: must match [A-Za-z0-9_.-]{1,64}")
        _check_source(self.sha256, self.env, self.file, "")
        for key in ("not_before", "not_after"):
            value = getattr(self, key)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{key}: needs a UTC offset (RFC 3339), e.g. 2027-01-01T00:00:00Z")
        if self.not_before and self.not_after and self.not_before >= self.not_after:
            raise ValueError("not_after: must be later than not_before")


class RevokedSpec(_Spec, frozen=True):
    id: str
    sha256: str
    revoked_at: datetime | None = None

    def __post_init__(self) -> None:
        if not NAME.match(self.id):
            raise ValueError("id: must match [A-Za-z0-9_.-]{1,64}")
        if not _SHA256_HEX.match(self.sha256):
            raise ValueError("sha256: expected 64 lowercase hex characters")


class JwtSpec(_Spec, frozen=True):
    """Accept JWTs for a credential (RFC 7519, with RFC 8725's advice)."""

    # Explicit allow-list; the token header never chooses the algorithm.
    algorithms: tuple[str, ...]
    issuer: str
    audience: str
    # Exactly one key source: JWKS or PEM public key for RS/PS/ES/EdDSA,
    # a secret (env or file) for HS.  Keys of one kind never serve the other.
    jwks_file: str | None = None
    public_key_file: str | None = None
    hmac_secret_env: str | None = None
    hmac_secret_file: str | None = None
    # The key id tokens signed with a PEM key or an HMAC secret carry in
    # their header (a JWKS names its own).  Needed when another credential
    # also has a key without one: a token without kid would fit either.
    kid: str = ""
    leeway_seconds: Annotated[float, msgspec.Meta(ge=0, le=300)] = 30.0
    # The claim listing what the token may do ("" → every route of the
    # credential).  Values map to routes through ``scopes``; without a
    # ``scopes`` table the values are route names.
    scope_claim: str = "scope"
    scopes: dict[str, tuple[str, ...]] = {}

    def __post_init__(self) -> None:
        algs = set(self.algorithms)
        if not algs:
            raise ValueError("algorithms: list at least one algorithm")
        unknown = algs - HMAC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if unknown:
            raise ValueError(
                f"algorithms: {sorted(unknown)} not allowed; choose from "
                f"{sorted(HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS)} ('none' never)"
            )
        hmac = bool(algs & HMAC_ALGORITHMS)
        if hmac and algs - HMAC_ALGORITHMS:
            raise ValueError("algorithms: HS* and public-key algorithms cannot be mixed")
        sources = [
            k
            for k in ("jwks_file", "public_key_file", "hmac_secret_env", "hmac_secret_file")
            if getattr(self, k) is not None
        ]
        if len(sources) != 1:
            raise ValueError(
                "jwks_file: give exactly one of jwks_file, public_key_file, "
                "hmac_secret_env, hmac_secret_file"
            )
        if hmac != sources[0].startswith("hmac_"):
            raise ValueError(
                f"{sources[0]}: HS* algorithms need hmac_secret_env/hmac_secret_file; "
                "public-key algorithms need jwks_file/public_key_file"
            )
        if not self.issuer or not self.audience:
            raise ValueError("issuer: issuer and audience are required (RFC 8725 §3.8-3.9)")
        if self.kid and self.jwks_file is not None:
            raise ValueError('kid: a JWKS names its keys itself (its "kid" members)')
        if self.kid and not NAME.match(self.kid):
            raise ValueError("kid: must match [A-Za-z0-9_.-]{1,64}")


class CredentialSpec(_Spec, frozen=True):
    name: str
    routes: tuple[str, ...] = ()
    # Shorthand for a single token with id "default".
    token_sha256: str | None = None
    token_env: str | None = None
    token_file: str | None = None
    tokens: tuple[TokenSpec, ...] = ()
    revoked: tuple[RevokedSpec, ...] = ()
    jwt: JwtSpec | None = None
    # Extra conditions and limits for this credential (0 / empty: none).
    allow_cidrs: tuple[str, ...] = ()
    client_cert_subjects: tuple[str, ...] = ()
    max_concurrent_requests: Annotated[int, msgspec.Meta(ge=0)] = 0
    rate_limit_requests_per_second: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    rate_limit_burst: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    rate_limit_bytes_per_second: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # What the credential, not the sender, decides upstream: labels,
    # headers, backends (tenancy).
    forward: ForwardSpec | None = None

    def __post_init__(self) -> None:
        _check_cidrs(self.allow_cidrs, "allow_cidrs")
        if not NAME.match(self.name) or self.name in _RESERVED_NAMES:
            raise ValueError(
                f"name: must match [A-Za-z0-9_.-]{{1,64}} "
                f"and not be one of {sorted(_RESERVED_NAMES)}"
            )
        shorthand = (self.token_sha256, self.token_env, self.token_file)
        if any(v is not None for v in shorthand):
            if self.tokens:
                raise ValueError("tokens: use either token_* keys or a tokens list, not both")
            _check_source(*shorthand, "token_")
        elif not self.tokens and self.jwt is None and not self.revoked:
            # Only revoked entries is allowed: a retired sender's digests kept
            # so its attempts are still named in logs and metrics.
            raise ValueError("tokens: give token_sha256, token_env, token_file, tokens or jwt")


def _check_source(sha256: str | None, env: str | None, file: str | None, prefix: str) -> None:
    given = [k for k, v in (("sha256", sha256), ("env", env), ("file", file)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"{prefix}sha256: exactly one of {prefix}sha256, {prefix}env, {prefix}file"
        )
    if sha256 is not None and not _SHA256_HEX.match(sha256):
        raise ValueError(f"{prefix}sha256: expected 64 lowercase hex characters")
    if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
        raise ValueError(f"{prefix}env: not an environment variable name")


class SettingsSpec(_Spec, frozen=True):
    server: ServerSpec = ServerSpec()
    upstream: UpstreamSpec = UpstreamSpec()
    log: LogSpec = LogSpec()
    auth: AuthSpec = AuthSpec()
    reload: ReloadSpec = ReloadSpec()
    clients: ClientsSpec = ClientsSpec()
    limits: LimitsSpec = LimitsSpec()
    routes: tuple[RouteSpec, ...] = ()
    credentials: tuple[CredentialSpec, ...] = ()
