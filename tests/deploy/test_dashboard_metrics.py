"""The dashboard and the alert rules query only metrics the gateway exports.

A real gateway (in-process, real loopback sockets) serves a few requests
that touch every code path with a metric of its own (success, auth
failures of several reasons, an upstream connect error, a token with a
not_after); its admin /metrics is scraped and parsed.  Every metric name in
every dashboard query, dashboard variable and alert rule must be among the
scraped sample names, so renaming a metric in gateway/metrics.py fails
here instead of leaving an empty panel or an alert that can never fire.
The queries are parsed with a real PromQL parser, so a syntax error in one
fails here too.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser
import pytest
import yaml

from tests.conftest import (
    OTHER_TOKEN,
    TOKEN,
    RecordingUpstream,
    StartGateway,
    config_text,
    sha256,
    wait_for,
)
from tests.support.metrics import scrape

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "obs-gateway.json"
RULES = REPO / "deploy" / "alerts" / "obs-gateway.rules.yml"

# Series the scraper (vmagent, Prometheus) adds to every target: not ours to export.
SCRAPER_SERIES = frozenset({"up"})

REVOKED_TOKEN = "test-token-0123456789abcdef-revoked"
UNKNOWN_TOKEN = "test-token-0123456789abcdef-unknown"
TENANT_TOKEN = "test-token-0123456789abcdef-tenant"

# "ingest": a token list with a not_after (→ expiry gauge) and a revoked
# entry (→ reason="revoked"); "other": remote_write only (→ reason="scope");
# "tenant": a forward table (→ a client's extra_label dropped and counted).
CREDENTIALS = f"""
[[credentials]]
name = "ingest"
routes = ["remote_write", "otlp_traces"]

[[credentials.tokens]]
id = "current"
sha256 = "{sha256(TOKEN.encode())}"
not_after = "2099-01-01T00:00:00Z"

[[credentials.revoked]]
id = "leaked"
sha256 = "{sha256(REVOKED_TOKEN.encode())}"

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["remote_write"]

[[credentials]]
name = "tenant"
token_sha256 = "{sha256(TENANT_TOKEN.encode())}"
routes = ["remote_write"]
[credentials.forward]
extra_labels = {{ tenant = "a" }}
"""


# ---------------------------------------------------------------- queries


def to_promql(expr: str) -> str:
    """Grafana's macros and template variables → plain PromQL that parses.

    Template variables may only stand inside label matchers (`=~"$route"`),
    where `.*` keeps the query valid; anywhere else the parse fails, which
    is the point: such a query would not survive another Grafana either.
    """
    for macro, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(macro, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next(
                (m.value for m in node.matchers.matchers if m.name == "__name__"), None
            )
            assert name, f"selector without a literal metric name in {expr!r}"
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows, collapsed or not


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*\w+\s*\)$")


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [
        (f"panel {panel['title']!r} target {target['refId']}", to_promql(target["expr"]))
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(query)
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        found.append((f"variable ${var['name']}", to_promql(m.group("selector"))))
    return found


def rule_queries() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


# ---------------------------------------------------------------- the scrape


@pytest.fixture
async def exported(start_gateway: StartGateway, upstream: RecordingUpstream) -> set[str]:
    """Sample names (histograms as _bucket/_sum/_count) after some traffic."""
    rw = upstream.url + "/api/v1/write"
    text = config_text(
        rw_upstream=rw,
        otlp_upstream="http://127.0.0.1:9/v1/traces",  # discard port: connect error
        credentials=CREDENTIALS,
        # Three failures below, then a fourth is throttled.
        extra="[limits]\nauth_failure_limit = 3",
    )
    # remote_write over two backends, the first refusing: a connect failure,
    # an ejection and a retry; a replay buffer too small for the bodies (a
    # skipped copy); a health check (probe results, health gauges).
    text = text.replace(
        f'upstream = "{rw}"',
        f'upstreams = ["http://127.0.0.1:9/api/v1/write", "{rw}"]\n'
        'balance = "first_available"\nreplay_buffer_bytes = 16\n'
        'health_check = { path = "/health", interval_seconds = 0.1, timeout_seconds = 0.1 }',
    )
    gw = await start_gateway(text)
    base = f"http://127.0.0.1:{gw.port}"
    attempts: list[tuple[str, str | None, int]] = [
        ("/api/v1/write", TOKEN, 204),
        ("/api/v1/write", None, 401),  # missing
        ("/api/v1/write", UNKNOWN_TOKEN, 401),  # unknown
        ("/api/v1/write", REVOKED_TOKEN, 401),  # revoked
        ("/v1/traces", OTHER_TOKEN, 403),  # scope
        ("/v1/traces", TOKEN, 503),  # upstream connect error (503 on OTLP routes)
        ("/api/v1/write?extra_label=tenant%3Devil", TENANT_TOKEN, 204),  # override dropped
        ("/api/v1/write", UNKNOWN_TOKEN, 429),  # gateway_limit_rejections_total (auth_throttle)
    ]
    async with aiohttp.ClientSession() as session:
        for path, token, status in attempts:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            headers["X_Underscored"] = "dropped"  # gateway_request_headers_dropped_total
            async with session.post(base + path, data=b"\x00" * 64, headers=headers) as resp:
                assert resp.status == status, (path, token, await resp.text())
    await wait_for(lambda: any(r.path_qs == "/health" for r in upstream.requests))
    for _ in range(100):  # the probe's answer is counted just after it arrives
        names = {s.name for s in (await scrape(gw.admin_port)).samples}
        if "gateway_upstream_probes_total" in names:
            break
        await asyncio.sleep(0.02)
    return names


def _unexported(queries: list[tuple[str, str]], exported: set[str]) -> list[str]:
    return [
        f"{where}: {name}"
        for where, expr in queries
        for name in sorted(metric_names(expr))
        if name not in exported and name not in SCRAPER_SERIES
    ]


def test_dashboard_queries_only_exported_metrics(exported: set[str]) -> None:
    missing = _unexported(dashboard_queries(), exported)
    assert not missing, "dashboard queries metrics the gateway does not export:\n" + "\n".join(
        missing
    )


def test_alert_rules_query_only_exported_metrics(exported: set[str]) -> None:
    missing = _unexported(rule_queries(), exported)
    assert not missing, "alert rules query metrics the gateway does not export:\n" + "\n".join(
        missing
    )


def test_the_scrape_saw_every_path_the_queries_need(exported: set[str]) -> None:
    # Guards the guard: families that appear only after their first event
    # must be in the scrape, or a rename of them would go unnoticed.
    for name in (
        "gateway_auth_failures_total",
        "gateway_upstream_errors_total",
        "gateway_request_headers_dropped_total",
        "gateway_limit_rejections_total",
        "gateway_credential_expiry_timestamp_seconds",
        "gateway_request_duration_seconds_bucket",
        "gateway_upstream_failures_total",
        "gateway_upstream_ejections_total",
        "gateway_upstream_retries_total",
        "gateway_upstream_probes_total",
        "gateway_upstream_healthy",
        "gateway_replay_skipped_total",
    ):
        assert name in exported


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_query_names_a_metric(source: str) -> None:
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    assert len(queries) >= 10
    for where, expr in queries:
        assert metric_names(expr), f"{where}: no metric name found in {expr!r}"


def test_metric_names_sees_through_promql() -> None:
    expr = to_promql(
        'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{route=~"$route"}'
        "[$__rate_interval]))) / on (route) group_left () max_over_time((b > 0)[1h:1m])"
        ' unless c offset 7d or {__name__="d"} and time() - e'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d", "e"}
