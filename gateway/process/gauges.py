"""Metric values that come from config rather than traffic (tokens and
their expiry, reloads, version, workers), for the admin listener of a
single process or of the supervisor.
"""

from __future__ import annotations

from gateway import __version__
from gateway.config.loader import Settings
from gateway.telemetry.snapshot import Gauges, ProcessSample

__all__ = ["config_gauges"]


def config_gauges(
    settings: Settings,
    reloads: dict[str, int],
    last_success: float,
    workers: int = 1,
    last_ok: bool = True,
    processes: list[ProcessSample] | None = None,
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
    )
