"""In-test HTTP peers on loopback threads: a static scrape target, an OTLP/HTTP
receiver and a recording tap in front of VictoriaMetrics.

They are real HTTP/1.1 servers (stdlib ``http.server``, keep-alive, chunked
request bodies decoded), so what they record is what crossed the wire from
the gateway.  ``stop()`` also cuts open keep-alive connections: a stopped
receiver must look down to the gateway's pooled connections too.  None of
them knows the gateway; they are the receivers the gateway proxies to.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["OtlpReceiver", "Received", "ReceivedSpan", "ScrapeTarget", "Server", "Tap"]

# Headers a tap forwards to VictoriaMetrics (the end-to-end ones that matter).
_FORWARD = ("content-type", "content-encoding", "x-prometheus-remote-write-version", "user-agent")


@dataclass(frozen=True)
class Received:
    """One complete request as the receiver read it off the socket."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int
    response_body: bytes
    # Every field as it came, in order, repeats and spelling kept.
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


Reply = tuple[int, dict[str, str], bytes]
# None: the receiver gives no answer and drops the connection (a hung receiver).
Handle = Callable[[str, str, dict[str, str], bytes], Reply | None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real receiver
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test records requests itself

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)  # CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _serve(self) -> None:
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = self.server.owner.handle(self.command, self.path, headers, body)
        if answer is None:
            self.close_connection = True
            return
        status, reply_headers, reply = answer
        fields = tuple(self.headers.items())
        received = Received(self.command, self.path, headers, body, status, reply, fields)
        self.server.owner.record(received)
        self.send_response(status)
        for name, value in reply_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _serve  # noqa: N815  (http.server dispatches on these names)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, owner: Server) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its handler thread
                conn.shutdown(socket.SHUT_RDWR)


class Server:
    """A threaded HTTP server on 127.0.0.1 that records every request."""

    def __init__(self) -> None:
        self.port = 0
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen on the previous port when restarting, else on a free one."""
        assert self._httpd is None, "already running"
        self._httpd = _HTTPServer(self.port, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.cut_connections()
        assert self._thread is not None
        self._thread.join(5.0)
        self._httpd = self._thread = None

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply | None:
        raise NotImplementedError

    def record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)


class ScrapeTarget(Server):
    """Serves a fixed Prometheus text exposition at /metrics."""

    def __init__(self, exposition: str) -> None:
        super().__init__()
        self.exposition = exposition.encode("utf-8")

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path.split("?", 1)[0] != "/metrics":
            return 404, {}, b""
        return 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}, self.exposition


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: int
    span_id: int
    name: str


class OtlpReceiver(Server):
    """An OTLP/HTTP traces receiver: decodes ``ExportTraceServiceRequest``
    (protobuf; gzip or deflate when the request says so) like the Collector's
    ``otlpreceiver``, and answers 200 with an ``ExportTraceServiceResponse``.

    ``hang(seconds)`` makes it a receiver that stops answering: every request
    that arrives in that window is read, then held without an answer until the
    window ends and its connection dropped; its spans are not kept (the work
    was lost), and ``hung`` counts those requests."""

    def __init__(self) -> None:
        super().__init__()
        self.hung = 0
        self._hang_until = 0.0
        self.spans: list[ReceivedSpan] = []
        self.errors: list[str] = []
        self.payload_sha256: list[str] = []  # of the decoded (decompressed) payloads

    def hang(self, seconds: float) -> None:
        with self._lock:
            self._hang_until = time.monotonic() + seconds

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply | None:
        with self._lock:
            held = self._hang_until - time.monotonic()
            if held > 0:
                self.hung += 1
        if held > 0:
            time.sleep(held)  # on this request's own handler thread
            return None
        if method != "POST" or path != "/v1/traces":
            return 404, {}, b""
        encoding = headers.get("content-encoding", "")
        try:
            if encoding == "gzip":
                payload = gzip.decompress(body)
            elif encoding == "deflate":
                payload = zlib.decompress(body)
            elif encoding in ("", "identity"):
                payload = body
            else:
                raise ValueError(f"unsupported Content-Encoding {encoding!r}")
            request = ExportTraceServiceRequest()
            request.ParseFromString(payload)
        except (OSError, ValueError, zlib.error) as exc:  # DecodeError is a ValueError
            with self._lock:
                self.errors.append(f"{encoding}: {exc}")
            return 400, {"Content-Type": "text/plain"}, b"cannot decode\n"
        spans = [
            ReceivedSpan(
                int.from_bytes(s.trace_id, "big"), int.from_bytes(s.span_id, "big"), s.name
            )
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]
        with self._lock:
            self.spans.extend(spans)
            self.payload_sha256.append(hashlib.sha256(payload).hexdigest())
        response = ExportTraceServiceResponse()
        # An explicit, empty partial_success: a non-empty 200 body, so the
        # gateway's response-byte counter has something to count.
        response.partial_success.rejected_spans = 0
        response.partial_success.SetInParent()
        return 200, {"Content-Type": "application/x-protobuf"}, response.SerializeToString()

    def received_spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)


class Tap(Server):
    """Records each request, then forwards it to a real receiver
    (VictoriaMetrics) and returns that receiver's answer unchanged."""

    def __init__(self, upstream: str) -> None:
        super().__init__()
        parts = urlsplit(upstream)
        assert parts.hostname == "127.0.0.1"
        self._host, self._port = parts.hostname, parts.port or 80

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30.0)
        try:
            forward = {k: v for k, v in headers.items() if k in _FORWARD}
            conn.request(method, path, body=body, headers=forward)
            resp = conn.getresponse()
            data = resp.read()
            ctype = resp.getheader("Content-Type")
            return resp.status, ({"Content-Type": ctype} if ctype else {}), data
        except OSError:
            return 502, {}, b""
        finally:
            conn.close()
