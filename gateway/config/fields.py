"""What every part of the TOML schema shares: the Struct base (immutable,
unknown keys are errors), the number and name rules, the names and paths
the gateway keeps for itself, and the one check of an upstream URL.

No I/O.  ``schema.py`` and ``routes.py`` build on it; it imports neither.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "NAME",
    "RESERVED_NAMES",
    "RESERVED_PATHS",
    "ConfigError",
    "Positive",
    "PositiveInt",
    "Spec",
    "check_url",
]

# Paths the gateway answers itself; a route may not shadow them.
RESERVED_PATHS = frozenset({"/health"})
# Label values come from these names, so keep them short and printable.
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Label values the gateway uses for requests that match nothing.
RESERVED_NAMES = frozenset({"none", "unmatched", "health"})

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class ConfigError(Exception):
    """A config that must not be served; ``str()`` names the key path."""


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the TOML schema: immutable, unknown keys are errors."""


def check_url(url: str, key: str) -> None:
    """An upstream URL the data path can always use: http(s), a host name
    IDNA accepts, a real port, no credentials or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ValueError(f"{key}: not an http(s) URL: {url!r}")
    if parts.username or parts.password:
        raise ValueError(f"{key}: credentials in the URL are not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{key}: invalid port in {url!r}") from None
    if port == 0:
        raise ValueError(f"{key}: port 0 in {url!r}")
    try:
        # What the Host header will carry; IDNA refuses empty or oversized
        # labels, so the server can always build it.
        parts.hostname.encode("ascii" if parts.hostname.isascii() else "idna")
    except UnicodeError:
        raise ValueError(f"{key}: not a valid host name in {url!r}") from None
