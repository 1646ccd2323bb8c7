"""limits, in memory: concurrency slots with their FIFO queue, token buckets
(refill, burst, debt), the auth-failure throttle's window and bound, and
admission state that survives a reload."""

from __future__ import annotations

import tracemalloc

from gateway.config.loader import loads
from gateway.policy.limits import Admission, FailureThrottle, Slots, TokenBucket
from tests.conftest import config_text


class Waiter:
    def __init__(self, slots: Slots, log: list[str], name: str) -> None:
        self.slots, self.log, self.name = slots, log, name

    def admitted(self) -> None:
        self.log.append(self.name)
        assert self.slots.try_acquire()


def test_slots_admit_up_to_the_limit_then_queue_in_order() -> None:
    slots = Slots(2, 2)
    log: list[str] = []
    assert slots.try_acquire()
    assert slots.try_acquire()
    assert not slots.try_acquire()
    a, b, c = (Waiter(slots, log, n) for n in "abc")
    assert slots.enqueue(a)
    assert slots.enqueue(b)
    assert not slots.enqueue(c)  # the queue is full: refused at once
    slots.release()
    assert log == ["a"]
    slots.release()
    assert log == ["a", "b"]
    assert slots.in_use == 2


def test_a_forgotten_waiter_is_never_admitted() -> None:
    slots = Slots(1, 4)
    log: list[str] = []
    assert slots.try_acquire()
    a, b = Waiter(slots, log, "a"), Waiter(slots, log, "b")
    slots.enqueue(a)
    slots.enqueue(b)
    slots.forget(a)
    slots.forget(a)  # twice is harmless
    slots.release()
    assert log == ["b"]


def test_zero_means_unlimited() -> None:
    slots = Slots(0, 0)
    assert all(slots.try_acquire() for _ in range(10_000))


def test_bucket_refills_at_its_rate_up_to_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0, now=0.0)
    assert all(bucket.take(1.0, 0.0) for _ in range(4))
    assert not bucket.take(1.0, 0.0)
    assert not bucket.take(1.0, 0.4)  # 0.8 tokens
    assert bucket.take(1.0, 0.5)
    assert bucket.take(1.0, 100.0)
    assert bucket.tokens == 3.0  # refilled to the burst, not beyond


def test_bucket_burst_is_at_least_the_rate() -> None:
    assert TokenBucket(rate=10.0, burst=0.0, now=0.0).burst == 10.0


def test_bucket_debt_blocks_until_repaid() -> None:
    bucket = TokenBucket(rate=100.0, burst=100.0, now=0.0)
    assert bucket.positive(0.0)
    bucket.spend(1000.0)  # a large body, paid after the fact
    assert not bucket.positive(0.0)
    assert not bucket.positive(9.0)
    assert bucket.positive(9.1)


def test_throttle_blocks_after_limit_within_the_window() -> None:
    throttle = FailureThrottle(limit=3, window=60.0)
    for t in range(3):
        assert not throttle.blocked("192.0.2.1", float(t))
        throttle.failed("192.0.2.1", float(t))
    assert throttle.blocked("192.0.2.1", 10.0)
    assert not throttle.blocked("192.0.2.2", 10.0)
    assert not throttle.blocked("192.0.2.1", 60.0)  # the window passed


def test_throttle_off_tracks_nothing() -> None:
    throttle = FailureThrottle(limit=0, window=60.0)
    throttle.failed("192.0.2.1", 0.0)
    assert not throttle.blocked("192.0.2.1", 0.0)
    assert throttle._seen == {}


def test_throttle_memory_is_bounded() -> None:
    throttle = FailureThrottle(limit=1, window=60.0, max_tracked=100)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(throttle._seen) <= 100


def test_ipv6_addresses_of_one_64_share_a_window() -> None:
    """One host holds a whole /64: at 70f0a08 each of its addresses had a
    window of its own, so rotating through them was never throttled."""
    throttle = FailureThrottle(limit=3, window=60.0)
    for i in range(3):
        address = f"2001:db8:1:2::{i + 1:x}"
        assert not throttle.blocked(address, 1.0)
        throttle.failed(address, 1.0)
    assert throttle.blocked("2001:db8:1:2:ffff:ffff:ffff:ffff", 2.0)
    assert throttle.blocked("2001:0db8:0001:0002:0000:0000:0000:0009", 2.0)
    assert not throttle.blocked("2001:db8:1:3::1", 2.0)  # the next /64
    assert not throttle.blocked("2001:db8:1::1", 2.0)
    # IPv4 stays exact, also when it arrives IPv4-mapped (a dual-stack socket).
    for _ in range(3):
        throttle.failed("::ffff:192.0.2.1", 1.0)
    assert throttle.blocked("192.0.2.1", 2.0)
    assert throttle.blocked("::ffff:192.0.2.1", 2.0)
    assert not throttle.blocked("192.0.2.2", 2.0)
    assert not throttle.blocked("::ffff:192.0.2.2", 2.0)


def test_a_full_table_forgets_the_oldest_window_not_every_offender() -> None:
    """At 70f0a08 the table was cleared when full: every offender forgiven."""
    throttle = FailureThrottle(limit=1, window=1000.0, max_tracked=100)
    offenders = [f"192.0.2.{i}" if i < 100 else f"198.51.100.{i - 100}" for i in range(150)]
    for t, address in enumerate(offenders):
        throttle.failed(address, float(t))
    assert len(throttle._seen) == 100
    blocked = [a for a in offenders if throttle.blocked(a, 200.0)]
    assert blocked == offenders[50:]


def test_a_window_that_starts_again_is_the_newest() -> None:
    throttle = FailureThrottle(limit=1, window=10.0, max_tracked=3)
    throttle.failed("192.0.2.1", 0.0)
    throttle.failed("192.0.2.2", 5.0)
    throttle.failed("192.0.2.3", 6.0)
    throttle.failed("192.0.2.1", 12.0)  # its old window ended: a new one, now the newest
    throttle.failed("192.0.2.4", 13.0)  # full: 192.0.2.2's window is the oldest
    assert [
        a for a in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4") if throttle.blocked(a, 14.0)
    ] == ["192.0.2.1", "192.0.2.3", "192.0.2.4"]


def test_throttle_memory_stays_flat_past_its_bound() -> None:
    """Measured, not counted: a full table does not grow with more offenders."""
    bound = 5_000
    throttle = FailureThrottle(limit=1, window=1e9, max_tracked=bound)
    sizes = []
    tracemalloc.start()
    try:
        for i in range(5 * bound):
            throttle.failed(f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1", float(i))
            if i % bound == bound - 1:
                sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert len(throttle._seen) == bound
    # After the first evictions: a table that kept every window would hold
    # 2.5x as much by the end; the dict's resizes and the bounded key cache
    # move it by a few percent.
    full = sizes[1]
    assert max(sizes[1:]) < full * 1.25, sizes
    # At the default bound (100,000 windows) that is well under 64 MB a worker.
    assert full / bound * 100_000 < 64 * 1024 * 1024, full


def test_admission_keeps_holders_and_buckets_across_a_reload() -> None:
    cred = """
[[credentials]]
name = "ingest"
token_sha256 = "{}"
routes = ["remote_write"]
max_concurrent_requests = 2
rate_limit_requests_per_second = 5
""".format("0" * 64)
    first = loads(config_text(credentials=cred), environ={})
    admission = Admission()
    admission.configure(first.limits, first.credentials, 0.0)
    slots = admission.credential_slots["ingest"]
    assert slots.try_acquire()
    bucket = admission.request_rate["ingest"]
    assert bucket.take(5.0, 0.0)
    second = loads(config_text(credentials=cred.replace("= 2", "= 3")), environ={})
    admission.configure(second.limits, second.credentials, 1.0)
    assert admission.credential_slots["ingest"] is slots
    assert (slots.limit, slots.in_use) == (3, 1)
    assert admission.request_rate["ingest"] is bucket  # no fresh burst by reloading
    third = loads(
        config_text(credentials=cred.replace("rate_limit_requests_per_second = 5", "")), environ={}
    )
    admission.configure(third.limits, third.credentials, 2.0)
    assert "ingest" not in admission.request_rate
