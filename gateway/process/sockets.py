"""Listening sockets for the public port: one process, or several workers
sharing the port with SO_REUSEPORT.
"""

from __future__ import annotations

import socket

__all__ = ["listen_socket", "split_hostport"]


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def listen_socket(listen: str, *, reuse_port: bool, listen_now: bool = True) -> socket.socket:
    """A TCP socket bound to ``HOST:PORT``; with ``reuse_port`` several
    processes bind the same port and the kernel spreads connections.

    The supervisor binds without listening to reserve (and, for port 0,
    choose) the port; each worker then binds it again and listens.
    """
    host, port = split_hostport(listen)
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if listen_now:
            sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
