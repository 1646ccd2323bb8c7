"""How many bytes of a connection's output its peer has not yet taken.

The write deadline is an idle timeout: a client that keeps reading at the
minimum rate keeps its connection.  The transport's own buffer is not enough
to see that: with megabytes queued in the kernel's send buffer it shrinks only
after the kernel has drained a good part of them, which can take longer than
the timeout while the client reads steadily.  So the kernel's share is
counted too (``SIOCOUTQ``: bytes sent but not yet acknowledged, Linux),
where the platform can say.

Must not know: HTTP, exchanges, deadlines.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios

__all__ = ["unsent"]

# SIOCOUTQ has the value of TIOCOUTQ on Linux; elsewhere only the transport's
# share is known, and a slow reader then needs it to move within the timeout.
_OUTQ = getattr(termios, "TIOCOUTQ", None)
_INT = struct.Struct("i")


def unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes written to ``transport`` that its peer has not read yet, as far
    as this platform can tell (called when a write deadline expires, not per
    write: it costs a system call).  No isinstance check: uvloop's transports
    have the methods but not asyncio's classes as bases."""
    total = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _OUTQ is None or sock is None:
        return total
    try:
        raw = fcntl.ioctl(sock.fileno(), _OUTQ, _INT.pack(0))
    except (OSError, ValueError):  # closed meanwhile, or not a TCP socket
        return total
    return total + int(_INT.unpack(raw)[0])
