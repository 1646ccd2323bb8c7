"""JWT credentials: RFC 8725 pitfalls are refused, valid tokens pass and are scoped."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config.loader import ConfigError, loads
from gateway.policy.auth import Authenticator, Failure, Principal

ISS = "https://issuer.test"
AUD = "obs-gateway"


def _config(jwt_block: str, routes: str = '["remote_write", "otlp_traces"]') -> str:
    return f"""
[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "http://127.0.0.1:9/api/v1/write"

[[routes]]
name = "otlp_traces"
path = "/v1/traces"
protocol = "otlp-http"
upstream = "http://127.0.0.1:9/v1/traces"

[[credentials]]
name = "apps"
routes = {routes}
[credentials.jwt]
issuer = "{ISS}"
audience = "{AUD}"
{jwt_block}
"""


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks(tmp_path: Path, key: ec.EllipticCurvePrivateKey, kid: str = "k1") -> Path:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return path


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "exp": now + 300,
        "iat": now,
        "scope": "otlp_traces",
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _auth(token: str, authn: Authenticator) -> Principal | Failure:
    return authn.authenticate(b"Bearer " + token.encode(), time.time())


@pytest.fixture
def es_authn(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> Authenticator:
    _jwks(tmp_path, ec_key)
    settings = loads(_config('algorithms = ["ES256"]\njwks_file = "jwks.json"'), base=tmp_path)
    return Authenticator(settings.credentials)


def test_valid_token_is_scoped_by_claim(
    es_authn: Authenticator, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(_claims(), ec_key, algorithm="ES256", headers={"kid": "k1"})
    result = _auth(token, es_authn)
    assert isinstance(result, Principal)
    assert (result.credential, result.token_id) == ("apps", "k1")
    assert result.routes == frozenset({"otlp_traces"})
    assert result.not_after is not None
    assert result.not_after > time.time()
    # cached: the same token again is the same principal
    assert _auth(token, es_authn) is result


# Claims are built when the test runs, not at collection: the whole suite
# takes longer than a token's five minutes, and an expired "wrong audience"
# token would fail for the wrong reason.
@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (lambda: _claims(exp=int(time.time()) - 120), "expired"),
        (lambda: _claims(nbf=int(time.time()) + 600), "not_yet_valid"),
        (lambda: _claims(aud="someone-else"), "jwt_invalid"),
        (lambda: _claims(iss="https://evil.test"), "jwt_invalid"),
        (lambda: _claims(exp=None), "jwt_invalid"),
        (lambda: _claims(aud=None), "jwt_invalid"),
        (lambda: _claims(iss=None), "jwt_invalid"),
        # Validly signed, but no date: past a float's range, or JSON's Infinity.
        (lambda: _claims(exp=10**400), "jwt_invalid"),
        (lambda: _claims(exp=float("inf")), "jwt_invalid"),
        (lambda: _claims(nbf=float("-inf")), "jwt_invalid"),
    ],
)
def test_claims_are_enforced(
    es_authn: Authenticator,
    ec_key: ec.EllipticCurvePrivateKey,
    claims: Callable[[], dict[str, Any]],
    reason: str,
) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "k1"})
    result = _auth(token, es_authn)
    assert isinstance(result, Failure)
    assert result.reason == reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_alg_none_is_refused(es_authn: Authenticator) -> None:
    header = _b64(json.dumps({"alg": "none", "kid": "k1", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    result = _auth(f"{header}.{body}.", es_authn)
    assert isinstance(result, Failure)
    assert result.reason == "jwt_invalid"


def test_public_key_as_hmac_secret_is_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    settings = loads(_config('algorithms = ["RS256"]\npublic_key_file = "pub.pem"'), base=tmp_path)
    authn = Authenticator(settings.credentials)
    good = jwt.encode(_claims(), rsa_key, algorithm="RS256")
    assert isinstance(_auth(good, authn), Principal)
    # The classic confusion: sign HS256 with the public key's PEM as secret.
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    sig = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{body}.{_b64(sig)}"
    result = _auth(forged, authn)
    assert isinstance(result, Failure)
    assert result.reason == "jwt_invalid"


def test_unknown_kid_and_tampered_signature(
    es_authn: Authenticator, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    unknown = jwt.encode(_claims(), other, algorithm="ES256", headers={"kid": "k2"})
    assert _auth(unknown, es_authn) == Failure("jwt_invalid")
    wrong_key = jwt.encode(_claims(), other, algorithm="ES256", headers={"kid": "k1"})
    result = _auth(wrong_key, es_authn)
    assert isinstance(result, Failure)
    assert result.reason == "jwt_invalid"
    good = jwt.encode(_claims(), ec_key, algorithm="ES256", headers={"kid": "k1"})
    head, _body, sig = good.split(".")
    tampered_body = _b64(json.dumps(_claims(scope="remote_write otlp_traces")).encode())
    result = _auth(f"{head}.{tampered_body}.{sig}", es_authn)
    assert isinstance(result, Failure)
    assert result.reason == "jwt_invalid"


def test_scope_table_maps_claim_values_to_routes(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    _jwks(tmp_path, ec_key)
    block = (
        'algorithms = ["ES256"]\njwks_file = "jwks.json"\n'
        '[credentials.jwt.scopes]\n"metrics:write" = ["remote_write"]\n'
    )
    authn = Authenticator(loads(_config(block), base=tmp_path).credentials)
    token = jwt.encode(
        _claims(scope="metrics:write other"), ec_key, algorithm="ES256", headers={"kid": "k1"}
    )
    result = _auth(token, authn)
    assert isinstance(result, Principal)
    assert result.routes == frozenset({"remote_write"})


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ('algorithms = ["none"]\njwks_file = "jwks.json"', "credentials[0].jwt.algorithms"),
        (
            'algorithms = ["HS256", "RS256"]\njwks_file = "jwks.json"',
            "credentials[0].jwt.algorithms: HS* and public-key",
        ),
        ('algorithms = ["HS256"]\njwks_file = "jwks.json"', "credentials[0].jwt.jwks_file"),
        (
            'algorithms = ["RS256"]\njwks_file = "jwks.json"',
            "credentials[0].jwt.jwks_file: an EC key cannot verify RS256",
        ),
        (
            'algorithms = ["HS256"]\nhmac_secret_env = "NOPE_UNSET"',
            "credentials[0].jwt.hmac_secret_env",
        ),
        ('algorithms = ["ES256"]\njwks_file = "jwks.json"\nkid = "k9"', "credentials[0].jwt.kid"),
        ('algorithms = ["HS256"]\nhmac_secret_env = "S"\nkid = "a b"', "credentials[0].jwt.kid"),
    ],
)
def test_bad_jwt_config_names_the_key(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, block: str, error: str
) -> None:
    _jwks(tmp_path, ec_key)
    with pytest.raises(ConfigError) as info:
        loads(_config(block), base=tmp_path, environ={})
    assert str(info.value).startswith(error)


# Two credentials whose keys have no kid (HMAC secrets, PEM keys, a one-key
# JWKS without "kid"): a token without kid could be either's, so neither was
# used and every JWT got 401 (70f0a08).  Refused at load, naming both.
_HMAC_A = "a" * 32 + "-secret-of-credential-a"
_HMAC_B = "b" * 32 + "-secret-of-credential-b"


def _two_hmac_credentials(kid_b: str = "") -> str:
    kid_line = f'kid = "{kid_b}"' if kid_b else ""
    return f"""
[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "http://127.0.0.1:9/api/v1/write"

[[credentials]]
name = "team-a"
routes = ["remote_write"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "{ISS}"
audience = "{AUD}"
hmac_secret_env = "SECRET_A"
scope_claim = ""

[[credentials]]
name = "team-b"
routes = ["remote_write"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "{ISS}"
audience = "{AUD}"
hmac_secret_env = "SECRET_B"
scope_claim = ""
{kid_line}
"""


_SECRETS = {"SECRET_A": _HMAC_A, "SECRET_B": _HMAC_B}


def test_two_keys_without_kid_are_refused_naming_both_credentials_by_position() -> None:
    with pytest.raises(ConfigError) as info:
        loads(_two_hmac_credentials(), environ=_SECRETS)
    message = str(info.value)
    assert message.startswith("credentials[1].jwt: "), message
    assert "credentials[0]" in message  # by position: a config error echoes no value
    assert "team-a" not in message
    assert "kid" in message
    assert _HMAC_A not in message
    assert _HMAC_B not in message


def test_a_jwks_key_without_kid_beside_an_hmac_secret_is_refused(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    text = _two_hmac_credentials().replace(
        'algorithms = ["HS256"]\nissuer = "https://issuer.test"\naudience = "obs-gateway"\n'
        'hmac_secret_env = "SECRET_B"',
        'algorithms = ["ES256"]\nissuer = "https://issuer.test"\naudience = "obs-gateway"\n'
        'jwks_file = "jwks.json"',
    )
    assert 'jwks_file = "jwks.json"' in text
    with pytest.raises(ConfigError) as info:
        loads(text, environ=_SECRETS, base=tmp_path)
    assert str(info.value).startswith("credentials[1].jwt: "), info.value


def test_a_configured_kid_lets_both_credentials_work() -> None:
    settings = loads(_two_hmac_credentials(kid_b="team-b-2026"), environ=_SECRETS)
    authn = Authenticator(settings.credentials)
    plain = jwt.encode(_claims(), _HMAC_A, algorithm="HS256")
    tagged = jwt.encode(_claims(), _HMAC_B, algorithm="HS256", headers={"kid": "team-b-2026"})
    a, b = _auth(plain, authn), _auth(tagged, authn)
    assert isinstance(a, Principal)
    assert isinstance(b, Principal)
    assert (a.credential, a.token_id) == ("team-a", "jwt")
    assert (b.credential, b.token_id) == ("team-b", "team-b-2026")
    # The kid is the key's id: team-b's secret without it is not team-a's key.
    untagged_b = jwt.encode(_claims(), _HMAC_B, algorithm="HS256")
    assert _auth(untagged_b, authn) == Failure("jwt_invalid", "team-a", "jwt")
