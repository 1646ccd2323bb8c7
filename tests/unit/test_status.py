"""The status view, in memory: quantiles from histogram buckets, the
last-minute window from the samples kept, and what the view never says."""

from __future__ import annotations

import orjson
import pytest

from gateway.admin.status import SAMPLE_SECONDS, History, quantile, status_view
from gateway.telemetry.counters import DURATION_BUCKETS, Stats
from gateway.telemetry.snapshot import Gauges


def _buckets(**at: int) -> list[float]:
    counts = [0.0] * (len(DURATION_BUCKETS) + 1)
    for bound, n in at.items():
        counts[DURATION_BUCKETS.index(float(bound.removeprefix("le_").replace("_", ".")))] = n
    return counts


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 100 samples in (0.001, 0.0025]: the median lies halfway through it.
    counts = _buckets(le_0_0025=100)
    assert quantile(0.5, counts) == pytest.approx(0.00175)
    assert quantile(0.99, counts) == pytest.approx(0.001 + 0.0015 * 0.99)
    assert quantile(0.5, [0.0] * (len(DURATION_BUCKETS) + 1)) is None


def test_quantile_above_the_last_bound_is_the_bound() -> None:
    counts = [0.0] * len(DURATION_BUCKETS) + [5.0]
    assert quantile(0.99, counts) == DURATION_BUCKETS[-1]


def _gauges() -> Gauges:
    return Gauges(
        [("ingest", "default")],
        [],
        {"success": 2, "failure": 1},
        100.0,
        True,
        "0.1.0",
        1,
        routes=[("remote_write", "prometheus-remote-write")],
        expiry_warning_days=14.0,
        last_reload_attempt=150.0,
        restarts=[0],
        started_at=10.0,
    )


def _stats(requests: int) -> Stats:
    stats = Stats()
    token = stats.token("ingest", "default")
    token.requests, token.request_bytes, token.last_used = requests, 10 * requests, 99.0
    pair = stats.pair("remote_write", "ingest")
    pair.codes = {204: requests, 502: 1}
    route = stats.route("remote_write")
    for _ in range(requests):
        route.added.observe(0.002)
    return stats


def test_last_minute_is_the_difference_to_the_oldest_sample_in_the_window() -> None:
    history = History(started=0.0)
    for i, requests in enumerate((1, 5, 9)):
        history.add(100.0 + i * SAMPLE_SECONDS, _stats(requests).snapshot())
    now = 100.0 + 2 * SAMPLE_SECONDS
    view = status_view(_stats(12).snapshot(), _gauges(), history, now)
    [cred] = view["credentials"]
    [tok] = cred["tokens"]
    assert tok["requests"] == 12
    assert tok["last_minute"] == {"requests": 11, "request_bytes": 110}
    assert view["window_seconds"] == 2 * SAMPLE_SECONDS
    [route] = [r for r in view["routes"] if r["name"] == "remote_write"]
    assert route["last_minute"]["answers"]["2xx"] == 11
    assert route["last_minute"]["answers"]["5xx"] == 0  # the 502 was there before
    assert route["last_minute"]["added_p50_seconds"] == pytest.approx(0.00175)
    assert view["config"]["generation"] == 3


def test_samples_older_than_a_minute_fall_out_of_the_window() -> None:
    history = History(started=0.0)
    history.add(0.0, _stats(1).snapshot())
    history.add(70.0, _stats(5).snapshot())
    view = status_view(_stats(6).snapshot(), _gauges(), history, 75.0)
    [tok] = view["credentials"][0]["tokens"]
    assert tok["last_minute"]["requests"] == 1


def test_while_younger_than_a_minute_last_minute_counts_from_zero() -> None:
    """The first sample can come after the first requests (a worker slow to
    answer skips one): those requests are still in the last minute."""
    history = History(started=100.0)
    history.add(103.0, _stats(2).snapshot())
    view = status_view(_stats(3).snapshot(), _gauges(), history, 104.0)
    [tok] = view["credentials"][0]["tokens"]
    assert tok["last_minute"]["requests"] == 3
    assert view["window_seconds"] == 4.0


def test_the_view_names_no_secret_and_no_address() -> None:
    view = status_view(_stats(3).snapshot(), _gauges(), History(), 200.0)
    text = orjson.dumps(view).decode()
    for word in ("sha256", "digest", "upstream_url", "http://", 'token":'):
        assert word not in text
