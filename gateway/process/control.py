"""The supervisor ↔ worker control channel: length-prefixed orjson messages
over a Unix socket pair.  Off the data path: config pushes, stats requests,
readiness and reload results only.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson

__all__ = ["ChannelClosed", "read_message", "write_message"]

_LEN = struct.Struct("!I")
# A stats snapshot of a large config stays far below this.
_MAX_MESSAGE = 64 * 1024 * 1024


class ChannelClosed(Exception):
    """The other side went away."""


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        head = await reader.readexactly(_LEN.size)
        (size,) = _LEN.unpack(head)
        if size > _MAX_MESSAGE:
            raise ChannelClosed(f"control message of {size} bytes")
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed(str(exc)) from None
    message = orjson.loads(body)
    if not isinstance(message, dict):
        raise ChannelClosed("control message is not an object")
    return message


def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    body = orjson.dumps(message)
    writer.write(_LEN.pack(len(body)) + body)
