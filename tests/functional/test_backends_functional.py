"""Several backends per route over real sockets (issue 12): each balancing
policy, passive ejection with a growing bounded backoff and the return of
a backend, the least recently failed backend tried when all are ejected,
active probes taking a backend out and bringing it back, the access line
and the metrics naming backends, health kept across a reload, and
``/health?deep=1`` per backend without addresses."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config.loader import loads
from gateway.datapath.health import PROBE_REUSE_SECONDS
from gateway.process.gateway import Gateway
from tests.conftest import TOKEN, StartGateway, sha256, wait_for
from tests.support.backends import Entry, backends_config
from tests.support.client import raw_client, raw_request
from tests.support.metrics import Metrics, scrape
from tests.support.process import GatewayProcess
from tests.support.routes import THREE_CREDENTIALS
from tests.support.sockets import refused_port
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import ParsedRequest, Response, request_bytes

BODY = b"\x0a\x0bsnappy\x00\xff" * 64
WRITE = "/api/v1/write"


async def upstreams(n: int) -> list[RawUpstream]:
    ups = []
    for _ in range(n):
        up = RawUpstream()
        await up.start()
        ups.append(up)
    return ups


async def stop_all(ups: list[RawUpstream]) -> None:
    for up in ups:
        await up.stop()


def writes(up: RawUpstream) -> int:
    return sum(1 for r in up.requests if r.path == WRITE)


async def post(gw: Gateway | GatewayProcess, path: str = WRITE, body: bytes = BODY) -> Response:
    return await raw_request(gw.port, request_bytes("POST", path, body=body), timeout=10)


def labels(gw_metrics: Metrics, name: str, **match: str) -> dict[str, float]:
    return gw_metrics.by(name, "backend", **match)


@pytest.mark.parametrize("balance", ["round_robin", "least_outstanding"])
async def test_equal_backends_share_even_one_request_at_a_time(
    start_gateway: StartGateway, balance: str
) -> None:
    """One request at a time (vmagent's usual rate): ties are broken round
    robin, so three equal backends take turns, whatever the policy."""
    ups = await upstreams(3)
    try:
        gw = await start_gateway(
            backends_config([u.url + WRITE for u in ups], rw_keys=f'balance = "{balance}"')
        )
        order = []
        for _ in range(9):
            before = [writes(u) for u in ups]
            assert (await post(gw)).status == 204
            [turn] = [i for i, u in enumerate(ups) if writes(u) > before[i]]
            order.append(turn)
        assert order == [0, 1, 2] * 3
        m = await scrape(gw.admin_port)
        assert labels(m, "gateway_upstream_requests_total", route="remote_write") == {
            f"127.0.0.1:{u.port}": 3.0 for u in ups
        }
        assert m.sum("gateway_upstream_retries_total") == 0
    finally:
        await stop_all(ups)


async def test_least_outstanding_sends_new_requests_past_a_busy_backend(
    start_gateway: StartGateway,
) -> None:
    """A backend with a request in flight gets no new one while the other
    has none: the held request's backend is skipped three times in a row."""
    a, b = await upstreams(2)
    release = asyncio.Event()

    async def slow(conn: UpConn, req: ParsedRequest) -> None:
        await release.wait()
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    a.responder = slow
    try:
        gw = await start_gateway(backends_config([a.url + WRITE, b.url + WRITE]))
        held = asyncio.create_task(post(gw))
        await wait_for(lambda: writes(a) == 1)
        for _ in range(3):
            assert (await post(gw)).status == 204
        assert (writes(a), writes(b)) == (1, 3)
        m = await scrape(gw.admin_port)
        assert m.value("gateway_upstream_outstanding", route="remote_write", backend=a.url[7:]) == 1
        release.set()
        assert (await held).status == 204
    finally:
        release.set()
        await stop_all([a, b])


async def test_weights_share_round_robin_smoothly(start_gateway: StartGateway) -> None:
    a, b = await upstreams(2)
    try:
        entries: list[Entry] = [
            {"url": a.url + WRITE, "weight": 3, "name": "big"},
            {"url": b.url + WRITE},
        ]
        gw = await start_gateway(backends_config(entries, rw_keys='balance = "round_robin"'))
        order = []
        for _ in range(8):
            before = writes(a)
            assert (await post(gw)).status == 204
            order.append("a" if writes(a) > before else "b")
        # Smooth weighted round robin: 3:1, never b twice in a row.
        assert Counter(order) == {"a": 6, "b": 2}
        assert "bb" not in "".join(order)
        m = await scrape(gw.admin_port)
        assert labels(m, "gateway_upstream_requests_total", route="remote_write") == {
            "big": 6.0,
            b.url[7:]: 2.0,
        }
    finally:
        await stop_all([a, b])


async def test_first_available_sends_everything_to_the_first_healthy(
    start_gateway: StartGateway, log_capture: list[MutableMapping[str, Any]]
) -> None:
    """Active/standby: all on A; A dies (the request in flight fails over,
    A is ejected), everything on B; A comes back and takes over again once
    its ejection ends."""
    a, b = await upstreams(2)
    try:
        gw = await start_gateway(
            backends_config(
                [a.url + WRITE, b.url + WRITE],
                rw_keys='balance = "first_available"',
                upstream="eject_base_seconds = 0.5\neject_max_seconds = 0.5",
            )
        )
        for _ in range(3):
            assert (await post(gw)).status == 204
        assert (writes(a), writes(b)) == (3, 0)
        await a.stop()
        for _ in range(3):
            assert (await post(gw)).status == 204
        assert writes(b) == 3  # one failed over from A, two sent to B directly
        m = await scrape(gw.admin_port)
        a_label = a.url[7:]
        assert m.value("gateway_upstream_healthy", route="remote_write", backend=a_label) == 0
        assert m.value("gateway_upstream_healthy", route="remote_write", backend=b.url[7:]) == 1
        assert (
            m.value(
                "gateway_upstream_failures_total",
                route="remote_write",
                backend=a_label,
                kind="connect",
            )
            == 1
        )
        assert (
            m.value("gateway_upstream_retries_total", route="remote_write", reason="connect") == 1
        )
        ejected = [e for e in log_capture if e.get("event") == "backend_ejected"]
        assert [(e["backend"], e["after"]) for e in ejected] == [(a_label, "connect")]

        await a.start()  # same port
        await asyncio.sleep(0.6)  # the ejection ends; nothing probes A meanwhile
        before = writes(a)
        assert (await post(gw)).status == 204
        assert writes(a) == before + 1
        assert any(e.get("event") == "backend_recovered" for e in log_capture)
        m = await scrape(gw.admin_port)
        assert m.value("gateway_upstream_healthy", route="remote_write", backend=a_label) == 1
        lines = [e for e in log_capture if e.get("event") == "request"]
        assert lines[3]["backends"] == [a_label, b.url[7:]]
        assert lines[3]["retried"] == ["connect"]
        assert lines[4]["backends"] == [b.url[7:]]
        assert lines[4]["retried"] is None
    finally:
        await stop_all([a, b])


async def test_ejection_backoff_grows_while_a_backend_keeps_failing_and_is_bounded(
    start_gateway: StartGateway, log_capture: list[MutableMapping[str, Any]]
) -> None:
    b = (await upstreams(1))[0]
    try:
        with refused_port() as dead:
            gw = await start_gateway(
                backends_config(
                    [f"http://127.0.0.1:{dead}{WRITE}", b.url + WRITE],
                    rw_keys='balance = "first_available"',
                    upstream="eject_base_seconds = 0.1\neject_max_seconds = 0.4",
                )
            )
            seen: list[float] = []
            for _ in range(5):
                assert (await post(gw)).status == 204  # A fails, B answers
                ejected = [e for e in log_capture if e.get("event") == "backend_ejected"]
                seen.append(ejected[-1]["seconds"])
                await asyncio.sleep(seen[-1] + 0.05)  # A is tried again once it ends
        assert seen == [0.1, 0.2, 0.4, 0.4, 0.4]
        m = await scrape(gw.admin_port)
        assert (
            m.value(
                "gateway_upstream_ejections_total",
                route="remote_write",
                backend=f"127.0.0.1:{dead}",
                cause="failures",
            )
            == 5
        )
        assert writes(b) == 5
    finally:
        await b.stop()


async def test_when_every_backend_is_ejected_the_least_recently_failed_is_tried(
    start_gateway: StartGateway,
) -> None:
    """Both backends fail (and are ejected for a minute); both come back.
    The next request is not refused for want of a healthy backend: it goes
    to the one whose failure is oldest, which answers."""
    a, b = await upstreams(2)
    try:
        gw = await start_gateway(
            backends_config(
                [a.url + WRITE, b.url + WRITE],
                rw_keys='balance = "first_available"',
                upstream="eject_base_seconds = 60\neject_max_seconds = 60",
            )
        )
        await a.stop()
        await b.stop()
        resp = await post(gw)
        assert resp.status == 502  # A refused, then B: every attempt failed
        m = await scrape(gw.admin_port)
        assert sum(m.by("gateway_upstream_healthy", "backend", route="remote_write").values()) == 0
        await a.start()
        await b.start()
        assert (await post(gw)).status == 204
        assert (writes(a), writes(b)) == (1, 0)  # A failed first
    finally:
        await stop_all([a, b])


def health_responder(healthy: dict[str, bool]) -> Any:
    async def respond(conn: UpConn, req: ParsedRequest) -> None:
        if req.path == "/health":
            status = b"200 OK" if healthy["ok"] else b"503 Service Unavailable"
            await conn.write(b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\nok" % status)
            conn.close()
        else:
            await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    return respond


PROBE = """
[routes.health_check]
path = "/health"
interval_seconds = 0.1
timeout_seconds = 0.1
healthy_threshold = 2
unhealthy_threshold = 2
"""


async def test_active_probe_takes_a_backend_out_and_brings_it_back(
    start_gateway: StartGateway, log_capture: list[MutableMapping[str, Any]]
) -> None:
    a, b = await upstreams(2)
    a_ok, b_ok = {"ok": True}, {"ok": True}
    a.responder, b.responder = health_responder(a_ok), health_responder(b_ok)
    try:
        gw = await start_gateway(
            backends_config(
                [a.url + WRITE, b.url + WRITE],
                rw_keys='balance = "round_robin"' + PROBE,
                otlp_keys="",
            )
        )
        a_label = a.url[7:]

        def events(name: str) -> list[MutableMapping[str, Any]]:
            return [e for e in log_capture if e.get("event") == name]

        await wait_for(lambda: sum(1 for r in a.requests if r.path == "/health") >= 2)
        probe = next(r for r in a.requests if r.path == "/health")
        assert probe.method == "GET"
        assert probe.header("Host") == a_label
        assert probe.header("Connection") == "close"
        assert probe.header("Authorization") is None

        a_ok["ok"] = False
        await wait_for(lambda: bool(events("backend_down")))
        assert events("backend_down")[0]["backend"] == a_label
        before = writes(a)
        for _ in range(4):
            assert (await post(gw)).status == 204
        assert writes(a) == before  # out of rotation: no request, and no failure either
        m = await scrape(gw.admin_port)
        assert m.value("gateway_upstream_healthy", route="remote_write", backend=a_label) == 0
        assert (
            m.value(
                "gateway_upstream_ejections_total",
                route="remote_write",
                backend=a_label,
                cause="probe",
            )
            == 1
        )
        assert (
            m.get(
                "gateway_upstream_failures_total",
                route="remote_write",
                backend=a_label,
                kind="connect",
            )
            is None
        )

        a_ok["ok"] = True
        await wait_for(lambda: bool(events("backend_up")))
        for _ in range(4):
            assert (await post(gw)).status == 204
        assert writes(a) == before + 2  # back in the rotation
        m = await scrape(gw.admin_port)
        assert m.value("gateway_upstream_healthy", route="remote_write", backend=a_label) == 1
        assert (
            m.value(
                "gateway_upstream_probes_total",
                route="remote_write",
                backend=a_label,
                result="failed",
            )
            >= 2
        )
        # The route without a health check is never probed.
        assert m.select("gateway_upstream_probes_total", route="otlp_traces") == []
    finally:
        await stop_all([a, b])


async def test_a_probe_that_hangs_fails_by_its_timeout(
    start_gateway: StartGateway, log_capture: list[MutableMapping[str, Any]]
) -> None:
    a, b = await upstreams(2)

    async def hang_health(conn: UpConn, req: ParsedRequest) -> None:
        if req.path != "/health":
            await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        # /health: never answered

    a.responder = hang_health
    try:
        await start_gateway(backends_config([a.url + WRITE, b.url + WRITE], rw_keys=PROBE))
        await wait_for(lambda: any(e.get("event") == "backend_down" for e in log_capture))
    finally:
        await stop_all([a, b])


async def test_reload_keeps_the_health_of_backends_whose_url_did_not_change(
    start_gateway: StartGateway,
) -> None:
    a, b = await upstreams(2)
    try:
        keys = {
            "rw_keys": 'balance = "first_available"',
            "upstream": "eject_base_seconds = 60\neject_max_seconds = 60",
        }
        text = backends_config([a.url + WRITE, b.url + WRITE], **keys)
        gw = await start_gateway(text)
        await a.stop()
        assert (await post(gw)).status == 204  # failed over; A ejected for a minute
        await a.start()
        a_label = a.url[7:]

        async def healthy() -> float:
            return (await scrape(gw.admin_port)).value(
                "gateway_upstream_healthy", route="remote_write", backend=a_label
            )

        gw.reload(loads(text.replace('level = "debug"', 'level = "info"'), environ={}))
        assert await healthy() == 0  # same URL: still ejected
        assert (await post(gw)).status == 204
        assert writes(a) == 0
        # Another URL on the same host is another backend: no history.
        gw.reload(loads(text.replace(a.url + WRITE, a.url + WRITE + "?x=1"), environ={}))
        assert await healthy() == 1
        assert (await post(gw)).status == 204
        assert writes(a) == 1
    finally:
        await stop_all([a, b])


async def test_a_reload_that_drops_the_health_check_brings_a_probed_down_backend_back(
    start_gateway: StartGateway, log_capture: list[MutableMapping[str, Any]]
) -> None:
    """A probe's verdict stands only while its check does: with the check
    gone, nothing would ever probe the backend back in."""
    a, b = await upstreams(2)
    a_ok = {"ok": False}
    a.responder = health_responder(a_ok)
    try:
        urls = [a.url + WRITE, b.url + WRITE]
        policy = 'balance = "first_available"'
        gw = await start_gateway(backends_config(urls, rw_keys=policy + PROBE))
        await wait_for(lambda: any(e.get("event") == "backend_down" for e in log_capture))
        assert (await post(gw)).status == 204
        assert writes(a) == 0  # probed down: B serves
        a_label = a.url[7:]

        # The same URLs, no health_check.
        gw.reload(loads(backends_config(urls, rw_keys=policy), environ={}))
        m = await scrape(gw.admin_port)
        assert m.value("gateway_upstream_healthy", route="remote_write", backend=a_label) == 1
        assert (await post(gw)).status == 204
        assert writes(a) == 1  # the primary again
    finally:
        await stop_all([a, b])


async def test_a_reload_that_shortens_the_probe_interval_probes_at_the_new_one(
    start_gateway: StartGateway, log_capture: list[MutableMapping[str, Any]]
) -> None:
    """A check changed by a reload runs at once and at its own interval,
    not when the old interval (an hour here) would have ended."""
    a, b = await upstreams(2)
    a_ok = {"ok": True}
    a.responder = health_responder(a_ok)

    def probes() -> int:
        return sum(1 for r in a.requests if r.path == "/health")

    try:
        hourly = PROBE.replace("interval_seconds = 0.1", "interval_seconds = 3600")
        text = backends_config([a.url + WRITE, b.url + WRITE], rw_keys=hourly)
        gw = await start_gateway(text)
        await wait_for(lambda: probes() == 1)  # the first probe, then an hour's wait
        a_ok["ok"] = False
        gw.reload(
            loads(text.replace("interval_seconds = 3600", "interval_seconds = 0.1"), environ={})
        )
        # Two failures at the new interval take A out.
        await wait_for(lambda: any(e.get("event") == "backend_down" for e in log_capture))
        assert probes() >= 3
    finally:
        await stop_all([a, b])


async def test_deep_health_reports_each_backend_without_addresses(
    start_gateway: StartGateway,
) -> None:
    a = (await upstreams(1))[0]
    try:
        with refused_port() as dead:
            gw = await start_gateway(
                backends_config([a.url + WRITE, f"http://127.0.0.1:{dead}{WRITE}"])
            )
            data = request_bytes("GET", "/health?deep=1")
            resp = await raw_request(gw.port, data)
            assert resp.status == 200  # each route still has a backend
            doc = orjson.loads(resp.body)
            assert doc["status"] == "degraded"
            assert doc["upstreams"] == {"remote_write": "degraded", "otlp_traces": "degraded"}
            assert doc["backends"] == {
                "remote_write": ["ok", "unreachable"],
                "otlp_traces": ["ok", "unreachable"],
            }
            for leak in (b"127.0.0.1", str(a.port).encode(), str(dead).encode()):
                assert leak not in resp.raw
            await a.stop()
            await asyncio.sleep(PROBE_REUSE_SECONDS + 0.1)  # the last probe's answer expires
            resp = await raw_request(gw.port, data)
            assert resp.status == 503
            assert orjson.loads(resp.body)["upstreams"]["remote_write"] == "unreachable"
    finally:
        await a.stop()


async def test_upstream_as_a_list_of_one_behaves_as_upstream(
    start_gateway: StartGateway,
) -> None:
    """``upstreams = [url]`` is ``upstream = url``: no retry (nowhere else to
    go), the failure answered as before, the backend named in the metrics."""
    with refused_port() as dead:
        gw = await start_gateway(backends_config([f"http://127.0.0.1:{dead}{WRITE}"]))
        assert (await post(gw)).status == 502
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("POST", "/v1/traces", body=BODY))
            assert (await client.response()).status == 503
    m = await scrape(gw.admin_port)
    assert m.sum("gateway_upstream_retries_total") == 0
    assert (
        m.value(
            "gateway_upstream_failures_total",
            route="remote_write",
            backend=f"127.0.0.1:{dead}",
            kind="connect",
        )
        == 1
    )
    assert TOKEN.encode() not in m.text.encode()


async def test_workers_each_probe_and_the_supervisor_sums_their_views(tmp_path: Path) -> None:
    """Two workers probe on their own; the supervisor's gauge says healthy
    only while every worker would use the backend, and the probe counters
    add up across workers."""
    a, b = await upstreams(2)
    a_ok = {"ok": True}
    a.responder, b.responder = health_responder(a_ok), health_responder({"ok": True})
    config = tmp_path / "gateway.toml"
    config.write_text(backends_config([a.url + WRITE, b.url + WRITE], rw_keys=PROBE))
    gw = GatewayProcess(config, ("--workers", "2"))
    a_label = a.url[7:]
    try:
        await gw.start()

        async def gauge() -> float | None:
            return (await gw.metrics()).get(
                "gateway_upstream_healthy", route="remote_write", backend=a_label
            )

        async def settles(value: float) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while await gauge() != value:
                assert loop.time() < deadline, (await gw.metrics()).lines("gateway_upstream")
                await asyncio.sleep(0.1)

        await settles(1)
        a_ok["ok"] = False
        await settles(0)  # as soon as one worker takes it out
        await gw.wait_event("backend_down", backend=a_label)
        await wait_for(lambda: len(gw.find("backend_down", backend=a_label)) == 2, 10)
        a_ok["ok"] = True
        await settles(1)
        m = await gw.metrics()
        failed = m.value(
            "gateway_upstream_probes_total", route="remote_write", backend=a_label, result="failed"
        )
        assert failed >= 4  # two in a row, in each worker
        assert (
            m.value(
                "gateway_upstream_ejections_total",
                route="remote_write",
                backend=a_label,
                cause="probe",
            )
            == 2
        )
    finally:
        await gw.stop()
        await stop_all([a, b])


async def test_status_shows_each_backend_of_each_worker(tmp_path: Path) -> None:
    """``obs-gateway status`` (and GET /status): a two-backend route's
    backends in order, by position or configured name (no address), the
    refusing one out on every worker, the attempts and failures of the
    last minute, the route's retries."""
    b = (await upstreams(1))[0]
    try:
        with refused_port() as dead:
            config = tmp_path / "gateway.toml"
            config.write_text(
                backends_config(
                    [f"http://127.0.0.1:{dead}{WRITE}", {"url": b.url + WRITE, "name": "vm-b"}],
                    rw_keys='balance = "first_available"',
                    upstream="eject_base_seconds = 60\neject_max_seconds = 60",
                )
            )
            gw = GatewayProcess(config, ("--workers", "2"))
            try:
                await gw.start()
                sent = 0
                # New connections until both workers have had one (the kernel
                # spreads them): each ejects the refusing backend once.
                while len(gw.find("backend_ejected")) < 2:
                    assert sent < 64, gw.find("backend_ejected")
                    assert (await post(gw)).status == 204
                    sent += 1
                    await asyncio.sleep(0.05)
                args = ("-m", "gateway", "status", "--admin", f"127.0.0.1:{gw.admin_port}")
                done = await asyncio.create_subprocess_exec(
                    sys.executable, *args, "--json", stdout=asyncio.subprocess.PIPE
                )
                out, _ = await done.communicate()
                table = await asyncio.create_subprocess_exec(
                    sys.executable, *args, stdout=asyncio.subprocess.PIPE
                )
                text, _ = await table.communicate()
            finally:
                await gw.stop()
    finally:
        await b.stop()
    [route] = [r for r in orjson.loads(out)["routes"] if r["name"] == "remote_write"]
    first, second = route["backends"]
    assert (first["name"], first["index"], first["healthy"]) == ("#0", 0, False)
    assert second["name"] == "vm-b"
    assert b"127.0.0.1" not in out  # no address
    assert (first["workers"], first["ejected_workers"], first["healthy_workers"]) == (2, 2, 0)
    assert first["failures"] == {"connect": 2}  # one per worker, then ejected for a minute
    assert (second["healthy"], second["requests"], second["last_minute"]["requests"]) == (
        True,
        sent,
        sent,
    )
    assert route["retries"] == {"connect": 2}
    lines = text.decode().splitlines()
    assert any("#0" in line and "OUT 0/2 workers" in line for line in lines)
    assert any("vm-b" in line and " ok " in f"{line} " for line in lines)


TEAM_TOKEN = "test-token-0123456789abcdef-team-own"


async def test_a_credential_brings_its_own_backends_under_the_routes_policy(
    start_gateway: StartGateway,
) -> None:
    """Issue 13's ``[credentials.forward.upstreams]`` with a list: the
    credential's requests go to its own backends, balanced and failed over
    under the route's settings, with its pinned label on every backend; a
    backend URL it shares with the route is one backend (one health);
    other credentials keep the route's backends."""
    shared, own = await upstreams(2)
    try:
        with refused_port() as dead:
            dead_url = f"http://127.0.0.1:{dead}{WRITE}"
            credentials = f"""{THREE_CREDENTIALS}
[[credentials]]
name = "team"
token_sha256 = "{sha256(TEAM_TOKEN.encode())}"
routes = ["remote_write"]
  [credentials.forward]
  extra_labels = {{ tenant = "team" }}
  [credentials.forward.upstreams]
  remote_write = ["{dead_url}", "{own.url}{WRITE}", "{shared.url}{WRITE}"]
"""
            gw = await start_gateway(
                backends_config(
                    [shared.url + WRITE],
                    rw_keys='balance = "first_available"\nattempts = 3',
                    upstream="eject_base_seconds = 60\neject_max_seconds = 60",
                    credentials=credentials,
                )
            )
            team = request_bytes("POST", WRITE, body=BODY, token=TEAM_TOKEN)
            assert (await raw_request(gw.port, team)).status == 204  # dead, then own
            assert (await raw_request(gw.port, team)).status == 204  # own (dead is out)
            assert (await post(gw)).status == 204  # ingest: the route's backend
        assert [r.target for r in own.requests] == [f"{WRITE}?extra_label=tenant%3Dteam"] * 2
        assert [r.target for r in shared.requests] == [WRITE]
        m = await scrape(gw.admin_port)
        assert (
            m.value(
                "gateway_upstream_failures_total",
                route="remote_write",
                backend=f"127.0.0.1:{dead}",
                kind="connect",
            )
            == 1
        )
        assert (
            m.value("gateway_upstream_retries_total", route="remote_write", reason="connect") == 1
        )
        healthy = m.by("gateway_upstream_healthy", "backend", route="remote_write")
        # Each backend of the config in force once: the route's and the team's.
        assert healthy == {f"127.0.0.1:{dead}": 0, own.url[7:]: 1, shared.url[7:]: 1}
    finally:
        await stop_all([shared, own])


async def test_http2_clients_are_balanced_over_the_backends_too(
    start_gateway: StartGateway,
) -> None:
    """An HTTP/1.1 route reached over HTTP/2 (h2c) picks a backend from the
    same balancer: equal backends take turns; an ejected one is skipped.
    (Failover with replay is the HTTP/1.1 data path's: over HTTP/2 a request
    has one attempt.)"""
    from tests.support.h2client import H2Client  # noqa: PLC0415

    a, b = await upstreams(2)
    try:
        gw = await start_gateway(
            with_grpc(
                backends_config([a.url + WRITE, b.url + WRITE], rw_keys='balance = "round_robin"')
            )
        )
        client = await H2Client.open(gw.port)
        try:
            for _ in range(4):
                resp = await client.request(
                    "POST", WRITE, [("authorization", f"Bearer {TOKEN}")], BODY
                )
                assert resp.status == 204
        finally:
            await client.close()
        assert (writes(a), writes(b)) == (2, 2)
        m = await scrape(gw.admin_port)
        assert labels(m, "gateway_upstream_requests_total", route="remote_write") == {
            a.url[7:]: 2.0,
            b.url[7:]: 2.0,
        }
    finally:
        await stop_all([a, b])


def with_grpc(text: str) -> str:
    """``text`` with a gRPC route in scope of the token (h2c for every route)."""
    from tests.support.grpc_peers import TRACE_METHOD  # noqa: PLC0415

    grpc = f"""
[[routes]]
name = "grpc_traces"
path = "{TRACE_METHOD}"
protocol = "otlp-grpc"
upstream = "http://127.0.0.1:9"
"""
    text = text.replace("[[credentials]]", grpc + "\n[[credentials]]", 1)
    return text.replace(
        'routes = ["remote_write", "otlp_traces"]',
        'routes = ["remote_write", "otlp_traces", "grpc_traces"]',
        1,
    )


async def test_http2_clients_feed_passive_health_so_a_dead_backend_is_ejected(
    start_gateway: StartGateway,
) -> None:
    """Over HTTP/2 a request has one attempt, but its failure counts against
    the backend: the dead one costs one 502, then is ejected and skipped."""
    from tests.support.h2client import H2Client  # noqa: PLC0415

    (b,) = await upstreams(1)
    try:
        with refused_port() as dead:
            text = backends_config(
                [f"http://127.0.0.1:{dead}{WRITE}", b.url + WRITE],
                rw_keys='balance = "round_robin"',
                upstream="eject_base_seconds = 60\neject_max_seconds = 60",
            )
            gw = await start_gateway(with_grpc(text))
            client = await H2Client.open(gw.port)
            try:
                statuses = [
                    (
                        await client.request(
                            "POST", WRITE, [("authorization", f"Bearer {TOKEN}")], BODY
                        )
                    ).status
                    for _ in range(4)
                ]
            finally:
                await client.close()
            assert statuses == [502, 204, 204, 204]
            m = await scrape(gw.admin_port)
            dead_label = f"127.0.0.1:{dead}"
            route = "remote_write"
            assert (
                m.value(
                    "gateway_upstream_failures_total",
                    route=route,
                    backend=dead_label,
                    kind="connect",
                )
                == 1
            )
            assert (
                m.value(
                    "gateway_upstream_ejections_total",
                    route=route,
                    backend=dead_label,
                    cause="failures",
                )
                == 1
            )
            assert m.value("gateway_upstream_healthy", route=route, backend=dead_label) == 0
    finally:
        await stop_all([b])


async def test_http2_requests_count_as_outstanding_on_their_backend(
    start_gateway: StartGateway,
) -> None:
    """least_outstanding over HTTP/2: while A holds a request, the next ones
    go to B (a request not counted would leave A looking idle)."""
    from tests.support.h2client import H2Client  # noqa: PLC0415

    a, b = await upstreams(2)
    release = asyncio.Event()

    async def slow(conn: UpConn, req: ParsedRequest) -> None:
        await release.wait()
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    a.responder = slow
    auth = [("authorization", f"Bearer {TOKEN}")]
    try:
        gw = await start_gateway(with_grpc(backends_config([a.url + WRITE, b.url + WRITE])))
        client = await H2Client.open(gw.port)
        try:
            held = await client.start("POST", WRITE, auth)
            await client.send(held, BODY, end=True)
            await wait_for(lambda: writes(a) == 1)
            for _ in range(3):  # one sent to the busy A would wait for release: a timeout
                resp = await client.request("POST", WRITE, auth, BODY, timeout=5)
                assert resp.status == 204
            assert (writes(a), writes(b)) == (1, 3)
            release.set()
            assert (await client.wait(held)).status == 204
        finally:
            release.set()
            await client.close()
    finally:
        await stop_all([a, b])
