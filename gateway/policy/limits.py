"""Admission limits: concurrency slots with a short queue, token buckets for
request and byte rates, and auth-failure throttling per client address.

Pure bookkeeping driven by the caller's clock: nothing here sleeps or holds
a connection.  A request that cannot be admitted is answered at once (429
on remote-write, 503 on OTLP, DESIGN §3) or waits in a bounded FIFO for at
most ``queue_timeout`` seconds, enforced by the connection sweeper.
Unlike vmauth's 2-3 s delay on bad tokens, throttling never parks a
connection: in an event loop that delay would be a resource lever for the
attacker, not a cost.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from ipaddress import IPv6Address
from typing import Final, Protocol

from gateway.config.credentials import Credential
from gateway.config.schema import LimitsSpec

__all__ = ["Admission", "FailureThrottle", "Slots", "TokenBucket", "Waiter", "throttle_key"]


class Waiter(Protocol):
    """An exchange waiting for a slot."""

    def admitted(self) -> None: ...


class Slots:
    """At most ``limit`` holders; then up to ``queue_size`` waiters, FIFO."""

    __slots__ = ("in_use", "limit", "queue_size", "waiters")

    def __init__(self, limit: int, queue_size: int) -> None:
        self.limit = limit  # 0: unlimited
        self.queue_size = queue_size
        self.in_use = 0
        self.waiters: deque[Waiter] = deque()

    def try_acquire(self) -> bool:
        if self.limit and self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def enqueue(self, waiter: Waiter) -> bool:
        if len(self.waiters) >= self.queue_size:
            return False
        self.waiters.append(waiter)
        return True

    def forget(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def release(self) -> None:
        self.in_use -= 1
        while self.waiters and (not self.limit or self.in_use < self.limit):
            waiter = self.waiters.popleft()
            waiter.admitted()  # re-enters try_acquire; may queue elsewhere


class TokenBucket:
    """``rate`` per second, up to ``burst``; ``spend`` may run into debt so a
    large body is paid for after the fact and blocks admission until repaid."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, rate)
        self.tokens = self.burst
        self.updated = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now

    def take(self, amount: float, now: float) -> bool:
        """Admit if the bucket holds ``amount``; spend it then."""
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def positive(self, now: float) -> bool:
        self._refill(now)
        return self.tokens > 0

    def spend(self, amount: float) -> None:
        self.tokens -= amount


# IPv6 address → its key, remembered (bounded) because parsing costs
# microseconds and strict mode asks on every request.
_KEYS: Final[dict[str, str]] = {}
_KEYS_MAX: Final = 4096


def throttle_key(address: str) -> str:
    """What the throttle counts under: an IPv4 address as it is (also when
    IPv4-mapped), an IPv6 address by its /64, which one host holds whole
    and could otherwise rotate through."""
    if ":" not in address:
        return address
    key = _KEYS.get(address)
    if key is None:
        try:
            addr = IPv6Address(address)
        except ValueError:
            return address
        mapped = addr.ipv4_mapped
        key = str(mapped) if mapped is not None else f"{int(addr) >> 64:x}::/64"
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()  # a cache: starting over forgets nothing
        _KEYS[address] = key
    return key


class FailureThrottle:
    """Counts auth failures per client address (``throttle_key``) in fixed
    windows that start at an address's first failure.

    Memory is bounded: the table keeps windows in the order they started
    and, holding ``max_tracked``, drops the oldest to make room, so one
    offender is forgiven early, never all of them at once.
    """

    __slots__ = ("_seen", "limit", "max_tracked", "window")

    def __init__(self, limit: int, window: float, max_tracked: int = 100_000) -> None:
        self.limit = limit  # 0: off
        self.window = window
        self.max_tracked = max_tracked
        # key → [window start, count], oldest window first.
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def blocked(self, address: str, now: float) -> bool:
        if not self.limit:
            return False
        key = throttle_key(address)
        entry = self._seen.get(key)
        if entry is None:
            return False
        if now - entry[0] >= self.window:
            del self._seen[key]
            return False
        return entry[1] >= self.limit

    def failed(self, address: str, now: float) -> None:
        if not self.limit:
            return
        seen = self._seen
        key = throttle_key(address)
        entry = seen.get(key)
        if entry is not None:
            if now - entry[0] < self.window:
                entry[1] += 1
                return
            del seen[key]  # a new window: it goes to the end, as the newest
        elif len(seen) >= self.max_tracked:
            seen.popitem(last=False)
        seen[key] = [now, 1.0]


class Admission:
    """One worker's admission state.  Survives reloads: limits are updated
    in place so holders and waiters of the old config stay counted."""

    __slots__ = (
        "byte_rate",
        "credential_slots",
        "queue_timeout",
        "request_rate",
        "slots",
        "throttle",
    )

    def __init__(self) -> None:
        self.slots = Slots(0, 0)
        self.credential_slots: dict[str, Slots] = {}
        self.request_rate: dict[str, TokenBucket] = {}
        self.byte_rate: dict[str, TokenBucket] = {}
        self.throttle = FailureThrottle(0, 60.0)
        self.queue_timeout = 1.0

    def configure(
        self, limits: LimitsSpec, credentials: tuple[Credential, ...], now: float
    ) -> None:
        self.slots.limit = limits.max_concurrent_requests
        self.slots.queue_size = limits.queue_size
        self.queue_timeout = limits.queue_timeout_seconds
        self.throttle.limit = limits.auth_failure_limit
        self.throttle.window = limits.auth_failure_window_seconds
        for cred in credentials:
            slots = self.credential_slots.get(cred.name)
            if slots is None:
                slots = self.credential_slots[cred.name] = Slots(0, 0)
            slots.limit = cred.max_concurrent_requests  # 0: unlimited
            slots.queue_size = limits.queue_size
            _bucket(self.request_rate, cred.name, cred.rate_rps, cred.rate_burst, now)
            _bucket(self.byte_rate, cred.name, cred.rate_bytes, cred.rate_bytes, now)


def _bucket(
    buckets: dict[str, TokenBucket], name: str, rate: float, burst: float, now: float
) -> None:
    if not rate:
        buckets.pop(name, None)
        return
    bucket = buckets.get(name)
    if bucket is None:
        buckets[name] = TokenBucket(rate, burst, now)
    else:
        bucket.rate, bucket.burst = rate, max(burst, rate)
