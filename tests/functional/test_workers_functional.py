"""Multi-worker mode: the supervisor's /metrics adds up every worker's
counters, keeps a killed worker's counts, and replaces the worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.conftest import RecordingUpstream, config_text, wait_for
from tests.support.client import raw_request
from tests.support.metrics import scrape
from tests.support.process import GatewayProcess
from tests.support.wire import request_bytes

REQUESTS = 40


async def _send(port: int, n: int) -> None:
    # A new connection per request: SO_REUSEPORT spreads connections, not requests.
    for _ in range(n):
        resp = await raw_request(port, request_bytes("POST", "/api/v1/write", body=b"abc"))
        assert resp.status == 204


async def test_counters_add_up_across_workers_and_survive_a_worker_death(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(upstream.url + "/api/v1/write"))
    gw = GatewayProcess(config, ("--workers", "2"))
    try:
        await gw.start()
        await _send(gw.port, REQUESTS)
        metrics = await scrape(gw.admin_port)
        per_worker = {
            labels["worker"]: value
            for name, labels, value in metrics.samples
            if name == "gateway_worker_cpu_seconds_total"
        }
        assert set(per_worker) == {"0", "1"}
        assert metrics.sum("gateway_workers") == 2
        assert len(upstream.requests) == REQUESTS
        assert metrics.sum("gateway_requests_total", code="204") == REQUESTS
        assert metrics.sum("gateway_request_bytes_total", route="remote_write") == 3 * REQUESTS
        assert metrics.sum("gateway_credential_requests_total") == REQUESTS

        # Kill one worker outright: its counts stay in the sums, and the
        # supervisor starts a replacement that serves.
        children = set(gw.pids()[1:])
        assert len(children) == 2
        victim = min(children)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = set(gw.pids()[1:])
            return len(now) == 2 and victim not in now

        await wait_for(replaced, timeout=15)
        await wait_for(lambda: bool(gw.find("worker_exited")), timeout=5)
        await _send(gw.port, REQUESTS)
        after = await scrape(gw.admin_port)
        assert len(upstream.requests) == 2 * REQUESTS
        # The dead worker served nothing after the last scrape, so its kept
        # snapshot is complete and the sums are exact, never backwards.
        assert after.sum("gateway_requests_total", code="204") == 2 * REQUESTS
        assert after.sum("gateway_request_bytes_total", route="remote_write") == 6 * REQUESTS
    finally:
        await gw.stop()
