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
from tests.support.upstreams import RawUpstream, UpConn, reset_after_request
from tests.support.wire import ParsedRequest, Response, request_bytes

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


TINY_CHUNKS = 1024 * 1024  # one byte each: 1 MiB of body, 6 MiB on the wire
# A copy that costs what it holds adds ~1 MiB; one that kept three objects
# per chunk (the framing apart from the byte) adds ~80 MiB (measured).  The
# rest (~9 MiB measured) is streaming itself: one 256 KiB read of tiny
# chunks becomes ~40 k pieces until it is written.
TINY_BOUND_KIB = 20 * 1024


async def test_a_chunked_body_of_tiny_chunks_costs_its_bytes_in_the_copy(
    tmp_path: Path,
) -> None:
    """The replay copy holds payload bytes, not a list of pieces: a million
    one-byte chunks, read by a backend that holds the request, cost the
    gateway about a MiB of resident memory, and the replay to the second
    backend carries the same body."""
    release, held = asyncio.Event(), asyncio.Event()

    async def hold_then_reset(conn: UpConn) -> None:
        tail = b""  # the raw end of the body, not parsed (1 M chunks)
        while tail != b"0\r\n\r\n":
            data = await conn.reader.read(65536)
            if not data:
                return
            tail = (tail + data)[-5:]
        held.set()
        await release.wait()
        conn.reset()

    a = RawUpstream(hold_then_reset, keep=False)
    b = RawUpstream()
    await a.start()
    await b.start()
    config = tmp_path / "gateway.toml"
    config.write_text(
        backends_config(
            [a.url + "/api/v1/write", b.url + "/api/v1/write"],
            rw_keys='balance = "first_available"',
            upstream="response_timeout_seconds = 60",
            server="body_idle_timeout_seconds = 30",
            log='level = "info"\naccess = false',
        )
    )
    gw = GatewayProcess(config, ("--workers", "1"))
    try:
        await gw.start()
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("GET", "/health"))  # warm up, A untouched
            assert (await client.response()).status == 200
        before = gw.status()["VmRSS"]
        async with raw_client(gw.port) as client:
            head = request_bytes("POST", "/api/v1/write", [("Transfer-Encoding", "chunked")])
            await client.send(head + b"1\r\nx\r\n" * TINY_CHUNKS + b"0\r\n\r\n")
            async with asyncio.timeout(60):
                await held.wait()
            mem = gw.status()
            growth = max(mem["VmRSS"], mem["VmHWM"]) - before
            m = await gw.metrics()
            print(f"{TINY_CHUNKS} one-byte chunks held: RSS +{growth} KiB")
            assert growth < TINY_BOUND_KIB, f"RSS grew {growth} KiB for a 1 MiB body"
            assert m.value("gateway_replay_buffer_bytes") >= TINY_CHUNKS
            release.set()
            resp = await client.response(timeout=30)
        assert resp.status == 204
        assert [r.body for r in b.requests] == [b"x" * TINY_CHUNKS]
        assert b.errors == []
    finally:
        release.set()
        await gw.stop()
        await a.stop()
        await b.stop()


async def test_a_replay_keeps_its_reservation_while_the_last_backend_stalls(
    tmp_path: Path,
) -> None:
    """The last attempt's replay is still the copy's memory: while B does not
    read, the bytes sent to it wait in the gateway, so the gauge keeps them
    and the bound refuses new copies (those bodies stream without one)."""
    held_bodies, body_bytes, bound = 3, MIB, 3 * MIB

    async def stall(conn: UpConn) -> None:
        await asyncio.Event().wait()  # accepts, never reads, never answers

    a = RawUpstream(reset_after_request, keep=False)
    b = RawUpstream(stall, keep=False)
    await a.start()
    await b.start()
    config = tmp_path / "gateway.toml"
    config.write_text(
        backends_config(
            [a.url + "/api/v1/write", b.url + "/api/v1/write"],
            rw_keys='balance = "first_available"',
            upstream=f"replay_memory_bytes = {bound}\nresponse_timeout_seconds = 60",
            log='level = "info"\naccess = false',
        )
    )
    gw = GatewayProcess(config, ("--workers", "1"))
    body = random.Random(2).randbytes(body_bytes)

    async def send() -> Response:
        async with raw_client(gw.port) as client:
            await client.send(request_bytes("POST", "/api/v1/write", body=body))
            return await client.response(timeout=60)

    stalled: list[asyncio.Task[Response]] = []
    try:
        await gw.start()
        stalled = [asyncio.create_task(send()) for _ in range(held_bodies)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while b.connections < held_bodies:  # every copy replayed to B
            assert loop.time() < deadline, "the replays did not all reach B"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # what B would release, if anything, is released
        m = await gw.metrics()
        assert m.value("gateway_replay_buffer_bytes") == bound, "replayed bytes unreserved"
        assert m.value("gateway_upstream_replayed_bytes_total", route="remote_write") == bound

        # The bound is taken: the next bodies stream without a copy.
        stalled += [asyncio.create_task(send()) for _ in range(2)]
        deadline = loop.time() + 20
        while (m := await gw.metrics()).value(
            "gateway_replay_skipped_total", route="remote_write", reason="memory"
        ) < 2:
            assert loop.time() < deadline, "the new bodies were not refused a copy"
            await asyncio.sleep(0.05)
        assert m.value("gateway_replay_buffer_bytes") == bound
        assert not any(t.done() for t in stalled)
    finally:
        for t in stalled:
            t.cancel()
        await gw.stop()
        await a.stop()
        await b.stop()


async def test_a_chunked_body_read_while_queued_is_reserved_whole(tmp_path: Path) -> None:
    """What a queued request read of its chunked body is in the copy from
    the start, so the reservation covers it, not only a first 64 KiB step."""
    first_done = asyncio.Event()
    queued_body = 100 * 1024  # one read: within a loopback receive buffer

    async def respond(conn: UpConn, req: ParsedRequest) -> None:
        await first_done.wait()  # the first request holds the only slot
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    a, b = RawUpstream(), RawUpstream()
    a.responder = respond
    await a.start()
    await b.start()
    config = tmp_path / "gateway.toml"
    text = backends_config(
        [a.url + "/api/v1/write", b.url + "/api/v1/write"],
        rw_keys='balance = "first_available"',
        upstream="response_timeout_seconds = 30",
        log='level = "info"\naccess = false',
    )
    config.write_text(
        text + "\n[limits]\nmax_concurrent_requests = 1\nqueue_timeout_seconds = 20\n"
    )
    gw = GatewayProcess(config, ("--workers", "1"))
    try:
        await gw.start()
        async with raw_client(gw.port) as first, raw_client(gw.port) as second:
            await first.send(request_bytes("POST", "/api/v1/write", body=b"first"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not a.requests:
                assert loop.time() < deadline, "the first request did not reach A"
                await asyncio.sleep(0.02)
            head = request_bytes("POST", "/api/v1/write", [("Transfer-Encoding", "chunked")])
            # One chunk, read while queued; the body goes on (no last chunk yet).
            await second.send(head + b"%x\r\n" % queued_body + b"y" * queued_body + b"\r\n")
            await asyncio.sleep(0.3)  # read by the gateway while queued
            first_done.set()  # the slot frees: the second is admitted, its copy kept
            assert (await first.response()).status == 204
            deadline = loop.time() + 10
            while a.received.count(b"POST /api/v1/write") < 2:
                assert loop.time() < deadline, "the second request did not reach A"
                await asyncio.sleep(0.02)
            m = await gw.metrics()
            assert m.value("gateway_replay_buffer_bytes") >= queued_body
    finally:
        first_done.set()
        await gw.stop()
        await a.stop()
        await b.stop()
