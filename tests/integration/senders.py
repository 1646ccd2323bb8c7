"""OTLP senders as their own processes: a real OpenTelemetry SDK each, driven
by one contract so that several SDKs can meet the same outage side by side.

Each sender program (``sender_python.py``: the Python SDK; ``node/sender.mjs``:
the JS SDK) reads its target and load from the environment, emits SPANS root
spans at a steady rate through its SDK's BatchSpanProcessor and OTLP/HTTP
exporter, flushes, and writes one JSON result: the ids it created and what its
exports returned.  The tests compare those ids with what the receiver decoded.

A missing toolchain fails the test naming what to install (this tier never
skips): node from Debian's ``nodejs`` (or the machine's own), and the JS SDK
from ``tests/integration/node/package-lock.json`` via ``npm ci``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.components import Gateway
from tests.integration.harness import Proc, Procs, wait_until

__all__ = ["NODE_DIR", "Load", "Sender", "SenderResult", "node_sender", "python_sender"]

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = Path(__file__).with_name("node")
# Oldest node the JS SDK 2.x supports (its package.json "engines").
NODE_MIN = (18, 19)


@dataclass(frozen=True)
class Load:
    """SPANS root spans, PER_TICK every TICK_MS; the exporter's timeout is its
    whole retry budget in every SDK, so it bounds how long an outage can be."""

    spans: int
    per_tick: int = 10
    tick_ms: int = 200
    export_timeout_ms: int = 30_000

    @property
    def seconds(self) -> float:
        return self.spans / self.per_tick * self.tick_ms / 1000

    def env(self) -> dict[str, str]:
        return {
            "SPANS": str(self.spans),
            "PER_TICK": str(self.per_tick),
            "TICK_MS": str(self.tick_ms),
            "EXPORT_TIMEOUT_MS": str(self.export_timeout_ms),
        }


@dataclass(frozen=True)
class SenderResult:
    sdk: str
    sent: list[str]  # trace id + span id, lower-case hex
    exported_ok: int  # spans in exports the SDK saw succeed
    export_failed: int  # spans in exports the SDK gave up on (dropped)
    export_calls: int


class Sender:
    def __init__(self, sdk: str, proc: Proc, result_path: Path) -> None:
        self.sdk = sdk
        self.proc = proc
        self.result_path = result_path

    def wait(self, timeout: float) -> SenderResult:
        """Wait for the program to finish; its result (fails with its log)."""
        wait_until(lambda: not self.proc.running(), f"the {self.sdk} sender to finish", timeout)
        code = self.proc.popen.returncode
        if code != 0 or not self.result_path.exists():
            pytest.fail(f"{self.sdk} sender exited with {code}\n{self.proc.log_tail()}")
        data = json.loads(self.result_path.read_text(encoding="utf-8"))
        return SenderResult(
            self.sdk,
            data["sent"],
            data["exported_ok"],
            data["export_failed"],
            data["export_calls"],
        )


def _contract_env(gw: Gateway, token: str, load: Load, result_path: Path) -> dict[str, str]:
    return {
        "OTLP_URL": gw.traces_url,
        "OTLP_TOKEN": token,
        "RESULT_FILE": str(result_path),
        **load.env(),
    }


def python_sender(
    procs: Procs,
    gw: Gateway,
    token: str,
    load: Load,
    workdir: Path,
    *,
    url: str | None = None,
    http2_ca: Path | None = None,
) -> Sender:
    """``url``: instead of the gateway's cleartext traces URL; ``http2_ca``:
    export over HTTP/2 (TLS) trusting this CA (``sender_python.py``)."""
    result = workdir / "python-sender.json"
    env = _contract_env(gw, token, load, result)
    if url is not None:
        env["OTLP_URL"] = url
    if http2_ca is not None:
        env["OTLP_HTTP2_CA"] = str(http2_ca)
    proc = procs.start(
        "sender-python",
        [sys.executable, "-m", "tests.integration.sender_python"],
        env=env,
        cwd=REPO,
    )
    return Sender("python", proc, result)


def require_node() -> str:
    """The node binary, new enough for the JS SDK, with the SDK installed."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "'node' is not on PATH: install Node.js >= 18.19 (Debian: apt-get install "
            "nodejs npm; .ci/run does); the integration tier does not skip",
            pytrace=False,
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    major, minor = (int(part) for part in version.lstrip("v").split(".")[:2])
    if (major, minor) < NODE_MIN:
        pytest.fail(f"node {version} is older than the JS SDK's 18.19", pytrace=False)
    installed = NODE_DIR / "node_modules" / "@opentelemetry" / "exporter-trace-otlp-proto"
    if not (installed / "package.json").exists():
        pytest.fail(
            f"the OpenTelemetry JS SDK is not installed in {NODE_DIR}: run "
            f"'npm ci --prefix {NODE_DIR.relative_to(REPO)}' (make test does); "
            "the integration tier does not skip",
            pytrace=False,
        )
    return node


def node_sender(procs: Procs, gw: Gateway, token: str, load: Load, workdir: Path) -> Sender:
    node = require_node()
    result = workdir / "node-sender.json"
    proc = procs.start(
        "sender-node",
        [node, str(NODE_DIR / "sender.mjs")],
        env=_contract_env(gw, token, load, result),
        cwd=NODE_DIR,
    )
    return Sender("node", proc, result)
