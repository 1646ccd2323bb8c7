"""OTLP/HTTP over HTTP/2: the real OpenTelemetry Python SDK exporter
(OTLPSpanExporter, protobuf, gzip, its own retries) negotiating ``h2`` by
TLS ALPN with the gateway's CLI, which offers it once an ``otlp-grpc`` route
exists, to an HTTP/1.1 receiver behind it that decodes every span.

The SDK's default transport (requests) cannot speak HTTP/2; its built-in
urllib3 transport can, with urllib3 2's HTTP/2 support (``sender_python.py``).
The JS SDK's OTLP/HTTP exporter uses node's http/https modules: HTTP/1.1
only.  What a Go ``otlptracehttp`` exporter does over h2 is what this test
does, by another client.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import TOKEN
from tests.hostile.pki import Pki
from tests.integration.components import Gateway
from tests.integration.harness import Procs, timeout, wait_until
from tests.integration.receivers import OtlpReceiver
from tests.integration.senders import Load, python_sender
from tests.support.grpc_peers import grpc_config

pytestmark = [pytest.mark.integration, timeout(120)]


def tls_gateway(procs: Procs, tmp_path: Path, receiver: OtlpReceiver) -> tuple[Gateway, Path]:
    pki = Pki(tmp_path)
    cert = pki.server("localhost")
    tls = f'[server.tls]\ncert_file = "{cert.cert}"\nkey_file = "{cert.key}"\n'
    text = grpc_config(9, http_upstream=receiver.url + "/v1/traces")
    text = text.replace("\n[limits]", f"\n{tls}\n[limits]")
    return Gateway(procs, tmp_path / "gateway", text), pki.server_ca_file


def test_the_python_sdk_exports_over_h2_and_every_span_arrives(
    procs: Procs, tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    gw, ca = tls_gateway(procs, tmp_path, otlp_receiver)
    url = "https://localhost:" + gw.url.rsplit(":", 1)[1] + "/v1/traces"
    sender = python_sender(procs, gw, TOKEN, Load(spans=300), tmp_path, url=url, http2_ca=ca)
    result = sender.wait(60)
    got = Counter(f"{s.trace_id:032x}{s.span_id:016x}" for s in otlp_receiver.received_spans())
    assert result.exported_ok == len(result.sent) == 300
    assert result.export_failed == 0
    assert all(got[i] == 1 for i in result.sent)
    assert not otlp_receiver.errors
    assert {r.headers.get("content-encoding") for r in otlp_receiver.received} == {"gzip"}
    # Over HTTP/2 all the way to the gateway, HTTP/1.1 behind it.
    wait_until(lambda: len(gw.access_lines()) >= result.export_calls, "access lines", 10)
    lines = [e for e in gw.access_lines() if e["route"] == "otlp_traces"]
    assert {(e["http"], e["status"]) for e in lines} == {("2", 200)}
    assert len(lines) == len(otlp_receiver.received) == result.export_calls
    assert all("authorization" not in r.headers for r in otlp_receiver.received)


def test_a_wrong_token_over_h2_is_refused_once_and_not_retried(
    procs: Procs, tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    gw, ca = tls_gateway(procs, tmp_path, otlp_receiver)
    url = "https://localhost:" + gw.url.rsplit(":", 1)[1] + "/v1/traces"
    load = Load(spans=20, per_tick=20)
    sender = python_sender(procs, gw, "wrong-token", load, tmp_path, url=url, http2_ca=ca)
    result = sender.wait(60)
    assert result.export_failed == 20
    assert otlp_receiver.received == []
    wait_until(lambda: len(gw.access_lines()) >= result.export_calls, "access lines", 10)
    lines = gw.access_lines()
    # 401 is not retryable for OTLP: one attempt per export.
    assert [(e["http"], e["status"]) for e in lines] == [("2", 401)] * result.export_calls
