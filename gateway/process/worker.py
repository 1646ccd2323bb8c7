"""One worker process of a multi-worker gateway.

Started by the supervisor as ``python -m gateway _worker --fd N --index I``
with one end of a Unix socket pair.  It receives its config text over that
channel (so every worker serves exactly what the supervisor validated),
binds the public port with SO_REUSEPORT, answers stats and reload requests
(a pushed config is prepared, then served or dropped as the supervisor's
``Commit`` says: see ``control``), and drains on SIGTERM/SIGINT or when the
supervisor goes away.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from pathlib import Path

import structlog

from gateway.config.loader import ConfigError, Settings, loads
from gateway.policy.generation import Generation
from gateway.process.control import (
    ChannelClosed,
    Commit,
    Committed,
    Configure,
    Failed,
    Ready,
    Reloaded,
    StatsReply,
    StatsRequest,
    read_message,
    write_message,
)
from gateway.process.gateway import Gateway
from gateway.process.gauges import process_sample
from gateway.process.sockets import listen_socket, split_hostport
from gateway.telemetry import log

__all__ = ["serve_worker"]


def _settings(message: Configure) -> Settings:
    return loads(message.text, base=Path(message.source).parent, source=message.source)


async def serve_worker(fd: int, index: int) -> int:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    first = await read_message(reader)
    if not isinstance(first, Configure):
        return 2  # not our supervisor
    try:
        settings = _settings(first)
    except ConfigError as exc:
        write_message(writer, Failed(str(exc)))
        await writer.drain()
        return 2
    log.configure(settings.log.level, pipe_safe=True)
    structlog.contextvars.bind_contextvars(worker=index)
    host, _ = split_hostport(settings.server.listen)
    sock = listen_socket(f"[{host}]:{first.port}", reuse_port=True)
    gateway = Gateway(settings, admin=False, sock=sock)
    await gateway.start()
    # Everything allocated so far lives for the whole process: keep the
    # cyclic collector from rescanning it on every collection.
    gc.collect()
    gc.freeze()
    write_message(writer, Ready(os.getpid()))
    await writer.drain()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Reloads arrive over the channel; a stray SIGHUP must not kill us.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    control = loop.create_task(_control(reader, writer, gateway, stop, index))
    await stop.wait()
    control.cancel()
    await gateway.drain()
    writer.close()
    return 0


class _Prepared:
    """The pushed config, built and waiting for its Commit (at most one)."""

    __slots__ = ("gen", "generation", "settings")

    def __init__(self, generation: int, settings: Settings, gen: Generation) -> None:
        self.generation = generation
        self.settings = settings
        self.gen = gen


def _matches(prepared: _Prepared | None, commit: Commit) -> bool:
    return prepared is not None and prepared.generation == commit.generation


def _prepare(message: Configure, gateway: Gateway) -> tuple[Reloaded, _Prepared | None]:
    try:
        settings = _settings(message)
        prepared = _Prepared(message.generation, settings, gateway.prepare(settings))
    except ConfigError as exc:
        return Reloaded(ok=False, error=str(exc), generation=message.generation), None
    except Exception as exc:  # noqa: BLE001  (the channel must outlive a bad config)
        error = f"config not servable: {type(exc).__name__}"
        return Reloaded(ok=False, error=error, generation=message.generation), None
    return Reloaded(ok=True, generation=message.generation), prepared


async def _control(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    gateway: Gateway,
    stop: asyncio.Event,
    index: int,
) -> None:
    prepared: _Prepared | None = None
    try:
        while True:
            message = await read_message(reader)
            if isinstance(message, StatsRequest):
                reply = StatsReply(message.id, gateway.snapshot(), process_sample(index))
                write_message(writer, reply)
            elif isinstance(message, Configure):
                answer, prepared = _prepare(message, gateway)
                write_message(writer, answer)
            # A Commit for another generation (a push this worker never
            # prepared: it started since) changes nothing.
            elif isinstance(message, Commit) and _matches(prepared, message):
                assert prepared is not None
                if message.apply:
                    gateway.commit(prepared.settings, prepared.gen)
                    write_message(writer, Committed(message.generation))
                prepared = None
            await writer.drain()
    except (ChannelClosed, ConnectionError):
        stop.set()  # the supervisor is gone: finish what is in flight and exit
