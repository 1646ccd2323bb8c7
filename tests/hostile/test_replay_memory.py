"""Replay copies under a burst of big bodies (issue 12): however many large
requests arrive at once at a route with several backends, one worker holds
at most ``[upstream] replay_memory_bytes`` of copies; the rest stream
without one.  Measured as the resident memory of a real gateway process,
not as a status code alone."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from tests.support.backends import backends_config
from tests.support.client import raw_client
from tests.support.process import GatewayProcess
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import Response, request_bytes

MIB = 1024 * 1024
CLIENTS = 24
BODY_BYTES = 4 * MIB  # 96 MiB in flight at once
BOUND = 16 * MIB  # replay_memory_bytes: room for four copies
# Beyond the copies: per-connection read buffers and allocator slack.
SLACK_KIB = 24 * 1024


async def test_a_burst_of_big_bodies_holds_at_most_the_replay_bound(tmp_path: Path) -> None:
    release = asyncio.Event()
    read = []

    async def hold_then_reset(conn: UpConn) -> None:
        await conn.next_request()  # the whole body, read and dropped as it comes
        read.append(conn)
        await release.wait()
        conn.reset()

    a = RawUpstream(hold_then_reset, keep=False)
    b = RawUpstream(keep=False)
    await a.start()
    await b.start()
    config = tmp_path / "gateway.toml"
    config.write_text(
        backends_config(
            [a.url + "/api/v1/write", b.url + "/api/v1/write"],
            rw_keys='balance = "first_available"',
            upstream=f"replay_memory_bytes = {BOUND}\nresponse_timeout_seconds = 30",
            log='level = "info"\naccess = false',
        )
    )
    gw = GatewayProcess(config, ("--workers", "1"))
    body = random.Random(1).randbytes(BODY_BYTES)
    clients = []
    try:
        await gw.start()
        before = gw.status()["VmRSS"]

        async def send() -> Response:
            async with raw_client(gw.port) as client:
                clients.append(client)
                await client.send(request_bytes("POST", "/api/v1/write", body=body))
                return await client.response(timeout=40)

        tasks = [asyncio.create_task(send()) for _ in range(CLIENTS)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(read) < CLIENTS:  # every body read by A
            assert loop.time() < deadline, "the bodies did not all reach A"
            await asyncio.sleep(0.05)
        held = gw.status()
        growth = max(held["VmRSS"], held["VmHWM"]) - before
        assert growth < BOUND // 1024 + SLACK_KIB, f"RSS grew {growth} KiB"
        m = await gw.metrics()
        assert m.value("gateway_replay_buffer_bytes") == BOUND
        assert m.value("gateway_replay_skipped_total", route="remote_write", reason="memory") == (
            CLIENTS - BOUND // BODY_BYTES
        )

        release.set()  # A dies with every request: the copies go to B
        async with asyncio.timeout(20):
            statuses = Counter([(await t).status for t in tasks])
        assert statuses == {204: BOUND // BODY_BYTES, 502: CLIENTS - BOUND // BODY_BYTES}
        m = await gw.metrics()
        assert m.value("gateway_replay_buffer_bytes") == 0
        assert m.value("gateway_upstream_replayed_bytes_total", route="remote_write") == BOUND
    finally:
        release.set()
        await gw.stop()
        await a.stop()
        await b.stop()
