"""Static-token lifecycle over real sockets against the real process: validity
windows at their edges, revocation diagnostics, the last-used signal,
scopes, /health and ``check-config``, expiry warnings.
"""

from __future__ import annotations

import asyncio
import math
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.conftest import RecordingUpstream, sha256, wait_for
from tests.lifecycle.conftest import (
    Answer,
    StartProcess,
    call,
    lifecycle_config,
    new_token,
    rfc3339,
    token_block,
    write_atomic,
)
from tests.support.process import OBS_GATEWAY, GatewayProcess

WRITE = "/api/v1/write"
TRACES = "/v1/traces"
BODY = b"\x00some remote-write bytes\xff" * 4


def ingest(
    *blocks: str, name: str = "ingest", routes: str = '["remote_write", "otlp_traces"]'
) -> str:
    return f'\n[[credentials]]\nname = "{name}"\nroutes = {routes}\n' + "".join(blocks)


def revoked_block(token_id: str, token: str, revoked_at: str = "2026-01-15T09:00:00Z") -> str:
    return (
        f'[[credentials.revoked]]\nid = "{token_id}"\n'
        f'sha256 = "{sha256(token.encode())}"\nrevoked_at = "{revoked_at}"\n'
    )


async def start(
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
    credentials: str,
    extra: str = "",
) -> GatewayProcess:
    config = tmp_path / "gateway.toml"
    write_atomic(config, lifecycle_config(upstream.url, credentials, extra=extra))
    return await gateway_process(config)


def same_refusal(a: Answer, b: Answer) -> bool:
    """Two answers a client cannot tell apart (Date aside)."""
    keep = ("Content-Type", "Content-Length", "WWW-Authenticate", "Cache-Control")
    return (a.status, a.body, [a.headers.get(k) for k in keep]) == (
        b.status,
        b.body,
        [b.headers.get(k) for k in keep],
    )


# ---------------------------------------------------------------- validity windows


async def test_not_after_and_not_before_edges(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    steady, expiring, future = new_token(), new_token(), new_token()
    gw = await start(tmp_path, upstream, gateway_process, ingest(token_block("steady", steady)))

    # Edges a couple of seconds ahead, whole seconds as an operator writes them.
    edge = math.ceil(time.time()) + 2
    blocks = (
        token_block("steady", steady),
        token_block("expiring", expiring, not_after=rfc3339(edge)),
        token_block("future", future, not_before=rfc3339(edge)),
    )
    write_atomic(gw.config, lifecycle_config(upstream.url, ingest(*blocks)))
    since = gw.mark()
    assert (await gw.reload())["event"] == "config_reloaded"
    warning = await gw.wait_event("token_expiring", since, token_id="expiring")
    assert warning["credential"] == "ingest"
    assert warning["days_left"] == 0.0

    just_before = [
        await call("POST", gw.url + WRITE, expiring, BODY),
        await call("POST", gw.url + WRITE, future, BODY),
        await call("GET", gw.url + "/health", expiring),
    ]
    assert time.time() < edge, "too slow to observe the moment before the edge"
    assert [a.status for a in just_before] == [204, 401, 200]
    assert 0 < just_before[2].json()["expires_in_seconds"] <= 2

    await wait_for(lambda: time.time() >= edge, 5)
    just_after = [
        await call("POST", gw.url + WRITE, expiring, BODY),
        await call("POST", gw.url + WRITE, future, BODY),
    ]
    assert [a.status for a in just_after] == [401, 204]
    unknown = await call("POST", gw.url + WRITE, new_token(), BODY)
    assert same_refusal(just_after[0], unknown)
    assert same_refusal(just_before[1], unknown)

    metrics = await gw.metrics()
    failures = "gateway_auth_failures_total"
    assert metrics.value(failures, reason="expired", credential="ingest", token_id="expiring") == 1
    assert (
        metrics.value(failures, reason="not_yet_valid", credential="ingest", token_id="future") == 1
    )
    expiry = "gateway_credential_expiry_timestamp_seconds"
    assert metrics.value(expiry, credential="ingest", token_id="expiring") == edge
    assert metrics.get(expiry, credential="ingest", token_id="steady") is None
    await wait_for(lambda: len(gw.find("request", since, status=401)) >= 3, 5)
    refusals = {(e["token_id"], e["error"]) for e in gw.find("request", since, status=401)}
    assert refusals == {
        ("future", "auth_not_yet_valid"),
        ("expiring", "auth_expired"),
        (None, "auth_unknown"),
    }

    # A reload after the edge says the token has run out.
    since = gw.mark()
    assert (await gw.reload())["event"] == "config_reloaded"
    expired = await gw.wait_event("token_expired", since, token_id="expiring")
    assert expired["credential"] == "ingest"


async def test_expiry_warnings_at_start_name_tokens_inside_the_window(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    now = time.time()
    blocks = (
        token_block("soon", new_token(), not_after=rfc3339(now + 3 * 86400)),
        token_block("later", new_token(), not_after=rfc3339(now + 30 * 86400)),
        token_block("gone", new_token(), not_after=rfc3339(now - 86400)),
        token_block("forever", new_token()),
    )
    gw = await start(
        tmp_path,
        upstream,
        gateway_process,
        ingest(*blocks),
        extra="[auth]\nexpiry_warning_days = 7\n",
    )
    soon = await gw.wait_event("token_expiring", token_id="soon")
    assert soon["credential"] == "ingest"
    assert soon["level"] == "warning"
    assert 2.9 < soon["days_left"] <= 3.0
    gone = await gw.wait_event("token_expired", token_id="gone")
    assert gone["credential"] == "ingest"
    warned = {
        e["token_id"] for e in gw.events if e.get("event") in ("token_expiring", "token_expired")
    }
    assert warned == {"soon", "gone"}

    # A wider window on reload brings "later" in.
    text = gw.config.read_text().replace("expiry_warning_days = 7", "expiry_warning_days = 40")
    write_atomic(gw.config, text)
    since = gw.mark()
    assert (await gw.reload())["event"] == "config_reloaded"
    later = await gw.wait_event("token_expiring", since, token_id="later")
    assert 29.9 < later["days_left"] <= 30.0


# ---------------------------------------------------------------- revocation


async def test_revoked_token_is_refused_like_any_other_but_named_for_the_operator(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    current, retired = new_token(), new_token()
    credentials = ingest(token_block("2026-02", current), revoked_block("2026-01", retired))
    gw = await start(tmp_path, upstream, gateway_process, credentials)

    revoked = await call("POST", gw.url + WRITE, retired, BODY)
    unknown = await call("POST", gw.url + WRITE, new_token(), BODY)
    assert revoked.status == 401
    assert same_refusal(revoked, unknown), "a client must not learn the token was revoked"
    assert revoked.headers["WWW-Authenticate"].startswith("Bearer ")
    assert (await call("POST", gw.url + WRITE, current, BODY)).status == 204

    metrics = await gw.metrics()
    assert (
        metrics.value(
            "gateway_auth_failures_total", reason="revoked", credential="ingest", token_id="2026-01"
        )
        == 1
    )
    assert (
        metrics.value(
            "gateway_auth_failures_total", reason="unknown", credential="none", token_id="none"
        )
        == 1
    )
    # Counted as unauthenticated, like the unknown token...
    assert (
        metrics.value("gateway_requests_total", route="remote_write", credential="none", code="401")
        == 2
    )
    assert metrics.select("gateway_requests_total", credential="ingest", code="401") == []
    await wait_for(lambda: bool(gw.find("request", error="auth_revoked")), 5)
    [line] = gw.find("request", error="auth_revoked")
    # ...but its log line names it as the metric does: the operator hunting
    # the forgotten sender reads the log first.
    assert (line["credential"], line["token_id"]) == ("ingest", "2026-01")
    assert line["status"] == 401
    assert line["client"] == "127.0.0.1"
    [other] = gw.find("request", error="auth_unknown")
    assert (other["credential"], other["token_id"]) == ("none", None)
    # The retired secret is named by id only: neither it nor its digest is logged.
    log_text = orjson.dumps(gw.events)
    for secret in (retired, sha256(retired.encode()), current, sha256(current.encode())):
        assert secret.encode() not in log_text


# ---------------------------------------------------------------- last used


async def test_last_used_advances_for_the_token_in_use_and_stays_flat_for_the_other(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    old, new, never = new_token(), new_token(), new_token()
    credentials = ingest(
        token_block("old", old), token_block("new", new), token_block("never", never)
    )
    gw = await start(tmp_path, upstream, gateway_process, credentials)
    last_used = "gateway_credential_last_used_timestamp_seconds"

    assert (await call("POST", gw.url + WRITE, old, BODY)).status == 204
    assert (await call("POST", gw.url + WRITE, new, BODY)).status == 204
    first = await gw.metrics()
    old_at = first.value(last_used, credential="ingest", token_id="old")
    new_at = first.value(last_used, credential="ingest", token_id="new")
    assert time.time() - 10 < old_at <= new_at <= time.time()
    assert first.value(last_used, credential="ingest", token_id="never") == 0

    # A reload must not reset the signal the rotation relies on.
    assert (await gw.reload())["event"] == "config_reloaded"
    for _ in range(3):
        assert (await call("POST", gw.url + WRITE, new, BODY)).status == 204
    second = await gw.metrics()
    assert second.value(last_used, credential="ingest", token_id="old") == old_at
    assert second.value(last_used, credential="ingest", token_id="new") > new_at
    assert second.value(last_used, credential="ingest", token_id="never") == 0
    requests = "gateway_credential_requests_total"
    assert second.value(requests, credential="ingest", token_id="old") == 1
    assert second.value(requests, credential="ingest", token_id="new") == 4
    assert second.value(requests, credential="ingest", token_id="never") == 0
    nbytes = "gateway_credential_request_bytes_total"
    assert second.value(nbytes, credential="ingest", token_id="new") == 4 * len(BODY)
    assert second.value(nbytes, credential="ingest", token_id="old") == len(BODY)


# ---------------------------------------------------------------- scopes


async def test_scopes_refuse_other_routes_with_403(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    both, metrics_only, health_only = new_token(), new_token(), new_token()
    credentials = (
        ingest(token_block("t", both))
        + ingest(token_block("t", metrics_only), name="vmagent", routes='["remote_write"]')
        + ingest(token_block("t", health_only), name="prober", routes="[]")
    )
    gw = await start(tmp_path, upstream, gateway_process, credentials)
    otlp_json = {"Content-Type": "application/json"}

    assert (await call("POST", gw.url + TRACES, both, b"{}", otlp_json)).status == 204
    assert (await call("POST", gw.url + WRITE, metrics_only, BODY)).status == 204
    refused = await call("POST", gw.url + TRACES, metrics_only, b"{}", otlp_json)
    assert refused.status == 403
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    # OTLP: a google.rpc.Status in the request's encoding; 7 = PERMISSION_DENIED.
    assert refused.json()["code"] == 7
    for path in (WRITE, TRACES):
        assert (await call("POST", gw.url + path, health_only, BODY)).status == 403
    health = await call("GET", gw.url + "/health", health_only)
    assert (health.status, health.json()["routes"]) == (200, [])

    metrics = await gw.metrics()
    scope = {
        s.labels["credential"]: s.value
        for s in metrics.select("gateway_auth_failures_total", reason="scope")
    }
    assert scope == {"vmagent": 1, "prober": 2}
    assert (
        metrics.value(
            "gateway_requests_total", route="otlp_traces", credential="vmagent", code="403"
        )
        == 1
    )
    assert len(upstream.requests) == 2


# ---------------------------------------------------------------- /health


async def test_health_proves_the_token_and_deep_names_routes_not_addresses(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    token = new_token()
    not_after = math.ceil(time.time()) + 3 * 86400
    # The OTLP upstream: a port bound but not listening, so connects are refused.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    try:
        config = tmp_path / "gateway.toml"
        credentials = ingest(token_block("2026-03", token, not_after=rfc3339(not_after)))
        write_atomic(
            config,
            lifecycle_config(
                upstream.url, credentials, otlp_upstream=f"http://127.0.0.1:{dead_port}"
            ),
        )
        gw = await gateway_process(config)
        live_port = upstream.url.rpartition(":")[2]

        shallow = await call("GET", gw.url + "/health", token)
        assert shallow.status == 200
        assert shallow.headers["Cache-Control"] == "no-store"
        assert shallow.headers["Content-Type"] == "application/json"
        doc = shallow.json()
        expires_in = doc.pop("expires_in_seconds")
        assert doc == {
            "status": "ok",
            "credential": "ingest",
            "token_id": "2026-03",
            "routes": ["otlp_traces", "remote_write"],
        }
        assert not_after - time.time() - 5 <= expires_in <= not_after - time.time() + 1

        deep = await call("GET", gw.url + "/health?deep=1", token)
        assert deep.status == 503
        assert deep.headers["Cache-Control"] == "no-store"
        assert deep.json()["status"] == "degraded"
        assert deep.json()["upstreams"] == {"remote_write": "ok", "otlp_traces": "unreachable"}

        for answer in (shallow, deep):
            for secret in (token, sha256(token.encode()), "127.0.0.1", live_port, str(dead_port)):
                assert secret.encode() not in answer.body, secret
        # Nothing about health to an anonymous or wrong caller.
        assert (await call("GET", gw.url + "/health?deep=1")).status == 401
        assert (await call("GET", gw.url + "/health?deep=1", new_token())).status == 401
        assert upstream.requests == []  # /health is never proxied

        # The upstream comes back (config now points at a live one): 200.
        write_atomic(config, lifecycle_config(upstream.url, credentials))
        assert (await gw.reload())["event"] == "config_reloaded"
        deep = await call("GET", gw.url + "/health?deep=1", token)
        assert deep.status == 200
        assert deep.json()["upstreams"] == {"remote_write": "ok", "otlp_traces": "ok"}
    finally:
        closed.close()


# ---------------------------------------------------------------- check-config


async def test_check_config_prints_the_matrix_and_validity_windows(tmp_path: Path) -> None:
    tokens = [new_token() for _ in range(4)]
    credentials = ingest(
        token_block("2026-01", tokens[0], not_after="2026-12-01T00:00:00Z"),
        token_block("2026-02", tokens[1], not_before="2026-11-01T00:00:00Z"),
        revoked_block("2025-12", tokens[2]),
    ) + ingest(token_block("k3s", tokens[3]), name="vmagent", routes='["remote_write"]')
    config = tmp_path / "gateway.toml"
    write_atomic(config, lifecycle_config("http://127.0.0.1:9", credentials))
    proc = await asyncio.create_subprocess_exec(
        OBS_GATEWAY,
        "check-config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err) == (0, b"")
    text = out.decode()
    lines = text.splitlines()
    assert lines[0] == f"config OK: {config}"
    header = next(line for line in lines if line.startswith("credential"))
    assert header.split() == ["credential", "remote_write", "otlp_traces", "health"]
    rows = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.startswith(("ingest ", "vmagent "))
    }
    assert rows == {"ingest": ["yes", "yes", "yes"], "vmagent": ["yes", "-", "yes"]}
    assert "  ingest/2026-01: - → 2026-12-01T00:00:00Z" in lines
    assert "  ingest/2026-02: 2026-11-01T00:00:00Z → -" in lines
    assert "  ingest/2025-12: revoked 2026-01-15T09:00:00Z" in lines
    assert "  vmagent/k3s: - → -" in lines
    for token in tokens:
        assert token not in text
        assert sha256(token.encode()) not in text

    # A broken config: exit 2, the key path on stderr, nothing on stdout.
    write_atomic(
        config, config.read_text().replace('routes = ["remote_write"]', 'routes = ["nope"]')
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "check-config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out) == (2, b"")
    assert b"credentials[1].routes[0]: no route of that name" in err


@pytest.mark.parametrize("shorthand", ["token_sha256", "token_file"])
async def test_check_config_names_the_shorthand_token_default(
    tmp_path: Path, shorthand: str
) -> None:
    """The id a shorthand token gets is what the metrics and the runbook call it."""
    token = new_token()
    (tmp_path / "t").write_text(token)
    value = sha256(token.encode()) if shorthand == "token_sha256" else "t"
    credentials = (
        f'\n[[credentials]]\nname = "ingest"\n{shorthand} = "{value}"\nroutes = ["remote_write"]\n'
    )
    config = tmp_path / "gateway.toml"
    write_atomic(config, lifecycle_config("http://127.0.0.1:9", credentials))
    proc = await asyncio.create_subprocess_exec(
        OBS_GATEWAY, "check-config", str(config), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert "  ingest/default: - → -" in out.decode().splitlines()


async def test_a_forgotten_sender_stays_named_and_does_not_lock_out_rotated_ones(
    tmp_path: Path, upstream: RecordingUpstream, gateway_process: StartProcess
) -> None:
    """After a rotation, one sender still retries with the revoked token
    (vmagent retries a 401 forever: several queues, backoff from 1 s), from
    the address its rotated neighbours share (a k3s node's egress, a NAT, or
    a proxy not listed in trusted_proxies).  The operator must keep seeing
    *which* token it holds, and the rotated senders must keep writing."""
    current, retired = new_token(), new_token()
    credentials = ingest(token_block("2026-11", current), revoked_block("2026-10", retired))
    gw = await start(tmp_path, upstream, gateway_process, credentials)

    forgotten = [(await call("POST", gw.url + WRITE, retired, BODY)).status for _ in range(40)]
    rotated = await call("POST", gw.url + WRITE, current, BODY)
    metrics = await gw.metrics()
    revoked = metrics.get(
        "gateway_auth_failures_total", reason="revoked", credential="ingest", token_id="2026-10"
    )
    # The throttle may answer the forgotten sender 429 rather than 401 (it
    # retries both), but not at the rotated senders' or the diagnosis' cost.
    observed = f"forgotten sender got {dict(Counter(forgotten))}"
    assert rotated.status == 204, observed
    assert revoked == 40, observed
