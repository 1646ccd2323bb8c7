"""Metric values that come from config rather than traffic (tokens and
their expiry, reloads, version, workers), for the admin listener of a
single process or of the supervisor.
"""

from __future__ import annotations

import os
import resource

from gateway import __version__
from gateway.config.loader import Settings
from gateway.telemetry.snapshot import Gauges, ProcessSample

__all__ = ["config_gauges", "process_sample"]


def config_gauges(
    settings: Settings,
    reloads: dict[str, int],
    last_success: float,
    workers: int = 1,
    last_ok: bool = True,
    processes: list[ProcessSample] | None = None,
    *,
    last_attempt: float = 0.0,
    restarts: list[int] | None = None,
    started_at: float = 0.0,
) -> Gauges:
    """Metric values that come from config rather than traffic."""
    return Gauges(
        [(c.name, tid) for c in settings.credentials for tid in c.token_ids],
        [
            (c.name, t.id, t.not_after)
            for c in settings.credentials
            for t in c.tokens
            if t.not_after is not None
        ],
        dict(reloads),
        last_success,
        last_ok,
        __version__,
        workers,
        processes or [],
        [(r.name, r.protocol) for r in settings.routes],
        settings.auth.expiry_warning_days,
        last_attempt,
        restarts or [0] * workers,
        started_at,
    )


def process_sample(index: int) -> ProcessSample:
    """This process's CPU seconds and resident bytes, for the supervisor."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/statm", encoding="ascii") as f:
        rss_pages = int(f.read().split()[1])
    return ProcessSample(
        index, usage.ru_utime + usage.ru_stime, rss_pages * os.sysconf("SC_PAGESIZE")
    )
