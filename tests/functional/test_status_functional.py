"""``obs-gateway status`` against the real CLI with two workers: a busy
token, a quiet one, and a revoked token presented once.  The JSON form is
parsed and checked; the table is checked a few lines at a time, never as a
snapshot of text."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import config_text, sha256
from tests.support.client import raw_request
from tests.support.process import GatewayProcess
from tests.support.wire import request_bytes

BUSY = "status-busy-token-0123456789abcdef"
QUIET = "status-quiet-token-0123456789abcdef"
OLD = "status-revoked-token-0123456789abcdef"
CREDENTIALS = f"""
[[credentials]]
name = "busy"
token_sha256 = "{sha256(BUSY.encode())}"
routes = ["remote_write"]

[[credentials]]
name = "quiet"
routes = ["remote_write"]

[[credentials.tokens]]
id = "2026-12"
sha256 = "{sha256(QUIET.encode())}"
not_after = "2027-01-01T00:00:00Z"

[[credentials.revoked]]
id = "2026-10"
sha256 = "{sha256(OLD.encode())}"
"""


def status(admin_port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "status", "--admin", f"127.0.0.1:{admin_port}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def token(view: dict[str, Any], cred: str, tid: str) -> dict[str, Any]:
    [c] = [c for c in view["credentials"] if c["name"] == cred]
    found: list[dict[str, Any]] = [t for t in c["tokens"] if t["id"] == tid]
    [t] = found
    return t


# One scenario: traffic, two reads of status, then what they say.
async def test_status_names_busy_quiet_and_revoked_tokens(tmp_path: Path) -> None:  # noqa: PLR0915
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(credentials=CREDENTIALS))
    gw = GatewayProcess(config, ("--workers", "2"))
    try:
        await gw.start()
        resp = await raw_request(gw.port, request_bytes("GET", "/health", token=QUIET))
        assert resp.status == 200
        quiet_at = time.time()
        resp = await raw_request(gw.port, request_bytes("GET", "/health", token=OLD))
        assert resp.status == 401
        await asyncio.sleep(2.0)  # the quiet token ages
        for _ in range(20):
            resp = await raw_request(gw.port, request_bytes("GET", "/health", token=BUSY))
            assert resp.status == 200
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, status, gw.admin_port, "--json")
        assert answer.returncode == 0, answer.stderr
        view = json.loads(answer.stdout)
        table = await loop.run_in_executor(None, status, gw.admin_port)
        assert table.returncode == 0, table.stderr
    finally:
        await gw.stop()

    busy = token(view, "busy", "default")
    assert (busy["requests"], busy["last_minute"]["requests"]) == (20, 20)
    assert view["now"] - busy["last_used"] < 2.0
    quiet = token(view, "quiet", "2026-12")
    assert quiet["requests"] == 1
    assert view["now"] - quiet["last_used"] >= 1.9
    assert abs(quiet["last_used"] - quiet_at) < 1.0
    assert quiet["not_after"] == 1798761600.0  # 2027-01-01T00:00:00Z
    [quiet_cred] = [c for c in view["credentials"] if c["name"] == "quiet"]
    assert quiet_cred["auth_failures"] == {"revoked": 1}
    assert [w["index"] for w in view["workers"]] == [0, 1]
    assert all(w["rss_bytes"] > 10_000_000 for w in view["workers"])
    assert view["config"]["generation"] == 1
    [health] = [r for r in view["routes"] if r["name"] == "health"]
    assert health["last_minute"]["answers"]["2xx"] == 21
    assert health["last_minute"]["answers"]["4xx"] == 1
    for secret in (BUSY, QUIET, OLD, sha256(BUSY.encode()), "127.0.0.1:9"):
        assert secret not in answer.stdout
        assert secret not in table.stdout

    lines = table.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    [busy_row] = [ln for ln in lines if ln.startswith("busy ")]
    cells = busy_row.split()
    assert cells[1] == "default"
    assert cells[3:5] == ["s", "ago"]  # used seconds ago
    assert int(cells[2]) <= 5
    assert cells[5:7] == ["-", "20"]  # no expiry; requests in the last minute
    [quiet_row] = [ln for ln in lines if ln.startswith("quiet ")]
    assert " s ago " in quiet_row
    assert "revoked 1" in quiet_row
    assert " d " in quiet_row  # expires in N days
    assert "rates over" in table.stdout


def test_status_without_a_gateway_says_so(tmp_path: Path) -> None:
    answer = status(9)  # port 9: nothing listens there
    assert answer.returncode == 1
    assert "cannot read the admin listener" in answer.stderr
