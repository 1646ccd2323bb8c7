"""Two real VictoriaMetrics behind one route, a real vmagent writing through
the gateway (1 s scrapes of 500 series), and one VictoriaMetrics dying with
a request in its hands (issue 12): frozen with SIGSTOP until a request waits
unanswered in its socket, then SIGKILLed, restarted 10 s later.  The gateway
replays that request on the other database, so the union of both databases
has no gap wider than 1.5 scrape intervals and vmagent never sees anything
but a 2xx, nor retries.  With ``first_available``: everything on A, A dies,
B takes over, A returns and takes the traffic back within 15 s of passing
its health checks.  Then the OTLP route with two receivers and the real
Python SDK: one receiver dies holding a request, no span is lost, the SDK
reports no error.

Rig facts (the first two found building the same check against nginx):
VictoriaMetrics 1.79.5 loses its last seconds of acknowledged samples on
SIGKILL (not yet flushed), so what A held is exported just before it is
frozen (with an ``end`` in the future: its export leaves out the newest
samples otherwise, force_flush or not), and the
freeze is only kept when no request reached A between that export and the
SIGSTOP (the gateway's own counters say so; else A is thawed and it is
tried again); and a plain SIGKILL almost never catches a request in flight
at one request a second, hence the freeze.
"""

from __future__ import annotations

import itertools
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import TOKEN
from tests.integration.components import Exported, Gateway, VictoriaMetrics, VmAgent
from tests.integration.harness import Procs, timeout, wait_until
from tests.integration.payloads import exposition
from tests.integration.receivers import OtlpReceiver, ScrapeTarget
from tests.integration.senders import Load, python_sender
from tests.integration.test_otlp_retry import assert_nothing_lost
from tests.integration.test_remote_write import SCRAPE_INTERVAL_S, scrape_config
from tests.support.backends import backends_config

pytestmark = [pytest.mark.integration, timeout(180)]

SERIES = 500
MATCH = '{__name__="itest_failover",job="itest-failover"}'
OUTAGE_S = 10.0
GAP_LIMIT_MS = 1.5 * SCRAPE_INTERVAL_S * 1000
TAKEOVER_S = 15.0
PROBE = """
[routes.health_check]
path = "/health"
interval_seconds = 1.0
timeout_seconds = 1.0
healthy_threshold = 2
unhealthy_threshold = 3
"""


def many_series() -> str:
    return exposition(("itest_failover", {"idx": str(i)}, float(i)) for i in range(SERIES))


def unread_bytes(port: int) -> int:
    """Bytes waiting unread in the receive queues of the sockets a listener
    on ``port`` accepted (/proc/net/tcp: ESTABLISHED, local port = port)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                total += int(queues.split(":")[1], 16)
    return total


def export(vm: VictoriaMetrics, start: float | None = None) -> list[Exported]:
    """Every sample of the test's series, the newest included: without an
    explicit ``end`` VictoriaMetrics 1.79.5 leaves out samples of the last
    moments, even after /internal/force_flush."""
    return vm.export(MATCH, start=start, end=time.time() + 3600)


def events(gw: Gateway, name: str) -> list[dict[str, Any]]:
    out = []
    for line in gw.proc.log_text().splitlines():
        if line.startswith("{"):
            event = orjson.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


class Rig:
    """Two VictoriaMetrics, the gateway over both, vmagent scraping 500 series."""

    def __init__(
        self, procs: Procs, tmp_path: Path, target: ScrapeTarget, rw_keys: str = ""
    ) -> None:
        self.a = VictoriaMetrics(procs, tmp_path / "vm-a")
        self.b = VictoriaMetrics(procs, tmp_path / "vm-b")
        self.a_label = f"127.0.0.1:{self.a.port}"
        self.b_label = f"127.0.0.1:{self.b.port}"
        config = backends_config(
            [self.a.write_url, self.b.write_url],
            rw_keys=rw_keys,
            server="workers = 1",
            upstream="response_timeout_seconds = 20",
            log='level = "info"',
        )
        self.gw = Gateway(procs, tmp_path / "gateway", config)
        self.agent = VmAgent(
            procs,
            tmp_path / "vmagent",
            "vmagent",
            self.gw.write_url,
            TOKEN,
            scrape=scrape_config("itest-failover", target),
        )
        self.watch = [self.agent.proc, self.gw.proc]
        self.marks: dict[str, int] = {}

    def count(self, name: str, backend: str) -> float:
        return self.gw.metrics().sum(name, route="remote_write", backend=backend)

    def freeze_and_kill_a(self) -> list[Exported]:
        """Export what A holds, SIGSTOP it (only kept if no request reached A
        in between), wait until a request sits unread in its socket, SIGKILL.
        Returns the export."""
        for _ in range(10):
            before = self.gw.metrics()
            sent = before.value(
                "gateway_upstream_requests_total", route="remote_write", backend=self.a_label
            )
            busy = before.value(
                "gateway_upstream_outstanding", route="remote_write", backend=self.a_label
            )
            if busy:
                time.sleep(0.05)
                continue
            held = export(self.a)
            self.marks["exported"] = int(time.time() * 1000)
            self.a.proc.signal(signal.SIGSTOP)
            self.marks["stopped"] = int(time.time() * 1000)
            after = self.gw.metrics()
            since = (
                after.value(
                    "gateway_upstream_requests_total", route="remote_write", backend=self.a_label
                )
                - sent
            )
            waiting = after.value(
                "gateway_upstream_outstanding", route="remote_write", backend=self.a_label
            )
            if since == waiting:  # nothing reached A and was answered after the export
                break
            self.a.proc.signal(signal.SIGCONT)
            time.sleep(0.3)
        else:
            pytest.fail("A answered between every export and freeze in 10 tries")
        wait_until(
            lambda: (
                unread_bytes(self.a.port) > 0
                and self.count("gateway_upstream_outstanding", self.a_label) >= 1
            ),
            "a request waiting unanswered in A's socket",
            20,
            watch=self.watch,
        )
        self.a.proc.signal(signal.SIGKILL)
        self.marks["killed"] = int(time.time() * 1000)
        self.a.proc.popen.wait(10)
        return held

    def assert_no_gap(self, held: list[Exported], start_ms: int, end_ms: int) -> None:
        stamps: dict[str, set[int]] = {}
        sources: dict[int, str] = {}
        for name, rows in (
            ("A-held", held),
            ("A", self.a.export(MATCH)),
            ("B", self.b.export(MATCH)),
        ):
            for row in rows:
                stamps.setdefault(row.labels["idx"], set()).update(row.timestamps)
                if row.labels["idx"] == "0":
                    for t in row.timestamps:
                        sources[t] = sources.get(t, "") + name + ","
        assert len(stamps) == SERIES, len(stamps)
        for idx, seen in stamps.items():
            window = sorted(t for t in seen if start_ms <= t <= end_ms)
            assert window, idx
            assert window[0] - start_ms <= GAP_LIMIT_MS, (idx, window[:3])
            assert end_ms - window[-1] <= GAP_LIMIT_MS, (idx, window[-3:])
            gaps = [b - a for a, b in itertools.pairwise(window)]
            if max(gaps) > GAP_LIMIT_MS:
                at = next(a for a, b in itertools.pairwise(window) if b - a == max(gaps))
                around = {t: sources.get(t) for t in window if abs(t - at) < 6000}
                scrapes = self.agent.metrics().sum("vm_promscrape_scrapes_failed_total")
                pytest.fail(
                    f"series {idx}: gap of {max(gaps)} ms after {at} (start {start_ms}, "
                    f"events {self.marks}); around it: {around}; failed scrapes {scrapes}"
                )

    def delivered_until(self, end_ms: int) -> bool:
        """Samples scraped after ``end_ms`` are stored (vmagent's one queue
        delivers in order: everything before is stored too)."""
        latest = 0
        for vm in (self.a, self.b):
            if vm.proc.running():
                for row in export(vm, start=end_ms / 1000):
                    latest = max(latest, *row.timestamps)
        return latest > end_ms + 2000

    def assert_sender_saw_only_success(self) -> None:
        statuses = self.agent.requests_by_status()
        assert set(statuses) == {"2XX"}, statuses
        sent = self.agent.metrics()
        assert sent.sum("vmagent_remotewrite_retries_count_total") == 0
        codes = self.gw.metrics().by("gateway_requests_total", "code", route="remote_write")
        assert set(codes) == {"204"}, codes


@pytest.fixture
def many_target(servers: Any) -> ScrapeTarget:
    target: ScrapeTarget = servers(ScrapeTarget(many_series()))
    return target


def test_a_database_dying_with_a_request_costs_vmagent_nothing(
    procs: Procs, tmp_path: Path, many_target: ScrapeTarget
) -> None:
    rig = Rig(procs, tmp_path, many_target)
    wait_until(
        lambda: (
            rig.count("gateway_upstream_requests_total", rig.a_label) >= 3
            and rig.count("gateway_upstream_requests_total", rig.b_label) >= 3
        ),
        "writes reaching both databases",
        40,
        watch=rig.watch,
    )
    start_ms = int(time.time() * 1000) - 3000
    held = rig.freeze_and_kill_a()
    killed = time.monotonic()
    wait_until(
        lambda: rig.gw.metrics().sum("gateway_upstream_retries_total", reason="reset") >= 1,
        "the frozen request replayed on B",
        20,
        watch=rig.watch,
    )
    time.sleep(max(0.0, killed + OUTAGE_S - time.monotonic()))
    rig.a.start()  # same port, same data
    restarted_ms = int(time.time() * 1000)
    sent_before = rig.count("gateway_upstream_requests_total", rig.a_label)
    wait_until(
        lambda: (
            rig.count("gateway_upstream_requests_total", rig.a_label) > sent_before + 2
            and rig.delivered_until(restarted_ms + 3000)
        ),
        "A back in the rotation and everything delivered",
        40,
        watch=rig.watch,
    )
    rig.assert_no_gap(held, start_ms, restarted_ms + 3000)
    rig.assert_sender_saw_only_success()
    m = rig.gw.metrics()
    assert m.value("gateway_upstream_retries_total", route="remote_write", reason="reset") == 1
    assert m.value("gateway_upstream_replayed_bytes_total", route="remote_write") > 0
    failures = m.by("gateway_upstream_failures_total", "kind", backend=rig.a_label)
    assert failures.get("reset") == 1, failures
    assert m.sum("gateway_upstream_failures_total", backend=rig.b_label) == 0
    assert m.sum("gateway_upstream_ejections_total", backend=rig.a_label) >= 1


def test_first_available_b_takes_over_and_a_takes_back(
    procs: Procs, tmp_path: Path, many_target: ScrapeTarget
) -> None:
    rig = Rig(procs, tmp_path, many_target, rw_keys='balance = "first_available"' + PROBE)
    wait_until(
        lambda: rig.count("gateway_upstream_requests_total", rig.a_label) >= 5,
        "writes reaching A",
        40,
        watch=rig.watch,
    )
    assert rig.count("gateway_upstream_requests_total", rig.b_label) == 0  # all on A
    assert export(rig.b) == []
    start_ms = int(time.time() * 1000) - 3000
    held = rig.freeze_and_kill_a()
    killed = time.monotonic()
    wait_until(
        lambda: rig.count("gateway_upstream_requests_total", rig.b_label) >= 3,
        "B taking over",
        20,
        watch=rig.watch,
    )
    time.sleep(max(0.0, killed + OUTAGE_S - time.monotonic()))
    rig.a.start()
    restarted_ms = int(time.time() * 1000)
    up = wait_until(
        lambda: [e for e in events(rig.gw, "backend_up") if e["backend"] == rig.a_label],
        "A passing its health checks",
        30,
        watch=rig.watch,
    )[0]

    def back_on_a() -> list[dict[str, Any]]:
        return [
            e
            for e in rig.gw.access_lines()
            if e.get("backends") == [rig.a_label] and when(e) >= when(up)
        ]

    first = wait_until(back_on_a, "a write on A again", TAKEOVER_S + 5, watch=rig.watch)[0]
    assert when(first) - when(up) <= TAKEOVER_S
    on_b = rig.count("gateway_upstream_requests_total", rig.b_label)
    wait_until(
        lambda: rig.delivered_until(restarted_ms + 3000),
        "everything delivered",
        30,
        watch=rig.watch,
    )
    assert rig.count("gateway_upstream_requests_total", rig.b_label) == on_b  # A has it all again
    rig.assert_no_gap(held, start_ms, restarted_ms + 3000)
    rig.assert_sender_saw_only_success()
    m = rig.gw.metrics()
    assert m.value("gateway_upstream_retries_total", route="remote_write", reason="reset") == 1
    assert (
        m.value(
            "gateway_upstream_ejections_total",
            route="remote_write",
            backend=rig.a_label,
            cause="probe",
        )
        == 1
    )
    assert m.value("gateway_upstream_healthy", route="remote_write", backend=rig.a_label) == 1


def test_otlp_receiver_dying_mid_run_loses_no_span(
    procs: Procs, tmp_path: Path, servers: Any
) -> None:
    """Two receivers behind the OTLP route; the real Python SDK exports
    spans through the gateway; receiver 1 stops answering and dies with a
    request in its hands (its spans never kept).  Every span arrives once,
    on receiver 2, and the SDK reports no failed export."""
    r1: OtlpReceiver = servers(OtlpReceiver())
    r2: OtlpReceiver = servers(OtlpReceiver())
    config = backends_config(
        ["http://127.0.0.1:9/api/v1/write"],
        [r1.url + "/v1/traces", r2.url + "/v1/traces"],
        server="workers = 1",
        log='level = "info"',
    )
    gw = Gateway(procs, tmp_path / "gateway", config)
    load = Load(spans=500, export_timeout_ms=10_000)  # the SDK's default timeout
    sender = python_sender(procs, gw, TOKEN, load, tmp_path)
    wait_until(
        lambda: bool(r1.received_spans() and r2.received_spans()),
        "spans at both receivers",
        30,
        watch=[sender.proc, gw.proc],
    )
    r1.hang(30)  # what arrives now is held, never kept
    wait_until(lambda: r1.hung >= 1, "a request held by receiver 1", 20, watch=[sender.proc])
    r1.stop()  # and it dies with it
    result = sender.wait(load.seconds + 60)
    assert_nothing_lost([result], _Both(r1, r2))
    m = gw.metrics()
    assert m.value("gateway_upstream_retries_total", route="otlp_traces", reason="reset") >= 1
    codes = m.by("gateway_requests_total", "code", route="otlp_traces")
    assert set(codes) == {"200"}, codes


class _Both(OtlpReceiver):
    """Both receivers' spans as one receiver's, for ``assert_nothing_lost``."""

    def __init__(self, *receivers: OtlpReceiver) -> None:
        super().__init__()
        self.spans = [s for r in receivers for s in r.received_spans()]
        self.errors = [e for r in receivers for e in r.errors]
