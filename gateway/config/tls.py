"""TLS for the public listener: server contexts from config files, and a
terminator that swaps certificates on reload without dropping connections.

Contexts allow TLS 1.2 and 1.3 only and leave cipher choice to OpenSSL's
secure defaults.  ``client_auth`` verifies client certificates against a CA
file, e.g. Cloudflare's Authenticated Origin Pulls CA, so only Cloudflare
can reach the origin.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from gateway.config.schema import ConfigError, TlsSpec

__all__ = ["TlsTerminator", "server_context"]


def server_context(spec: TlsSpec, base: Path, h2: bool = False) -> ssl.SSLContext:
    """Build and validate (cert and key must match) a server context.

    ``h2``: offer HTTP/2 in ALPN (only when an ``otlp-grpc`` route exists,
    so a config without one keeps every TLS sender on HTTP/1.1).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2", "http/1.1"] if h2 else ["http/1.1"])
    # OpenSSL's error for an unreadable file names neither the file nor which
    # of the two it was: read each first, so the error names its own key.
    cert = _readable(base / spec.cert_file, "cert_file")
    key = _readable(base / spec.key_file, "key_file")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"server.tls.key_file: certificate and key do not load as a pair: {exc.strerror or exc}"
        ) from None
    if spec.client_ca_file is not None:
        ca = _readable(base / spec.client_ca_file, "client_ca_file")
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"server.tls.client_ca_file: {exc.strerror or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if spec.client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


def _readable(path: Path, key: str) -> Path:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"server.tls.{key}: cannot read {str(path)!r}: {exc.strerror}") from None
    return path


class TlsTerminator:
    """The listener keeps its first context; each new handshake is handed
    to the newest one, so a reload changes certificates (and client CAs)
    for new connections while open ones keep their session."""

    __slots__ = ("current", "listener")

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.current = ctx
        self.listener = ctx
        ctx.sni_callback = self._select

    def _select(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self.current is not ctx:
            sslobj.context = self.current

    def swap(self, ctx: ssl.SSLContext) -> None:
        self.current = ctx
