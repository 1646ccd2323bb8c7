"""Listening sockets for the public port: one process, or several workers
sharing the port with SO_REUSEPORT, and the claim that keeps a second
gateway off an address this one serves.
"""

from __future__ import annotations

import socket

__all__ = ["claim_port", "listen_socket", "split_hostport"]


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def listen_socket(listen: str, *, reuse_port: bool, listen_now: bool = True) -> socket.socket:
    """A TCP socket bound to ``HOST:PORT``; with ``reuse_port`` several
    processes bind the same port and the kernel spreads connections.

    The supervisor binds without listening to reserve (and, for port 0,
    choose) the port; each worker then binds it again and listens.
    A failure is an ``OSError`` naming the address.
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
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def claim_port(sock: socket.socket, *, probe: bool) -> socket.socket:
    """Make this process the only gateway on ``sock``'s address; returns a
    lock to hold for as long as the process serves.

    SO_REUSEPORT lets any process of the same user bind a port that is in
    use, so a second supervisor would silently split the traffic with the
    first.  Two checks refuse that: an abstract Unix socket named after the
    address, which one process at a time can bind (per network namespace;
    the kernel releases it however the process ends), catches two gateways
    starting together; with ``probe`` (the supervisor, whose own socket is bound but
    not listening), binding a socket without SO_REUSEPORT and listening
    catches anything already listening there, a gateway or not.
    """
    name = _address(sock)
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0obs-gateway:listen:{name}")
    except OSError as exc:
        lock.close()
        raise OSError(
            exc.errno, f"cannot listen on {name}: another obs-gateway serves this address"
        ) from None
    if probe:
        check = socket.socket(sock.family, socket.SOCK_STREAM)
        try:
            check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            check.bind(sock.getsockname())
            check.listen(1)
        except OSError as exc:
            lock.close()
            raise OSError(
                exc.errno, f"cannot listen on {name}: {exc.strerror} (another program listens)"
            ) from None
        finally:
            check.close()
    return lock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
