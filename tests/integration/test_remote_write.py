"""Remote-write through the gateway with the real senders and receiver:
vmagent and Prometheus → obs-gateway (CLI process) → VictoriaMetrics.

Issue 3 scenarios 1, 2, 3, the VictoriaMetrics outage of 5 and the large
remote-write body of 6.  Values are checked exactly from VictoriaMetrics'
raw export; waits poll with deadlines.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOKEN
from tests.integration.components import Exported, Prometheus, VictoriaMetrics, VmAgent
from tests.integration.conftest import StartGateway
from tests.integration.harness import INTEGRATION_TIMEOUT, Procs, http_post, timeout, wait_until
from tests.integration.payloads import TARGET_SERIES, series_key, snappy, write_request
from tests.integration.receivers import ScrapeTarget, Tap

pytestmark = [pytest.mark.integration, INTEGRATION_TIMEOUT]

SCRAPE_INTERVAL_S = 1
EXPECTED = {series_key(name, labels): value for name, labels, value in TARGET_SERIES}
# Labels the scraper adds; everything else must be exactly the target's.
_ADDED = frozenset({"__name__", "job", "instance"})
WRONG_TOKEN = "wrong-token-0123456789abcdef"


def scrape_config(job: str, target: ScrapeTarget, **global_: Any) -> dict[str, Any]:
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            **global_,
        },
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{target.port}"]}]}
        ],
    }


def by_key(rows: list[Exported], extra: frozenset[str] = frozenset()) -> dict[Any, Exported]:
    out = {}
    for row in rows:
        labels = {k: v for k, v in row.labels.items() if k not in _ADDED | extra}
        key = series_key(row.labels["__name__"], labels)
        assert key not in out, f"series exported twice: {row.labels}"
        out[key] = row
    return out


def all_arrived(vm: VictoriaMetrics, match: str, samples: int) -> dict[Any, Exported] | None:
    """The target's series under ``match`` once each has ``samples`` samples."""
    got = by_key(vm.export(match))
    if set(got) >= set(EXPECTED) and all(len(got[k].values) >= samples for k in EXPECTED):
        return got
    return None


def assert_exact(got: dict[Any, Exported], target: ScrapeTarget) -> None:
    assert set(got) == set(EXPECTED), (
        f"missing: {set(EXPECTED) - set(got)}; unexpected: {set(got) - set(EXPECTED)}"
    )
    for key, expected in EXPECTED.items():
        row = got[key]
        assert set(row.values) == {expected}, f"{key}: {row.values[:10]} != {expected}"
        assert row.labels["instance"] == f"127.0.0.1:{target.port}"


def test_vmagent_scrape_arrives_exactly(
    procs: Procs,
    tmp_path: Path,
    victoria_metrics: VictoriaMetrics,
    start_gateway: StartGateway,
    scrape_target: ScrapeTarget,
) -> None:
    """Scenario 1: every series, UTF-8 label values included, with exact values."""
    vm = victoria_metrics
    gw = start_gateway(rw_upstream=vm.write_url)
    agent = VmAgent(
        procs,
        tmp_path / "vmagent",
        "vmagent",
        gw.write_url,
        TOKEN,
        scrape=scrape_config("itest-vmagent", scrape_target),
    )

    match = '{__name__=~"itest_.*",job="itest-vmagent"}'
    got = wait_until(
        lambda: all_arrived(vm, match, samples=3),
        "3 samples of every target series in VictoriaMetrics",
        30,
        watch=[agent.proc, gw.proc, vm.proc],
    )
    assert_exact(got, scrape_target)
    # The route only ever saw successful writes from this credential.
    codes = gw.metrics().by("gateway_requests_total", "code", route="remote_write")
    assert set(codes) == {"204"}, codes
    assert set(agent.requests_by_status()) == {"2XX"}


def test_wrong_token_vmagent_delivers_nothing(
    procs: Procs,
    tmp_path: Path,
    victoria_metrics: VictoriaMetrics,
    start_gateway: StartGateway,
    scrape_target: ScrapeTarget,
) -> None:
    """Scenario 2: a wrong token is refused with 401 (vmagent keeps retrying),
    nothing of it reaches VictoriaMetrics, and the gateway counts it."""
    vm = victoria_metrics
    gw = start_gateway(rw_upstream=vm.write_url)
    good = VmAgent(
        procs,
        tmp_path / "good",
        "vmagent-good",
        gw.write_url,
        TOKEN,
        scrape=scrape_config("itest-good", scrape_target),
    )
    bad = VmAgent(
        procs,
        tmp_path / "wrong",
        "vmagent-wrong",
        gw.write_url,
        WRONG_TOKEN,
        scrape=scrape_config("itest-wrong", scrape_target),
    )
    watch = [good.proc, bad.proc, gw.proc, vm.proc]

    # Two requests sent (vmagent retries a 401 with a growing backoff).
    wait_until(
        lambda: sum(bad.requests_by_status().values()) >= 2,
        "two answers in the wrong vmagent's own metrics",
        20,
        watch=watch,
    )
    # Positive control: the good sender's samples scraped after that point
    # arrive, so the wrong sender's had every chance to arrive too.
    since_ms = int(time.time() * 1000)
    good_match = '{__name__=~"itest_.*",job="itest-good"}'
    wait_until(
        lambda: (
            (got := all_arrived(vm, good_match, samples=1)) is not None
            and all(max(got[k].timestamps) > since_ms for k in EXPECTED)
        ),
        "the good vmagent's newer samples",
        20,
        watch=watch,
    )

    assert vm.export('{job="itest-wrong"}') == [], "a sender with a wrong token got data in"
    seen_by_bad = bad.requests_by_status()
    assert set(seen_by_bad) == {"401"}, seen_by_bad
    rejected = seen_by_bad["401"]

    def counted() -> bool:
        m = gw.metrics()
        return (
            m.sum("gateway_auth_failures_total", reason="unknown") >= rejected
            and m.sum("gateway_requests_total", route="remote_write", credential="none", code="401")
            >= rejected
        )

    wait_until(counted, f"the gateway to count {rejected} unknown-token 401s", 10, watch=watch)
    m = gw.metrics()
    assert m.by("gateway_auth_failures_total", "reason") == {
        "unknown": m.sum("gateway_requests_total", credential="none")
    }
    assert m.by("gateway_requests_total", "code", credential="none") == {
        "401": m.sum("gateway_requests_total", credential="none")
    }
    assert set(m.by("gateway_requests_total", "code", credential="ingest")) == {"204"}
    assert set(good.requests_by_status()) == {"2XX"}


def test_prometheus_remote_write_with_authorization(
    procs: Procs,
    tmp_path: Path,
    victoria_metrics: VictoriaMetrics,
    start_gateway: StartGateway,
    scrape_target: ScrapeTarget,
) -> None:
    """Scenario 3: Prometheus ``remote_write`` with ``authorization`` credentials;
    its samples arrive exactly, carrying its external label."""
    vm = victoria_metrics
    gw = start_gateway(rw_upstream=vm.write_url)
    external = "prometheus ✓ Köln"
    config = scrape_config(
        "itest-prometheus", scrape_target, external_labels={"itest_sender": external}
    )
    config["remote_write"] = [
        {
            "url": gw.write_url,
            "authorization": {"type": "Bearer", "credentials": TOKEN},
            "queue_config": {
                "batch_send_deadline": "1s",
                "min_backoff": "100ms",
                "max_backoff": "1s",
            },
            "metadata_config": {"send": False},
        }
    ]
    prom = Prometheus(procs, tmp_path / "prometheus", config)

    match = '{__name__=~"itest_.*",job="itest-prometheus"}'

    def arrived() -> dict[Any, Exported] | None:
        got = by_key(vm.export(match), extra=frozenset({"itest_sender"}))
        return got if set(got) >= set(EXPECTED) else None

    got = wait_until(
        arrived, "Prometheus' samples in VictoriaMetrics", 40, watch=[prom.proc, gw.proc, vm.proc]
    )
    assert_exact(got, scrape_target)
    for row in got.values():
        assert row.labels["itest_sender"] == external, row.labels
    codes = gw.metrics().by("gateway_requests_total", "code", route="remote_write")
    assert set(codes) == {"204"}, codes
    assert prom.metrics().sum("prometheus_remote_storage_samples_failed_total") == 0


OUTAGE_S = 10.0


@timeout(120)
def test_victoria_metrics_outage_loses_nothing(
    procs: Procs,
    tmp_path: Path,
    victoria_metrics: VictoriaMetrics,
    start_gateway: StartGateway,
    scrape_target: ScrapeTarget,
) -> None:
    """Scenario 5: VictoriaMetrics down ~10 s while vmagent keeps sending.
    The gateway answers a retryable status, vmagent retries, and after the
    restart (same port, same data dir) no scrape is missing."""
    vm = victoria_metrics
    gw = start_gateway(rw_upstream=vm.write_url)
    agent = VmAgent(
        procs,
        tmp_path / "vmagent",
        "vmagent",
        gw.write_url,
        TOKEN,
        scrape=scrape_config("itest-outage", scrape_target),
    )
    match = '{__name__=~"itest_.*",job="itest-outage"}'
    wait_until(
        lambda: all_arrived(vm, match, samples=2),
        "data flowing before the outage",
        30,
        watch=[agent.proc, gw.proc, vm.proc],
    )

    before_ms = int(time.time() * 1000)
    vm.stop()
    stopped = time.monotonic()

    def refused() -> bool:
        answers = gw.metrics().by("gateway_requests_total", "code", route="remote_write")
        failed = agent.requests_by_status()
        return sum(n for c, n in answers.items() if c != "204") >= 2 and (
            sum(n for c, n in failed.items() if c != "2XX") >= 2
        )

    # What the answers were is checked after recovery: a non-retryable one
    # shows up first as the data it made vmagent drop.
    wait_until(
        refused,
        "two refused writes, in the gateway's and vmagent's metrics",
        20,
        watch=[agent.proc, gw.proc],
    )
    # The outage lasts OUTAGE_S in all; vmagent keeps scraping and queueing.
    wait_until(
        lambda: time.monotonic() - stopped >= OUTAGE_S,
        f"{OUTAGE_S:.0f} s of outage",
        OUTAGE_S + 5,
        watch=[agent.proc, gw.proc],
    )
    vm.start()
    restarted_ms = int(time.time() * 1000)

    # vmagent's single queue delivers in order: once a sample scraped after
    # the restart is stored, everything queued during the outage is too.
    def caught_up() -> dict[Any, Exported] | None:
        got = by_key(vm.export(match, start=before_ms / 1000 - 5))
        if set(got) == set(EXPECTED) and all(
            max(got[k].timestamps) >= restarted_ms + 2000 for k in EXPECTED
        ):
            return got
        return None

    got = wait_until(
        caught_up, "samples scraped after the restart", 60, watch=[agent.proc, gw.proc, vm.proc]
    )
    assert_exact(got, scrape_target)
    limit_ms = SCRAPE_INTERVAL_S * 1000 * 1.5  # one missed scrape would make a 2 s gap
    for key, row in got.items():
        window = [t for t in row.timestamps if before_ms - 3000 <= t <= restarted_ms + 2000]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        assert window, key
        assert window[0] <= before_ms, (key, window)  # covers the whole outage
        assert window[-1] >= restarted_ms, (key, window)
        assert max(gaps) <= limit_ms, f"{key}: gap of {max(gaps)} ms in {window}"

    m = gw.metrics()
    codes = m.by("gateway_requests_total", "code", route="remote_write")
    assert set(codes) <= {"204", "502", "503", "504"}, f"non-retryable answers: {codes}"
    assert codes.get("502", 0) >= 2, codes  # connection refused: DESIGN §3 says 502
    assert (
        m.by("gateway_upstream_errors_total", "kind", route="remote_write").get("connect", 0) >= 2
    )
    sent = agent.metrics()
    statuses = agent.requests_by_status()
    assert set(statuses) <= {"2XX", "502", "503", "504"}, statuses
    assert statuses.get("502", 0) >= 2, statuses
    assert sent.sum("vmagent_remotewrite_retries_count_total") >= 2


def test_large_remote_write_body_passes_intact(
    procs: Procs,
    victoria_metrics: VictoriaMetrics,
    start_gateway: StartGateway,
    servers: Any,
) -> None:
    """Scenario 6: a remote-write body of several MiB reaches the receiver byte
    for byte (sha256 at a recording tap) and VictoriaMetrics decodes all of it."""
    vm = victoria_metrics
    tap: Tap = servers(Tap(vm.url))
    gw = start_gateway(rw_upstream=tap.url + "/api/v1/write")
    rng = random.Random(6)
    now_ms = int(time.time() * 1000)
    n = 20_000
    # Random label values keep snappy from shrinking the body.
    body = snappy(
        write_request(
            (
                {"__name__": "itest_large", "idx": str(i), "pad": rng.randbytes(150).hex()},
                float(i),
                now_ms,
            )
            for i in range(n)
        )
    )
    assert len(body) > 5 * 1024 * 1024, len(body)

    result = http_post(
        gw.write_url,
        body,
        {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "snappy",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
        },
    )
    assert result.status == 204, result

    [received] = tap.received
    assert len(received.body) == len(body)
    assert received.sha256 == hashlib.sha256(body).hexdigest()
    assert received.status == 204  # VictoriaMetrics' own answer, passed back
    assert received.headers["content-encoding"] == "snappy"

    def stored() -> bool:
        count = vm.query("count(itest_large)")
        total = vm.query("sum(itest_large)")
        return bool(
            count
            and total
            and float(count[0]["value"][1]) == n
            and float(total[0]["value"][1]) == n * (n - 1) / 2
        )

    wait_until(stored, f"{n} decoded series in VictoriaMetrics", 30, watch=[vm.proc])
    m = gw.metrics()
    assert m.sum("gateway_request_bytes_total", route="remote_write", credential="ingest") == len(
        body
    )
