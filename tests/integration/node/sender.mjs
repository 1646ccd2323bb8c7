// OTLP/HTTP trace sender for tests/integration: the OpenTelemetry JS SDK
// (BasicTracerProvider + BatchSpanProcessor + OTLPTraceExporter, protobuf,
// gzip), configured as an application would. The contract is the one of
// tests/integration/sender_python.py (see tests/integration/senders.py):
// environment in, one JSON result file out.
//
//   OTLP_URL, OTLP_TOKEN      traces endpoint and bearer token
//   SPANS, PER_TICK, TICK_MS  SPANS root spans, PER_TICK of them every TICK_MS
//   EXPORT_TIMEOUT_MS         the exporter's timeout (its whole retry budget)
//   RESULT_FILE               {"sent": [trace+span id hex], "exported_ok": n,
//                              "export_failed": n, "export_calls": n}
import { writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import { diag, DiagConsoleLogger, DiagLogLevel } from '@opentelemetry/api';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, BatchSpanProcessor } from '@opentelemetry/sdk-trace-base';

// INFO shows each retry decision ("Export retry time ... exceeds ...") in the log.
diag.setLogger(new DiagConsoleLogger(), DiagLogLevel.INFO);

const number = (name, fallback) => Number(process.env[name] ?? fallback);

const exporter = new OTLPTraceExporter({
  url: process.env.OTLP_URL,
  headers: { Authorization: `Bearer ${process.env.OTLP_TOKEN}` },
  compression: 'gzip',
  timeoutMillis: number('EXPORT_TIMEOUT_MS', 10000),
});

// BatchSpanProcessor only logs an export's outcome; count it here.
const tally = { exported_ok: 0, export_failed: 0, export_calls: 0 };
const recording = {
  export(spans, done) {
    exporter.export(spans, (result) => {
      tally.export_calls += 1;
      if (result.code === 0) tally.exported_ok += spans.length;
      else tally.export_failed += spans.length;
      done(result);
    });
  },
  shutdown: () => exporter.shutdown(),
  forceFlush: () => exporter.forceFlush(),
};

const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ 'service.name': 'obs-gateway-itest-node' }),
  spanProcessors: [
    new BatchSpanProcessor(recording, {
      scheduledDelayMillis: 100,
      maxExportBatchSize: 128,
      maxQueueSize: 10000,
      // Longer than the exporter's own budget, so the exporter decides.
      exportTimeoutMillis: 2 * number('EXPORT_TIMEOUT_MS', 10000),
    }),
  ],
});
const tracer = provider.getTracer('obs-gateway-itest');

const total = number('SPANS', 100);
const perTick = number('PER_TICK', 10);
const sent = [];
for (let i = 0; i < total; i += 1) {
  const span = tracer.startSpan(`node-${i}`, { attributes: { i } });
  const ctx = span.spanContext();
  sent.push(ctx.traceId + ctx.spanId);
  span.end();
  if ((i + 1) % perTick === 0) await sleep(number('TICK_MS', 200));
}
await provider.forceFlush();
await provider.shutdown();
writeFileSync(process.env.RESULT_FILE, JSON.stringify({ sent, ...tally }));
