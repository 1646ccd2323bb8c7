"""Upstream URLs as the config gives them: the checks every one passes,
whichever key names it (a route's ``upstream``, a credential's
``forward.upstreams``), so the server can always build its Host header and
request-target.  Pure: no I/O, no DNS.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["check_upstream_url"]


def check_upstream_url(url: str, key: str) -> None:
    """Raise ``ValueError("key: …")`` unless ``url`` is a usable http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ValueError(f"{key}: not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError(f"{key}: credentials in the URL are not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{key}: invalid port") from None
    if port == 0:
        raise ValueError(f"{key}: port 0")
    try:
        # What the Host header will carry; IDNA refuses empty or oversized
        # labels, so the server can always build it.
        parts.hostname.encode("ascii" if parts.hostname.isascii() else "idna")
    except UnicodeError:
        raise ValueError(f"{key}: not a valid host name") from None
