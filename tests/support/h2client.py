"""An HTTP/2 client for tests (h2, python-hyper, on an asyncio socket):
h2c with prior knowledge or TLS with ALPN ``h2``, many streams on one
connection, and the misbehaviour a test needs: bodies sent in pieces at the
test's pace, streams reset mid-body, a receive window that is never
reopened (``auto_ack=False``).

Each stream's answer is collected as it arrives: status, fields, body,
trailers, whether it ended, and any RST_STREAM code.

Knows nothing of the gateway's config, routes or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings

__all__ = ["H2Client", "H2Response"]

_READ = 65536


@dataclass
class H2Response:
    """One stream as the client saw it."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    informational: list[int] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # RST_STREAM error code
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class H2Client:
    """One HTTP/2 connection to 127.0.0.1:``port``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        auto_ack: bool,
        window: int | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.auto_ack = auto_ack
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        settings = {h2.settings.SettingCodes.ENABLE_PUSH: 0}
        if window is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = window
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.h2.initiate_connection()
        self.responses: dict[int, H2Response] = {}
        self.goaway: int | None = None
        self.closed = asyncio.Event()
        # Woken on every WINDOW_UPDATE / SETTINGS: a fresh future per wait,
        # so no sender misses an update that came before it waited.
        self._window_waiters: list[asyncio.Future[None]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        auto_ack: bool = True,
        window: int | None = None,
    ) -> H2Client:
        kwargs: dict[str, object] = {}
        if ssl_context is not None:
            kwargs = {"ssl": ssl_context, "server_hostname": "localhost"}
        reader, writer = await asyncio.open_connection("127.0.0.1", port, **kwargs)  # type: ignore[arg-type]
        if ssl_context is not None:
            sslobj = writer.get_extra_info("ssl_object")
            assert sslobj.selected_alpn_protocol() == "h2"
        self = cls(reader, writer, auto_ack=auto_ack, window=window)
        await self._flush()
        return self

    @staticmethod
    def tls_context(cafile: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.set_alpn_protocols(["h2"])
        return ctx

    # -- requests -----------------------------------------------------------
    async def start(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        *,
        end: bool = False,
        scheme: str = "http",
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.responses[sid] = H2Response()
        fields = [(":method", method), (":scheme", scheme), (":path", path)]
        fields += [(":authority", "gateway"), *headers]
        self.h2.send_headers(sid, fields, end_stream=end)
        await self._flush()
        return sid

    async def send(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """Send ``data`` as the windows allow (waiting for them), then END_STREAM."""
        view = memoryview(data)
        while view:
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if room <= 0:
                waiter = asyncio.get_running_loop().create_future()
                self._window_waiters.append(waiter)
                await asyncio.wait_for(waiter, 10)
                continue
            self.h2.send_data(sid, view[:room].tobytes())
            view = view[room:]
            await self._flush()
        if end:
            self.h2.end_stream(sid)
            await self._flush()

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        *,
        timeout: float = 10.0,
    ) -> H2Response:
        sid = await self.start(method, path, headers, end=not body)
        if body:
            await self.send(sid, body, end=True)
        return await self.wait(sid, timeout)

    async def wait(self, sid: int, timeout: float = 10.0) -> H2Response:
        resp = self.responses[sid]
        await asyncio.wait_for(resp.done.wait(), timeout)
        return resp

    async def reset(self, sid: int, code: int = 8) -> None:
        self.h2.reset_stream(sid, code)
        await self._flush()

    async def open_window(self, sid: int, n: int) -> None:
        """Hand back ``n`` bytes of a stream's (and the connection's) window."""
        self.h2.acknowledge_received_data(n, sid)
        await self._flush()

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    # -- internals ------------------------------------------------------------
    async def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def _read(self) -> None:
        try:
            while chunk := await self.reader.read(_READ):
                for ev in self.h2.receive_data(chunk):
                    self._event(ev)
                await self._flush()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for resp in self.responses.values():
                resp.done.set()
            for waiter in self._window_waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection closed"))

    def _event(self, ev: h2.events.Event) -> None:
        resp = self.responses.get(getattr(ev, "stream_id", 0) or 0)
        if isinstance(ev, h2.events.InformationalResponseReceived) and resp is not None:
            fields = {str(k): str(v) for k, v in ev.headers}
            resp.informational.append(int(fields[":status"]))
        elif isinstance(ev, h2.events.ResponseReceived) and resp is not None:
            resp.headers = [(str(k), str(v)) for k, v in ev.headers]
            resp.status = int(dict(resp.headers)[":status"])
        elif isinstance(ev, h2.events.DataReceived) and resp is not None:
            resp.body += ev.data
            if self.auto_ack:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived) and resp is not None:
            resp.trailers = [(str(k), str(v)) for k, v in ev.headers]
        elif isinstance(ev, h2.events.StreamEnded) and resp is not None:
            resp.ended = True
            resp.done.set()
        elif isinstance(ev, h2.events.StreamReset) and resp is not None:
            resp.reset = int(ev.error_code or 0)
            resp.done.set()
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            waiters, self._window_waiters = self._window_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = int(ev.error_code or 0)
            for r in self.responses.values():
                r.done.set()
