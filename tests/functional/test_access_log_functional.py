"""The access line as an operator reads it (real CLI, JSON on stdout): every
request names its path, as the client sent it (no decoding, no query
string, cut at 200 bytes, escaped by the JSON renderer), routed or not."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import TOKEN, config_text
from tests.support.client import raw_request
from tests.support.process import GatewayProcess
from tests.support.wire import request_bytes


async def test_every_access_line_names_the_path_it_was_sent(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text())
    gw = GatewayProcess(config, ("--workers", "1"))
    long_path = "/" + "a" * 300
    sent = [
        ("POST", "/api/v1/write", TOKEN),  # routed (the upstream refuses: 502)
        ("GET", "/health", TOKEN),
        ("GET", "/nope?token=in-the-query", TOKEN),  # 404: the query is not logged
        ("GET", "/api/v1/write/../x", None),  # 401 before any routing
        ("GET", "/%2e%2e/x", TOKEN),  # never decoded
        ("GET", '/q"uote\\', TOKEN),  # escaped by JSON, one line still
        ("GET", long_path, TOKEN),
    ]
    try:
        await gw.start()
        for method, path, token in sent:
            body = b"x" if method == "POST" else b""
            await raw_request(gw.port, request_bytes(method, path, body=body, token=token))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len([e for e in gw.events if e.get("event") == "request"]) < len(sent):
            assert loop.time() < deadline, gw.raw_stdout.decode()
            await asyncio.sleep(0.05)
    finally:
        await gw.stop()
    lines = [e for e in gw.events if e.get("event") == "request"]
    by_status = [(e["path"], e["status"], e["route"]) for e in lines]
    assert by_status == [
        ("/api/v1/write", 502, "remote_write"),
        ("/health", 200, "health"),
        ("/nope", 404, "unmatched"),
        ("/api/v1/write/../x", 401, "unmatched"),
        ("/%2e%2e/x", 404, "unmatched"),
        ('/q"uote\\', 404, "unmatched"),
        (long_path[:200], 404, "unmatched"),
    ]
    assert b"in-the-query" not in gw.raw_stdout
    # Every line parsed as JSON: the quote and backslash were escaped.
    assert gw.find("<not json>") == []
