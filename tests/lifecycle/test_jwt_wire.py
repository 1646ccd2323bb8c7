"""JWT credentials over the wire, against the real process.

The unit tests (tests/unit/test_auth_jwt.py) prove ``Authenticator``; these
prove what a client on the socket sees: every forged, stale or misdirected
token gets the very 401 an unknown static token gets (no traceback, no hint
of what was wrong), the operator sees the reason, and the key set is re-read
on reload, so dropping a signing key drops the tokens it signed at once.
"""

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
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import RecordingUpstream
from tests.lifecycle.conftest import (
    Answer,
    StartProcess,
    call,
    lifecycle_config,
    new_token,
    token_block,
    write_atomic,
)
from tests.support.process import GatewayProcess

ISS = "https://sso.88oakapps.test"
AUD = "obs-gateway"
WRITE = "/api/v1/write"
TRACES = "/v1/traces"
OTLP_JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def next_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**doc, "kid": kid, "use": "sig", "alg": "RS256"}


def write_jwks(path: Path, *keys: tuple[rsa.RSAPrivateKey, str]) -> None:
    write_atomic(path, json.dumps({"keys": [jwk(key, kid) for key, kid in keys]}))


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    doc: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "checkout-service",
        "iat": now,
        "exp": now + 300,
        "scope": "traces:write",
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def sign(key: rsa.RSAPrivateKey, kid: str = "k1", **over: Any) -> str:
    return jwt.encode(claims(**over), key, algorithm="RS256", headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(secret: bytes, kid: str = "k1") -> str:
    """A token MACed with ``secret``: what an attacker holding only the
    public key can make (RFC 8725 §2.1, key confusion)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims()).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def flip(text: str, at: int) -> str:
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


def credentials(static: str) -> str:
    return f"""
[[credentials]]
name = "ingest"
routes = ["remote_write"]
{token_block("static", static)}
[[credentials]]
name = "apps"
routes = ["remote_write", "otlp_traces"]
[credentials.jwt]
algorithms = ["RS256"]
issuer = "{ISS}"
audience = "{AUD}"
jwks_file = "jwks.json"
leeway_seconds = 5
[credentials.jwt.scopes]
"metrics:write" = ["remote_write"]
"traces:write" = ["otlp_traces"]
"""


async def start(
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
    signing_key: rsa.RSAPrivateKey,
) -> GatewayProcess:
    write_jwks(tmp_path / "jwks.json", (signing_key, "k1"))
    config = tmp_path / "gateway.toml"
    # Off: this file makes ~30 failed attempts from one address on purpose.
    throttle_off = "[limits]\nauth_failure_limit = 0\n"
    write_atomic(
        config, lifecycle_config(upstream.url, credentials(new_token()), extra=throttle_off)
    )
    return await gateway_process(config)


def refusal_like_unknown(answer: Answer, unknown: Answer) -> None:
    assert answer.status == 401
    assert answer.body == unknown.body
    assert answer.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]
    assert answer.headers["Content-Type"] == unknown.headers["Content-Type"]
    for leak in (b"Traceback", b"jwt", b"Error", b"signature", b"kid"):
        assert leak not in answer.body


async def test_valid_jwt_is_scoped_by_its_claim(
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
    signing_key: rsa.RSAPrivateKey,
) -> None:
    gw = await start(tmp_path, upstream, gateway_process, signing_key)
    token = sign(signing_key)
    assert (await call("POST", gw.url + TRACES, token, b"{}", OTLP_JSON)).status == 204
    assert (await call("POST", gw.url + TRACES, token, b"{}", OTLP_JSON)).status == 204  # cached
    refused = await call("POST", gw.url + WRITE, token, b"x")
    assert refused.status == 403
    both = sign(signing_key, scope="metrics:write traces:write")
    assert (await call("POST", gw.url + WRITE, both, b"x")).status == 204

    health = await call("GET", gw.url + "/health", token)
    assert health.status == 200
    doc = health.json()
    assert doc["credential"] == "apps"
    assert doc["token_id"] == "k1"
    assert doc["routes"] == ["otlp_traces"]
    assert 290 <= doc["expires_in_seconds"] <= 300
    assert token.encode() not in health.body

    metrics = await gw.metrics()
    assert (
        metrics.value("gateway_requests_total", route="otlp_traces", credential="apps", code="204")
        == 2
    )
    assert (
        metrics.value(
            "gateway_auth_failures_total", reason="scope", credential="apps", token_id="k1"
        )
        == 1
    )


async def test_jwt_last_used_is_exported_per_key_id(
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
    signing_key: rsa.RSAPrivateKey,
) -> None:
    """Rotating a signing key is a rotation too: the operator needs to see the
    old kid go quiet before removing it from the JWKS."""
    gw = await start(tmp_path, upstream, gateway_process, signing_key)
    before = time.time()
    assert (await call("POST", gw.url + TRACES, sign(signing_key), b"{}", OTLP_JSON)).status == 204
    metrics = await gw.metrics()
    exported = metrics.lines("gateway_credential_")
    requests = metrics.get("gateway_credential_requests_total", credential="apps", token_id="k1")
    assert requests == 1, exported
    last_used = metrics.get(
        "gateway_credential_last_used_timestamp_seconds", credential="apps", token_id="k1"
    )
    assert last_used is not None, exported
    assert last_used >= before


BAD_TOKENS: dict[str, tuple[Callable[[rsa.RSAPrivateKey], str], tuple[str, str, str]]] = {
    "expired": (lambda k: sign(k, exp=int(time.time()) - 60), ("expired", "apps", "k1")),
    "not yet valid": (
        lambda k: sign(k, nbf=int(time.time()) + 600),
        ("not_yet_valid", "apps", "k1"),
    ),
    "wrong audience": (lambda k: sign(k, aud="grafana"), ("jwt_invalid", "apps", "k1")),
    "wrong issuer": (lambda k: sign(k, iss="https://evil.test"), ("jwt_invalid", "apps", "k1")),
    "no exp": (lambda k: sign(k, exp=None), ("jwt_invalid", "apps", "k1")),
    "alg none": (
        lambda _k: (
            b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "k1"}).encode())
            + "."
            + b64(json.dumps(claims()).encode())
            + "."
        ),
        ("jwt_invalid", "apps", "k1"),
    ),
    "HS256 with the PEM public key as secret": (
        lambda k: hs256(
            k.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ),
        ("jwt_invalid", "apps", "k1"),
    ),
    "HS256 with the JWK as secret": (
        lambda k: hs256(json.dumps(jwk(k, "k1")).encode()),
        ("jwt_invalid", "apps", "k1"),
    ),
    "unknown kid": (
        lambda _k: sign(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid="k9"),
        ("jwt_invalid", "none", "none"),
    ),
    "known kid, other key": (
        lambda _k: sign(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("jwt_invalid", "apps", "k1"),
    ),
    "tampered signature": (
        lambda k: flip(sign(k), len(sign(k)) - 20),
        ("jwt_invalid", "apps", "k1"),
    ),
    "tampered claims": (
        lambda k: ".".join(
            (
                sign(k).split(".")[0],
                b64(json.dumps(claims(scope="metrics:write traces:write")).encode()),
                sign(k).split(".")[2],
            )
        ),
        ("jwt_invalid", "apps", "k1"),
    ),
    "not a JWT at all": (lambda _k: "eyJhbGciOi.x.y", ("jwt_invalid", "none", "none")),
    # Validly signed: a 503 and an internal_error log line at 70f0a08.
    "exp past a float's range": (lambda k: sign(k, exp=10**400), ("jwt_invalid", "apps", "k1")),
}


async def test_every_bad_jwt_gets_the_plain_401_and_the_operator_the_reason(
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
    signing_key: rsa.RSAPrivateKey,
) -> None:
    gw = await start(tmp_path, upstream, gateway_process, signing_key)
    unknown = await call("POST", gw.url + WRITE, new_token(), b"x")
    unknown_otlp = await call("POST", gw.url + TRACES, new_token(), b"{}", OTLP_JSON)
    assert (unknown.status, unknown_otlp.status) == (401, 401)
    assert unknown_otlp.json() == {"code": 16, "message": "invalid bearer token"}

    expected: dict[tuple[str, str, str], int] = {("unknown", "none", "none"): 2}
    for what, (make, labels) in BAD_TOKENS.items():
        token = make(signing_key)
        answer = await call("POST", gw.url + WRITE, token, b"x")
        try:
            refusal_like_unknown(answer, unknown)
            refusal_like_unknown(
                await call("POST", gw.url + TRACES, token, b"{}", OTLP_JSON), unknown_otlp
            )
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
        expected[labels] = expected.get(labels, 0) + 2
    assert upstream.requests == []

    metrics = await gw.metrics()
    seen = {
        (s.labels["reason"], s.labels["credential"], s.labels["token_id"]): s.value
        for s in metrics.select("gateway_auth_failures_total")
    }
    assert seen == expected
    assert not any(e.get("level") == "error" for e in gw.events)


async def test_jwks_is_reread_on_reload_and_a_dropped_key_stops_working_at_once(
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
    signing_key: rsa.RSAPrivateKey,
    next_key: rsa.RSAPrivateKey,
) -> None:
    gw = await start(tmp_path, upstream, gateway_process, signing_key)
    old = sign(signing_key)
    new = sign(next_key, kid="k2")
    assert (await call("POST", gw.url + TRACES, old, b"{}", OTLP_JSON)).status == 204
    assert (await call("POST", gw.url + TRACES, new, b"{}", OTLP_JSON)).status == 401

    # Key rotation: publish k2 beside k1 ...
    write_jwks(tmp_path / "jwks.json", (signing_key, "k1"), (next_key, "k2"))
    assert (await gw.reload())["event"] == "config_reloaded"
    assert (await call("POST", gw.url + TRACES, new, b"{}", OTLP_JSON)).status == 204
    assert (await call("POST", gw.url + TRACES, old, b"{}", OTLP_JSON)).status == 204
    # ... then drop k1: its tokens, verified and cached before, are refused now.
    write_jwks(tmp_path / "jwks.json", (next_key, "k2"))
    assert (await gw.reload())["event"] == "config_reloaded"
    assert (await call("POST", gw.url + TRACES, old, b"{}", OTLP_JSON)).status == 401
    assert (await call("POST", gw.url + TRACES, new, b"{}", OTLP_JSON)).status == 204
