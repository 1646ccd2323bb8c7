"""docs/runbook.md "Rotating a sender's token", followed step by step against
a real VictoriaMetrics and a real vmagent writing through the real gateway.

vmagent scrapes a probe whose only metric counts its own scrapes (1, 2, 3,
…), so a lost sample is a missing integer in VictoriaMetrics, and it also
scrapes the gateway's admin /metrics, so the runbook's PromQL is evaluated
on a real TSDB.  The rotation must cost no sample and no 401: not in the
gateway's counters, not in vmagent's own.  Each step prints what the
operator sees on /metrics (run with ``-s`` to read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import wait_for
from tests.integration.harness import require_binary
from tests.lifecycle.conftest import (
    StartProcess,
    call,
    lifecycle_config,
    rfc3339,
    write_atomic,
)
from tests.support.metrics import Metrics
from tests.support.process import OBS_GATEWAY, GatewayProcess

# A missing victoria-metrics or vmagent fails the test naming the package
# (require_binary): this test never skips.
pytestmark = [pytest.mark.integration]

T = TypeVar("T")
SCRAPE_INTERVAL = 1.0
OLD_ID, NEW_ID = "2026-10", "2026-11"
# The runbook's query for step 4, verbatim (test_runbook.py checks it is there).
LAST_USED_AGE = (
    "time() - max by (credential, token_id) "
    '(gateway_credential_last_used_timestamp_seconds{credential="ingest"} > 0)'
)
SHOWN = (
    "gateway_config_reloads_total",
    "gateway_config_last_reload_successful",
    "gateway_credential_last_used_timestamp_seconds",
    "gateway_credential_requests_total",
    "gateway_requests_total",
    "gateway_auth_failures_total",
)


# ---------------------------------------------------------------- processes


def listening_ports(pid: int) -> list[int]:
    """TCP ports a process listens on, from /proc: no port is guessed, so
    nothing races the other tests and engineers sharing this machine."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.append(int(fields[1].rpartition(":")[2], 16))
    return ports


Spawn = Callable[..., Awaitable[tuple[asyncio.subprocess.Process, int]]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start a binary that listens on 127.0.0.1:0; returns it and its port."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(name: str, *args: str) -> tuple[asyncio.subprocess.Process, int]:
        out = (tmp_path / f"{name}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            require_binary(name), *args, stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path
        )
        out.close()
        procs.append(proc)
        ports: list[int] = []

        def listening() -> bool:
            assert proc.returncode is None, (tmp_path / f"{name}.log").read_text()
            ports[:] = listening_ports(proc.pid)
            return bool(ports)

        await wait_for(listening, 30)
        return proc, ports[0]

    yield start
    for proc in reversed(procs):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def probe_target(aiohttp_server: Any) -> tuple[str, list[float]]:
    """The static target: ``rotation_probe_seq`` is the number of the scrape."""
    scrapes: list[float] = []

    async def metrics(request: web.Request) -> web.Response:
        scrapes.append(time.time())
        text = f"# TYPE rotation_probe_seq counter\nrotation_probe_seq {len(scrapes)}\n"
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    return f"127.0.0.1:{server.port}", scrapes


# ---------------------------------------------------------------- HTTP


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200, (url, resp.status)
        return await resp.text()


class Victoria:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    async def flush(self) -> None:
        await get_text(self.url + "/internal/force_flush")

    async def series(self, match: str) -> list[dict[str, Any]]:
        await self.flush()
        text = await get_text(f"{self.url}/api/v1/export?match[]={match}")
        return [orjson.loads(line) for line in text.splitlines() if line]

    async def query(self, promql: str) -> dict[tuple[str, str], float]:
        """An instant query → {(credential, token_id): value}."""
        await self.flush()
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/api/v1/query", params={"query": promql}) as resp,
        ):
            doc = await resp.json()
        assert doc["status"] == "success", doc
        return {
            (r["metric"].get("credential", ""), r["metric"].get("token_id", "")): float(
                r["value"][1]
            )
            for r in doc["data"]["result"]
        }

    async def probe_values(self) -> list[float]:
        found = await self.series('rotation_probe_seq{job="probe"}')
        return [v for s in found for v in s["values"]]


def show(step: str, metrics: Metrics) -> None:
    print(f"\n==== {step}\n{metrics.lines(*SHOWN)}")  # the operator's view, for the report


def config_with(vm_url: str, tokens: str) -> str:
    credentials = f"""
[[credentials]]
name = "ingest"
routes = ["remote_write"]
{tokens}"""
    return lifecycle_config(vm_url, credentials, otlp_upstream=vm_url)


async def hash_token() -> tuple[str, str]:
    """Runbook step 1, verbatim: `obs-gateway hash-token` → (token, digest)."""
    proc = await asyncio.create_subprocess_exec(
        OBS_GATEWAY, "hash-token", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    token = re.search(r"^token:\s+(\S+)$", out.decode(), re.MULTILINE)
    digest = re.search(r'^config: token_sha256 = "([0-9a-f]{64})"$', out.decode(), re.MULTILINE)
    assert token, out
    assert digest, out
    return token.group(1), digest.group(1)


async def check_config(path: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        OBS_GATEWAY, "check-config", str(path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    return out.decode()


async def token_requests(gw: GatewayProcess, token_id: str) -> float:
    metrics = await gw.metrics()
    return (
        metrics.get("gateway_credential_requests_total", credential="ingest", token_id=token_id)
        or 0.0
    )


# ---------------------------------------------------------------- the rotation


# The runbook's steps in the runbook's order: splitting it would hide the procedure.
async def test_runbook_rotation_with_a_real_vmagent_loses_nothing(  # noqa: PLR0915
    tmp_path: Path,
    aiohttp_server: Any,
    spawn: Spawn,
    gateway_process: StartProcess,
) -> None:
    target, scrapes = await probe_target(aiohttp_server)
    _, vm_port = await spawn(
        "victoria-metrics",
        "-httpListenAddr=127.0.0.1:0",
        "-storageDataPath=vm-data",
        "-retentionPeriod=1d",
        "-search.latencyOffset=0s",
        "-search.disableCache",
        "-loggerLevel=WARN",
    )
    vm = Victoria(vm_port)

    # The gateway as deployed before the rotation: one token, with an id.
    old_token, old_digest = await hash_token()
    old_block = f'[[credentials.tokens]]\nid = "{OLD_ID}"\nsha256 = "{old_digest}"\n'
    config = tmp_path / "gateway.toml"
    write_atomic(config, config_with(vm.url, old_block))
    gw = await gateway_process(config, workers=2)

    token_file = tmp_path / "vmagent.token"
    token_file.write_text(old_token + "\n")
    (tmp_path / "scrape.yml").write_text(
        f"""global:
  scrape_interval: {SCRAPE_INTERVAL:g}s
scrape_configs:
  - job_name: probe
    static_configs:
      - targets: ["{target}"]
  - job_name: obs-gateway
    static_configs:
      - targets: ["127.0.0.1:{gw.admin_port}"]
"""
    )
    _, vmagent_port = await spawn(
        "vmagent",
        "-httpListenAddr=127.0.0.1:0",
        "-promscrape.config=scrape.yml",
        f"-remoteWrite.url={gw.url}/api/v1/write",
        f"-remoteWrite.bearerTokenFile={token_file}",
        "-remoteWrite.tmpDataPath=vmagent-data",
        "-remoteWrite.flushInterval=1s",
        "-loggerLevel=WARN",
    )
    vmagent_metrics = f"http://127.0.0.1:{vmagent_port}/metrics"
    deadline = 20

    # vmagent is sending with the old token.
    await poll(lambda: token_requests(gw, OLD_ID), lambda n: n >= 3, deadline)
    show("before: vmagent sends with the old token", await gw.metrics())

    # Step 1: mint the new token.
    new_token, new_digest = await hash_token()

    # Step 2: add it beside the old one, with an id; check; reload.
    new_block = f'[[credentials.tokens]]\nid = "{NEW_ID}"\nsha256 = "{new_digest}"\n'
    write_atomic(config, config_with(vm.url, old_block + new_block))
    matrix = await check_config(config)
    assert f"  ingest/{OLD_ID}: - → -" in matrix
    assert f"  ingest/{NEW_ID}: - → -" in matrix
    outcome = await gw.reload()
    assert outcome["event"] == "config_reloaded", outcome
    health = await call("GET", gw.url + "/health", new_token)
    assert (health.status, health.json()["token_id"]) == (200, NEW_ID)
    step2 = await gw.metrics()
    assert step2.value("gateway_config_last_reload_successful") == 1
    assert step2.value("gateway_config_reloads_total", result="success") == 1
    show("step 2: new token added, SIGHUP", step2)

    # Step 3: roll the sender.  vmagent re-reads -remoteWrite.bearerTokenFile
    # every second; the file is replaced atomically so it never reads half.
    rolled_at = time.time()
    checked = await token_requests(gw, NEW_ID)  # the /health call above
    write_atomic(token_file, new_token + "\n")
    await poll(lambda: token_requests(gw, NEW_ID), lambda n: n > checked, deadline)
    show("step 3: vmagent rolled to the new token", await gw.metrics())

    # Step 4: watch the old token go quiet: its last-used stays put while the
    # new one keeps advancing (here: over three more pushes).
    await old_token_quiet(gw, pushes=3, timeout=deadline)
    quiet = await gw.metrics()
    old_last = quiet.value(
        "gateway_credential_last_used_timestamp_seconds", credential="ingest", token_id=OLD_ID
    )
    assert old_last < rolled_at + 2 * SCRAPE_INTERVAL
    show("step 4: old token quiet", quiet)
    # The same, with the runbook's PromQL on the TSDB the gateway is scraped into.
    ages: dict[tuple[str, str], float] = {}

    async def runbook_query() -> dict[tuple[str, str], float]:
        ages.update(await vm.query(LAST_USED_AGE))
        return ages

    await poll(
        runbook_query,
        lambda a: a.get(("ingest", OLD_ID), 0) >= 3 and a.get(("ingest", NEW_ID), 1e9) < 3,
        deadline,
    )
    print(f"\n==== step 4, PromQL: {LAST_USED_AGE}\n{ages}")

    # Step 4, then: move the old digest to revoked and reload.
    revoked = (
        f'[[credentials.revoked]]\nid = "{OLD_ID}"\nsha256 = "{old_digest}"\n'
        f'revoked_at = "{rfc3339(time.time())}"\n'
    )
    write_atomic(config, config_with(vm.url, new_block + revoked))
    assert f"  ingest/{OLD_ID}: revoked " in await check_config(config)
    outcome = await gw.reload()
    assert outcome["event"] == "config_reloaded", outcome
    seq_at_revoke = len(scrapes)
    after = await gw.metrics()
    show("step 4: old token revoked, SIGHUP", after)
    assert (
        after.get(
            "gateway_credential_last_used_timestamp_seconds", credential="ingest", token_id=OLD_ID
        )
        is None
    )

    # Samples scraped after the revocation arrive too.
    await poll(vm.probe_values, lambda v: max(v, default=0) >= seq_at_revoke + 3, deadline)

    # ---- No sample lost: every scrape number, in order, one scrape apart.
    [series] = await vm.series('rotation_probe_seq{job="probe"}')
    values = series["values"]
    assert values == list(range(1, len(values) + 1)), f"gaps or repeats in {values}"
    gaps = [(b - a) / 1000 for a, b in itertools.pairwise(series["timestamps"])]
    assert max(gaps) <= 1.5 * SCRAPE_INTERVAL, gaps
    print(f"\n==== probe samples in VictoriaMetrics: 1..{values[-1]}, largest gap {max(gaps)}s")

    # ---- No 401, seen by the gateway ...
    final = await gw.metrics()
    codes = {
        s.labels["code"]: s.value
        for s in final.select("gateway_requests_total", route="remote_write")
    }
    assert codes.keys() == {"204"}, codes
    assert final.select("gateway_auth_failures_total") == []
    assert await token_requests(gw, NEW_ID) >= 3
    # ... and by vmagent.
    vmagent = Metrics(await get_text(vmagent_metrics))
    statuses = {
        s.labels["status_code"]: s.value
        for s in vmagent.select("vmagent_remotewrite_requests_total")
    }
    assert statuses.keys() == {"2XX"}, statuses
    for counter in (
        "vmagent_remotewrite_retries_count_total",
        "vmagent_remotewrite_packets_dropped_total",
        "vmagent_remotewrite_errors_total",
    ):
        assert {s.value for s in vmagent.select(counter)} == {0}, counter
    print(
        "\n==== vmagent\n"
        + vmagent.lines(
            "vmagent_remotewrite_requests_total",
            "vmagent_remotewrite_retries_count_total",
            "vmagent_remotewrite_packets_dropped_total",
        )
    )

    # A sender the rotation forgot would now be refused, and named.
    assert (await call("POST", gw.url + "/api/v1/write", old_token, b"x")).status == 401
    forgotten = await gw.metrics()
    assert (
        forgotten.value(
            "gateway_auth_failures_total", reason="revoked", credential="ingest", token_id=OLD_ID
        )
        == 1
    )
    show("afterwards: a forgotten sender presents the old token", forgotten)


async def poll(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float) -> T:
    """Re-read a value until it satisfies ``done``, within a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await read()
        if done(value):
            return value
        assert loop.time() < deadline, f"condition not met within {timeout}s; last value {value}"
        await asyncio.sleep(0.2)


async def old_token_quiet(gw: GatewayProcess, pushes: int, timeout: float) -> None:
    """The old token's last-used has not moved while the new token made
    ``pushes`` more requests."""
    last_used = "gateway_credential_last_used_timestamp_seconds"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    baseline: tuple[float, float] | None = None  # (old last-used, new requests)
    while True:
        metrics = await gw.metrics()
        old = metrics.value(last_used, credential="ingest", token_id=OLD_ID)
        new = metrics.value(
            "gateway_credential_requests_total", credential="ingest", token_id=NEW_ID
        )
        if baseline is None or old != baseline[0]:
            baseline = (old, new)
        elif new - baseline[1] >= pushes:
            return
        assert loop.time() < deadline, "the old token never went quiet"
        await asyncio.sleep(0.2)
