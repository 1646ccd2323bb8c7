"""telemetry snapshots, in memory: what a worker's counters turn into, how
the supervisor sums them, and that they cross the control channel intact."""

from __future__ import annotations

from gateway.process import control
from gateway.telemetry.counters import Stats
from gateway.telemetry.snapshot import ProcessSample, merge


def _stats(requests: int, last_used: float) -> Stats:
    stats = Stats()
    route = stats.route("remote_write")
    for _ in range(requests):
        route.duration.observe(0.002)
    route.in_flight = 1
    route.response_bytes = 10 * requests
    stats.upstream_error("remote_write", "reset")
    pair = stats.pair("remote_write", "ingest")
    pair.codes[204] = requests
    pair.request_bytes = 100 * requests
    token = stats.token("ingest", "default")
    token.requests, token.request_bytes, token.last_used = requests, 100 * requests, last_used
    stats.auth_failure("revoked", "ingest", "2026-10")
    stats.limit_rejection("rate")
    stats.header_dropped("underscore", 2)
    stats.open_connections = 3
    return stats


def test_merge_adds_counters_and_keeps_the_latest_last_used() -> None:
    merged = merge([_stats(2, 100.0).snapshot(), _stats(5, 50.0).snapshot()])
    route = merged.routes["remote_write"]
    assert route.in_flight == 2
    assert route.response_bytes == 70
    assert route.upstream_errors == {"reset": 2}
    assert sum(route.duration[:-1]) == 7
    assert route.duration[-1] == 7 * 0.002
    (pair,) = merged.pairs
    assert (pair.codes, pair.request_bytes) == ({204: 7}, 700)
    (token,) = merged.tokens
    assert (token.requests, token.request_bytes, token.last_used) == (7, 700, 100.0)
    (failure,) = merged.auth_failures
    assert (failure.reason, failure.credential, failure.token_id, failure.count) == (
        "revoked",
        "ingest",
        "2026-10",
        2,
    )
    assert merged.limit_rejections == {"rate": 2}
    assert merged.headers_dropped == {"underscore": 4}
    assert merged.open_connections == 6


def test_merge_does_not_alias_its_inputs() -> None:
    first = _stats(1, 1.0).snapshot()
    merged = merge([first, _stats(1, 1.0).snapshot()])
    assert merged.routes["remote_write"].upstream_errors == {"reset": 2}
    assert first.routes["remote_write"].upstream_errors == {"reset": 1}


def test_merge_of_nothing_is_empty() -> None:
    empty = merge([])
    assert (empty.routes, empty.pairs, empty.open_connections) == ({}, [], 0)


def test_a_stats_reply_crosses_the_channel_unchanged() -> None:
    reply = control.StatsReply(7, _stats(3, 12.5).snapshot(), ProcessSample(1, 0.25, 4096))
    decoded = control._decoder.decode(control._encode(reply))
    assert decoded == reply


def test_every_control_message_round_trips() -> None:
    messages: list[control.Message] = [
        control.Configure("text", "/etc/gw.toml", 8080, 3),
        control.StatsRequest(1),
        control.Ready(1234),
        control.Failed("routes: at least one route is required"),
        control.Reloaded(ok=False, error="x", generation=3),
        control.Commit(3, apply=True),
        control.Commit(4, apply=False),
        control.Committed(3),
    ]
    for message in messages:
        assert control._decoder.decode(control._encode(message)) == message
