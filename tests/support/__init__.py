"""Helpers for functional tests that treat the public listener as a black box:
a raw-socket HTTP/1.1 client (exact bytes out, parsed responses in), raw TCP
upstreams that refuse, hang, reset or answer with exact bytes, a /metrics
scraper, and the route cases every §3 test runs for both protocols."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httptools
from google.rpc import status_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import OTHER_TOKEN, TOKEN, TWO_CREDENTIALS, sha256

# A third credential, scoped to the OTLP route only, so that both routes have
# a credential that is valid but out of scope (the 403 row).
TRACES_TOKEN = "test-token-0123456789abcdef-traces"
THREE_CREDENTIALS = f"""{TWO_CREDENTIALS}
[[credentials]]
name = "traces"
token_sha256 = "{sha256(TRACES_TOKEN.encode())}"
routes = ["otlp_traces"]
"""
ALL_TOKENS = (TOKEN, OTHER_TOKEN, TRACES_TOKEN)


@dataclass(frozen=True)
class RouteCase:
    """One route of the test config, with what §3 expects of it."""

    name: str
    path: str
    otlp: bool
    # A valid credential that is not scoped to this route.
    out_of_scope_token: str

    def status(self, remote_write: int, otlp: int) -> int:
        return otlp if self.otlp else remote_write


RW = RouteCase("remote_write", "/api/v1/write", otlp=False, out_of_scope_token=TRACES_TOKEN)
OTLP = RouteCase("otlp_traces", "/v1/traces", otlp=True, out_of_scope_token=OTHER_TOKEN)
ROUTES = [RW, OTLP]
ROUTE_IDS = ["remote_write", "otlp"]


# ---------------------------------------------------------------------------
# Raw HTTP/1.1 client.


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes = b""

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def has(self, name: str) -> bool:
        return bool(self.get_all(name))


class _Collector:
    """httptools callbacks → RawResponse objects (several per connection)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[RawResponse] = []
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, data: bytes) -> None:
        self._body += data

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:
            self.done.append(RawResponse(status, self._headers, bytes(self._body)))


def request_bytes(
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    token: str | None = TOKEN,
    content_length: int | None = None,
) -> bytes:
    """One HTTP/1.1 request as raw bytes; Content-Length from the body unless given."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{n}: {v}" for n, v in headers or []]
    names = {n.lower() for n, _ in headers or []}
    if "transfer-encoding" not in names:
        length = len(body) if content_length is None else content_length
        if length or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {length}")
    # UTF-8, as a careless client would send non-ASCII header values.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def chunked(*parts: bytes, end: bool = True) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return out + (b"0\r\n\r\n" if end else b"")


def rst_on_close(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER 0: closing the socket sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class RawClient:
    """A client connection where every byte on the wire is the test's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._collector = _Collector()
        self.eof = False
        self.raw = bytearray()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read_more(self) -> None:
        try:
            data = await self.reader.read(256 * 1024)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return
        self.raw += data
        self._collector.parser.feed_data(data)

    async def received(self, needle: bytes, timeout: float = 5.0) -> None:
        """Wait until ``needle`` has arrived (the response may be incomplete)."""
        async with asyncio.timeout(timeout):
            while needle not in self.raw:
                if self.eof:
                    raise AssertionError(f"closed before {needle!r}: {bytes(self.raw)!r}")
                await self._read_more()

    async def response(self, timeout: float = 5.0) -> RawResponse:
        """The next complete response (interim 1xx answers are skipped)."""
        async with asyncio.timeout(timeout):
            while not self._collector.done:
                if self.eof:
                    raise AssertionError(
                        f"connection closed before a response: {bytes(self.raw)!r}"
                    )
                await self._read_more()
        resp = self._collector.done.pop(0)
        resp.raw = bytes(self.raw)
        return resp

    async def head_response(self, timeout: float = 5.0) -> RawResponse:
        """The response to a HEAD request (a head without a body).  Only for
        the first response of a connection: the parser is bypassed."""
        async with asyncio.timeout(timeout):
            while b"\r\n\r\n" not in self.raw:
                if self.eof:
                    raise AssertionError(
                        f"connection closed before a response: {bytes(self.raw)!r}"
                    )
                await self._read_more_raw()
        head = bytes(self.raw).partition(b"\r\n\r\n")[0].decode("latin-1")
        status_line, *lines = head.split("\r\n")
        headers = [(n.strip(), v.strip()) for n, _, v in (ln.partition(":") for ln in lines)]
        return RawResponse(int(status_line.split(" ")[1]), headers, b"", bytes(self.raw))

    async def _read_more_raw(self) -> None:
        try:
            data = await self.reader.read(256 * 1024)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
        self.raw += data

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the gateway has closed the connection (EOF or reset)."""
        async with asyncio.timeout(timeout):
            while not self.eof:
                await self._read_more()
        return True

    def abort(self) -> None:
        """Reset the connection (RST), as a crashed sender would.  (A plain
        close or transport.abort() sends FIN when no unread data is queued.)"""
        rst_on_close(self.writer)
        self.writer.transport.abort()

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


@asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    try:
        yield client
    finally:
        await client.close()


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    async with raw_client(port) as client:
        await client.send(data)
        return await client.response(timeout)


# ---------------------------------------------------------------------------
# Raw upstreams: exact control over what an upstream does at the TCP level.

UpstreamBehaviour = Callable[
    ["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request with a Content-Length body (or none)."""
    head = await read_head(reader)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head, body


def answer_with(response: bytes) -> UpstreamBehaviour:
    """Read each request, answer with exactly these bytes (keep-alive)."""

    async def behave(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head, body = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if not head:
                return
            up.requests.append(head + body)
            writer.write(response)
            await writer.drain()

    return behave


async def hang(up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read everything, never answer."""
    while True:
        try:
            data = await reader.read(65536)
        except ConnectionError:
            return
        if not data:
            return
        up.received += data


async def reset_after_head(
    up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Read the request head, then reset the connection before any answer."""
    head = await read_head(reader)
    up.requests.append(head)
    rst_on_close(writer)
    writer.transport.abort()


async def close_after_head(
    up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Read the request head, then close cleanly (FIN) without answering."""
    head = await read_head(reader)
    up.requests.append(head)
    writer.close()


@dataclass
class RawUpstream:
    behaviour: UpstreamBehaviour
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self.behaviour(self, reader, writer)
            finally:
                self._tasks.discard(task)

        self._server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._server is not None:
            await self._server.wait_closed()


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused (RST)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextmanager
def unreachable_port() -> Iterator[int]:
    """A listener whose accept queue is full: further SYNs are dropped, so a
    connect hangs like one to a blackholed host."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


# ---------------------------------------------------------------------------
# Bodies and metrics.


def assert_error_body(resp: RawResponse, case: RouteCase | None, *, as_json: bool = False) -> None:
    """A gateway-made error body: text for remote-write and unmatched paths,
    google.rpc.Status (protobuf, or JSON if the request was JSON) for OTLP."""
    ctype = resp.get("Content-Type") or ""
    if case is not None and case.otlp:
        if as_json:
            assert ctype == "application/json", ctype
            decoded = json.loads(resp.body)
            assert isinstance(decoded["code"], int)
            assert decoded["code"] != 0
            assert decoded["message"]
        else:
            assert ctype == "application/x-protobuf", ctype
            status = status_pb2.Status()
            status.ParseFromString(resp.body)
            assert status.code != 0
            assert status.message
    else:
        assert ctype.startswith("text/plain"), ctype
        assert resp.body.endswith(b"\n")
    for leak in (b"127.0.0.1", b"http://", b"Traceback", *(t.encode() for t in ALL_TOKENS)):
        assert leak not in resp.raw, leak


@dataclass
class Metrics:
    samples: list[tuple[str, dict[str, str], float]]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        )


async def scrape(admin_port: int) -> Metrics:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    samples = [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]
    return Metrics(samples, text)


# ---------------------------------------------------------------------------
# The real CLI as a subprocess.


@dataclass
class GatewayProcess:
    """``python -m gateway run --config FILE``; ports come from its first
    JSON log line (``event=listening``).  Always ``await stop()`` it."""

    config: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw_stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    port: int = 0
    admin_port: int = 0
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, timeout: float = 15.0) -> None:
        env = {**os.environ, **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            str(self.config),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # Its own process group, so the finaliser can kill workers too.
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_stdout(self.proc.stdout)),
            asyncio.create_task(self._read_stderr(self.proc.stderr)),
        ]
        listening = await self.wait_event("listening", timeout)
        self.port = int(listening["listen"].rpartition(":")[2])
        self.admin_port = int(listening["admin"].rpartition(":")[2])

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.raw_stdout += line
            with suppress(ValueError):
                self.lines.append(json.loads(line))

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            self.stderr += data

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e.get("event") == name]

    async def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.events(name):
            assert self.proc is not None
            if self.proc.returncode is not None or loop.time() > deadline:
                raise AssertionError(
                    f"no {name!r} event; rc={self.proc.returncode} stderr={bytes(self.stderr)!r}"
                )
            await asyncio.sleep(0.02)
        return self.events(name)[0]

    def status(self) -> dict[str, int]:
        """VmRSS / VmHWM of the process, in KiB (Linux /proc)."""
        assert self.proc is not None
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    async def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait(self._readers, timeout=2.0)
        return rc

    async def stop(self) -> None:
        """Finaliser: kill whatever is left of the process group we started
        (a supervisor's workers hold our stdout pipe too), collect the exit
        status, and read the pipes to EOF so their transports close."""
        if self.proc is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        if self._readers:
            _, pending = await asyncio.wait(self._readers, timeout=5.0)
            for task in pending:
                task.cancel()
