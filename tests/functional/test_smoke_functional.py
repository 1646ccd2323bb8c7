"""A first end-to-end check over loopback: write passes, auth and routing answer."""

from __future__ import annotations

import aiohttp

from tests.conftest import TOKEN, RecordingUpstream, StartGateway, config_text


async def test_remote_write_reaches_upstream(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config_text(rw_upstream=upstream.url + "/api/v1/write"))
    body = b"\x00snappy-bytes\xff" * 100
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(
            f"http://127.0.0.1:{gw.port}/api/v1/write?extra_label=a%3Db",
            data=body,
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Encoding": "snappy",
                "X-Prometheus-Remote-Write-Version": "0.1.0",
            },
        ) as resp:
            assert resp.status == 204
        async with session.get(f"http://127.0.0.1:{gw.port}/health") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    [req] = upstream.requests
    assert req.body == body
    assert req.path_qs == "/api/v1/write?extra_label=a%3Db"
    assert "Authorization" not in req.headers
    assert req.headers["Content-Encoding"] == "snappy"
    assert req.headers["X-Forwarded-For"] == "127.0.0.1"
