"""Configuration: one TOML file → validated, frozen ``Settings``.

Decodes with the msgspec schema (``schema.py``), resolves credentials
(``credentials.py``: digests and keys, never plaintext), applies the
cross-field rules, and turns every error into ``key.path: message``.
Must not know: aiohttp, sockets, metrics, logging.  No globals.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from gateway.config.credentials import Credential, JwtConfig, Revoked, Token, resolve_credential
from gateway.config.schema import (
    RESERVED_PATHS,
    AuthSpec,
    ClientsSpec,
    ConfigError,
    ForwardSpec,
    LimitsSpec,
    LogSpec,
    ReloadSpec,
    RouteSpec,
    ServerSpec,
    SettingsSpec,
    UpstreamSpec,
)
from gateway.config.tls import server_context

__all__ = [
    "RESERVED_PATHS",
    "ConfigError",
    "Credential",
    "JwtConfig",
    "Revoked",
    "Route",
    "Settings",
    "Token",
    "expiry_warnings",
    "load",
    "loads",
]

Route = RouteSpec


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSpec
    upstream: UpstreamSpec
    log: LogSpec
    auth: AuthSpec
    reload: ReloadSpec
    clients: ClientsSpec
    limits: LimitsSpec
    routes: tuple[RouteSpec, ...]
    credentials: tuple[Credential, ...]
    source: str = ""
    # Every file this config was built from: what a watcher must poll.
    files: tuple[str, ...] = ()
    # Built (and so validated: cert and key match) at load.
    tls_context: ssl.SSLContext | None = None
    # The document these settings were built from: what a supervisor pushes
    # to its workers, so they serve exactly what it validated.
    text: str = field(default="", repr=False)


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
# A rule's own message names its field, a key inside a table field
# (``extra_labels.tenant``) or an item of a list field (``upstreams[1]``,
# ``upstreams[1].name``, ``upstreams.remote_write[1]``).
_FIELD_MSG = re.compile(
    r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?(?:\.[A-Za-z0-9_.-]+)?(?:\[\d+\])?"
    r"(?:\.[A-Za-z_][A-Za-z0-9_]*)?): (?P<msg>.*)$",
    re.DOTALL,
)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")


def _format_validation_error(err: msgspec.ValidationError) -> str:
    """msgspec's "msg - at `$.a[0].b`" → "a[0].b: msg" (our error convention)."""
    m = _AT.match(str(err))
    msg, path = (m.group("msg"), (m.group("path") or "").lstrip(".")) if m else (str(err), "")
    if unknown := _UNKNOWN.match(msg):
        path, msg = _join(path, unknown.group("field")), "unknown key"
    elif own := _FIELD_MSG.match(msg):
        path, msg = _join(path, own.group("field")), own.group("msg")
    elif msg.startswith("Invalid enum value"):
        msg = "not one of the allowed values (config/gateway.toml lists them)"
    else:
        msg = msg[:1].lower() + msg[1:]
    return f"{path}: {msg}" if path else msg


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_routes(spec: SettingsSpec) -> set[str]:
    """Route names and paths are unique; returns the names."""
    if not spec.routes:
        raise ConfigError("routes: at least one route is required")
    names: set[str] = set()
    paths: set[str] = set()
    for i, route in enumerate(spec.routes):
        if route.name in names:
            raise ConfigError(f"routes[{i}].name: duplicate route name")
        if route.path in paths:
            raise ConfigError(f"routes[{i}].path: duplicate route path")
        names.add(route.name)
        paths.add(route.path)
    return names


def _check_secrets(credentials: tuple[Credential, ...]) -> None:
    """No two tokens share a secret, no two credentials a JWT key id, and at
    most one JWT key has no id (a token without ``kid`` is verified with it:
    with two, neither would be, and every JWT would get 401)."""
    # Credentials are named by position, not by name: a config error never
    # echoes a value, and a token pasted into the wrong key is one.
    seen: dict[bytes, tuple[int, str]] = {}  # digest -> (credential index, token id)
    kids: dict[str, str] = {}
    unnamed = ""
    for i, cred in enumerate(credentials):
        here = f"credentials[{i}]"
        for k in cred.jwt.keys if cred.jwt is not None else ():
            if not k.kid:
                if unnamed:
                    raise ConfigError(
                        f"{here}.jwt: this credential and {unnamed} both have a JWT "
                        "key without a kid, so a token without one could be either's; give "
                        'all but one a kid ([credentials.jwt] kid = "…", or "kid" in the JWKS)'
                    )
                unnamed = here
                continue
            owner = kids.setdefault(k.kid, here)
            if owner != here:
                raise ConfigError(f"{here}.jwt: a key id is also used by {owner}")
        secrets: list[Token | Revoked] = [*cred.tokens, *cred.revoked]
        for t in secrets:
            first = seen.setdefault(t.digest, (i, t.id))
            if first != (i, t.id):
                where = "another token of it" if first[0] == i else f"credentials[{first[0]}]"
                raise ConfigError(f"{here}: a token has the same secret as {where}")


def _cross_check(spec: SettingsSpec, credentials: tuple[Credential, ...]) -> None:
    names = _check_routes(spec)
    if not credentials:
        raise ConfigError("credentials: at least one credential is required")
    cred_names: set[str] = set()
    for i, (cspec, cred) in enumerate(zip(spec.credentials, credentials, strict=True)):
        if cred.name in cred_names:
            raise ConfigError(f"credentials[{i}].name: duplicate credential name")
        cred_names.add(cred.name)
        for j, route_name in enumerate(cspec.routes):
            if route_name not in names:
                raise ConfigError(f"credentials[{i}].routes[{j}]: no route of that name")
        if cspec.forward is not None:
            _check_forward(f"credentials[{i}].forward", spec, cspec.forward, cred)
    _check_secrets(credentials)


def _check_forward(key: str, spec: SettingsSpec, fwd: ForwardSpec, cred: Credential) -> None:
    """What a forward table needs from the rest of the config."""
    routes = {r.name: r for r in spec.routes if r.name in cred.routes}
    for name in fwd.upstreams:
        if name not in routes:
            raise ConfigError(f"{key}.upstreams.{name}: not one of this credential's routes")
        urls = fwd.upstream_urls(name)
        if routes[name].protocol != "otlp-grpc":
            continue
        if len(urls) > 1:
            raise ConfigError(f"{key}.upstreams.{name}: an otlp-grpc route takes one backend")
        parts = urlsplit(urls[0])
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(
                f"{key}.upstreams.{name}: an otlp-grpc upstream is scheme, host and port only"
            )
    written = [r for r in routes.values() if r.protocol == "prometheus-remote-write"]
    if fwd.extra_labels and not written:
        raise ConfigError(
            f"{key}.extra_labels: none of this credential's routes is prometheus-remote-write"
        )
    for route in written:
        urls = fwd.upstream_urls(route.name) or tuple(b.url for _, b in route.backends())
        pinned = {
            v.partition("=")[0]
            for url in urls
            for k, v in parse_qsl(urlsplit(url).query)
            if k == "extra_label"
        }
        for label in fwd.extra_labels:
            if label in pinned:
                raise ConfigError(
                    f"{key}.extra_labels.{label}: an upstream URL of this route "
                    "already sets this label"
                )
    if fwd.claims and (cred.jwt is None or cred.tokens):
        raise ConfigError(
            f"{key}: a {{claim:…}} value needs a JWT credential without static tokens "
            "(a static token has no claims)"
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
    credentials = tuple(
        resolve_credential(i, c, env, where) for i, c in enumerate(spec.credentials)
    )
    _cross_check(spec, credentials)
    files = [source] if base is not None else []
    tls = spec.server.tls
    tls_context = None
    if tls is not None:
        grpc = any(r.protocol == "otlp-grpc" for r in spec.routes)
        tls_context = server_context(tls, where, h2=grpc)
        named_tls = [tls.cert_file, tls.key_file, tls.client_ca_file]
        files += [str(where / f) for f in named_tls if f is not None]
    for c in spec.credentials:
        named = [c.token_file, *(t.file for t in c.tokens)]
        if c.jwt is not None:
            named += [c.jwt.jwks_file, c.jwt.public_key_file, c.jwt.hmac_secret_file]
        files += [str(where / f) for f in named if f is not None]
    return Settings(
        spec.server,
        spec.upstream,
        spec.log,
        spec.auth,
        spec.reload,
        spec.clients,
        spec.limits,
        spec.routes,
        credentials,
        source,
        tuple(dict.fromkeys(files)),
        tls_context,
        text,
    )


def expiry_warnings(settings: Settings, now: float) -> list[dict[str, Any]]:
    """Tokens expired or expiring within ``auth.expiry_warning_days``."""
    window = settings.auth.expiry_warning_days * 86400
    return [
        {
            "credential": cred.name,
            "token_id": t.id,
            "expired": t.not_after <= now,
            "days_left": round(max(0.0, t.not_after - now) / 86400, 2),
        }
        for cred in settings.credentials
        for t in cred.tokens
        if t.not_after is not None and t.not_after - now <= window
    ]


def load(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read a config file; relative ``file`` keys resolve beside it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"cannot read config {str(p)!r}: {reason}") from None
    return loads(text, environ=environ, base=p.parent, source=str(p))
