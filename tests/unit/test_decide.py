"""decide, in memory: the rules apply in the order its docstring gives.

``ORDER`` is that docstring as data: each rule, a change to a passing
request that breaks it, and the decision it must give.  For every rule the
request is broken at that rule *and at every later one*; the decision must
still be that rule's, so each rule is proven to come before all later ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import jwt
import pytest

from gateway.config.loader import Settings, loads
from gateway.policy import decide as d
from gateway.policy.auth import Failure, Principal
from gateway.policy.errors import Kind
from gateway.policy.generation import Generation
from gateway.policy.limits import Admission
from tests.conftest import sha256
from tests.support.heads import parse_head

TOKEN = "unit-token-0123456789abcdef-ingest"
JWT_SECRET = "unit-hmac-secret-0123456789abcdef-0123456789"
CONFIG = f"""
[clients]
deny = ["10.9.9.9/32"]

[limits]
auth_failure_limit = 2
auth_throttle_mode = "strict"

[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "http://127.0.0.1:9/api/v1/write"
max_body_bytes = 1000

[[routes]]
name = "otlp_logs"
path = "/v1/logs"
protocol = "otlp-http"
upstream = "http://127.0.0.1:9/v1/logs"

[[credentials]]
name = "ingest"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write"]
client_cert_subjects = ["CN=sender"]
allow_cidrs = ["10.0.0.0/8"]
rate_limit_requests_per_second = 1
rate_limit_bytes_per_second = 1000

# Passes everything "ingest" passes; its tenant comes from a claim.
[[credentials]]
name = "tenants"
routes = ["remote_write"]
client_cert_subjects = ["CN=sender"]
allow_cidrs = ["10.0.0.0/8"]
rate_limit_requests_per_second = 1
rate_limit_bytes_per_second = 1000
[credentials.jwt]
algorithms = ["HS256"]
issuer = "https://issuer.test"
audience = "gw"
hmac_secret_env = "JWT_SECRET"
scope_claim = ""
[credentials.forward]
extra_labels = {{ tenant = "{{claim:tenant}}" }}
"""
SETTINGS = loads(CONFIG, environ={"JWT_SECRET": JWT_SECRET})
GEN = Generation(SETTINGS)


@dataclass(frozen=True)
class Request:
    """Everything decide reads, as a passing request has it."""

    method: str = "POST"
    path: str = "/api/v1/write"
    headers: tuple[tuple[str, str], ...] = (("Content-Length", "10"),)
    token: str | None = TOKEN
    hosts: int = 1
    client: str = "10.1.2.3"
    cert_subject: str = "CN=sender"
    draining: bool = False
    throttled: bool = False  # the client address has used up its auth failures
    spend: tuple[Callable[[Admission, float], None], ...] = ()
    settings: Settings = SETTINGS

    def decide(self) -> d.Decision:
        lines = [f"{self.method} {self.path} HTTP/1.1", *["Host: gw"] * self.hosts]
        if self.token is not None:
            lines.append(f"Authorization: Bearer {self.token}")
        lines += [f"{n}: {v}" for n, v in self.headers]
        head = parse_head(("\r\n".join(lines) + "\r\n\r\n").encode())
        gen = GEN if self.settings is SETTINGS else Generation(self.settings)
        admission = Admission()
        admission.configure(self.settings.limits, self.settings.credentials, 0.0)
        for spend in self.spend:
            spend(admission, 0.0)
        if self.throttled:
            for _ in range(self.settings.limits.auth_failure_limit):
                admission.throttle.failed(self.client, 0.0)
        route = gen.routes.get(head.path)
        # As the exchange does: a strict throttle skips authentication.
        if gen.throttle_strict and admission.throttle.blocked(self.client, 0.0):
            who: Principal | Failure = d.UNCHECKED
        else:
            who = gen.auth.authenticate(head.authorization, 0.0)
        return d.decide(
            head, route, self.client, who, self.cert_subject, gen, admission, 0.0, self.draining
        )


def _jwt(**claims: object) -> str:
    body = {"iss": "https://issuer.test", "aud": "gw", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


WITH_TENANT = _jwt(tenant="c")
WITHOUT_TENANT = _jwt(sub="no-tenant")


def _empty_request_bucket(admission: Admission, now: float) -> None:
    for credential in ("ingest", "tenants"):
        assert admission.request_rate[credential].take(1.0, now)


def _byte_debt(admission: Admission, now: float) -> None:
    for credential in ("ingest", "tenants"):
        admission.byte_rate[credential].spend(10_000)


def _missing_token(result: d.Decision) -> bool:
    return isinstance(result, d.Refuse) and result.kind is Kind.AUTH_MISSING


# (rule, how a passing request breaks it, the decision it gives), in decide's order.
ORDER: list[tuple[str, Callable[[Request], Request], Callable[[d.Decision], bool]]] = [
    ("malformed head", lambda r: replace(r, hosts=2), lambda x: x is d.MALFORMED),
    (
        "global deny",
        lambda r: replace(r, client="10.9.9.9"),
        lambda x: x is d.CLIENT_DENIED,
    ),
    (
        "strict auth throttle",
        lambda r: replace(r, throttled=True),
        lambda x: x is d.AUTH_THROTTLED,
    ),
    ("authentication", lambda r: replace(r, token=None), _missing_token),
    (
        "client certificate",
        lambda r: replace(r, token=TOKEN, cert_subject="CN=intruder"),
        lambda x: isinstance(x, d.Refuse) and x.auth == "client_cert",
    ),
    ("credential CIDRs", lambda r: replace(r, client="192.0.2.7"), lambda x: x is d.CIDR_DENIED),
    ("route known", lambda r: replace(r, path="/nope"), lambda x: x is d.NOT_FOUND),
    (
        "method",
        lambda r: replace(r, path="/api/v1/write", method="GET", headers=()),
        lambda x: x is d.METHOD,
    ),
    (
        "/health",
        lambda r: replace(r, path="/health", method="GET", headers=()),
        lambda x: x is d.HEALTH_CHECK,
    ),
    ("scope", lambda r: replace(r, path="/v1/logs"), lambda x: x is d.SCOPE),
    (
        "tenant claims",
        lambda r: replace(r, token=WITHOUT_TENANT),
        lambda x: x is d.CLAIM_MISSING,
    ),
    ("draining", lambda r: replace(r, draining=True), lambda x: x is d.DRAINING),
    (
        "framing",
        lambda r: replace(r, headers=(("Transfer-Encoding", "gzip, chunked"),)),
        lambda x: x is d.BAD_FRAMING,
    ),
    (
        "declared body size",
        lambda r: replace(r, headers=(("Content-Length", "5000"),)),
        lambda x: x is d.TOO_LARGE,
    ),
    (
        "request rate",
        lambda r: replace(r, spend=(*r.spend, _empty_request_bucket)),
        lambda x: x is d.RATE,
    ),
    ("byte rate", lambda r: replace(r, spend=(*r.spend, _byte_debt)), lambda x: x is d.BYTE_RATE),
]


def test_a_passing_request_is_proxied() -> None:
    assert Request().decide() is d.PROXY
    assert replace(Request(), token=WITH_TENANT).decide() is d.PROXY


def test_a_claim_that_fails_its_pattern_is_refused() -> None:
    result = replace(Request(), token=_jwt(tenant="not a tenant")).decide()
    assert result is d.CLAIM_INVALID
    assert (result.kind, result.auth) == (Kind.TENANT, "claim_invalid")


@pytest.mark.parametrize("index", range(len(ORDER)), ids=[rule for rule, _, _ in ORDER])
def test_each_rule_comes_before_every_later_rule(index: int) -> None:
    rule, _, expected = ORDER[index]
    request = Request()
    # Later breaks first, so where two rules change the same field the
    # earlier rule's change is the one that stands.
    for _, breaks, _ in reversed(ORDER[index:]):
        request = breaks(request)
    result = request.decide()
    assert expected(result), f"{rule}: got {result}"


@pytest.mark.parametrize("index", range(len(ORDER)), ids=[rule for rule, _, _ in ORDER])
def test_each_rule_alone(index: int) -> None:
    rule, breaks, expected = ORDER[index]
    result = breaks(Request()).decide()
    assert expected(result), f"{rule}: got {result}"


def test_a_bad_token_is_invalid_not_missing() -> None:
    result = replace(Request(), token="not-a-configured-token-at-all").decide()
    assert isinstance(result, d.Refuse)
    assert (result.kind, result.auth, result.error) == (
        Kind.AUTH_INVALID,
        "unknown",
        "auth_unknown",
    )


FAILURES_MODE = loads(CONFIG.replace('"strict"', '"failures"'), environ={"JWT_SECRET": JWT_SECRET})


def test_a_throttled_address_is_refused_as_overloaded_and_still_counted() -> None:
    """The default mode: the token is checked first; only failures are throttled."""
    gen = Generation(FAILURES_MODE)
    admission = Admission()
    admission.configure(FAILURES_MODE.limits, FAILURES_MODE.credentials, 0.0)
    head = parse_head(b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\n")
    who = gen.auth.authenticate(None, 0.0)
    route = gen.routes.get(head.path)
    results = [
        d.decide(head, route, "10.1.2.3", who, "", gen, admission, float(i), False)
        for i in range(4)
    ]
    assert [r.kind for r in results if isinstance(r, d.Refuse)] == [
        Kind.AUTH_MISSING,
        Kind.AUTH_MISSING,
        Kind.OVERLOADED,
        Kind.OVERLOADED,
    ]
    throttled = results[-1]
    assert isinstance(throttled, d.Refuse)
    assert (throttled.limit, throttled.auth) == ("auth_throttle", "missing")


def test_failures_mode_serves_a_valid_token_from_a_throttled_address() -> None:
    request = replace(Request(), throttled=True, settings=FAILURES_MODE)
    assert request.decide() is d.PROXY
    bad = replace(request, token="not-a-configured-token-at-all").decide()
    assert isinstance(bad, d.Refuse)
    assert (bad.kind, bad.limit, bad.auth) == (Kind.OVERLOADED, "auth_throttle", "unknown")


def test_strict_mode_refuses_even_an_unchecked_token() -> None:
    """What the exchange passes when it skipped authentication."""
    lines = b"POST /api/v1/write HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\n"
    admission = Admission()
    admission.configure(SETTINGS.limits, SETTINGS.credentials, 0.0)
    for _ in range(2):
        admission.throttle.failed("10.1.2.3", 0.0)
    head = parse_head(lines)
    route = GEN.routes.get(head.path)
    result = d.decide(head, route, "10.1.2.3", d.UNCHECKED, "", GEN, admission, 1.0, False)
    assert result is d.AUTH_THROTTLED
    assert (result.kind, result.limit, result.auth, result.anonymous) == (
        Kind.OVERLOADED,
        "auth_throttle",
        "",
        True,
    )


def test_refusals_are_built_once() -> None:
    """Deciding allocates no refusal: the same failure gives the same object."""
    first = replace(Request(), token=None).decide()
    assert first is replace(Request(), token=None).decide()
    assert first is d._AUTH["missing"][0]


def test_anonymous_refusals_are_the_ones_before_authentication() -> None:
    anonymous = {name for name in dir(d) if isinstance(getattr(d, name), d.Refuse)}
    assert {n for n in anonymous if getattr(d, n).anonymous} == {
        "MALFORMED",
        "CLIENT_DENIED",
        "AUTH_THROTTLED",
    }
