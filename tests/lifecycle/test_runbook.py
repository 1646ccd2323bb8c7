"""docs/runbook.md stays true: its config snippets load, its PromQL parses and
names only metrics the gateway exports, its alert examples are the shipped
rules, and the query the rotation test watches is the one printed there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.config.loader import loads
from tests.deploy import test_dashboard_metrics as dashboard
from tests.lifecycle.test_rotation_vmagent import LAST_USED_AGE

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "docs" / "runbook.md"
RULES = REPO / "deploy" / "alerts" / "obs-gateway.rules.yml"

# One scrape definition for the dashboard, the rules and this page.
exported = dashboard.exported

ROUTES = """
[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "http://127.0.0.1:8428/api/v1/write"

[[routes]]
name = "otlp_traces"
path = "/v1/traces"
protocol = "otlp-http"
upstream = "http://127.0.0.1:4318/v1/traces"
"""


CREDENTIAL = """
[[credentials]]
name = "ingest"
token_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
routes = ["remote_write"]
"""


def blocks(language: str) -> list[str]:
    found = re.findall(rf"^ *```{language}\n(.*?)^ *```", RUNBOOK.read_text(), re.M | re.S)
    return [block.strip() for block in found]


def _normal(expr: str) -> str:
    return " ".join(expr.split())


@pytest.mark.parametrize("snippet", blocks("toml"), ids=lambda s: s.split("\n")[-2][:40])
def test_config_snippets_load(snippet: str) -> None:
    if "[[routes]]" in snippet:  # a route of its own (several backends): any credential
        settings = loads(snippet + CREDENTIAL, environ={})
        assert settings.routes
        return
    settings = loads(ROUTES + snippet, environ={})
    [credential] = settings.credentials
    # The rotation's credential, or the tenant of § Tenants.
    assert credential.name == ("team-a" if credential.forward else "ingest")


def test_promql_names_only_exported_metrics(exported: set[str]) -> None:
    queries = blocks("promql")
    assert len(queries) >= 2
    missing = dashboard._unexported([("runbook", q) for q in queries], exported)
    assert not missing


def test_alert_examples_are_the_shipped_rules(exported: set[str]) -> None:
    shipped = {
        rule["alert"]: _normal(rule["expr"])
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    [example] = blocks("yaml")
    quoted = yaml.safe_load(example)
    assert {r["alert"] for r in quoted} == {
        "ObsGatewayTokenExpiringSoon",
        "ObsGatewayRevokedTokenPresented",
        "ObsGatewayConfigReloadFailed",
    }
    for rule in quoted:
        assert _normal(rule["expr"]) == shipped[rule["alert"]], rule["alert"]
    text = RUNBOOK.read_text()
    for name in re.findall(r"`(ObsGateway\w+)`", text):
        assert name in shipped, f"the runbook names an alert the rules do not have: {name}"
    for name in set(re.findall(r"\b(gateway_[a-z_]*[a-z])(?=[{`\s])", text)):
        assert name in exported, f"the runbook names a metric the gateway does not export: {name}"


def test_the_rotation_test_watches_the_runbooks_query() -> None:
    assert LAST_USED_AGE in blocks("promql")
