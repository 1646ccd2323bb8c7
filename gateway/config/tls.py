"""TLS for the public listener: server contexts from config files.

Contexts allow TLS 1.2 and 1.3 only and leave cipher choice to OpenSSL's
secure defaults.  ``client_auth`` verifies client certificates against a CA
file, e.g. Cloudflare's Authenticated Origin Pulls CA, so only Cloudflare
can reach the origin.  A context is built whole per config: the data path
hands each new handshake the newest one (``datapath/handshake.py``), so a
reload changes certificates, client CAs, ``client_auth`` and ALPN for new
connections while open ones keep their session.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.config.schema import ConfigError, TlsSpec

__all__ = ["ALPN_H2", "ALPN_HTTP1", "server_context"]

# What the listener offers in ALPN, in preference order, without and with an
# otlp-grpc route: the one place the protocols on the TLS port are listed.
ALPN_HTTP1 = ("http/1.1",)
ALPN_H2 = ("h2", "http/1.1")


def server_context(spec: TlsSpec, base: Path, h2: bool = False) -> ssl.SSLContext:
    """Build and validate (cert and key must match) a server context.

    ``h2``: offer HTTP/2 in ALPN (only when an ``otlp-grpc`` route exists,
    so a config without one keeps every TLS sender on HTTP/1.1).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(ALPN_H2 if h2 else ALPN_HTTP1))
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
    # "none" asks for no certificate even with a CA file named (the file is
    # still checked): switching client_auth is then a one-line change.
    ctx.verify_mode = _VERIFY[spec.client_auth]
    return ctx


_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _readable(path: Path, key: str) -> Path:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"server.tls.{key}: cannot read the file: {exc.strerror}") from None
    return path
