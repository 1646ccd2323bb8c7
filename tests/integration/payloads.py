"""Known data the scenarios send and check: the scrape target's series with
exact values (UTF-8 and escaped label values included) and a hand-encoded
Prometheus remote-write ``WriteRequest`` (protobuf + snappy block format).

The encoder follows prompb/types.proto: WriteRequest{1: repeated TimeSeries},
TimeSeries{1: repeated Label, 2: repeated Sample}, Label{1: name, 2: value},
Sample{1: double value, 2: int64 timestamp}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import cramjam

from gateway.policy.protowire import length_delimited, varint

__all__ = ["TARGET_SERIES", "exposition", "series_key", "snappy", "write_request"]

SeriesKey = tuple[str, frozenset[tuple[str, str]]]

# Values chosen to be exact in binary and in VictoriaMetrics' decimal storage,
# so "arrives with exact values" can be checked with ==.
TARGET_SERIES: list[tuple[str, dict[str, str], float]] = [
    ("itest_temperature_celsius", {"city": "Zürich"}, 21.5),
    ("itest_temperature_celsius", {"city": "東京"}, -3.25),
    ("itest_temperature_celsius", {"city": "São Paulo 🌡"}, 30.0),
    ("itest_requests_total", {"path": "/ünïcödé", "note": 'say "hi" \\ bye'}, 123456789.0),
    ("itest_requests_total", {"path": "/plain", "note": "ascii"}, 0.0),
    ("itest_ratio", {}, 0.125),
    ("itest_big_bytes", {}, 1.5e15),
]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(series: Iterable[tuple[str, Mapping[str, str], float]] = TARGET_SERIES) -> str:
    """The Prometheus text format (0.0.4) a target would serve."""
    lines = []
    for name, labels, value in series:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{inner}}} {value!r}" if inner else f"{name} {value!r}")
    return "\n".join(lines) + "\n"


def series_key(name: str, labels: Mapping[str, str]) -> SeriesKey:
    return name, frozenset(labels.items())


def write_request(series: Iterable[tuple[Mapping[str, str], float, int]]) -> bytes:
    """Serialize (labels incl. __name__, value, timestamp ms) as a WriteRequest."""
    out = bytearray()
    for labels, value, timestamp_ms in series:
        ts = bytearray()
        # Prometheus sends labels sorted by name; receivers may rely on it.
        for name in sorted(labels):
            label = length_delimited(1, name.encode()) + length_delimited(2, labels[name].encode())
            ts += length_delimited(1, label)
        sample = b"\x09" + struct.pack("<d", value) + b"\x10" + varint(timestamp_ms)
        ts += length_delimited(2, sample)
        out += length_delimited(1, bytes(ts))
    return bytes(out)


def snappy(data: bytes) -> bytes:
    """Snappy *block* format, as remote-write requires (not the framed format)."""
    return bytes(cramjam.snappy.compress_raw(data))
