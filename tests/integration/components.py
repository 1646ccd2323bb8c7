"""The real programs of the integration tier, each a subprocess on free
127.0.0.1 ports with its own data directory: the gateway (through its CLI),
VictoriaMetrics, vmagent and Prometheus.

Each class starts its program, waits until it answers its readiness
endpoint (or fails with its log), and wraps the few API calls the scenarios
need.  Stopping is the ``Procs`` supervisor's job (by PID, in a finalizer).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest

from tests.integration.harness import (
    Proc,
    Procs,
    free_port,
    http_get,
    http_ok,
    http_post,
    require_binary,
    wait_until,
)
from tests.support.metrics import Metrics, scrape_sync

__all__ = ["Exported", "Gateway", "Prometheus", "VictoriaMetrics", "VmAgent"]

# Startup deadlines: generous for a loaded 2-core CI machine, reached in
# well under a second when idle.
START_TIMEOUT = 30.0


def _gateway_cli() -> str:
    """The ``obs-gateway`` console script of the venv running the tests."""
    script = Path(sys.executable).with_name("obs-gateway")
    if not script.exists():
        pytest.fail(
            f"{script} is missing: install the project into this venv "
            "(make test does: pip install -e '.[test]')",
            pytrace=False,
        )
    return str(script)


class Gateway:
    """``obs-gateway run --config FILE`` with a generated config."""

    def __init__(self, procs: Procs, workdir: Path, config: str, name: str = "gateway") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config, encoding="utf-8")
        self.proc = procs.start(name, [_gateway_cli(), "run", "--config", str(self.config_path)])
        listening = wait_until(
            self._listening, f"{name} to log 'listening'", START_TIMEOUT, watch=[self.proc]
        )
        self.url = f"http://{listening['listen']}"
        self.admin_url = f"http://{listening['admin']}"
        wait_until(
            lambda: http_ok(self.admin_url + "/readyz"),
            f"{name} /readyz",
            START_TIMEOUT,
            watch=[self.proc],
        )

    def _listening(self) -> dict[str, Any] | None:
        for line in self.proc.log_text().splitlines():
            if line.startswith("{"):
                event = orjson.loads(line)
                if event.get("event") == "listening":
                    assert isinstance(event, dict)
                    return event
        return None

    @property
    def write_url(self) -> str:
        return self.url + "/api/v1/write"

    @property
    def traces_url(self) -> str:
        return self.url + "/v1/traces"

    def metrics(self) -> Metrics:
        return scrape_sync(self.admin_url + "/metrics")

    def access_lines(self) -> list[dict[str, Any]]:
        """The gateway's JSON access-log lines so far (event ``request``)."""
        out = []
        for line in self.proc.log_text().splitlines():
            if line.startswith("{"):
                event = orjson.loads(line)
                if event.get("event") == "request":
                    out.append(event)
        return out


@dataclass(frozen=True)
class Exported:
    """One series from VictoriaMetrics' /api/v1/export (raw samples)."""

    labels: dict[str, str]
    values: list[float]
    timestamps: list[int]  # milliseconds


class VictoriaMetrics:
    """Single-node VictoriaMetrics; ``stop``/``start`` keep port and data dir."""

    proc: Proc  # the current process (a new one after each start)

    def __init__(self, procs: Procs, data_dir: Path) -> None:
        self._procs = procs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            require_binary("victoria-metrics"),
            f"-storageDataPath={data_dir}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            # Instant queries would hide the last 30 s of samples otherwise.
            "-search.latencyOffset=0s",
            "-retentionPeriod=1y",
        ]
        self.start()

    @property
    def write_url(self) -> str:
        return self.url + "/api/v1/write"

    def start(self) -> None:
        self.proc = self._procs.start("victoria-metrics", self.argv)
        wait_until(
            lambda: http_ok(self.url + "/health"),
            "victoria-metrics /health",
            START_TIMEOUT,
            watch=[self.proc],
        )

    def stop(self) -> None:
        code = self.proc.stop()
        assert code == 0, f"victoria-metrics exited with {code}\n{self.proc.log_tail()}"

    def export(
        self, match: str, start: float | None = None, end: float | None = None
    ) -> list[Exported]:
        """Raw samples of every series matching ``match``; recent rows flushed first."""
        flushed = http_get(self.url + "/internal/force_flush")
        assert flushed.status == 200, flushed
        params: dict[str, str | float] = {"match[]": match}
        if start is not None:
            params["start"] = start
        if end is not None:
            params["end"] = end
        result = http_get(f"{self.url}/api/v1/export?{urlencode(params)}", timeout=30.0)
        assert result.status == 200, f"export {match}: {result.status} {result.body[:300]!r}"
        series = []
        for line in result.body.splitlines():
            row = orjson.loads(line)
            series.append(
                Exported(row["metric"], [float(v) for v in row["values"]], row["timestamps"])
            )
        return series

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        http_get(self.url + "/internal/force_flush")
        result = http_get(f"{self.url}/api/v1/query?{urlencode({'query': promql})}")
        assert result.status == 200, f"query {promql}: {result.status} {result.body[:300]!r}"
        data: list[dict[str, Any]] = orjson.loads(result.body)["data"]["result"]
        return data

    def metrics(self) -> Metrics:
        return scrape_sync(self.url + "/metrics")


class VmAgent:
    """vmagent remote-writing to one URL with a bearer token.

    With ``scrape`` (a Prometheus scrape config as a dict) it scrapes; without
    it only forwards what is pushed to its import API.  One queue and a 1 s
    flush keep the order of blocks and the latency predictable.
    """

    def __init__(
        self,
        procs: Procs,
        workdir: Path,
        name: str,
        remote_write_url: str,
        token: str,
        scrape: dict[str, Any] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            require_binary("vmagent"),
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-remoteWrite.url={remote_write_url}",
            f"-remoteWrite.bearerToken={token}",
            f"-remoteWrite.tmpDataPath={workdir / 'queue'}",
            "-remoteWrite.flushInterval=1s",
            "-remoteWrite.queues=1",
            *(extra or []),
        ]
        if scrape is not None:
            config = workdir / "scrape.json"  # JSON is YAML: no quoting surprises
            config.write_text(json.dumps(scrape, ensure_ascii=False), encoding="utf-8")
            argv.append(f"-promscrape.config={config}")
        self.proc = procs.start(name, argv)
        wait_until(
            lambda: http_ok(self.url + "/health"),
            f"{name} /health",
            START_TIMEOUT,
            watch=[self.proc],
        )

    def metrics(self) -> Metrics:
        return scrape_sync(self.url + "/metrics")

    def requests_by_status(self) -> dict[str, float]:
        """Non-zero vmagent_remotewrite_requests_total by status_code ("2XX", "401", …)."""
        counts = self.metrics().by("vmagent_remotewrite_requests_total", "status_code")
        return {code: n for code, n in counts.items() if n}

    def import_prometheus(self, text: str) -> None:
        result = http_post(self.url + "/api/v1/import/prometheus", text.encode("utf-8"))
        assert result.status == 204, f"vmagent import: {result.status} {result.body!r}"


class Prometheus:
    """Prometheus server with a generated config (JSON, which YAML accepts)."""

    def __init__(self, procs: Procs, workdir: Path, config: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = workdir / "prometheus.json"
        config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
        self.proc = procs.start(
            "prometheus",
            [
                require_binary("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
        )
        wait_until(
            lambda: http_ok(self.url + "/-/ready"),
            "prometheus /-/ready",
            START_TIMEOUT,
            watch=[self.proc],
        )

    def metrics(self) -> Metrics:
        return scrape_sync(self.url + "/metrics")
