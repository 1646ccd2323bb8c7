"""An open-loop, rate-limited HTTP/1.1 client: latency at a fixed request rate.

wrk is closed-loop (each connection waits for its answer before sending
again) and so hides queueing delay; wrk2, its constant-rate fork, is not in
Debian.  This client sends on a fixed schedule over a few keep-alive
connections regardless of answers (a request whose turn comes while every
connection is busy waits for the next free one and is charged from its
scheduled time), times each exchange with ``perf_counter`` and prints one
JSON line.  Its own costs (Python, uvloop's millisecond timers) are the same
against the direct path and against a proxy, so the *difference* of the
two p99s is the latency the proxy adds.

``python -m bench.paced --port P --path /api/v1/write --body FILE --token T``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from pathlib import Path

import httptools
import uvloop

__all__ = ["main", "percentile"]

_perf = time.perf_counter


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


class _Conn(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.scheduled = 0.0
        self.sent = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.lost(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.client.errors += 1
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        end = _perf()
        self.busy = False
        status = self.parser.get_status_code()
        # nginx closes a connection after keepalive_requests (1000): such a
        # connection is not reused; a fresh one replaces it when it closes.
        reuse = self.parser.should_keep_alive()
        self.client.done(self, self.scheduled, self.sent, end, status, reuse=reuse)

    def send(self, scheduled: float, request: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.scheduled = scheduled
        self.sent = _perf()
        self.transport.write(request)


class _Client:
    def __init__(self, port: int, request: bytes, measure_from: float) -> None:
        self.port = port
        self.request = request
        self.measure_from = measure_from
        self.idle: deque[_Conn] = deque()
        self.queue: deque[float] = deque()
        self.service: list[float] = []  # send → answer, seconds
        self.intended: list[float] = []  # schedule → answer (includes queueing)
        self.errors = 0
        self.completed = 0
        self.total = -1  # set once every request has been submitted
        self.all_done = asyncio.Event()
        self.conns: set[_Conn] = set()
        self.closing = False
        self._reconnects: set[asyncio.Task[None]] = set()

    def submit(self, scheduled: float) -> None:
        if self.idle:
            self.idle.popleft().send(scheduled, self.request)
        else:
            self.queue.append(scheduled)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _t, conn = await loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port)
        self.conns.add(conn)
        self._free(conn)

    def _free(self, conn: _Conn) -> None:
        if self.queue:
            conn.send(self.queue.popleft(), self.request)
        else:
            self.idle.append(conn)

    def done(
        self, conn: _Conn, scheduled: float, sent: float, end: float, status: int, *, reuse: bool
    ) -> None:
        self.completed += 1
        if self.completed == self.total:
            self.all_done.set()
        if not 200 <= status < 300:
            self.errors += 1
        if scheduled >= self.measure_from:
            self.service.append(end - sent)
            self.intended.append(end - scheduled)
        if reuse:
            self._free(conn)

    def lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:
            self.errors += 1  # its request will never be answered
            self.completed += 1
        if not self.closing:
            task = asyncio.get_running_loop().create_task(self.connect())
            self._reconnects.add(task)
            task.add_done_callback(self._reconnects.discard)


async def run(
    port: int, request: bytes, rate: float, duration: float, connections: int, warmup: float
) -> dict[str, float]:
    start = _perf() + 0.05
    client = _Client(port, request, measure_from=start + warmup)
    for _ in range(connections):
        await client.connect()
    total = int(rate * (warmup + duration))
    interval = 1.0 / rate
    i = 0
    while i < total:
        now = _perf()
        while i < total and start + i * interval <= now:
            client.submit(start + i * interval)
            i += 1
        # uvloop timers have millisecond resolution and round shorter sleeps
        # to zero (a busy loop): sleep at least 1 ms, then send what is due.
        await asyncio.sleep(max(0.001, start + i * interval - _perf()))
    # Let the last answers arrive (bounded).
    client.total = total
    if client.completed < total:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await client.all_done.wait()
    elapsed = _perf() - start
    client.closing = True
    for conn in list(client.conns):
        if conn.transport is not None:
            conn.transport.close()
    service = sorted(client.service)
    intended = sorted(client.intended)
    us = 1e6
    return {
        "rate": rate,
        "sent": total,
        "completed": client.completed,
        "errors": client.errors + (total - client.completed),
        "achieved_rate": client.completed / elapsed,
        "p50_us": percentile(service, 50) * us,
        "p90_us": percentile(service, 90) * us,
        "p99_us": percentile(service, 99) * us,
        "p999_us": percentile(service, 99.9) * us,
        "max_us": (service[-1] if service else float("nan")) * us,
        "intended_p50_us": percentile(intended, 50) * us,
        "intended_p99_us": percentile(intended, 99) * us,
    }


def build_request(path: str, body: bytes, token: str, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paced", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/api/v1/write")
    p.add_argument("--body", type=Path, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--headers", default="{}", help="JSON object of extra request headers")
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--connections", type=int, default=8)
    args = p.parse_args(argv)
    request = build_request(args.path, args.body.read_bytes(), args.token, json.loads(args.headers))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            run(args.port, request, args.rate, args.duration, args.connections, args.warmup)
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
