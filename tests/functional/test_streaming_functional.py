"""Bodies stream through byte for byte and are never buffered whole: sha256
integrity for 1 KiB / 1 MiB / 32 MiB request bodies with and without
Content-Length and for response bodies; the upstream sees the first chunk
before the client sends the last (both directions); and a 256 MiB upload
does not grow a real gateway process's memory."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import TOKEN, RecordingUpstream, StartGateway, config_text, wait_for
from tests.support.client import raw_client
from tests.support.process import GatewayProcess
from tests.support.wire import chunked, request_bytes

AUTH = {"Authorization": f"Bearer {TOKEN}"}
KiB, MiB = 1024, 1024 * 1024


def received_at_least(upstream: RecordingUpstream, n: int) -> Callable[[], bool]:
    return lambda: bool(upstream.requests) and upstream.requests[0].received >= n


async def pieces(data: bytes, size: int = 256 * KiB) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])


@pytest.mark.parametrize("size", [KiB, MiB, 32 * MiB], ids=["1KiB", "1MiB", "32MiB"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_request_body_integrity(
    start_gateway: StartGateway, upstream: RecordingUpstream, size: int, framing: str
) -> None:
    upstream.keep_bodies = False
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    body = os.urandom(size)
    headers = {**AUTH, "Content-Encoding": "zstd", "Content-Type": "application/x-protobuf"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            f"http://127.0.0.1:{gw.port}/api/v1/write",
            # BytesIO: aiohttp sends it with a Content-Length, without a warning.
            data=io.BytesIO(body) if framing == "content-length" else pieces(body),
            headers=headers,
        ) as resp,
    ):
        assert resp.status == 204
    [seen] = upstream.complete
    assert seen.received == size
    assert seen.sha256 == hashlib.sha256(body).hexdigest()
    assert seen.chunked == (framing == "chunked")
    if framing == "content-length":
        assert seen.headers["Content-Length"] == str(size)
    assert seen.headers["Content-Encoding"] == "zstd"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_response_body_integrity(
    start_gateway: StartGateway, upstream: RecordingUpstream, framing: str
) -> None:
    body = os.urandom(4 * MiB)

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if framing == "content-length":
            return web.Response(body=body, headers={"Content-Encoding": "gzip"})
        resp = web.StreamResponse(headers={"Content-Encoding": "gzip"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for part in pieces(body, 100 * KiB):
            await resp.write(part)
        await resp.write_eof()
        return resp

    upstream.handler = handler
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(f"http://127.0.0.1:{gw.port}/api/v1/write", data=b"q", headers=AUTH) as resp,
    ):
        assert resp.status == 200
        got = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"  # not decompressed
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_gets_the_first_chunk_before_the_client_sends_the_last(
    start_gateway: StartGateway, upstream: RecordingUpstream, framing: str
) -> None:
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    parts = [bytes([i]) * (64 * KiB) for i in range(4)]
    total = sum(map(len, parts))
    async with raw_client(gw.port) as client:
        if framing == "chunked":
            await client.send(
                request_bytes("POST", "/api/v1/write", [("Transfer-Encoding", "chunked")])
            )
        else:
            await client.send(request_bytes("POST", "/api/v1/write", content_length=total))
        sent = 0
        for part in parts[:-1]:
            await client.send(chunked(part, end=False) if framing == "chunked" else part)
            sent += len(part)
            # A buffering proxy would hold these bytes until the body is complete.
            await wait_for(received_at_least(upstream, sent))
            assert not upstream.requests[0].complete
        await client.send(chunked(parts[-1]) if framing == "chunked" else parts[-1])
        assert (await client.response()).status == 204
    [seen] = upstream.complete
    assert seen.body == b"".join(parts)


async def test_client_gets_the_first_response_bytes_before_the_upstream_sends_the_last(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    more = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first-part;")
        await more.wait()
        await resp.write(b"last-part")
        await resp.write_eof()
        return resp

    upstream.handler = handler
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    try:
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("POST", "/api/v1/write", body=b"x"))
            # The gateway forwards what the upstream sent so far ...
            await client.received(b"first-part;")
            assert b"last-part" not in client.raw
            more.set()
            resp = await client.response()
        assert resp.body == b"first-part;last-part"
    finally:
        more.set()


async def test_256_mib_upload_does_not_grow_gateway_memory(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    upstream.keep_bodies = False
    config = tmp_path / "gateway.toml"
    config.write_text(
        config_text(upstream.url + "/api/v1/write", max_body_bytes=512 * MiB).replace(
            'level = "debug"', 'level = "info"'
        )
    )
    # One process, so the pid measured is the one that streams (with
    # workers it would be the supervisor's, which never sees a byte).
    gw = GatewayProcess(config, args=("--workers", "1"))
    try:
        await gw.start()
        block = bytes(MiB)

        async def upload(size: int) -> int:
            async with raw_client(gw.port) as client:
                await client.send(request_bytes("POST", "/api/v1/write", content_length=size))
                for _ in range(size // MiB):
                    await client.send(block)
                return (await client.response(timeout=30)).status

        # Warm up (pools, allocator, first-request imports), then measure.
        assert await upload(4 * MiB) == 204
        before = gw.status()
        assert await upload(256 * MiB) == 204
        after = gw.status()
    finally:
        await gw.stop()
    assert [r.received for r in upstream.complete] == [4 * MiB, 256 * MiB]
    assert upstream.complete[1].sha256 == hashlib.sha256(bytes(256 * MiB)).hexdigest()
    grown_kib = after["VmHWM"] - before["VmHWM"]
    # Buffering the body would add >= 256 MiB; streaming needs socket-sized buffers.
    assert grown_kib < 32 * 1024, f"peak RSS grew by {grown_kib} KiB"
