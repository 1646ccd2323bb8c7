"""Credentials resolved from config: token digests and JWT keys.

Reads the secrets a config points at (environment variables, token files,
JWKS / PEM / HMAC key files), keeps SHA-256 digests of static tokens and
parsed public keys, and drops every plaintext before returning.  Errors
name the key path.  Called by ``config.py`` at load and on every reload, so
rotated files are re-read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.config.schema import ConfigError, CredentialSpec, ForwardSpec, JwtSpec

__all__ = ["Credential", "JwtConfig", "JwtKey", "Revoked", "Token", "resolve_credential"]


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
class JwtKey:
    kid: str  # "": a single key without a kid (at most one in a config)
    key: Any = field(repr=False)  # a cryptography public key, or HMAC secret bytes


@dataclass(frozen=True, slots=True)
class JwtConfig:
    algorithms: tuple[str, ...]
    issuer: str
    audience: str
    leeway: float
    scope_claim: str
    scopes: Mapping[str, frozenset[str]]
    keys: tuple[JwtKey, ...]


@dataclass(frozen=True, slots=True)
class Credential:
    name: str
    routes: frozenset[str]
    tokens: tuple[Token, ...]
    revoked: tuple[Revoked, ...] = ()
    jwt: JwtConfig | None = None
    allow_cidrs: tuple[str, ...] = ()
    client_cert_subjects: frozenset[str] = frozenset()
    max_concurrent_requests: int = 0
    rate_rps: float = 0.0
    rate_burst: float = 0.0
    rate_bytes: float = 0.0
    forward: ForwardSpec | None = None

    @property
    def token_ids(self) -> tuple[str, ...]:
        """Ids that label this credential's metrics (JWT: one per key id)."""
        ids = tuple(t.id for t in self.tokens)
        if self.jwt is not None:
            ids += tuple(k.kid or "jwt" for k in self.jwt.keys)
        return ids


def token_digest(token: bytes, key: str) -> bytes:
    """SHA-256 of a token given as text (``token_env``, ``token_file``,
    ``hash-token --stdin``): surrounding whitespace, such as the newline a
    file or ``echo`` ends with, is not part of it (a bearer token cannot
    contain whitespace)."""
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
        return token_digest(value.encode(), f"{key}env")
    assert file is not None  # _check_source guarantees exactly one source
    path = base / file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}file: cannot read the file: {exc.strerror}") from None
    return token_digest(data, f"{key}file")


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def resolve_credential(
    i: int, spec: CredentialSpec, environ: Mapping[str, str], base: Path
) -> Credential:
    key = f"credentials[{i}]."
    tokens: list[Token] = []
    for j, t in enumerate(spec.tokens):
        digest = _resolve(t.sha256, t.env, t.file, f"{key}tokens[{j}].", environ, base)
        tokens.append(Token(t.id, digest, _ts(t.not_before), _ts(t.not_after)))
    if (spec.token_sha256, spec.token_env, spec.token_file) != (None, None, None):
        digest = _resolve(
            spec.token_sha256, spec.token_env, spec.token_file, f"{key}token_", environ, base
        )
        tokens.append(Token("default", digest))
    ids = [t.id for t in tokens] + [r.id for r in spec.revoked]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key}tokens: token ids must be unique within a credential")
    revoked = tuple(Revoked(r.id, bytes.fromhex(r.sha256), _ts(r.revoked_at)) for r in spec.revoked)
    jwt_config = None if spec.jwt is None else _jwt(spec.jwt, f"{key}jwt.", environ, base, spec)
    return Credential(
        spec.name,
        frozenset(spec.routes),
        tuple(tokens),
        revoked,
        jwt_config,
        spec.allow_cidrs,
        frozenset(spec.client_cert_subjects),
        spec.max_concurrent_requests,
        spec.rate_limit_requests_per_second,
        spec.rate_limit_burst,
        spec.rate_limit_bytes_per_second,
        spec.forward,
    )


_MIN_HMAC_SECRET = 32
# pyjwt and cryptography are imported only when a JWT credential is
# configured (~20 MB per process otherwise spent for nothing).


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read the file: {exc.strerror}") from None


def _kind(public_key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "an EC key"
    return "an EdDSA key"


def _check_family(public_key: Any, algorithms: tuple[str, ...], key: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    # Which key kind each algorithm family needs: an RSA key never verifies
    # an ES256 token and no public key ever serves as an HMAC secret.
    families: dict[str, tuple[type[Any], ...]] = {
        "RS": (rsa.RSAPublicKey,),
        "PS": (rsa.RSAPublicKey,),
        "ES": (ec.EllipticCurvePublicKey,),
        "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
    }
    for alg in algorithms:
        if not isinstance(public_key, families[alg[:2]]):
            raise ConfigError(f"{key}: {_kind(public_key)} cannot verify {alg}")


def _jwks_keys(spec: JwtSpec, key: str, base: Path) -> list[JwtKey]:
    import jwt

    assert spec.jwks_file is not None
    data = _read(base / spec.jwks_file, f"{key}jwks_file")
    try:
        jwks = jwt.PyJWKSet.from_dict(json.loads(data))
    except (ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as exc:
        raise ConfigError(f"{key}jwks_file: not a usable JWKS: {exc}") from None
    keys: list[JwtKey] = []
    for jwk in jwks.keys:
        if jwk.key_type == "oct":
            raise ConfigError(f"{key}jwks_file: symmetric keys are not accepted from a JWKS")
        _check_family(jwk.key, spec.algorithms, f"{key}jwks_file")
        keys.append(JwtKey(jwk.key_id or "", jwk.key))
    if len(keys) > 1 and any(not k.kid for k in keys):
        raise ConfigError(f"{key}jwks_file: with several keys every key needs a kid")
    return keys


def _pem_key(spec: JwtSpec, key: str, base: Path) -> JwtKey:
    from cryptography.hazmat.primitives import serialization

    assert spec.public_key_file is not None
    data = _read(base / spec.public_key_file, f"{key}public_key_file")
    try:
        public_key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(
            f"{key}public_key_file: not a PEM public key (private keys do not belong here)"
        ) from None
    _check_family(public_key, spec.algorithms, f"{key}public_key_file")
    return JwtKey(spec.kid, public_key)


def _hmac_key(spec: JwtSpec, key: str, environ: Mapping[str, str], base: Path) -> JwtKey:
    if spec.hmac_secret_env is not None:
        value = environ.get(spec.hmac_secret_env)
        if value is None:
            raise ConfigError(f"{key}hmac_secret_env: {spec.hmac_secret_env} is not set")
        secret = value.encode().strip()
        where = f"{key}hmac_secret_env"
    else:
        assert spec.hmac_secret_file is not None
        secret = _read(base / spec.hmac_secret_file, f"{key}hmac_secret_file").strip()
        where = f"{key}hmac_secret_file"
    if len(secret) < _MIN_HMAC_SECRET:
        raise ConfigError(f"{where}: an HMAC secret needs at least {_MIN_HMAC_SECRET} bytes")
    return JwtKey(spec.kid, secret)


def _jwt(
    spec: JwtSpec, key: str, environ: Mapping[str, str], base: Path, cred: CredentialSpec
) -> JwtConfig:
    if spec.jwks_file is not None:
        keys = _jwks_keys(spec, key, base)
    elif spec.public_key_file is not None:
        keys = [_pem_key(spec, key, base)]
    else:
        keys = [_hmac_key(spec, key, environ, base)]
    routes = set(cred.routes)
    scopes: dict[str, frozenset[str]] = {}
    for scope, scope_routes in spec.scopes.items():
        for route in scope_routes:
            if route not in routes:
                raise ConfigError(
                    f"{key}scopes.{scope}: a route that is not in this credential's routes"
                )
        scopes[scope] = frozenset(scope_routes)
    return JwtConfig(
        spec.algorithms,
        spec.issuer,
        spec.audience,
        spec.leeway_seconds,
        spec.scope_claim,
        scopes,
        tuple(keys),
    )
