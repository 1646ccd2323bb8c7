"""Backend choice and health as pure values (policy/backends.py,
policy/balance.py): each policy's pick, ties broken round robin, weights,
the fallback when nothing is healthy, passive ejection with a bounded
doubling backoff, probe thresholds, and a registry that keeps the state of
a backend whose URL survives a reload."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import msgspec
import pytest

from gateway.config.routes import RouteSpec
from gateway.config.schema import UpstreamSpec
from gateway.policy.backends import FIRST_AVAILABLE, Ejection, route_backends
from gateway.policy.balance import BackendRegistry, Balancer, Transition


def route(urls: Sequence[object], **keys: object) -> RouteSpec:
    raw = {"name": "rw", "path": "/w", "protocol": "prometheus-remote-write", "upstreams": urls}
    return msgspec.convert({**raw, **keys}, RouteSpec)


def balancer(
    urls: Sequence[object], registry: BackendRegistry | None = None, **keys: object
) -> Balancer:
    up = msgspec.convert(keys.pop("upstream", {}), UpstreamSpec)
    bset = route_backends(route(urls, **keys), up)
    return (registry if registry is not None else BackendRegistry()).balancer("rw", bset)


URLS = [f"http://10.0.0.{i}:8428/api/v1/write" for i in (1, 2, 3)]


def picks(bal: Balancer, n: int, now: float = 100.0) -> list[int]:
    out = []
    for _ in range(n):
        lane = bal.pick(now, 0)
        assert lane is not None
        out.append(lane.backend.index)
    return out


@pytest.mark.parametrize("balance", ["least_outstanding", "round_robin"])
def test_equal_backends_take_turns(balance: str) -> None:
    assert picks(balancer(URLS, balance=balance), 7) == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_prefers_the_least_loaded_then_rotates() -> None:
    bal = balancer(URLS)
    bal.lanes[0].state.outstanding = 2
    bal.lanes[1].state.outstanding = 1
    assert picks(bal, 2) == [2, 2]
    bal.lanes[2].state.outstanding = 1
    assert picks(bal, 4) == [1, 2, 1, 2]


def test_least_outstanding_divides_by_weight() -> None:
    bal = balancer([{"url": URLS[0], "weight": 4}, URLS[1]])
    bal.lanes[0].state.outstanding = 3  # 3/4 < 1/1
    bal.lanes[1].state.outstanding = 1
    assert picks(bal, 1) == [0]


def test_smooth_weighted_round_robin_interleaves() -> None:
    bal = balancer([{"url": URLS[0], "weight": 5}, {"url": URLS[1], "weight": 1}, URLS[2]])
    order = picks(bal, 14)
    assert Counter(order) == {0: 10, 1: 2, 2: 2}
    assert order[:7] == [0, 0, 1, 0, 2, 0, 0]  # nginx's sequence for 5:1:1


def test_first_available_is_order_and_health() -> None:
    bal = balancer(URLS, balance="first_available")
    assert bal.set.policy == FIRST_AVAILABLE
    assert picks(bal, 3) == [0, 0, 0]
    bal.failed(bal.lanes[0], 100.0)
    assert picks(bal, 2) == [1, 1]
    bal.lanes[1].state.probe_ok = False
    assert picks(bal, 1) == [2]


def test_pick_skips_what_was_tried_and_ends_when_all_were() -> None:
    bal = balancer(URLS, balance="first_available")
    tried = 0
    order = []
    while (lane := bal.pick(100.0, tried)) is not None:
        order.append(lane.backend.index)
        tried |= lane.bit
    assert order == [0, 1, 2]


def test_with_none_healthy_the_least_recently_failed_is_tried() -> None:
    bal = balancer(URLS, upstream={"eject_base_seconds": 60, "eject_max_seconds": 60})
    for i, t in ((1, 10.0), (0, 20.0), (2, 30.0)):
        assert bal.failed(bal.lanes[i], t) == Transition.EJECTED
    assert picks(bal, 2, now=31.0) == [1, 1]
    lane = bal.pick(31.0, bal.lanes[1].bit)
    assert lane is not None
    assert lane.backend.index == 0


def test_ejection_doubles_while_failing_is_bounded_and_resets_on_success() -> None:
    bal = balancer(URLS, upstream={"eject_base_seconds": 1, "eject_max_seconds": 5})
    lane, state = bal.lanes[0], bal.lanes[0].state
    now, lasted = 0.0, []
    for _ in range(5):
        assert bal.failed(lane, now) == Transition.EJECTED
        lasted.append(state.ejected_until - now)
        assert not state.healthy(now)
        assert bal.failed(lane, now + 0.1) is None  # already out: no second ejection
        now = state.ejected_until
        assert state.healthy(now)
    assert lasted == [1, 2, 4, 5, 5]
    Balancer.succeeded(lane)
    bal.failed(lane, now)
    assert state.ejected_until - now == 1


def test_eject_after_failures_counts_failures_in_a_row() -> None:
    bal = balancer(URLS, upstream={"eject_after_failures": 3})
    lane = bal.lanes[0]
    assert [bal.failed(lane, 1.0), bal.failed(lane, 1.0)] == [None, None]
    Balancer.succeeded(lane)  # the streak is broken
    assert [bal.failed(lane, 1.0) for _ in range(3)] == [None, None, Transition.EJECTED]


def test_failures_while_ejected_do_not_count_toward_the_next_ejection() -> None:
    """Tried as the fallback while ejected, a backend's failures are not a
    streak: once back, it takes eject_after_failures again to eject it."""
    bal = balancer(
        URLS, upstream={"eject_after_failures": 3, "eject_base_seconds": 1, "eject_max_seconds": 5}
    )
    lane = bal.lanes[0]
    assert [bal.failed(lane, 1.0) for _ in range(3)] == [None, None, Transition.EJECTED]
    assert [bal.failed(lane, 1.5) for _ in range(3)] == [None, None, None]  # out already
    assert [bal.failed(lane, 2.5) for _ in range(3)] == [None, None, Transition.EJECTED]
    assert lane.state.ejected_until - 2.5 == 2  # the backoff still grew


def test_a_probe_failure_is_a_failure_for_the_fallback() -> None:
    """With nothing healthy the least recently failed backend is tried; a
    backend its probe keeps failing has just failed, so it is not that one."""
    check = {
        "interval_seconds": 1,
        "timeout_seconds": 1,
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    bal = balancer(
        URLS[:2], health_check=check, upstream={"eject_base_seconds": 60, "eject_max_seconds": 60}
    )
    assert bal.failed(bal.lanes[1], 40.0) == Transition.EJECTED
    assert bal.probed(bal.lanes[0].state, False, 50.0) == Transition.PROBE_DOWN
    assert picks(bal, 2, now=55.0) == [1, 1]


def test_ejection_duration_is_capped_even_after_many() -> None:
    assert Ejection(1, 1.0, 10.0).duration(10_000) == 10.0


def test_probe_thresholds_and_a_probe_pass_ending_an_ejection() -> None:
    check = {
        "interval_seconds": 1,
        "timeout_seconds": 1,
        "healthy_threshold": 2,
        "unhealthy_threshold": 3,
    }
    bal = balancer(
        URLS, health_check=check, upstream={"eject_base_seconds": 60, "eject_max_seconds": 60}
    )
    state = bal.lanes[0].state
    results = [bal.probed(state, ok, 1.0) for ok in (False, False, True, False, False, False)]
    assert results == [None, None, None, None, None, Transition.PROBE_DOWN]
    bal.failed(bal.lanes[0], 1.0)
    assert [bal.probed(state, True, 1.5), bal.probed(state, True, 1.5)] == [
        None,
        Transition.PROBE_UP,
    ]
    assert state.healthy(2.0)  # back: the passive ejection from when it was down ended


def test_single_backend_sets_never_retry_or_copy() -> None:
    bal = balancer(URLS[:1], attempts=3)
    assert bal.single
    assert (bal.attempts, bal.set.replay_bytes, bal.set.retry_statuses) == (1, 0, frozenset())


def test_registry_keeps_state_for_an_unchanged_url_and_forgets_the_rest() -> None:
    registry = BackendRegistry()
    old = balancer(URLS, registry)
    old.lanes[0].state.outstanding = 1
    old.lanes[1].state.probe_ok = False
    # Reordered, one URL gone, one new: state follows the URL, not the position.
    new = balancer([URLS[1], URLS[0], "http://10.0.0.9:8428/api/v1/write"], registry)
    assert new.lanes[0].state is old.lanes[1].state
    assert new.lanes[1].state is old.lanes[0].state
    assert new.lanes[2].state.healthy(0.0)
    registry.keep([new])
    assert len(registry) == 3
    again = balancer(URLS[2:], registry)
    assert again.lanes[0].state is not old.lanes[2].state  # forgotten by keep()


def test_labels_are_host_port_names_or_numbered_duplicates() -> None:
    spec = route(
        [
            "http://vm:8428/a",
            "http://vm:8428/b",
            {"url": "https://[::1]/x", "name": "v6"},
            "https://[::1]/y",
        ]
    )
    assert [label for label, _ in spec.backends()] == ["vm:8428#0", "vm:8428#1", "v6", "[::1]:443"]


def test_a_credentials_own_backends_share_state_with_the_routes_by_url() -> None:
    """Issue 13 over issue 12: a forward.upstreams list is a backend set of
    its own under the route's policy; where a URL is also the route's, both
    balancers point at one state, so one health and one load."""
    from gateway.config.loader import loads  # noqa: PLC0415
    from gateway.policy.generation import Generation  # noqa: PLC0415
    from tests.conftest import config_text, sha256  # noqa: PLC0415

    route_url = "http://127.0.0.1:9/api/v1/write"
    credentials = f"""
[[credentials]]
name = "team"
token_sha256 = "{sha256(b"team-token-0123456789abcdef")}"
routes = ["remote_write"]
  [credentials.forward.upstreams]
  remote_write = ["http://10.0.0.5:8428/api/v1/write", "{route_url}"]
"""
    text = config_text(rw_upstream=route_url, credentials=credentials).replace(
        "max_body_bytes = 67108864\n", 'max_body_bytes = 67108864\nbalance = "round_robin"\n', 1
    )
    registry = BackendRegistry()
    gen = Generation(loads(text, environ={}), registry)
    route = gen.routes.get(b"/api/v1/write")
    assert route is not None
    assert route.plan is not None
    [own] = gen.tenancy["team"].balancers
    assert [lane.backend.label for lane in own.lanes] == ["10.0.0.5:8428", "127.0.0.1:9"]
    assert own.lanes[1].state is route.plan.balancer.lanes[0].state
    assert own.set.policy == route.plan.balancer.set.policy  # the route's round_robin
    assert own.attempts == 2  # the route's attempts (2), now that there are two
    assert own in gen.balancers
    assert len(registry) == 3  # remote_write: two URLs (one shared); otlp_traces: one
