"""What every part of the TOML schema shares: the Struct base (immutable,
unknown keys are errors), the number and name rules, the names and paths
the gateway keeps for itself (upstream URLs are checked by ``urls.py``).

No I/O.  ``schema.py`` and ``routes.py`` build on it; it imports neither.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

__all__ = [
    "NAME",
    "RESERVED_NAMES",
    "RESERVED_PATHS",
    "ConfigError",
    "Positive",
    "PositiveInt",
    "Spec",
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
