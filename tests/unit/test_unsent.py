"""``unsent`` over a real loopback connection on uvloop: what the peer has not
read counts whether it sits in the transport's buffer or the kernel's send
queue, and reading it all brings the figure to zero."""

from __future__ import annotations

import asyncio
import socket

from gateway.datapath.unsent import unsent


async def test_unsent_counts_what_the_peer_has_not_read() -> None:
    loop = asyncio.get_running_loop()
    served: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Sender(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            served.set_result(transport)  # type: ignore[arg-type]  # uvloop's transport

    server = await loop.create_server(Sender, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(("127.0.0.1", port))
    peer.setblocking(False)
    try:
        transport = await asyncio.wait_for(served, 5.0)
        assert unsent(transport) == 0
        size = 4 << 20
        transport.write(b"u" * size)
        await asyncio.sleep(0.1)
        queued = unsent(transport)
        # Most of it waits in the kernel: the transport's buffer alone says less.
        assert queued > transport.get_write_buffer_size()
        assert 0 < queued <= size
        got = 0
        while got < size:
            chunk = await asyncio.wait_for(loop.sock_recv(peer, 1 << 16), 5.0)
            assert chunk, "closed early"
            got += len(chunk)
            left = unsent(transport)
            assert left <= size - got  # never more than the peer has yet to read
        await asyncio.sleep(0.05)  # the last ACK
        assert unsent(transport) == 0
    finally:
        peer.close()
        server.close()
