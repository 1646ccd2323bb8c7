"""Hostile HTTP/2 peers against the public port: floods, bombs, stalls.

Each attack is written as frames (hyperframe + hpack, not through an h2
client that would refuse to misbehave) on a raw socket, and each test
measures what the gateway process had to hold (tracemalloc's peak over the
attack; the attacker's own buffers are small and streamed) and how long
the connection lived, not only what came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from gateway.datapath.h2server import CONTROL_PER_SECOND, RESETS_PER_SECOND
from tests.conftest import TOKEN, StartGateway
from tests.support.grpc_peers import TRACE_METHOD, TraceReceiver, grpc_config, spans_request
from tests.support.metrics import scrape

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FAST = """
header_timeout_seconds = 1.0
body_idle_timeout_seconds = 1.0
"""
# What one attacked connection may make the gateway hold, at most.
MEMORY_BOUND = 12 * 1024 * 1024
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture
def receiver() -> Iterator[TraceReceiver]:
    rec = TraceReceiver().start()
    yield rec
    rec.stop()


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a list that holds the traced peak (bytes over the start) on exit."""
    out: list[int] = []
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    try:
        yield out
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.append(peak - base)


class Attacker:
    """A raw HTTP/2 client: frames out, frames in (parsed just enough)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 20
        self.buf = b""
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, port: int, settings: dict[int, int] | None = None) -> Attacker:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer)
        frame = SettingsFrame(0, settings=settings or {})
        writer.write(PREFACE + frame.serialize())
        await writer.drain()
        return self

    def request_headers(self, *, token: str = TOKEN) -> bytes:
        return self.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", TRACE_METHOD),
                (":authority", "gw"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("authorization", f"Bearer {token}"),
            ]
        )

    def headers(self, sid: int, *, end: bool = False, block: bytes | None = None) -> bytes:
        frame = HeadersFrame(sid, data=block if block is not None else self.request_headers())
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    async def send(self, data: bytes) -> bool:
        """False once the gateway has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def read_until_closed(self, timeout: float) -> float:
        """Read (and parse) until EOF; seconds it took."""
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    self._parse(chunk)
        return time.monotonic() - t0

    async def read_for(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(seconds):
                while chunk := await self.reader.read(65536):
                    self._parse(chunk)

    def _parse(self, chunk: bytes) -> None:
        self.buf += chunk
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            frame.parse_body(memoryview(self.buf[9 : 9 + length]))
            self.buf = self.buf[9 + length :]
            self.frames.append(frame)

    def goaway(self) -> int | None:
        for f in self.frames:
            if isinstance(f, GoAwayFrame):
                return int(f.error_code)
        return None

    def grpc_status(self, sid: int) -> str | None:
        for f in self.frames:
            if isinstance(f, HeadersFrame) and f.stream_id == sid:
                fields = {bytes(k): bytes(v) for k, v in self.decoder.decode(f.data, raw=True)}
                if b"grpc-status" in fields:
                    return fields[b"grpc-status"].decode()
        return None

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def gateway(start_gateway: StartGateway, receiver: TraceReceiver) -> Any:
    return await start_gateway(grpc_config(receiver.port, server=FAST))


async def _flood(port: int, frames: Iterator[bytes], limit: int) -> tuple[Attacker, int]:
    """Send up to ``limit`` batches; stop when the gateway closes."""
    peer = await Attacker.open(port)
    sent = 0
    reading = asyncio.create_task(peer.read_until_closed(15.0))
    for batch in frames:
        if sent >= limit or not await peer.send(batch) or reading.done():
            break
        sent += 1
    await reading
    return peer, sent


async def test_rapid_reset_is_cut_off(gateway: Any, receiver: TraceReceiver) -> None:
    def batches() -> Iterator[bytes]:
        sid = 1
        while True:
            out = []
            for _ in range(50):
                out.append(peer_headers(sid))
                out.append(RstStreamFrame(sid, error_code=8).serialize())
                sid += 2
            yield b"".join(out)

    encoder = hpack.Encoder()

    def peer_headers(sid: int) -> bytes:
        frame = HeadersFrame(sid, data=encoder.encode(_fields()))
        frame.flags.add("END_HEADERS")
        return frame.serialize()

    # Encoded before the clock starts: the bound is on the gateway, not on
    # this test's own HPACK encoding of 20 000 header blocks.
    flood = list(itertools.islice(batches(), 400))  # ≤ 20 000 streams
    with peak_memory() as peak:
        t0 = time.monotonic()
        peer, sent = await _flood(gateway.port, iter(flood), limit=400)
        elapsed = time.monotonic() - t0
    peer.close()
    assert peer.goaway() == ENHANCE_YOUR_CALM
    assert elapsed < 10
    assert peak[0] < MEMORY_BOUND
    metrics = await scrape(gateway.admin_port)
    assert metrics.sum("gateway_limit_rejections_total", reason="h2_flood") == 1
    # The streams it opened before the cut were decided and cancelled: a
    # second's budget of them, not the 20 000 it sent.
    cancelled = metrics.sum("gateway_requests_total", route="grpc_traces", code="499")
    assert 0 < cancelled <= 2 * RESETS_PER_SECOND
    assert sent * 50 > 10 * cancelled


def _fields() -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", TRACE_METHOD),
        (":authority", "gw"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", f"Bearer {TOKEN}"),
    ]


@pytest.mark.parametrize("kind", ["ping", "settings", "window_update", "empty_data"])
async def test_control_frame_floods_without_reading(gateway: Any, kind: str) -> None:
    def one() -> bytes:
        if kind == "ping":
            return PingFrame(0, opaque_data=b"12345678").serialize()
        if kind == "settings":
            return SettingsFrame(0, settings={0x4: 65535}).serialize()
        if kind == "window_update":
            return WindowUpdateFrame(0, window_increment=1).serialize()
        return DataFrame(1, data=b"").serialize()

    prelude = b""
    if kind == "empty_data":
        frame = HeadersFrame(1, data=hpack.Encoder().encode(_fields()))
        frame.flags.add("END_HEADERS")
        prelude = frame.serialize()
    batch = one() * 500

    def batches() -> Iterator[bytes]:
        yield prelude + batch
        while True:
            yield batch

    with peak_memory() as peak:
        peer = await Attacker.open(gateway.port)
        # Do not read: the ACKs must not pile up in the gateway either.
        sent = 0
        for data in batches():
            if sent >= 400 or not await peer.send(data):
                break
            sent += 1
        elapsed = await peer.read_until_closed(10.0)
    peer.close()
    assert elapsed < 10
    assert peer.goaway() == ENHANCE_YOUR_CALM
    assert peak[0] < MEMORY_BOUND
    # What it answered before the cut (PING and SETTINGS are ACKed): about
    # a second's budget, not the 200 000 frames it was sent.
    acks = [f for f in peer.frames if isinstance(f, PingFrame | SettingsFrame)]
    assert len(acks) <= 2 * CONTROL_PER_SECOND + 2
    assert sent * 500 > 20 * CONTROL_PER_SECOND


async def test_continuation_flood_is_bounded(gateway: Any) -> None:
    peer = await Attacker.open(gateway.port)
    first = HeadersFrame(1, data=peer.request_headers()[:10])  # no END_HEADERS
    filler = ContinuationFrame(1, data=b"\x00" * 16000).serialize()
    with peak_memory() as peak:
        reading = asyncio.create_task(peer.read_until_closed(10.0))
        ok = await peer.send(first.serialize())
        sent = 0
        while ok and sent < 2000 and not reading.done():  # 32 MB if nothing stopped it
            ok = await peer.send(filler)
            sent += 1
        elapsed = await reading
    peer.close()
    assert elapsed < 10
    assert peer.goaway() is not None
    assert peak[0] < MEMORY_BOUND


async def test_hpack_bomb_stops_while_decoding(gateway: Any, receiver: TraceReceiver) -> None:
    peer = await Attacker.open(gateway.port)
    # One 4 KiB value enters the dynamic table; then 4000 one-byte
    # references to it would decode to 16 MB of header list.
    encoder = hpack.Encoder()
    block = encoder.encode([*_fields(), ("x-bomb", "b" * 4000)])
    index = 62  # the newest dynamic-table entry
    block += bytes([0x80 | index]) * 4000
    with peak_memory() as peak:
        await peer.send(peer.headers(1, block=block, end=True))
        elapsed = await peer.read_until_closed(10.0)
    peer.close()
    assert elapsed < 10
    assert peer.goaway() is not None
    assert receiver.calls == 0
    assert peak[0] < MEMORY_BOUND


async def test_concurrent_streams_are_capped(gateway: Any, receiver: TraceReceiver) -> None:
    peer = await Attacker.open(gateway.port)
    encoder = hpack.Encoder()
    frames = []
    for i in range(150):  # the gateway allows 100 at once
        frame = HeadersFrame(1 + 2 * i, data=encoder.encode(_fields()))
        frame.flags.add("END_HEADERS")
        frames.append(frame.serialize())
    with peak_memory() as peak:
        await peer.send(b"".join(frames))
        elapsed = await peer.read_until_closed(10.0)
    peer.close()
    assert elapsed < 10
    assert peer.goaway() is not None
    assert peak[0] < MEMORY_BOUND
    assert receiver.calls == 0  # none of them completed a request


async def test_a_stream_that_never_finishes_is_answered_and_closed(
    gateway: Any, receiver: TraceReceiver
) -> None:
    peer = await Attacker.open(gateway.port)
    t0 = time.monotonic()
    await peer.send(peer.headers(1))  # the body never comes
    await peer.read_for(3.0)
    assert peer.grpc_status(1) == "14"  # UNAVAILABLE: retry
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == 1 for f in peer.frames)
    assert time.monotonic() - t0 < 3.5
    shared = gateway.shared
    assert all(not getattr(c, "streams", None) for c in shared.connections)
    peer.close()


async def test_a_client_that_never_opens_its_window_loses_the_stream(
    gateway: Any, receiver: TraceReceiver
) -> None:
    # SETTINGS_INITIAL_WINDOW_SIZE = 0: no response DATA may be sent.
    peer = await Attacker.open(gateway.port, settings={0x4: 0})
    body = spans_request(3).SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    await peer.send(peer.headers(1) + DataFrame(1, data=message, flags=["END_STREAM"]).serialize())
    await peer.read_for(3.5)
    assert receiver.calls == 1
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == 1 for f in peer.frames)
    assert all(not getattr(c, "streams", None) for c in gateway.shared.connections)
    peer.close()


async def test_a_preface_then_silence_is_closed(gateway: Any) -> None:
    peer = await Attacker.open(gateway.port)
    elapsed = await peer.read_until_closed(5.0)
    peer.close()
    assert elapsed < 3.0
    assert peer.goaway() is not None
