"""Passive health as the data path reports it: an attempt's failure counted
against its backend (and the ejection it may cause, logged), and an answer
from a backend that had failed.  One place for both HTTP/1.1 exchanges
(``failover.py``) and HTTP/2 streams of HTTP/1.1 routes (``h2relay.py``).

Must not know: exchanges, streams, connections; ``Balancer`` decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from gateway.policy.balance import Balancer, Transition

if TYPE_CHECKING:
    from gateway.datapath.shared import Shared
    from gateway.policy.balance import Lane

__all__ = ["BACKEND_KINDS", "backend_failed", "backend_recovered"]

# The failure kinds counted per backend (gateway_upstream_failures_total).
BACKEND_KINDS: Final = {
    "connect": "connect",
    "connect_timeout": "connect",
    "timeout": "timeout",
    "reset": "reset",
    "protocol": "protocol",
    "internal": "internal",
}


def backend_failed(shared: Shared, bal: Balancer, lane: Lane, kind: str) -> None:
    """Count a failure against ``lane``'s backend; eject it if it is one too many."""
    lane.stats.add(lane.stats.failures, kind)
    now = shared.loop.time()
    if bal.failed(lane, now) == Transition.EJECTED:
        lane.stats.add(lane.stats.ejections, "failures")
        shared.log.warning(
            "backend_ejected",
            route=bal.route,
            backend=lane.backend.label,
            after=kind,
            seconds=round(lane.state.ejected_until - now, 3),
        )


def backend_recovered(shared: Shared, route: str, lane: Lane) -> None:
    """An answer from a backend that had failed: healthy again."""
    if lane.state.ejections:
        shared.log.info("backend_recovered", route=route, backend=lane.backend.label)
    Balancer.succeeded(lane)
