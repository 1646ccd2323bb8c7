"""Request bodies the load generators send: real senders' wire formats.

Prometheus remote-write: a ``WriteRequest`` protobuf, snappy *block* format
(what vmagent and Prometheus send with ``Content-Encoding: snappy``).
OTLP/HTTP: an uncompressed ``ExportTraceServiceRequest`` protobuf.  Both are
encoded by the tiny hand encoder below (only the wire types they use), so
the bench needs no generated protobuf code; ``validate_otlp`` cross-checks
with the official bindings when they are installed.  Bodies are
deterministic (fixed seed) and sized to the largest body not above the
requested size, so "1 MiB" fits nginx's default ``client_max_body_size``.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cramjam

from gateway.policy.protowire import length_delimited, varint

__all__ = [
    "OTLP_HEADERS",
    "REMOTE_WRITE_HEADERS",
    "Payload",
    "otlp_body",
    "remote_write_body",
    "write_payload",
]

REMOTE_WRITE_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": "vmagent",
}
OTLP_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "User-Agent": "OTel-OTLP-Exporter-Python/1.25.0",
}


# -- protobuf wire format (https://protobuf.dev/programming-guides/encoding/) --


_ld = length_delimited


def _str(field: int, text: str) -> bytes:
    return _ld(field, text.encode())


def _int(field: int, n: int) -> bytes:
    """A varint field (wire type 0); negative int64 take ten bytes."""
    return varint(field << 3) + varint(n)


def _double(field: int, x: float) -> bytes:
    return varint(field << 3 | 1) + struct.pack("<d", x)


def _fixed64(field: int, n: int) -> bytes:
    return varint(field << 3 | 1) + struct.pack("<Q", n)


# -- Prometheus remote-write 1.0 (prompb/remote.proto, types.proto) -------------
_METRICS = (
    "http_requests_total",
    "process_cpu_seconds_total",
    "go_goroutines",
    "node_network_receive_bytes_total",
    "container_memory_working_set_bytes",
)
_T0_MS = 1_780_000_000_000


def _timeseries(rng: random.Random, i: int) -> bytes:
    labels = [
        ("__name__", _METRICS[i % len(_METRICS)]),
        ("instance", f"10.0.{i % 251}.{i % 7}:9100"),
        ("job", "node-exporter" if i % 3 else "api"),
        ("namespace", "honeydue"),
        ("pod", f"api-{rng.getrandbits(32):08x}-{rng.getrandbits(20):05x}"),
        ("route", f"/api/v{i % 3}/items/{i % 17}"),
    ]
    lab = b"".join(_ld(1, _str(1, k) + _str(2, v)) for k, v in sorted(labels))
    sample = _ld(2, _double(1, rng.random() * 1e6) + _int(2, _T0_MS + i * 15_000))
    return _ld(1, lab + sample)


def remote_write_body(max_bytes: int, seed: int = 1) -> tuple[bytes, int]:
    """The largest snappy-compressed WriteRequest of at most ``max_bytes``,
    and its number of samples (one sample per series, as vmagent mostly sends)."""
    rng = random.Random(seed)
    return _largest(
        lambda i: _timeseries(rng, i),
        lambda items: bytes(cramjam.snappy.compress_raw(b"".join(items))),
        max_bytes,
    )


# -- OTLP traces (opentelemetry/proto/collector/trace/v1, trace/v1) -------------
def _kv(field: int, key: str, value: str | int) -> bytes:
    """A ``KeyValue`` message as field ``field`` of its parent."""
    anyv = _str(1, value) if isinstance(value, str) else _int(3, value)
    return _ld(field, _str(1, key) + _ld(2, anyv))


def _span(rng: random.Random, trace_id: bytes, i: int) -> bytes:
    start = 1_780_000_000_000_000_000 + i * 1_000_000
    attrs = (
        _kv(9, "http.request.method", "POST")
        + _kv(9, "url.path", f"/api/items/{i % 97}")
        + _kv(9, "http.response.status_code", 204 if i % 5 else 200)
        + _kv(9, "server.address", "api.88oakapps.com")
    )
    return (
        _ld(1, trace_id)
        + _ld(2, rng.randbytes(8))
        + _str(5, f"POST /api/items/{i % 97}")
        + _int(6, 2)  # SPAN_KIND_SERVER
        + _fixed64(7, start)
        + _fixed64(8, start + rng.randrange(10**6, 10**8))
        + attrs
        + _ld(15, _int(3, 1))  # status: STATUS_CODE_OK
    )


def otlp_body(max_bytes: int, seed: int = 1) -> tuple[bytes, int]:
    """The largest ExportTraceServiceRequest of at most ``max_bytes`` (one
    resource, one scope, n spans; eight spans per trace), and its span count."""
    rng = random.Random(seed)
    trace_ids: list[bytes] = []

    def span(i: int) -> bytes:
        if i % 8 == 0:
            trace_ids.append(rng.randbytes(16))
        return _ld(2, _span(rng, trace_ids[-1], i))

    def wrap(spans: list[bytes]) -> bytes:
        resource = _ld(1, _kv(1, "service.name", "honeydue-api") + _kv(1, "host.name", "api-7d9f"))
        scope = _ld(1, _str(1, "opentelemetry.instrumentation.django"))
        return _ld(1, resource + _ld(2, scope + b"".join(spans)))

    return _largest(span, wrap, max_bytes)


def _largest(
    item: Callable[[int], bytes], wrap: Callable[[list[bytes]], bytes], max_bytes: int
) -> tuple[bytes, int]:
    """The largest ``wrap(items[:n])`` within the size: items are made once,
    in order, then a binary search on n."""
    items: list[bytes] = []

    def build(n: int) -> bytes:
        while len(items) < n:
            items.append(item(len(items)))
        return wrap(items[:n])

    lo, hi = 1, 2
    while len(build(hi)) <= max_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(build(mid)) <= max_bytes:
            lo = mid
        else:
            hi = mid
    return build(lo), lo


def validate_otlp(body: bytes) -> int | None:
    """Span count decoded by the official bindings, or None if not installed."""
    try:
        from opentelemetry.proto.collector.trace.v1 import (  # noqa: PLC0415
            trace_service_pb2,
        )
    except ImportError:
        return None
    msg = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    return sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)


@dataclass(frozen=True)
class Payload:
    name: str  # workload name: "1k", "64k", "1m", "otlp"
    path: str  # request path on every target
    file: Path
    size: int
    items: int  # samples or spans in the body
    headers: dict[str, str]


def write_payload(name: str, kind: str, max_bytes: int, directory: Path) -> Payload:
    if kind == "remote-write":
        body, items = remote_write_body(max_bytes)
        path, headers = "/api/v1/write", REMOTE_WRITE_HEADERS
    else:
        body, items = otlp_body(max_bytes)
        path, headers = "/v1/traces", OTLP_HEADERS
    file = directory / f"{name}.bin"
    file.write_bytes(body)
    return Payload(name, path, file, len(body), items, headers)
