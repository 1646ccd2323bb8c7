"""OTLP/HTTP sender process: the OpenTelemetry Python SDK (BatchSpanProcessor
+ OTLPSpanExporter, protobuf, gzip), run as its own program so that it meets
an outage exactly as the JS SDK's ``node/sender.mjs`` does beside it.

Contract (``tests.integration.senders``): environment in (OTLP_URL,
OTLP_TOKEN, SPANS, PER_TICK, TICK_MS, EXPORT_TIMEOUT_MS; OTLP_HTTP2_CA for
HTTP/2, below), one JSON file out (RESULT_FILE): the ids sent and what each
export returned.

HTTP/2: the SDK's default transport (requests) speaks HTTP/1.1 only.  With
OTLP_HTTP2_CA set, the exporter is given its other built-in transport,
urllib3's, with urllib3 2's HTTP/2 support switched on (TLS, ALPN ``h2``
only, h2 underneath); ``_transport`` is the SDK's own (private) keyword for
it, and the rest of the exporter (encoding, gzip, retries) is unchanged.
``python -m tests.integration.sender_python`` from the repository root.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.exporter.http.transport._base import BaseHTTPTransport
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class Tally(SpanExporter):
    """Counts what each export returned, in spans (BatchSpanProcessor only logs it)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.counts = {"exported_ok": 0, "export_failed": 0, "export_calls": 0}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.counts["export_calls"] += 1
        key = "exported_ok" if result is SpanExportResult.SUCCESS else "export_failed"
        self.counts[key] += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


def _http2_transport(ca_file: str) -> BaseHTTPTransport:
    import urllib3.http2  # noqa: PLC0415  (patches urllib3 for this process only)
    from opentelemetry.exporter.http.transport._urllib3 import (  # noqa: PLC0415
        Urllib3HTTPTransport,
    )

    urllib3.http2.inject_into_urllib3()
    return Urllib3HTTPTransport(verify=ca_file)


def main() -> None:
    env = os.environ
    timeout_ms = int(env.get("EXPORT_TIMEOUT_MS", "10000"))
    endpoint, timeout = env["OTLP_URL"], timeout_ms / 1000
    headers = {"Authorization": f"Bearer {env['OTLP_TOKEN']}"}
    ca_file = env.get("OTLP_HTTP2_CA")
    if ca_file:
        exporter = OTLPSpanExporter(
            endpoint=endpoint,
            headers=headers,
            compression=Compression.Gzip,
            timeout=timeout,
            _transport=_http2_transport(ca_file),
        )
    else:
        exporter = OTLPSpanExporter(
            endpoint=endpoint, headers=headers, compression=Compression.Gzip, timeout=timeout
        )
    sender = Tally(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": "obs-gateway-itest-py"}))
    provider.add_span_processor(
        BatchSpanProcessor(
            sender,
            schedule_delay_millis=100,
            max_export_batch_size=128,
            max_queue_size=10_000,
            export_timeout_millis=2 * timeout_ms,  # the exporter's budget decides
        )
    )
    tracer = provider.get_tracer("obs-gateway-itest")
    total, per_tick = int(env.get("SPANS", "100")), int(env.get("PER_TICK", "10"))
    tick = int(env.get("TICK_MS", "200")) / 1000
    sent: list[str] = []
    for i in range(total):
        with tracer.start_as_current_span(f"py-{i}", attributes={"i": i}) as span:
            ctx = span.get_span_context()
            sent.append(f"{ctx.trace_id:032x}{ctx.span_id:016x}")
        if (i + 1) % per_tick == 0:
            time.sleep(tick)
    provider.force_flush(4 * timeout_ms)
    provider.shutdown()
    result = {"sent": sent, **sender.counts}
    Path(env["RESULT_FILE"]).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
