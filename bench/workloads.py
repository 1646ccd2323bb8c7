"""What the bench measures: the workloads (body size, sender kind, client
connections) and where results are written.  Shared by the run and the
profiler, which must not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.peers import REPO

__all__ = ["OPTIONAL_WORKLOADS", "RESULTS", "WORKLOADS", "Workload"]

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "remote-write" | "otlp"
    max_bytes: int
    connections: int
    # A new connection per request (``Connection: close``): what accepting
    # (and with ``--tls``, handshaking) a connection costs.
    new_connection: bool = False


WORKLOADS = {
    "1k": Workload("1k", "remote-write", 1024, 64),
    "64k": Workload("64k", "remote-write", 64 * 1024, 32),
    "1m": Workload("1m", "remote-write", 1024 * 1024, 16),
    "otlp": Workload("otlp", "otlp", 16 * 1024, 64),
}
# Selectable with --sizes, never part of the default (recorded) run.
OPTIONAL_WORKLOADS = {
    "1k-close": Workload("1k-close", "remote-write", 1024, 64, new_connection=True),
}
