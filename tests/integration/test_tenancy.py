"""Tenancy with the real programs: the credential, not the sender, decides
the tenant.  vmagent and a hand-built remote-write request → obs-gateway
(CLI) → VictoriaMetrics; the OTel Python SDK → obs-gateway → an OTLP
receiver that records every header field as it came.

Both remote-write senders try to write as tenant "evil", in the body and
in the URL (spelled as VictoriaMetrics would still read it); the database
must hold every series under its credential's tenant and none under evil.
A control series posted straight to VictoriaMetrics with the same URL does
land under evil: the attempt is real, the gateway is what stops it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.integration.components import Gateway, VictoriaMetrics, VmAgent
from tests.integration.harness import INTEGRATION_TIMEOUT, Procs, http_post, wait_until
from tests.integration.otel import batch_provider, emit, exporter
from tests.integration.payloads import exposition, snappy, write_request
from tests.integration.receivers import OtlpReceiver, ScrapeTarget

pytestmark = [pytest.mark.integration, INTEGRATION_TIMEOUT]

TOKEN_A = "tenant-a-token-0123456789abcdef"
TOKEN_B = "tenant-b-token-0123456789abcdef"
TOKEN_PLAIN = "plain-token-0123456789abcdef"
HMAC_SECRET = "integration-hmac-secret-0123456789abcdef"
ISSUER, AUDIENCE = "https://issuer.itest", "obs-gateway"
# Every spelling VictoriaMetrics reads as extra_label tenant=evil (Go's
# url.ParseQuery decodes names and values; the last value of a label wins).
EVIL_QUERY = (
    "extra_label=tenant=evil&extra%5Flabel=tenant%3Devil&extra_label=tenant%3D%65vil"
    "&extra_label=tenant=evil"
)
REMOTE_WRITE_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def gateway_config(vm: VictoriaMetrics, receiver: OtlpReceiver, secret_file: Path) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "{vm.write_url}"

[[routes]]
name = "otlp_traces"
path = "/v1/traces"
protocol = "otlp-http"
upstream = "{receiver.url}/v1/traces"

[[credentials]]
name = "tenant-a"
token_sha256 = "{digest(TOKEN_A)}"
routes = ["remote_write", "otlp_traces"]
[credentials.forward]
extra_labels = {{ tenant = "a" }}
headers = {{ "x-tenant" = "a" }}

[[credentials]]
name = "tenant-b"
token_sha256 = "{digest(TOKEN_B)}"
routes = ["remote_write"]
[credentials.forward]
extra_labels = {{ tenant = "b" }}

[[credentials]]
name = "plain"
token_sha256 = "{digest(TOKEN_PLAIN)}"
routes = ["otlp_traces"]

[[credentials]]
name = "issuer"
routes = ["remote_write"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
hmac_secret_file = "{secret_file}"
scope_claim = ""
[credentials.forward]
extra_labels = {{ tenant = "{{claim:tenant}}" }}
"""


def series(name: str, count: int, now_ms: int) -> bytes:
    """``count`` series of ``name`` that claim tenant "evil" in the body."""
    rows = [
        ({"__name__": name, "idx": str(i), "tenant": "evil"}, float(i), now_ms)
        for i in range(count)
    ]
    return snappy(write_request(rows))


def post(url: str, body: bytes, token: str) -> int:
    result = http_post(url, body, {**REMOTE_WRITE_HEADERS, "Authorization": f"Bearer {token}"})
    return result.status


def tenants(vm: VictoriaMetrics, match: str) -> dict[str, set[str]]:
    """metric name → the tenant values its series were stored under."""
    out: dict[str, set[str]] = {}
    for row in vm.export(match):
        out.setdefault(row.labels["__name__"], set()).add(row.labels.get("tenant", "<none>"))
    return out


def token_for(**claims: Any) -> str:
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, HMAC_SECRET, algorithm="HS256")


def test_each_credential_writes_only_as_its_own_tenant(
    procs: Procs,
    tmp_path: Path,
    victoria_metrics: VictoriaMetrics,
    otlp_receiver: OtlpReceiver,
    servers: Any,
) -> None:
    vm = victoria_metrics
    secret = tmp_path / "jwt.secret"
    secret.write_text(HMAC_SECRET)
    gw = Gateway(procs, tmp_path / "gateway", gateway_config(vm, otlp_receiver, secret))
    now_ms = int(time.time() * 1000)

    # The control: the same URL straight to VictoriaMetrics is stored as evil.
    assert post(f"{vm.write_url}?{EVIL_QUERY}", series("itest_control", 1, now_ms), "x") == 204

    # Tenant b: a hand-built request, evil in the body and in the URL.
    assert post(f"{gw.write_url}?{EVIL_QUERY}", series("itest_b", 20, now_ms), TOKEN_B) == 204

    # Tenant a: a real vmagent scraping a target whose series say tenant="evil",
    # writing to a URL that asks for evil too.
    evil_series = [
        ("itest_a_gauge", {"tenant": "evil", "idx": str(i)}, float(i)) for i in range(10)
    ]
    target = servers(ScrapeTarget(exposition(evil_series)))
    scrape = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "itest-a", "static_configs": [{"targets": [f"127.0.0.1:{target.port}"]}]}
        ],
    }
    agent = VmAgent(
        procs,
        tmp_path / "vmagent",
        "vmagent",
        f"{gw.write_url}?{EVIL_QUERY}",
        TOKEN_A,
        scrape=scrape,
    )

    # Tenant c: a JWT whose claim says c; one without the claim is refused.
    assert post(gw.write_url, series("itest_c", 5, now_ms), token_for(tenant="c")) == 204
    assert post(gw.write_url, series("itest_nope", 5, now_ms), token_for(sub="x")) == 403
    assert post(gw.write_url, series("itest_nope", 5, now_ms), token_for(tenant="evil one")) == 403

    def landed() -> dict[str, set[str]] | None:
        got = tenants(vm, '{__name__=~"itest_.*"}')
        a = [r for r in vm.export('{__name__="itest_a_gauge"}') if len(r.values) >= 2]
        return got if len(a) == 10 and len(got) >= 4 else None

    got = wait_until(
        landed,
        "2 samples of each of tenant a's 10 series",
        30,
        watch=[agent.proc, gw.proc, vm.proc],
    )
    assert got == {
        "itest_control": {"evil"},
        "itest_a_gauge": {"a"},
        "itest_b": {"b"},
        "itest_c": {"c"},
    }, got
    assert len(vm.export('{__name__="itest_b"}')) == 20
    assert len(vm.export('{__name__="itest_c"}')) == 5
    assert vm.query('count({tenant="evil", __name__!="itest_control"})') == []
    assert set(agent.requests_by_status()) == {"2XX"}

    m = gw.metrics()
    dropped = m.by("gateway_client_overrides_dropped_total", "credential", kind="extra_label")
    assert dropped["tenant-b"] == 4.0
    assert dropped["tenant-a"] >= 8.0  # 4 per vmagent request, at least 2 requests
    failures = m.by("gateway_auth_failures_total", "reason", credential="issuer")
    assert (failures.get("claim_missing"), failures.get("claim_invalid")) == (1.0, 1.0)
    # The access lines name the tenants from config; a claim by its template.
    lines = {e["credential"]: e.get("tenant") for e in gw.access_lines() if e["status"] == 204}
    assert lines["tenant-b"] == {"labels": {"tenant": "b"}}
    assert lines["issuer"] == {"labels": {"tenant": "{claim:tenant}"}}


def tenant_fields(received: list[Any]) -> list[list[str]]:
    """Per request, the values of every field a backend could read as x-tenant."""
    return [[v for n, v in r.fields if n.lower().replace("_", "-") == "x-tenant"] for r in received]


def test_the_otlp_receiver_sees_exactly_the_configured_tenant_header(
    procs: Procs, tmp_path: Path, victoria_metrics: VictoriaMetrics, otlp_receiver: OtlpReceiver
) -> None:
    secret = tmp_path / "jwt.secret"
    secret.write_text(HMAC_SECRET)
    config = gateway_config(victoria_metrics, otlp_receiver, secret)
    gw = Gateway(procs, tmp_path / "gateway", config)
    sent = {"X-Tenant": "evil"}
    with batch_provider(exporter(gw, TOKEN_A, headers=sent)) as provider:
        emit(provider, 50, "tenant-a")
        assert provider.force_flush(30_000)
    pinned = otlp_receiver.received
    assert pinned
    assert len(otlp_receiver.received_spans()) == 50
    assert tenant_fields(pinned) == [["a"]] * len(pinned)
    # Without a forward table the client's header passes as it came: the
    # receiver does read what a sender writes there.
    with batch_provider(exporter(gw, TOKEN_PLAIN, headers=sent)) as provider:
        emit(provider, 10, "plain")
        assert provider.force_flush(30_000)
    plain = otlp_receiver.received[len(pinned) :]
    assert plain
    assert tenant_fields(plain) == [["evil"]] * len(plain)
    dropped = gw.metrics().by(
        "gateway_client_overrides_dropped_total", "kind", credential="tenant-a"
    )
    assert dropped == {"header": float(len(pinned))}


def test_a_label_pinned_in_the_route_url_is_not_overridden(
    procs: Procs, tmp_path: Path, victoria_metrics: VictoriaMetrics
) -> None:
    """The issue's report: a route whose upstream URL pins tenant=team_a,
    and a client that appends ?extra_label=tenant=… — VictoriaMetrics keeps
    the last value, so the client's won (stored as team_b) before."""
    vm = victoria_metrics
    config = f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "{vm.write_url}?extra_label=tenant%3Dteam_a"

[[credentials]]
name = "team-a"
token_sha256 = "{digest(TOKEN_A)}"
routes = ["remote_write"]
"""
    gw = Gateway(procs, tmp_path / "gateway", config)
    now_ms = int(time.time() * 1000)
    query = EVIL_QUERY.replace("evil", "team_b")
    assert post(f"{gw.write_url}?{query}", series("itest_url", 3, now_ms), TOKEN_A) == 204
    got = wait_until(
        lambda: tenants(vm, '{__name__="itest_url"}'), "itest_url in VictoriaMetrics", 15
    )
    assert got == {"itest_url": {"team_a"}}
