"""Choosing a backend, and each backend's health, in one worker.

``BackendState`` is one backend of one route as this worker sees it: the
requests it has outstanding, its failures and ejection (passive health),
and the verdict of its active probe.  The ``BackendRegistry`` keeps the
states keyed by (route, URL), so a reload keeps the health of every
backend whose URL did not change; a probe's verdict only while the same
health check stands (one dropped clears it, one changed runs at once).
A ``Balancer`` is a ``BackendSet`` of one generation bound to those
states: one ``Lane`` per backend (the backend, its state, and the slots
the data path fills with its pool and counters), the policy's position,
and ``pick``.

Policies: ``least_outstanding`` (fewest requests in flight per weight),
``round_robin`` (smooth weighted round robin) and ``first_available`` (the
first healthy backend in config order).  Ties are broken by round robin,
so equal backends share even one request a second.  A backend is healthy
when it is not ejected and its probe (if any) passes; when no backend left
to try is healthy, the least recently failed one is tried rather than
refusing.

Pure: times are passed in; no sockets, no metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from gateway.policy.backends import (
    FIRST_AVAILABLE,
    LEAST_OUTSTANDING,
    Backend,
    BackendSet,
    Probe,
)

__all__ = ["BackendRegistry", "BackendState", "Balancer", "Lane", "Transition"]


class Transition:
    """What a failure or a probe result changed (plain strings, as metrics label them)."""

    EJECTED: Final = "ejected"  # passive: failures in a row
    PROBE_DOWN: Final = "probe_down"  # active: the probe failed unhealthy times in a row
    PROBE_UP: Final = "probe_up"  # active: the probe passed healthy times in a row


class BackendState:
    """One backend of one route in this worker; survives reloads."""

    __slots__ = (
        "ejected_until",
        "ejections",
        "fails",
        "last_failure",
        "outstanding",
        "probe",
        "probe_due",
        "probe_ok",
        "probe_streak",
        "probing",
    )

    def __init__(self) -> None:
        self.outstanding = 0  # attempts in flight on this backend
        self.fails = 0  # failures since the last success or ejection
        self.ejections = 0  # ejections since the last success: the backoff's exponent
        self.ejected_until = 0.0  # loop time
        self.last_failure = 0.0  # loop time; 0: never
        self.probe_ok = True  # a backend is presumed up until its probe says otherwise
        self.probe_streak = 0  # > 0: passes in a row; < 0: failures in a row
        self.probe_due = 0.0  # loop time of the next probe
        self.probing = False  # a probe is under way
        self.probe: Probe | None = None  # the health check whose verdict probe_ok is

    def follow(self, probe: Probe | None) -> None:
        """A generation's health check for this backend: its verdict stands
        only while the same check does."""
        if probe == self.probe:
            return
        self.probe = probe
        self.probe_streak = 0
        self.probe_due = 0.0  # the new check runs now, not when the old interval ends
        if probe is None:
            self.probe_ok = True  # nothing checks it any more: a down verdict would stand forever

    def healthy(self, now: float) -> bool:
        return self.probe_ok and self.ejected_until <= now


class Lane:
    """One backend of a balancer: config, state, and the data path's slots."""

    __slots__ = ("backend", "bit", "current", "pool", "state", "stats")

    def __init__(self, backend: Backend, state: BackendState) -> None:
        self.backend = backend
        self.state = state
        self.bit = 1 << backend.index  # in an exchange's mask of backends tried
        self.current = 0  # smooth weighted round robin's running weight
        # Filled by the data path when the generation is installed: the
        # backend's connection pool and its counters (their types are the
        # data path's and telemetry's business).
        self.pool: Any = None
        self.stats: Any = None


class Balancer:
    """A ``BackendSet`` bound to this worker's backend states."""

    __slots__ = (
        "_cursor",
        "_equal",
        "_orders",
        "attempts",
        "first",
        "lanes",
        "route",
        "rstats",
        "set",
        "single",
    )

    def __init__(self, route: str, bset: BackendSet, states: list[BackendState]) -> None:
        self.route = route
        self.set = bset
        self.lanes = tuple(Lane(b, s) for b, s in zip(bset.backends, states, strict=True))
        self.first = self.lanes[0]
        # One backend: no choice, no retry, no replay copy.
        self.single = len(self.lanes) == 1
        self.attempts = bset.attempts
        self._cursor = 0
        lanes = self.lanes
        self._equal = all(lane.backend.weight == 1 for lane in lanes)
        # The lanes in rotation order from each position (n² references; n ≤ 32).
        self._orders = tuple(lanes[i:] + lanes[:i] for i in range(len(lanes)))
        # The route's counters, filled by the data path (as lanes' slots are).
        self.rstats: Any = None

    def pick(self, now: float, tried: int) -> Lane | None:
        """The lane for the next attempt, none of ``tried``; None when every
        backend was tried."""
        policy = self.set.policy
        if policy == FIRST_AVAILABLE:
            for lane in self.lanes:
                state = lane.state
                if not lane.bit & tried and state.probe_ok and state.ejected_until <= now:
                    return lane
        else:
            chosen = (
                self._rotating(now, tried, policy == LEAST_OUTSTANDING)
                if self._equal
                else self._by_weight(now, tried, policy == LEAST_OUTSTANDING)
            )
            if chosen is not None:
                return chosen
        # None left to try is healthy: the one whose last failure is oldest may be back.
        fallback: Lane | None = None
        for lane in self.lanes:
            if not lane.bit & tried and (
                fallback is None or lane.state.last_failure < fallback.state.last_failure
            ):
                fallback = lane
        return fallback

    def _rotating(self, now: float, tried: int, least: bool) -> Lane | None:
        """Equal weights: scan in rotation order from the lane after the last
        one chosen; the first healthy lane (round_robin) or the first of the
        least loaded (least_outstanding) wins, so ties rotate.  Allocates
        nothing: it runs once per request."""
        best: Lane | None = None
        load = 0
        for lane in self._orders[self._cursor]:
            state = lane.state
            if lane.bit & tried or not state.probe_ok or state.ejected_until > now:
                continue
            if best is None or (least and state.outstanding < load):
                best, load = lane, state.outstanding
                if not least or not load:
                    break
        if best is not None:
            self._cursor = (best.backend.index + 1) % len(self.lanes)
        return best

    def _by_weight(self, now: float, tried: int, least: bool) -> Lane | None:
        healthy = [lane for lane in self.lanes if not lane.bit & tried and lane.state.healthy(now)]
        if not healthy:
            return None
        if least:
            low = min(lane.state.outstanding / lane.backend.weight for lane in healthy)
            healthy = [
                lane for lane in healthy if lane.state.outstanding / lane.backend.weight == low
            ]
        return self._weighted(healthy)

    @staticmethod
    def _weighted(lanes: list[Lane]) -> Lane:
        """Smooth weighted round robin (as nginx's): unequal weights interleave
        rather than burst."""
        total = 0
        best = lanes[0]
        for lane in lanes:
            lane.current += lane.backend.weight
            total += lane.backend.weight
            if lane.current > best.current:
                best = lane
        best.current -= total
        return best

    def failed(self, lane: Lane, now: float) -> str | None:
        """A failure of ``lane``'s backend (connect, reset, timeout, protocol,
        a 5xx); ``Transition.EJECTED`` if it ejected the backend."""
        state = lane.state
        state.last_failure = now
        if state.ejected_until > now:
            # Out already (tried as the fallback): not part of a streak, or
            # the first failure once back would eject it again at once.
            return None
        state.fails += 1
        ejection = self.set.ejection
        if state.fails < ejection.after_failures:
            return None
        state.ejected_until = now + ejection.duration(state.ejections)
        state.ejections += 1
        state.fails = 0
        return Transition.EJECTED

    @staticmethod
    def succeeded(lane: Lane) -> None:
        """An answer that is not a failure: the backend is healthy again, and
        its next ejection starts from the base duration."""
        state = lane.state
        state.fails = 0
        state.ejections = 0
        state.ejected_until = 0.0

    def probed(self, state: BackendState, ok: bool, now: float) -> str | None:
        """One probe result at ``now``; the transition it caused, if any."""
        probe = self.set.probe
        assert probe is not None
        if ok:
            state.probe_streak = max(state.probe_streak, 0) + 1
            if not state.probe_ok and state.probe_streak >= probe.healthy:
                state.probe_ok = True
                # Back for the probe: a passive ejection from when it was down ends too.
                state.ejected_until = 0.0
                return Transition.PROBE_UP
            return None
        state.probe_streak = min(state.probe_streak, 0) - 1
        # A failure for the all-unhealthy fallback too, which tries the
        # least recently failed backend first.
        state.last_failure = now
        if state.probe_ok and -state.probe_streak >= probe.unhealthy:
            state.probe_ok = False
            return Transition.PROBE_DOWN
        return None


class BackendRegistry:
    """Every backend state of one worker, keyed by (route, URL)."""

    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], BackendState] = {}

    def balancer(self, route: str, bset: BackendSet) -> Balancer:
        """``bset`` bound to the states of its backends, new ones created."""
        states = []
        for backend in bset.backends:
            key = (route, backend.url)
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = BackendState()
            state.follow(bset.probe)
            states.append(state)
        return Balancer(route, bset, states)

    def keep(self, balancers: Iterable[Balancer]) -> None:
        """Forget the states no balancer of the generation in force uses
        (exchanges still running on an older one keep theirs)."""
        live = {id(lane.state) for b in balancers for lane in b.lanes}
        self._states = {k: s for k, s in self._states.items() if id(s) in live}

    def __len__(self) -> int:
        return len(self._states)
