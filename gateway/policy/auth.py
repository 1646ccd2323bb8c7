"""Bearer authentication: ``Authorization`` header bytes → principal or failure.

Pure and synchronous: no HTTP framework, no I/O, no logging.  The presented
token is hashed once (SHA-256) and compared, in constant time and without
an early exit, against every configured and revoked digest, so neither
which digest matched nor how much of it matched shows in the timing.
Non-ASCII or oversized input is just another unknown token: comparing
fixed-length digests as bytes never raises.  A token never appears in a
return value, an exception or a ``repr``.

JWT credentials (RFC 7519 / RFC 8725): the algorithm comes from the
credential's allow-list, never from the token; the key is looked up by
``kid`` in the configured set only; ``exp``, ``iss`` and ``aud`` are
required.  A verified token is cached by its digest until it expires, so
a sender reusing its JWT costs one dict lookup per request.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gateway.config.credentials import JwtKey
from gateway.config.loader import Credential, JwtConfig

if TYPE_CHECKING:
    from gateway.policy.routing import Plan
    from gateway.policy.tenancy import Tenancy

__all__ = [
    "MAX_AUTHORIZATION_BYTES",
    "Authenticator",
    "Failure",
    "Principal",
]

# Longer headers are rejected before hashing: a bearer token of 256 bits is
# 43-64 characters, and a JWT with a few claims stays well under this.
MAX_AUTHORIZATION_BYTES: Final = 4096
# Verified JWTs remembered at once; beyond it the cache starts over (an
# attacker's valid-looking tokens cannot grow memory without bound).
JWT_CACHE_SIZE: Final = 10_000
_JWT_REQUIRED: Final = {"require": ["exp", "iss", "aud"]}

_sha256: Final = hashlib.sha256
_compare: Final = hmac.compare_digest


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request authenticated as.  Names only; never the secret."""

    credential: str
    token_id: str
    routes: frozenset[str]
    not_after: float | None = None
    # Route name → what this principal sends upstream (tenancy.py); None:
    # every route's default.  ``refused``: route → why its claims cannot
    # be forwarded (decide answers 403).
    targets: Mapping[str, Plan] | None = None
    refused: Mapping[str, str] | None = None
    ok: bool = field(default=True, init=False)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a request did not authenticate; ``reason`` is a bounded label value.

    ``credential``/``token_id`` are filled only for ``revoked``, ``expired`` and
    ``not_yet_valid`` so the operator learns which sender holds an old secret;
    the client sees the same 401 as for any unknown token.
    """

    reason: str
    credential: str = ""
    token_id: str = ""
    ok: bool = field(default=False, init=False)


MISSING: Final = Failure("missing")
MALFORMED: Final = Failure("malformed")
UNKNOWN: Final = Failure("unknown")

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token.  The scheme is
# case-insensitive (RFC 9110 §11.1), compared on the lowered first 7 bytes.
_SCHEME: Final = b"bearer "


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes = field(repr=False)
    principal: Principal | None  # None for a revoked digest
    not_before: float | None
    not_after: float | None
    revoked: Failure | None


class Authenticator:
    """The digests and keys of one config generation (rebuilt on reload)."""

    __slots__ = ("_entries", "_jwt_by_kid", "_jwt_cache", "_jwt_single", "_tenancy")

    def __init__(
        self, credentials: tuple[Credential, ...], tenancy: Mapping[str, Tenancy] | None = None
    ) -> None:
        self._tenancy = tenancy or {}
        entries: list[_Entry] = []
        self._jwt_by_kid: dict[str, tuple[Credential, JwtKey]] = {}
        unnamed: list[tuple[Credential, JwtKey]] = []
        self._jwt_cache: dict[bytes, tuple[Principal, float]] = {}
        for cred in credentials:
            if cred.jwt is not None:
                for key in cred.jwt.keys:
                    if key.kid:
                        self._jwt_by_kid[key.kid] = (cred, key)
                    else:
                        unnamed.append((cred, key))
            own = self._tenancy.get(cred.name)
            targets = own.static if own is not None else None
            for t in cred.tokens:
                principal = Principal(cred.name, t.id, cred.routes, t.not_after, targets)
                entries.append(_Entry(t.digest, principal, t.not_before, t.not_after, None))
            for r in cred.revoked:
                failure = Failure("revoked", cred.name, r.id)
                entries.append(_Entry(r.digest, None, None, None, failure))
        self._entries = tuple(entries)
        # The config has at most one key without a kid (config/loader.py).
        self._jwt_single = unnamed[0] if len(unnamed) == 1 else None

    def authenticate(self, header: bytes | None, now: float) -> Principal | Failure:
        if header is None:
            return MISSING
        if len(header) > MAX_AUTHORIZATION_BYTES:
            return MALFORMED
        # Whitespace around a field value is not part of it (RFC 9110 §5.5).
        header = header.strip(b" \t")
        if header[:7].lower() != _SCHEME:
            return MALFORMED
        token = header[7:].lstrip(b" ")
        if not token or b" " in token or b"\t" in token:
            return MALFORMED
        digest = _sha256(token).digest()
        found: _Entry | None = None
        for entry in self._entries:
            # No break: every digest is compared whatever matched.
            if _compare(entry.digest, digest):
                found = entry
        if found is None:
            if (self._jwt_by_kid or self._jwt_single) and token.count(b".") == 2:
                return self._jwt(token, digest, now)
            return UNKNOWN
        if found.revoked is not None:
            return found.revoked
        principal = found.principal
        assert principal is not None
        if found.not_after is not None and now >= found.not_after:
            return Failure("expired", principal.credential, principal.token_id)
        if found.not_before is not None and now < found.not_before:
            return Failure("not_yet_valid", principal.credential, principal.token_id)
        return principal

    def _jwt(self, token: bytes, digest: bytes, now: float) -> Principal | Failure:
        cached = self._jwt_cache.get(digest)
        if cached is not None:
            principal, valid_until = cached
            if now < valid_until:
                return principal
            del self._jwt_cache[digest]
        # Imported on first use: pyjwt and cryptography cost ~20 MB per
        # process, which a gateway without JWT credentials never needs.
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except (jwt.PyJWTError, ValueError, TypeError):
            return JWT_INVALID
        entry = self._jwt_by_kid.get(kid) if isinstance(kid, str) and kid else self._jwt_single
        if entry is None:
            return JWT_INVALID  # a kid outside the configured set
        cred, key = entry
        config = cred.jwt
        assert config is not None
        token_id = key.kid or "jwt"
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=list(config.algorithms),
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway,
                options=_JWT_REQUIRED,  # type: ignore[arg-type]
            )
            # A validly signed exp past a float's range (10**400) is no date.
            expires = float(claims["exp"])
        except jwt.ExpiredSignatureError:
            return Failure("expired", cred.name, token_id)
        except jwt.ImmatureSignatureError:
            return Failure("not_yet_valid", cred.name, token_id)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, OverflowError):
            return Failure("jwt_invalid", cred.name, token_id)
        expires = float(claims["exp"])
        routes = _scoped(config, cred.routes, claims)
        own = self._tenancy.get(cred.name)
        targets: Mapping[str, Plan] | None = None
        refused = None
        if own is not None:
            targets, refused = own.for_claims(claims) if own.claims else (own.static, None)
        principal = Principal(cred.name, token_id, routes, expires, targets, refused)
        if len(self._jwt_cache) >= JWT_CACHE_SIZE:
            self._jwt_cache.clear()
        self._jwt_cache[digest] = (principal, expires + config.leeway)
        return principal


JWT_INVALID: Final = Failure("jwt_invalid")


def _scoped(config: JwtConfig, routes: frozenset[str], claims: dict[str, Any]) -> frozenset[str]:
    """Routes a verified token may use: its scope claim, within the credential's."""
    if not config.scope_claim:
        return routes
    value = claims.get(config.scope_claim)
    if isinstance(value, str):
        values = value.split()
    elif isinstance(value, list):
        values = [v for v in value if isinstance(v, str)]
    else:
        return frozenset()
    if config.scopes:
        granted: set[str] = set()
        for v in values:
            granted |= config.scopes.get(v, frozenset())
        return frozenset(granted) & routes
    return frozenset(values) & routes
