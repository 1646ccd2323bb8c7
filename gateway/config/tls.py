"""TLS for the public listener: server contexts from config files.

Contexts allow TLS 1.2 and 1.3 only and leave cipher choice to OpenSSL's
secure defaults.  ``client_auth`` verifies client certificates against a CA
file, e.g. Cloudflare's Authenticated Origin Pulls CA, so only Cloudflare
can reach the origin.  A context is built whole per config: the data path
hands each new handshake the newest one (``datapath/handshake.py``), so a
reload changes certificates, client CAs and ``client_auth`` for new
connections while open ones keep their session.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.config.schema import ConfigError, TlsSpec

__all__ = ["ALPN_PROTOCOLS", "server_context"]

# What the listener offers in ALPN, in preference order: the one list the
# data path reads the negotiated protocol against.
ALPN_PROTOCOLS = ("http/1.1",)


def server_context(spec: TlsSpec, base: Path) -> ssl.SSLContext:
    """Build and validate (cert and key must match) a server context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    try:
        ctx.load_cert_chain(base / spec.cert_file, base / spec.key_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"server.tls.cert_file: cannot read {exc.filename!r}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"server.tls.key_file: certificate and key do not load as a pair: {exc.strerror or exc}"
        ) from None
    if spec.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=base / spec.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"server.tls.client_ca_file: {exc.strerror or exc}") from None
    # "none" asks for no certificate even with a CA file named (the file is
    # still checked): switching client_auth is then a one-line change.
    ctx.verify_mode = _VERIFY[spec.client_auth]
    return ctx


_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
