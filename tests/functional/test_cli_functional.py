"""The real CLI as a process (DESIGN §6): ``run`` serves until SIGTERM, then
lets an in-flight request finish with its real status and exits 0;
``check-config`` exits 0 or 2 naming the key; ``hash-token`` prints a token
and the config line for its digest, which then authenticates."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import OTHER_TOKEN, TOKEN, RecordingUpstream, config_text, wait_for
from tests.support.client import raw_client, raw_request
from tests.support.metrics import scrape
from tests.support.process import GatewayProcess
from tests.support.wire import request_bytes


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def hash_token() -> tuple[str, str]:
    result = run_cli("hash-token")
    assert result.returncode == 0, result.stderr
    token = re.search(r"^token:\s+(\S+)$", result.stdout, re.MULTILINE)
    line = re.search(r'^config: (token_sha256 = "([0-9a-f]{64})")$', result.stdout, re.MULTILINE)
    assert token, result.stdout
    assert line, result.stdout
    return token.group(1), line.group(1)


def test_hash_token_prints_a_fresh_token_and_its_digest_line() -> None:
    token, line = hash_token()
    # 256 bits, URL-safe base64 without padding: 43 characters.
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert line == f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"'
    assert hash_token()[0] != token


def test_help_lists_the_public_commands_only() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "SUPPRESS" not in result.stdout
    assert "_worker" not in result.stdout
    assert "``" not in result.stdout  # no reStructuredText from a docstring
    for command in ("run", "check-config", "hash-token"):
        assert re.search(rf"^    {command} +\S", result.stdout, re.M), command
    # The supervisor's way of starting a worker still parses.
    assert "--fd" in run_cli("_worker", "--help").stdout


def digest_line(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "hash-token", "--stdin"],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )


async def test_hash_token_stdin_gives_the_line_that_authenticates_an_existing_token(
    tmp_path: Path,
) -> None:
    """The runbook's first step: the digest of the token senders already
    hold.  ``echo "$T" | sha256sum`` would hash the newline too, and after
    the reload every sender would get 401."""
    token, fresh_line = hash_token()
    for given in (token, token + "\n", token + "\r\n", f"  {token}\t\n"):
        result = digest_line(given.encode())
        assert result.returncode == 0, result.stderr
        out = result.stdout.decode()
        assert out.splitlines()[0] == f"config: {fresh_line}", repr(given)
        assert token not in out
    newline_digest = hashlib.sha256(f"{token}\n".encode()).hexdigest()
    assert newline_digest not in out
    # The printed line, in a config, lets the token in.
    config = tmp_path / "gateway.toml"
    line = out.splitlines()[0].removeprefix("config: ")
    config.write_text(config_text(credentials=single_credential(line)))
    gw = GatewayProcess(config)
    try:
        await gw.start()
        health = await raw_request(gw.port, request_bytes("GET", "/health", token=token))
        assert health.status == 200
        assert json.loads(health.body)["credential"] == "cli"
    finally:
        await gw.stop()


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (b"Bearer test-token-0123456789abcdef\n", "whitespace inside"),
        (b"test-token-0123456789abcdef\nother-token-0123456789abcdef\n", "whitespace inside"),
        (b"\n", "empty"),
        (b"", "empty"),
        (b"short-token\n", "shorter than 16"),
        (b"x" * 5000, "longer than 4096"),
    ],
)
def test_hash_token_stdin_refuses_what_cannot_be_one_token(given: bytes, says: str) -> None:
    result = digest_line(given)
    assert result.returncode == 2
    assert result.stdout == b""
    assert says in result.stderr.decode()
    assert b"0123456789abcdef" not in result.stderr  # what was given is never echoed


def single_credential(line: str) -> str:
    return f'[[credentials]]\nname = "cli"\n{line}\nroutes = ["remote_write", "otlp_traces"]\n'


def test_check_config_ok_prints_the_matrix(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text())
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    matrix = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:5]}
    assert matrix["credential"] == ["remote_write", "otlp_traces", "health"]
    assert matrix["ingest"] == ["yes", "yes", "yes"]
    assert matrix["other"] == ["yes", "-", "yes"]


TENANTS = f"""
[[credentials]]
name = "team-a"
token_sha256 = "{hashlib.sha256(b"team-a-token-0123456789").hexdigest()}"
routes = ["remote_write", "otlp_traces"]
[credentials.forward]
extra_labels = {{ tenant = "a" }}
headers = {{ "X-Scope-OrgID" = "a" }}
[credentials.forward.upstreams]
remote_write = "http://vminsert:8480/insert/42/prometheus/api/v1/write"
"""


def test_check_config_prints_the_forwarding_and_warns_of_mixed_tenancy(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    # "ingest" and "other" share remote_write with nothing pinned; team-a is kept apart.
    config.write_text(config_text() + TENANTS)
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = lines.index("forwarding (credential → route: extra labels; headers; backend):")
    assert lines[at + 1 :] == [
        "  ingest → remote_write: -; -; the route upstream",
        "  ingest → otlp_traces: -; -; the route upstream",
        "  other → remote_write: -; -; the route upstream",
        '  team-a → remote_write: tenant="a"; X-Scope-OrgID: a; '
        "http://vminsert:8480/insert/42/prometheus/api/v1/write",
        "  team-a → otlp_traces: -; X-Scope-OrgID: a; the route upstream",
    ]
    [warning] = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning == (
        "obs-gateway: warning: route remote_write: credentials ingest, other share it "
        "without any [credentials.forward] setting while team-a has one: their data is "
        "not kept apart"
    )
    # otlp_traces: only "ingest" is unpinned there, so no warning; nor without any tenancy.
    config.write_text(config_text())
    assert "warning" not in run_cli("check-config", str(config)).stderr


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("http://127.0.0.1:9/v1/traces", "not-a-url"), "routes[1].upstream"),
        (("[server]", "[server]\nlisten_port = 80"), "server.listen_port"),
        (('name = "other"', 'name = "ingest"'), "credentials[1].name"),
    ],
)
def test_check_config_bad_exits_2_naming_the_key(
    tmp_path: Path, change: tuple[str, str], key: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text().replace(*change))
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_of_an_unset_token_env_and_still_checks_the_rest(
    tmp_path: Path,
) -> None:
    """check-config runs in an operator's shell, which rarely has the
    service's environment: an unset variable is a warning naming it, with
    the matrix printed; run still refuses the same config."""
    config = tmp_path / "gateway.toml"
    two = single_credential('token_env = "OBS_TEST_UNSET"') + (
        '[[credentials]]\nname = "cli2"\nroutes = ["remote_write"]\n'
        '[[credentials.tokens]]\nid = "b"\nenv = "OBS_TEST_UNSET_TOO"\n'
    )
    config.write_text(config_text(credentials=two))
    unset = ("OBS_TEST_UNSET", "OBS_TEST_UNSET_TOO")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    result = run_cli("check-config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "  cli/default: - → -" in result.stdout
    assert "  cli2/b: - → -" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2
    for name, line in zip(unset, warnings, strict=True):
        assert f"warning: {name} is not set here" in line
        assert "'run' refuses to start without it" in line
    assert "placeholder-for" not in result.stdout + result.stderr.replace("a placeholder", "")
    # Everything else is still checked: a bad key is still an error.
    config.write_text(config_text(credentials=two).replace("[server]", "[server]\nlisten_port = 1"))
    result = run_cli("check-config", str(config), env=env)
    assert result.returncode == 2
    assert "server.listen_port" in result.stderr
    # A variable that is set is used as it is: too short is an error.
    config.write_text(config_text(credentials=two))
    short = run_cli("check-config", str(config), env={**env, "OBS_TEST_UNSET": "short"})
    assert short.returncode == 2
    assert "credentials[0].token_env: the token is shorter" in short.stderr
    # run refuses the config without serving, naming the key.
    refused = run_cli("run", "--config", str(config), env=env)
    assert refused.returncode == 2
    assert "credentials[0].token_env: environment variable OBS_TEST_UNSET" in refused.stderr


def _hmac_credential(name: str, env: str) -> str:
    return f"""
[[credentials]]
name = "{name}"
routes = ["remote_write"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "https://sso.test"
audience = "obs-gateway"
hmac_secret_env = "{env}"
"""


def test_two_jwt_keys_without_kid_exit_2_naming_both_by_position(tmp_path: Path) -> None:
    """Both loaded at 70f0a08, and then every JWT of either got 401."""
    config = tmp_path / "gateway.toml"
    creds = _hmac_credential("team-a", "OBS_TEST_HMAC_A") + _hmac_credential(
        "team-b", "OBS_TEST_HMAC_B"
    )
    config.write_text(config_text(credentials=creds))
    env = {**os.environ, "OBS_TEST_HMAC_A": "a" * 40, "OBS_TEST_HMAC_B": "b" * 40}
    result = run_cli("check-config", str(config), env=env)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("obs-gateway: config error: credentials[1].jwt: ")
    assert "credentials[0]" in result.stderr  # by position: config errors echo no value
    assert "a" * 40 not in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli("run", "--config", str(config), env=env).returncode == 2
    # A kid on one of them is the way out.
    config.write_text(config_text(credentials=creds + 'kid = "team-b-1"\n'))
    ok = run_cli("check-config", str(config), env=env)
    assert ok.returncode == 0, ok.stderr
    assert "team-a/jwt: JWT HS256" in ok.stdout
    assert "team-b/team-b-1: JWT HS256" in ok.stdout


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml" in result.stderr


async def wait_not_ready(admin_port: int, timeout: float = 10.0) -> None:
    """/readyz turns 503 once draining has begun (the "draining" log line is
    buffered, so it is no signal)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
                if resp.status == 503:
                    return
            assert loop.time() < deadline, "/readyz never reported draining"
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(
    upstream: RecordingUpstream, tmp_path: Path, workers: int
) -> None:
    token, line = hash_token()
    upstream.hold = True
    upstream.status = 200
    upstream.response_body = b"stored"
    config = tmp_path / "gateway.toml"
    config.write_text(
        config_text(
            upstream.url + "/api/v1/write",
            credentials=single_credential(line),
            server="drain_timeout_seconds = 10",
        )
    )
    gw = GatewayProcess(config, ("--workers", str(workers)))
    try:
        await gw.start()
        health = await raw_request(gw.port, request_bytes("GET", "/health", token=token))
        assert health.status == 200
        assert json.loads(health.body)["credential"] == "cli"
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("POST", "/api/v1/write", body=b"slow", token=token))
            await wait_for(lambda: len(upstream.complete) == 1)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            await wait_not_ready(gw.admin_port)
            # Stopped accepting: new connections are refused.
            await wait_refused(gw.port)
            assert gw.proc.returncode is None  # still waiting for the in-flight one
            upstream.release.set()
            resp = await client.response()
        assert resp.status == 200
        assert resp.body == b"stored"
        assert await gw.wait(timeout=15) == 0
    finally:
        upstream.release.set()
        await gw.stop()
    assert gw.find("draining")
    assert gw.find("stopped")
    [access] = [e for e in gw.events if e.get("route") == "remote_write"]
    assert (access["status"], access["credential"]) == (200, "cli")
    stdout = gw.raw_stdout.decode()
    assert token not in stdout
    assert token not in gw.stderr.decode()


async def wait_refused(port: int, timeout: float = 5.0) -> None:
    """Connections are refused once every listener has closed (with several
    workers, each closes its own SO_REUSEPORT socket as it drains)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        await writer.wait_closed()
        assert loop.time() < deadline, "still accepting connections while draining"
        await asyncio.sleep(0.02)


async def test_sigterm_when_idle_exits_0_promptly(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text())
    gw = GatewayProcess(config)
    try:
        await gw.start()
        # An idle keep-alive connection does not hold the drain up.
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("GET", "/health"))
            assert (await client.response()).status == 200
            assert gw.proc is not None
            loop = asyncio.get_running_loop()
            started = loop.time()
            gw.proc.send_signal(signal.SIGTERM)
            assert await gw.wait() == 0
            assert loop.time() - started < 5.0
            assert await client.closed()
    finally:
        await gw.stop()


async def test_sighup_reloads_a_good_config_and_keeps_serving_on_a_bad_one(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    original = config_text(upstream.url + "/api/v1/write")
    config.write_text(original)
    gw = GatewayProcess(config)

    async def status_with(token: str) -> int:
        data = request_bytes("POST", "/api/v1/write", body=b"x", token=token)
        return (await raw_request(gw.port, data)).status

    try:
        await gw.start()
        assert gw.proc is not None
        assert await status_with(OTHER_TOKEN) == 204
        # A good config without the "other" credential: its token stops working.
        without_other = original[: original.index('[[credentials]]\nname = "other"')]
        config.write_text(without_other)
        gw.proc.send_signal(signal.SIGHUP)
        await gw.wait_event("config_reloaded")
        assert await status_with(OTHER_TOKEN) == 401
        assert await status_with(TOKEN) == 204
        # A bad config is rejected, logged and counted; the last good one serves.
        config.write_text(without_other.replace("http://", "ftp://", 1))
        gw.proc.send_signal(signal.SIGHUP)
        failed = await gw.wait_event("config_reload_failed")
        assert "routes[0].upstream" in failed["error"]
        assert await status_with(TOKEN) == 204
        metrics = await scrape(gw.admin_port)
        assert metrics.sum("gateway_config_reloads_total", result="success") == 1
        assert metrics.sum("gateway_config_reloads_total", result="failure") == 1
    finally:
        await gw.stop()
