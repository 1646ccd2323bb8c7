"""Configuration: one TOML file decoded into frozen, typed settings.

Owns the schema (msgspec Structs: types, defaults, unknown-key rejection),
the cross-field rules msgspec cannot express, and the resolution of token
sources (``sha256`` / ``env`` / ``file``) into digests.  Every error names
the dotted key path (``routes[1].upstream: not an http(s) URL``).  The
plaintext of a token never outlives ``_digest_of``: settings keep digests
only, and even those are masked in ``repr``.

Must not know: aiohttp, sockets, metrics, logging.  No globals.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "RESERVED_PATHS",
    "ConfigError",
    "Credential",
    "Revoked",
    "Route",
    "Settings",
    "Token",
    "load",
    "loads",
]

# Paths the gateway answers itself; a route may not shadow them.
RESERVED_PATHS = frozenset({"/health"})
# Label values come from these names, so keep them short and printable.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_PROTOCOLS = ("prometheus-remote-write", "otlp-http")
_METHODS = frozenset({"POST", "PUT", "PATCH", "GET", "DELETE"})
# Label values the gateway uses for requests that match nothing.
_RESERVED_NAMES = frozenset({"none", "unmatched", "health"})

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class ConfigError(Exception):
    """A config that must not be served; ``str()`` names the key path."""


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the TOML schema: immutable, unknown keys are errors."""


def _check_listen(value: str, key: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{key}: expected HOST:PORT, got {value!r}")


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
    # realm= in WWW-Authenticate (RFC 6750 §3).
    realm: str = "obs-gateway"

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


class LogSpec(_Spec, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One JSON line per request; off only for benchmarks that compare with an
    # nginx that logs nothing either.
    access: bool = True


class AuthSpec(_Spec, frozen=True):
    # Tokens whose not_after falls within this window are logged at start
    # and on reload.
    expiry_warning_days: Annotated[float, msgspec.Meta(ge=0)] = 14.0


class RouteSpec(_Spec, frozen=True):
    name: str
    path: str
    protocol: Literal["prometheus-remote-write", "otlp-http"]
    upstream: str
    methods: tuple[str, ...] = ("POST",)
    # vmagent retries a 413 forever (head-of-line blocking), so the default
    # sits far above its largest block; OTLP recommends 64 MiB too.
    max_body_bytes: PositiveInt = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name in _RESERVED_NAMES:
            raise ValueError(
                f"name: {self.name!r} must match [A-Za-z0-9_.-]{{1,64}} "
                f"and not be one of {sorted(_RESERVED_NAMES)}"
            )
        if not self.path.startswith("/") or any(c in self.path for c in "?# \t%"):
            raise ValueError(f"path: {self.path!r} must be an absolute path without query")
        if self.path in RESERVED_PATHS:
            raise ValueError(f"path: {self.path!r} is answered by the gateway itself")
        if not self.methods:
            raise ValueError("methods: at least one method")
        for method in self.methods:
            if method not in _METHODS:
                raise ValueError(f"methods: {method!r} is not one of {sorted(_METHODS)}")
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
            raise ValueError(f"upstream: not an http(s) URL: {self.upstream!r}")
        if parts.username or parts.password:
            raise ValueError("upstream: credentials in the URL are not supported")
        try:
            parts.port  # noqa: B018  (raises on an invalid port)
        except ValueError:
            raise ValueError(f"upstream: invalid port in {self.upstream!r}") from None


class TokenSpec(_Spec, frozen=True):
    id: str
    sha256: str | None = None
    env: str | None = None
    file: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.id):
            raise ValueError(f"id: {self.id!r} must match [A-Za-z0-9_.-]{{1,64}}")
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
        if not _NAME.match(self.id):
            raise ValueError(f"id: {self.id!r} must match [A-Za-z0-9_.-]{{1,64}}")
        if not _SHA256_HEX.match(self.sha256):
            raise ValueError("sha256: expected 64 lowercase hex characters")


class CredentialSpec(_Spec, frozen=True):
    name: str
    routes: tuple[str, ...] = ()
    # Shorthand for a single token with id "default".
    token_sha256: str | None = None
    token_env: str | None = None
    token_file: str | None = None
    tokens: tuple[TokenSpec, ...] = ()
    revoked: tuple[RevokedSpec, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name in _RESERVED_NAMES:
            raise ValueError(
                f"name: {self.name!r} must match [A-Za-z0-9_.-]{{1,64}} "
                f"and not be one of {sorted(_RESERVED_NAMES)}"
            )
        shorthand = (self.token_sha256, self.token_env, self.token_file)
        if any(v is not None for v in shorthand):
            if self.tokens:
                raise ValueError("tokens: use either token_* keys or a tokens list, not both")
            _check_source(*shorthand, "token_")
        elif not self.tokens:
            raise ValueError("tokens: give token_sha256, token_env, token_file or tokens")


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
    routes: tuple[RouteSpec, ...] = ()
    credentials: tuple[CredentialSpec, ...] = ()


# --------------------------------------------------------------------------
# The resolved model the rest of the gateway uses.


@dataclass(frozen=True, slots=True)
class Token:
    """One accepted secret, by digest.  ``repr`` never shows the digest."""

    id: str
    digest: bytes = field(repr=False)
    not_before: float | None = None  # POSIX seconds
    not_after: float | None = None


@dataclass(frozen=True, slots=True)
class Revoked:
    id: str
    digest: bytes = field(repr=False)
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    name: str
    routes: frozenset[str]
    tokens: tuple[Token, ...]
    revoked: tuple[Revoked, ...] = ()


Route = RouteSpec


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSpec
    upstream: UpstreamSpec
    log: LogSpec
    auth: AuthSpec
    routes: tuple[RouteSpec, ...]
    credentials: tuple[Credential, ...]
    source: str = ""


# --------------------------------------------------------------------------
# Loading.

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD_MSG = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*): (?P<msg>.*)$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")


def _format_validation_error(err: msgspec.ValidationError) -> str:
    """msgspec's "msg - at `$.a[0].b`" → "a[0].b: msg" (our error convention)."""
    m = _AT.match(str(err))
    msg, path = (m.group("msg"), (m.group("path") or "").lstrip(".")) if m else (str(err), "")
    if unknown := _UNKNOWN.match(msg):
        path, msg = _join(path, unknown.group("field")), "unknown key"
    elif own := _FIELD_MSG.match(msg):
        path, msg = _join(path, own.group("field")), own.group("msg")
    else:
        msg = msg[:1].lower() + msg[1:]
    return f"{path}: {msg}" if path else msg


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _digest_of(token: bytes, key: str) -> bytes:
    token = token.strip()
    if not token:
        raise ConfigError(f"{key}: the token is empty (an empty token never means 'no auth')")
    if len(token) < 16:
        raise ConfigError(f"{key}: the token is shorter than 16 characters")
    return hashlib.sha256(token).digest()


def _resolve(
    sha256: str | None,
    env: str | None,
    file: str | None,
    key: str,
    environ: Mapping[str, str],
    base: Path,
) -> bytes:
    if sha256 is not None:
        return bytes.fromhex(sha256)
    if env is not None:
        value = environ.get(env)
        if value is None:
            raise ConfigError(f"{key}env: environment variable {env} is not set")
        return _digest_of(value.encode(), f"{key}env")
    assert file is not None  # _check_source guarantees exactly one source
    path = base / file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}file: cannot read {str(path)!r}: {exc.strerror}") from None
    return _digest_of(data, f"{key}file")


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _credential(i: int, spec: CredentialSpec, environ: Mapping[str, str], base: Path) -> Credential:
    key = f"credentials[{i}]."
    tokens: list[Token] = []
    if spec.tokens:
        for j, t in enumerate(spec.tokens):
            digest = _resolve(t.sha256, t.env, t.file, f"{key}tokens[{j}].", environ, base)
            tokens.append(Token(t.id, digest, _ts(t.not_before), _ts(t.not_after)))
    else:
        digest = _resolve(
            spec.token_sha256, spec.token_env, spec.token_file, f"{key}token_", environ, base
        )
        tokens.append(Token("default", digest))
    ids = [t.id for t in tokens] + [r.id for r in spec.revoked]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key}tokens: token ids must be unique within a credential")
    revoked = tuple(Revoked(r.id, bytes.fromhex(r.sha256), _ts(r.revoked_at)) for r in spec.revoked)
    return Credential(spec.name, frozenset(spec.routes), tuple(tokens), revoked)


def _cross_check(spec: SettingsSpec, credentials: tuple[Credential, ...]) -> None:
    if not spec.routes:
        raise ConfigError("routes: at least one route is required")
    names: set[str] = set()
    paths: set[str] = set()
    for i, route in enumerate(spec.routes):
        if route.name in names:
            raise ConfigError(f"routes[{i}].name: duplicate route name {route.name!r}")
        if route.path in paths:
            raise ConfigError(f"routes[{i}].path: duplicate route path {route.path!r}")
        names.add(route.name)
        paths.add(route.path)
    if not credentials:
        raise ConfigError("credentials: at least one credential is required")
    seen: dict[bytes, str] = {}
    cred_names: set[str] = set()
    for i, (cspec, cred) in enumerate(zip(spec.credentials, credentials, strict=True)):
        if cred.name in cred_names:
            raise ConfigError(f"credentials[{i}].name: duplicate credential name {cred.name!r}")
        cred_names.add(cred.name)
        for j, route_name in enumerate(cspec.routes):
            if route_name not in names:
                raise ConfigError(f"credentials[{i}].routes[{j}]: no route named {route_name!r}")
        secrets: list[Token | Revoked] = [*cred.tokens, *cred.revoked]
        for t in secrets:
            owner = seen.setdefault(t.digest, f"{cred.name}/{t.id}")
            if owner != f"{cred.name}/{t.id}":
                raise ConfigError(
                    f"credentials[{i}]: token {t.id!r} has the same secret as {owner}"
                )


def loads(
    text: str,
    *,
    environ: Mapping[str, str] | None = None,
    base: Path | None = None,
    source: str = "<string>",
) -> Settings:
    """Parse and validate a config document; raise ConfigError naming the key."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    try:
        spec = msgspec.convert(raw, SettingsSpec)
    except msgspec.ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    env = os.environ if environ is None else environ
    where = base if base is not None else Path.cwd()
    credentials = tuple(_credential(i, c, env, where) for i, c in enumerate(spec.credentials))
    _cross_check(spec, credentials)
    return Settings(
        spec.server, spec.upstream, spec.log, spec.auth, spec.routes, credentials, source
    )


def load(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read a config file; relative ``file`` keys resolve beside it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"cannot read config {str(p)!r}: {reason}") from None
    return loads(text, environ=environ, base=p.parent, source=str(p))
