"""Bearer authentication: ``Authorization`` header bytes → principal or failure.

Pure and synchronous: no HTTP framework, no I/O, no logging.  The presented
token is hashed once (SHA-256) and compared, in constant time and without
an early exit, against every configured and revoked digest, so neither
which digest matched nor how much of it matched shows in the timing.
Non-ASCII or oversized input is just another unknown token: comparing
fixed-length digests as bytes never raises.  A token never appears in a
return value, an exception or a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from gateway.config import Credential

__all__ = [
    "MAX_AUTHORIZATION_BYTES",
    "Authenticator",
    "Failure",
    "Principal",
]

# Longer headers are rejected before hashing: a bearer token of 256 bits is
# 43-64 characters, and a JWT with a few claims stays well under this.
MAX_AUTHORIZATION_BYTES = 4096

_sha256 = hashlib.sha256
_compare = hmac.compare_digest


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request authenticated as.  Names only; never the secret."""

    credential: str
    token_id: str
    routes: frozenset[str]
    not_after: float | None = None
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


MISSING = Failure("missing")
MALFORMED = Failure("malformed")
UNKNOWN = Failure("unknown")

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token.  The scheme is
# case-insensitive (RFC 9110 §11.1), compared on the lowered first 7 bytes.
_SCHEME = b"bearer "


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes = field(repr=False)
    principal: Principal | None  # None for a revoked digest
    not_before: float | None
    not_after: float | None
    revoked: Failure | None


class Authenticator:
    """Holds the digests of one config generation; immutable after build."""

    __slots__ = ("_entries",)

    def __init__(self, credentials: tuple[Credential, ...]) -> None:
        entries: list[_Entry] = []
        for cred in credentials:
            for t in cred.tokens:
                principal = Principal(cred.name, t.id, cred.routes, t.not_after)
                entries.append(_Entry(t.digest, principal, t.not_before, t.not_after, None))
            for r in cred.revoked:
                failure = Failure("revoked", cred.name, r.id)
                entries.append(_Entry(r.digest, None, None, None, failure))
        self._entries = tuple(entries)

    def authenticate(self, header: bytes | None, now: float) -> Principal | Failure:
        if header is None:
            return MISSING
        if len(header) > MAX_AUTHORIZATION_BYTES or header[:7].lower() != _SCHEME:
            return MALFORMED
        token = header[7:].lstrip(b" ")
        if not token or b" " in token:
            return MALFORMED
        digest = _sha256(token).digest()
        found: _Entry | None = None
        for entry in self._entries:
            # No break: every digest is compared whatever matched.
            if _compare(entry.digest, digest):
                found = entry
        if found is None:
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
