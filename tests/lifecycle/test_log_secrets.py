"""No secret reaches a log line through an exception, in any process.

A fault inside the JWT check has the presented token and the HMAC key in
the locals of its frames.  These tests put one there on purpose (a Python
start-up hook that every process of the gateway under test loads, standing
in for any bug below ``Authenticator``), against the real process with one
worker and with a supervisor and two workers, then read everything the
processes printed and look for any piece of either secret.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import jwt
import orjson
import pytest

from tests.conftest import RecordingUpstream, wait_for
from tests.lifecycle.conftest import (
    StartProcess,
    call,
    lifecycle_config,
    new_token,
    token_block,
    write_atomic,
)
from tests.support.process import GatewayProcess

ISS = "https://sso.88oakapps.test"
AUD = "obs-gateway"
SECRET_ENV = "OBS_TEST_HMAC_SECRET"
# Loaded by every Python process started with this directory on PYTHONPATH:
# the supervisor, its workers, a single-process gateway.
FAULT_HOOK = """
import jwt.algorithms


def _verify(self, msg, key, sig):
    # The HMAC key and the signed part of the token are this frame's locals.
    raise RuntimeError("injected fault inside the HMAC check")


jwt.algorithms.HMACAlgorithm.verify = _verify
"""
# Any run of this many characters of a secret in the output counts as a leak.
WINDOW = 12


def credentials() -> str:
    return f"""
[[credentials]]
name = "ingest"
routes = ["remote_write"]
{token_block("static", new_token())}
[[credentials]]
name = "apps"
routes = ["remote_write"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "{ISS}"
audience = "{AUD}"
hmac_secret_env = "{SECRET_ENV}"
scope_claim = ""
"""


def pieces(secret: str) -> set[str]:
    return {secret[i : i + WINDOW] for i in range(len(secret) - WINDOW + 1)}


def printed(gw: GatewayProcess) -> str:
    """Everything the processes wrote: stdout's JSON lines and stderr."""
    return orjson.dumps(gw.events).decode() + gw.stderr.decode(errors="replace")


async def start(
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
    workers: int,
    hmac_secret: str,
) -> GatewayProcess:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    config = tmp_path / "gateway.toml"
    write_atomic(config, lifecycle_config(upstream.url, credentials()))
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = {SECRET_ENV: hmac_secret, "PYTHONPATH": path}
    return await gateway_process(config, workers, env, faults_expected=True)


@pytest.mark.parametrize("workers", [1, 2], ids=["one_process", "supervisor_and_workers"])
async def test_a_fault_in_the_jwt_check_logs_neither_the_token_nor_the_key(
    workers: int,
    tmp_path: Path,
    upstream: RecordingUpstream,
    gateway_process: StartProcess,
) -> None:
    hmac_secret = secrets.token_urlsafe(30)  # 40 characters
    gw = await start(tmp_path, upstream, gateway_process, workers, hmac_secret)
    now = int(time.time())
    token = jwt.encode({"iss": ISS, "aud": AUD, "exp": now + 300}, hmac_secret, "HS256")
    # Fresh connections, so that with two workers both are likely to serve one.
    sent = 6
    for _ in range(sent):
        answer = await call("POST", gw.url + "/api/v1/write", token, b"x")
        assert answer.status == 503  # a fault is the gateway's, never the sender's
        assert token.encode() not in answer.body
    await wait_for(lambda: len(gw.find("internal_error")) == sent, 10.0)
    await wait_for(lambda: len(gw.find("request", status=503)) == sent, 10.0)
    assert upstream.requests == []

    # Nothing any process printed holds a piece of either secret ...
    out = printed(gw)
    leaked = {
        name: sorted(p for p in pieces(secret) if p in out)[:2]
        for name, secret in (("token", token), ("HMAC key", hmac_secret))
    }
    assert leaked == {"token": [], "HMAC key": []}
    # ... although the fault was logged with its traceback, frames without locals.
    for event in gw.find("internal_error"):
        assert event["error"] == "RuntimeError"
        frames = [f for exc in event["exception"] for f in exc["frames"]]
        assert any(f["name"] == "_verify" for f in frames), frames
        assert all("locals" not in f for f in frames)
