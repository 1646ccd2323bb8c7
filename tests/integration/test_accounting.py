"""Scenario 7: the gateway's own /metrics agree with what the receivers got.

Senders that go quiet once their data is delivered (two vmagents forwarding
pushed samples, one per credential; the OTel SDK; a few raw requests with a
wrong token), receivers that record every request (a tap in front of
VictoriaMetrics, the OTLP receiver).  Then request and byte counters per
route and credential must equal the receivers' tallies exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OTHER_TOKEN, TOKEN
from tests.integration.components import VictoriaMetrics, VmAgent
from tests.integration.conftest import StartGateway
from tests.integration.harness import INTEGRATION_TIMEOUT, Procs, http_post, wait_until
from tests.integration.otel import RecordingExporter, batch_provider, emit, exporter
from tests.integration.receivers import OtlpReceiver, Received, Tap
from tests.support.metrics import Metrics

pytestmark = [pytest.mark.integration, INTEGRATION_TIMEOUT]

SAMPLES_PER_SENDER = 300
WRONG_TOKEN = "wrong-token-0123456789abcdef"


def tally(received: list[Received]) -> dict[str, int]:
    return {
        "requests": len(received),
        "request_bytes": sum(len(r.body) for r in received),
        "response_bytes": sum(len(r.response_body) for r in received),
    }


def counted(m: Metrics, route: str, credential: str) -> dict[str, Any]:
    """The gateway's request counters for one (route, credential)."""
    return {
        "codes": m.by("gateway_requests_total", "code", route=route, credential=credential),
        "request_bytes": m.sum("gateway_request_bytes_total", route=route, credential=credential),
    }


def test_gateway_counters_match_the_receivers(
    procs: Procs,
    tmp_path: Path,
    victoria_metrics: VictoriaMetrics,
    start_gateway: StartGateway,
    otlp_receiver: OtlpReceiver,
    servers: Any,
) -> None:
    vm = victoria_metrics
    tap: Tap = servers(Tap(vm.url))
    gw = start_gateway(
        rw_upstream=tap.url + "/api/v1/write", otlp_upstream=otlp_receiver.url + "/v1/traces"
    )
    # The tap tells the two vmagents apart by a header the gateway forwards.
    agents = {
        cred: VmAgent(
            procs,
            tmp_path / cred,
            f"vmagent-{cred}",
            gw.write_url,
            token,
            extra=[f"-remoteWrite.headers=X-Itest-Sender: {cred}"],
        )
        for cred, token in (("ingest", TOKEN), ("other", OTHER_TOKEN))
    }
    watch = [gw.proc, vm.proc, *(a.proc for a in agents.values())]

    now_ms = int(time.time() * 1000)
    for cred, agent in agents.items():
        for batch in range(3):
            agent.import_prometheus(
                "".join(
                    f'itest_acct{{sender="{cred}",i="{i}"}} {i} {now_ms - 1000 * batch}\n'
                    for i in range(SAMPLES_PER_SENDER // 3)
                )
            )

    sender = RecordingExporter(exporter(gw, TOKEN))
    with batch_provider(sender) as provider:
        emit(provider, 200, "acct")
        assert provider.force_flush(30_000)

    # Quiet: every pushed sample is stored, each vmagent has had all its
    # blocks acknowledged (its own counter equals what the tap saw).
    expected_rows = SAMPLES_PER_SENDER * len(agents)

    def delivered() -> bool:
        stored = sum(len(s.values) for s in vm.export("itest_acct"))
        return stored == expected_rows and all(
            agent.requests_by_status().get("2XX", 0)
            == len([r for r in tap.received if r.headers.get("x-itest-sender") == cred])
            for cred, agent in agents.items()
        )

    wait_until(delivered, f"{expected_rows} samples stored and acknowledged", 30, watch=watch)
    by_sender = {
        cred: tally([r for r in tap.received if r.headers.get("x-itest-sender") == cred])
        for cred in agents
    }
    otlp = tally(otlp_receiver.received)
    total_requests = sum(t["requests"] for t in by_sender.values()) + otlp["requests"]
    # The gateway accounts an exchange just after its last response byte.
    wait_until(
        lambda: gw.metrics().sum("gateway_requests_total") == total_requests,
        f"{total_requests} requests accounted",
        10,
        watch=watch,
    )

    m = gw.metrics()

    assert all(r.status == 204 for r in tap.received)
    for cred, t in by_sender.items():
        assert t["requests"] > 0, f"no request from {cred}"
        assert counted(m, "remote_write", cred) == {
            "codes": {"204": t["requests"]},
            "request_bytes": t["request_bytes"],
        }, cred
        sent = agents[cred].metrics()
        assert sent.sum("vmagent_remotewrite_bytes_sent_total") == t["request_bytes"], cred
    assert counted(m, "otlp_traces", "ingest") == {
        "codes": {"200": otlp["requests"]},
        "request_bytes": otlp["request_bytes"],
    }
    assert otlp["requests"] == len(sender.results)
    assert counted(m, "otlp_traces", "other") == {"codes": {}, "request_bytes": 0}
    # Response bodies: what the receivers answered (VictoriaMetrics' 204s are
    # empty; the OTLP receiver's ExportTraceServiceResponse is not).
    assert m.by("gateway_response_bytes_total", "route") == {
        "remote_write": sum(t["response_bytes"] for t in by_sender.values()),
        "otlp_traces": otlp["response_bytes"],
    }
    # Per token (the rotation signal) adds up to the per-route counters.
    assert m.sum("gateway_credential_requests_total", credential="ingest") == (
        by_sender["ingest"]["requests"] + otlp["requests"]
    )
    assert (
        m.sum("gateway_credential_request_bytes_total", credential="other")
        == (by_sender["other"]["request_bytes"])
    )
    # VictoriaMetrics agrees with the tap.
    written = vm.metrics()
    assert written.sum("vm_http_requests_total", path="/api/v1/write") == sum(
        t["requests"] for t in by_sender.values()
    )
    assert written.sum("vm_rows_inserted_total", type="promremotewrite") == expected_rows

    # Refused requests: the receivers never see them; the gateway counts them
    # under credential "none" with the body bytes it read.
    before = len(tap.received), len(otlp_receiver.received)
    refused_body = b"\x00" * 1000
    refused = {"remote_write": 3, "otlp_traces": 2}
    for route, url in (("remote_write", gw.write_url), ("otlp_traces", gw.traces_url)):
        for _ in range(refused[route]):
            result = http_post(
                url,
                refused_body,
                {
                    "Authorization": f"Bearer {WRONG_TOKEN}",
                    "Content-Type": "application/x-protobuf",
                },
            )
            assert result.status == 401, result
    total_requests += sum(refused.values())
    wait_until(
        lambda: gw.metrics().sum("gateway_requests_total") == total_requests,
        f"{total_requests} requests accounted",
        10,
        watch=watch,
    )
    m = gw.metrics()
    assert (len(tap.received), len(otlp_receiver.received)) == before
    for route, n in refused.items():
        assert counted(m, route, "none") == {
            "codes": {"401": n},
            "request_bytes": len(refused_body) * n,
        }, route
    assert m.by("gateway_auth_failures_total", "reason") == {"unknown": sum(refused.values())}
