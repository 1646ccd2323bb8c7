"""[credentials.forward]: the config's rules name their key, static values
are pre-rendered per credential and route, and values from JWT claims are
checked (pattern, bounded, visible ASCII) or the route is refused."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from gateway.config.loader import ConfigError, loads
from gateway.policy.auth import Principal
from gateway.policy.generation import Generation
from tests.conftest import TOKEN, config_text, sha256
from tests.support.grpc_peers import grpc_config

SECRET = "hmac-secret-for-the-tenancy-tests-0123456789"
ISS, AUD = "https://issuer.test", "obs-gateway"
STATIC = f"""
[[credentials]]
name = "team-a"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]
[credentials.forward]
extra_labels = {{ tenant = "a", source = "edge" }}
headers = {{ "X-Scope-OrgID" = "a" }}
[credentials.forward.upstreams]
remote_write = "http://vminsert:8480/insert/42/prometheus/api/v1/write"
"""
CLAIMS = """
[[credentials]]
name = "issuer"
routes = ["remote_write", "otlp_traces"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "https://issuer.test"
audience = "obs-gateway"
hmac_secret_env = "JWT_SECRET"
scope_claim = ""
[credentials.forward]
extra_labels = { tenant = "{claim:tenant}" }
headers = { "x-tenant" = "t-{claim:tenant}" }
"""


def generation(credentials: str | None, **kwargs: Any) -> Generation:
    text = config_text(credentials=credentials, **kwargs)
    return Generation(loads(text, environ={"JWT_SECRET": SECRET}))


def principal(gen: Generation, **claims: Any) -> Principal:
    body = {"iss": ISS, "aud": AUD, "exp": int(time.time()) + 300, **claims}
    token = jwt.encode(body, SECRET, algorithm="HS256")
    who = gen.auth.authenticate(b"Bearer " + token.encode(), time.time())
    assert isinstance(who, Principal), who
    return who


def test_static_values_are_rendered_once_per_route() -> None:
    gen = generation(STATIC)
    who = gen.auth.authenticate(b"Bearer " + TOKEN.encode(), time.time())
    assert isinstance(who, Principal)
    assert who.targets is not None
    # One backend per route here: each plan's first (only) target.
    rw, otlp = who.targets["remote_write"].targets[0], who.targets["otlp_traces"].targets[0]
    assert (rw.upstream.host, rw.upstream.port) == ("vminsert", 8480)
    assert rw.bare == (
        b"/insert/42/prometheus/api/v1/write?extra_label=tenant%3Da&extra_label=source%3Dedge"
    )
    assert rw.tenant == {
        "labels": {"tenant": "a", "source": "edge"},
        "headers": {"X-Scope-OrgID": "a"},
    }
    # Labels are for remote-write; the OTLP route keeps its upstream and gets the header.
    assert (otlp.upstream.port, otlp.bare) == (9, b"/v1/traces")
    assert otlp.headers is not None
    assert b"".join(otlp.headers.lines) == b"X-Scope-OrgID: a\r\n"
    assert otlp.tenant == {"headers": {"X-Scope-OrgID": "a"}}
    # The same objects for every request.
    again = gen.auth.authenticate(b"Bearer " + TOKEN.encode(), time.time())
    assert isinstance(again, Principal)
    assert again.targets is who.targets


def test_a_credential_without_forward_uses_the_route_defaults() -> None:
    gen = generation(None)
    who = gen.auth.authenticate(b"Bearer " + TOKEN.encode(), time.time())
    assert isinstance(who, Principal)
    assert (who.targets, who.refused) == (None, None)
    route = gen.routes.get(b"/api/v1/write")
    assert route is not None
    assert route.default is not None
    assert route.default.plain


def test_claim_values_are_forwarded() -> None:
    gen = generation(CLAIMS)
    who = principal(gen, tenant="c")
    assert who.refused is None
    assert who.targets is not None
    rw = who.targets["remote_write"].targets[0]
    assert rw.bare == b"/api/v1/write?extra_label=tenant%3Dc"
    assert rw.headers is not None
    assert b"".join(rw.headers.lines) == b"x-tenant: t-c\r\n"
    # The access line names the template, not the claim's value.
    assert rw.tenant == {
        "labels": {"tenant": "{claim:tenant}"},
        "headers": {"x-tenant": "t-{claim:tenant}"},
    }
    # Tokens with the same claim values share their targets.
    assert principal(gen, tenant="c", sub="other").targets is who.targets
    # Numbers are ids (a vminsert account): forwarded as digits.
    numeric = principal(gen, tenant=42).targets
    assert numeric is not None
    assert numeric["remote_write"].targets[0].bare == b"/api/v1/write?extra_label=tenant%3D42"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({}, "claim_missing"),
        ({"tenant": None}, "claim_missing"),
        ({"tenant": ""}, "claim_invalid"),
        ({"tenant": "a b"}, "claim_invalid"),
        ({"tenant": "a\r\nX-Evil: 1"}, "claim_invalid"),
        ({"tenant": "x" * 64}, "claim_invalid"),  # the default pattern: 63 at most
        ({"tenant": "-a"}, "claim_invalid"),
        ({"tenant": "é"}, "claim_invalid"),
        ({"tenant": True}, "claim_invalid"),
        ({"tenant": 1.5}, "claim_invalid"),
        ({"tenant": ["a"]}, "claim_invalid"),
        ({"tenant": {"id": "a"}}, "claim_invalid"),
        ({"tenant": 10**60}, "claim_invalid"),
    ],
)
def test_bad_or_missing_claims_refuse_the_routes_that_need_them(
    claims: dict[str, Any], reason: str
) -> None:
    who = principal(generation(CLAIMS), **claims)
    assert who.refused == {"remote_write": reason, "otlp_traces": reason}


def test_claim_pattern_narrows_and_a_route_without_claims_is_not_refused() -> None:
    text = CLAIMS.replace(
        'headers = { "x-tenant" = "t-{claim:tenant}" }',
        'claim_pattern = "team-[a-z]{1,8}"',
    )
    gen = generation(text)
    assert principal(gen, tenant="team-x").refused is None
    who = principal(gen, tenant="other")
    # Only remote_write carries the label: the OTLP route has nothing to fill in.
    assert who.refused == {"remote_write": "claim_invalid"}
    assert who.targets is not None
    assert "otlp_traces" in who.targets
    assert principal(gen, tenant="team-" + "x" * 200).refused == {"remote_write": "claim_invalid"}


def _forward(body: str, routes: str = '["remote_write", "otlp_traces"]') -> str:
    return f"""
[[credentials]]
name = "team-a"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = {routes}
[credentials.forward]
{body}
"""


@pytest.mark.parametrize(
    ("credentials", "key"),
    [
        (_forward('extra_labels = { "1x" = "a" }'), "credentials[0].forward.extra_labels.1x:"),
        (
            _forward('extra_labels = { __name__ = "a" }'),
            "credentials[0].forward.extra_labels.__name__:",
        ),
        (_forward('extra_labels = { tenant = "" }'), "credentials[0].forward.extra_labels.tenant:"),
        (
            _forward('extra_labels = { tenant = "a\\nb" }'),
            "credentials[0].forward.extra_labels.tenant:",
        ),
        (
            _forward('extra_labels = { tenant = "{claim:}" }'),
            "credentials[0].forward.extra_labels.tenant:",
        ),
        (
            _forward('headers = { "X_Scope_OrgID" = "a" }'),
            "credentials[0].forward.headers.X_Scope_OrgID:",
        ),
        (_forward('headers = { "X Scope" = "a" }'), "credentials[0].forward"),
        (_forward('headers = { "Host" = "a" }'), "credentials[0].forward.headers.Host:"),
        (
            _forward('headers = { "authorization" = "Bearer x" }'),
            "credentials[0].forward.headers.authorization:",
        ),
        (
            _forward('headers = { "X-Forwarded-Host" = "a" }'),
            "credentials[0].forward.headers.X-Forwarded-Host:",
        ),
        (
            _forward('headers = { "X-Request-Id" = "a" }'),
            "credentials[0].forward.headers.X-Request-Id:",
        ),
        (
            _forward('headers = { "X-Scope-OrgID" = "a", "x-scope-orgid" = "b" }'),
            "credentials[0].forward.headers.x-scope-orgid:",
        ),
        (_forward('headers = { "X-Tenant" = " a" }'), "credentials[0].forward.headers.X-Tenant:"),
        (
            _forward('headers = { "X-Tenant" = "a\\r\\nX: b" }'),
            "credentials[0].forward.headers.X-Tenant:",
        ),
        (_forward('headers = { "X-Tenant" = "é" }'), "credentials[0].forward.headers.X-Tenant:"),
        (
            _forward("[credentials.forward.upstreams]\nremote_write = 'ftp://x/'"),
            "credentials[0].forward.upstreams.remote_write:",
        ),
        (
            _forward("[credentials.forward.upstreams]\nremote_write = 'http://u:p@vm/x'"),
            "credentials[0].forward.upstreams.remote_write:",
        ),
        (
            # A list is a backend set (issue 12): its URLs are listed once each.
            _forward(
                "[credentials.forward.upstreams]\nremote_write = ['http://a/x', 'http://a/x']"
            ),
            "credentials[0].forward.upstreams.remote_write[1]:",
        ),
        (
            _forward("[credentials.forward.upstreams]\nremote_write = []"),
            "credentials[0].forward.upstreams.remote_write:",
        ),
        (
            _forward("[credentials.forward.upstreams]\nnope = 'http://a/x'"),
            "credentials[0].forward.upstreams.nope:",
        ),
        (
            _forward(
                "[credentials.forward.upstreams]\notlp_traces = 'http://a/x'", '["remote_write"]'
            ),
            "credentials[0].forward.upstreams.otlp_traces:",
        ),
        (
            _forward('extra_labels = { tenant = "a" }', '["otlp_traces"]'),
            "credentials[0].forward.extra_labels:",
        ),
        (_forward('extra_labels = { tenant = "{claim:tenant}" }'), "credentials[0].forward:"),
        (_forward('claim_pattern = "[a-z]*"'), "credentials[0].forward.claim_pattern:"),
        (_forward('claim_pattern = "(["'), "credentials[0].forward.claim_pattern:"),
        (_forward('tenant = "a"'), "credentials[0].forward.tenant: unknown key"),
    ],
)
def test_forward_errors_name_the_key(credentials: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(config_text(credentials=credentials), environ={})
    assert str(info.value).startswith(key), str(info.value)


def test_a_label_the_upstream_url_already_sets_is_refused() -> None:
    text = config_text(
        rw_upstream="http://vm:8428/api/v1/write?extra_label=tenant%3Dx",
        credentials=_forward('extra_labels = { tenant = "a" }'),
    )
    with pytest.raises(ConfigError, match=r"^credentials\[0\]\.forward\.extra_labels\.tenant:"):
        loads(text, environ={})


def test_route_query_key() -> None:
    drop: Callable[[str], str] = lambda t: t.replace(  # noqa: E731
        'protocol = "prometheus-remote-write"',
        'protocol = "prometheus-remote-write"\nquery = "drop"',
    )
    gen = Generation(loads(drop(config_text()), environ={}))
    route = gen.routes.get(b"/api/v1/write")
    assert route is not None
    assert route.target(b"extra_label=tenant=evil&x=1") == b"/api/v1/write"
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.query"):
        loads(
            config_text().replace(
                'protocol = "prometheus-remote-write"',
                'protocol = "prometheus-remote-write"\nquery = "strip"',
            ),
            environ={},
        )


def test_the_claim_memo_is_bounded() -> None:
    """Tokens with ever new claim values (a busy issuer, or one minting
    tenants by the thousand) cannot grow the memo without bound."""
    tenancy = generation(CLAIMS).tenancy["issuer"]
    first = tenancy.for_claims({"tenant": "t0"})
    for i in range(10_000):
        tenancy.for_claims({"tenant": f"t{i}"})
        assert len(tenancy._memo) <= 4096
    again = tenancy.for_claims({"tenant": "t0"})  # rebuilt after the memo started over
    assert again[0]["remote_write"].targets[0].bare == first[0]["remote_write"].targets[0].bare


def test_an_otlp_grpc_override_is_an_address_only() -> None:
    extra = '[credentials.forward.upstreams]\ngrpc_traces = "http://127.0.0.1:4317/v1/traces"'
    with pytest.raises(ConfigError, match=r"^credentials\[0\]\.forward\.upstreams\.grpc_traces:"):
        loads(grpc_config(9, credentials_extra=extra), environ={})
    ok = extra.replace("/v1/traces", "")
    assert loads(grpc_config(9, credentials_extra=ok), environ={}).credentials[0].forward
