"""The supervisor ↔ worker control channel: typed messages (msgspec
Structs, a tagged union) framed by a length prefix over a Unix socket pair,
msgpack on the wire.  Off the data path: config pushes, stats requests,
readiness and reload results only.

    supervisor → worker:  Configure (first message, and every reload), Commit, StatsRequest
    worker → supervisor:  Ready, Failed (first config refused), Reloaded, Committed, StatsReply

A reload is two-phase, so that every worker serves one config: each worker
builds the pushed config and answers ``Reloaded`` (ok or why not) without
serving it; only when every worker said ok does the supervisor send
``Commit(apply=True)``, else ``Commit(apply=False)`` and the prepared
config is dropped.  Answers carry the push's ``generation``: a late answer
to an earlier push is recognised and ignored.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from gateway.telemetry.snapshot import ProcessSample, Snapshot

__all__ = [
    "ChannelClosed",
    "Commit",
    "Committed",
    "Configure",
    "Failed",
    "Message",
    "Ready",
    "Reloaded",
    "StatsReply",
    "StatsRequest",
    "read_message",
    "write_message",
]


class _Message(msgspec.Struct, tag_field="op", frozen=True):
    pass


class Configure(_Message, tag="config", frozen=True):
    """This config text (exactly what the supervisor validated): served at
    once as the first message; later, prepared for a ``Commit``."""

    text: str
    source: str  # the config file's path: relative file keys resolve beside it
    port: int  # the public port the supervisor reserved
    generation: int = 0  # echoed by Reloaded, so a late answer is never taken for a new one


class StatsRequest(_Message, tag="stats?", frozen=True):
    id: int


class Ready(_Message, tag="ready", frozen=True):
    pid: int


class Failed(_Message, tag="failed", frozen=True):
    """The first config could not be served; the worker exits."""

    error: str


class Reloaded(_Message, tag="reloaded", frozen=True):
    ok: bool
    error: str = ""
    generation: int = 0


class Commit(_Message, tag="commit", frozen=True):
    """Serve (``apply``) or drop the config prepared under ``generation``."""

    generation: int
    apply: bool


class Committed(_Message, tag="committed", frozen=True):
    """The config of ``generation`` is now served."""

    generation: int


class StatsReply(_Message, tag="stats", frozen=True):
    id: int
    snapshot: Snapshot
    process: ProcessSample


Message = Configure | Commit | StatsRequest | Ready | Failed | Reloaded | Committed | StatsReply

_LEN = struct.Struct("!I")
# A stats snapshot of a large config stays far below this.
_MAX_MESSAGE = 64 * 1024 * 1024
_encode = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(Message)


class ChannelClosed(Exception):
    """The other side went away, or sent something that is not a message."""


async def read_message(reader: asyncio.StreamReader) -> Message:
    try:
        head = await reader.readexactly(_LEN.size)
        (size,) = _LEN.unpack(head)
        if size > _MAX_MESSAGE:
            raise ChannelClosed(f"control message of {size} bytes")
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed(str(exc)) from None
    try:
        message: Message = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ChannelClosed(f"not a control message: {exc}") from None
    return message


def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    body = _encode(message)
    writer.write(_LEN.pack(len(body)) + body)
