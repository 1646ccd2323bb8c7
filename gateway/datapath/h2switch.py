"""The protocol switch: hand a new client connection to HTTP/2.

Two ways in, both decided once per connection and never per request:
TLS ALPN selected ``h2`` (``alpn_h2``, asked when the handshake is done),
or a cleartext client opened with the HTTP/2 connection preface (h2c with
prior knowledge, RFC 9113 §3.3).  llhttp stops at the preface's
``PRI * HTTP/2.0`` line ("pause on PRI"), so HTTP/1.1 parsing costs
nothing extra: ``h2c_preface`` is only asked from the parser's error path,
and gives back the bytes h2 must be fed.

h2 is imported on the first switch: a worker that never sees HTTP/2 does
not load it (about 1 MiB resident).

Must not know: HTTP/1.1 parsing, exchanges.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.datapath.shared import Shared

__all__ = ["PREFACE", "alpn_h2", "h2c", "h2c_preface", "hand_over"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# What llhttp consumes before it pauses: the request line and the empty line.
_LINE = PREFACE[:18]
_TAIL = PREFACE[18:]


def alpn_h2(transport: asyncio.BaseTransport) -> bool:
    sslobj: Any = transport.get_extra_info("ssl_object")
    return sslobj is not None and sslobj.selected_alpn_protocol() == "h2"


def h2c_preface(data: bytes) -> bytes | None:
    """The bytes to feed h2, when llhttp paused on the preface within ``data``.

    ``data`` is the read in which llhttp stopped: it ends the 18-byte
    ``PRI * HTTP/2.0\\r\\n\\r\\n`` line (whose start may have come in earlier
    reads) and goes on with the rest of the preface and the first frames.
    None if it does not look like that (then it is just a bad request).
    """
    for k in range(min(len(_LINE), len(data)), 0, -1):
        if data[:k] == _LINE[-k:]:
            rest = data[k:]
            n = min(len(rest), len(_TAIL))
            if rest[:n] == _TAIL[:n]:
                return _LINE + rest
    return None


def hand_over(shared: Shared, old: Any, transport: asyncio.Transport, first: bytes) -> None:
    """Replace the HTTP/1.1 protocol ``old`` on ``transport`` by HTTP/2."""
    from gateway.datapath.h2server import H2ServerConnection  # noqa: PLC0415  (see above)

    conn = H2ServerConnection(shared, transport, old.peer, old.cert_subject)
    # ``old`` gets no callback after set_protocol and leaves the sweep.
    old.deadline_kind = 0
    shared.connections.discard(old)
    shared.connections.add(conn)
    conn.start(first)


def h2c(shared: Shared, old: Any, data: bytes) -> bool:
    """Switch ``old`` to HTTP/2 if llhttp stopped on the preface in ``data``.

    Only where an ``otlp-grpc`` route exists: otherwise the preface stays
    the malformed HTTP/1.1 request it always was (400)."""
    if not shared.gen.routes.grpc:
        return False
    first = h2c_preface(data)
    if first is None:
        return False
    hand_over(shared, old, old.transport, first)
    return True
