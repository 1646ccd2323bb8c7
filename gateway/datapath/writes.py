"""Writing to a transport: the one place that turns a list of pieces into
as few syscalls as possible.  Both directions of the data path collect what
an event produces in a list and write it here, once per event.
"""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = ["write_coalesced"]

# Small pieces are joined into one buffer: one plain write() costs less in
# uvloop than writelines() (per-buffer bookkeeping, then writev).  Large
# bodies go as they are, without a copy.
_JOIN_BELOW: Final = 64 * 1024


def write_coalesced(transport: asyncio.WriteTransport, pieces: list[bytes]) -> None:
    if len(pieces) == 1:
        transport.write(pieces[0])
    elif sum(map(len, pieces)) < _JOIN_BELOW:
        transport.write(b"".join(pieces))
    else:
        transport.writelines(pieces)
