"""What a credential pins on the wire, and the client's attempts to change it.

Two pieces, both pre-built per config generation and applied per request:

* ``QueryFilter``: which of the client's query arguments go upstream.  An
  argument is read the way VictoriaMetrics (Go's ``url.ParseQuery``) reads
  it: its name percent-decoded, ``+`` as a space.  It is dropped when that
  name is one the gateway sends itself (vmauth's rule, and then some: names
  compare case-insensitively), when it cannot be read that way (a bad
  ``%`` escape, a ``;``, which older parsers split on), or when the route
  drops client queries altogether.  Kept arguments go as sent.
* ``PinnedHeaders``: the fields a credential sets, and the spellings of a
  client's copies to remove: any case, and ``_`` for ``-`` (backends that
  fold one into the other would read ``X_Scope_OrgID`` as the pinned name).

Must not know: routes, credentials, sockets, metrics.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "EXTRA_LABEL",
    "PinnedHeaders",
    "QueryFilter",
    "arg_name",
    "arg_names",
    "fold",
    "fold_names",
    "label_arg",
]

EXTRA_LABEL = b"extra_label"
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def arg_name(pair: bytes) -> bytes | None:
    """A query argument's name as a Go server reads it, lowercased; None when
    a reader could take it for something else (see the module docstring)."""
    if b";" in pair:
        return None
    name = pair.partition(b"=")[0]
    if b"%" in name or b"+" in name:
        if _BAD_ESCAPE.search(name):
            return None
        name = unquote_to_bytes(name.replace(b"+", b" "))
    return name.lower()


def arg_names(query: bytes) -> frozenset[bytes]:
    """The argument names of a query the config gives (an upstream URL's)."""
    names = {arg_name(pair) for pair in query.split(b"&") if pair}
    return frozenset(n for n in names if n is not None)


def label_arg(name: str, value: str) -> bytes:
    """``extra_label=name=value``, encoded so any value arrives as written."""
    return EXTRA_LABEL + b"=" + quote(f"{name}={value}", safe="").encode("ascii")


def fold(name: bytes) -> bytes:
    """The spelling every copy of a field name is compared in."""
    return name.lower().replace(b"_", b"-")


class QueryFilter:
    """Which client query arguments reach the upstream."""

    __slots__ = ("keep_rest", "names")

    def __init__(self, names: frozenset[bytes], keep_rest: bool) -> None:
        self.names = names  # decoded, lowercased: never taken from the client
        self.keep_rest = keep_rest  # the route's query = "pass"

    def apply(self, query: bytes) -> tuple[bytes, int, int]:
        """(the arguments kept, extra_label arguments dropped, others dropped).
        Empty arguments (``a&&b``) are no argument: neither kept nor counted."""
        kept: list[bytes] = []
        labels = others = 0
        names, keep_rest = self.names, self.keep_rest
        for pair in query.split(b"&"):
            if not pair:
                continue
            name = arg_name(pair)
            if keep_rest and name is not None and name not in names:
                kept.append(pair)
            elif name == EXTRA_LABEL:
                labels += 1
            else:
                others += 1
        return b"&".join(kept), labels, others


class PinnedHeaders:
    """Fields a credential sets on every upstream request of a route.

    ``RequestHead.upstream_head`` folds the names of the fields it would
    send into one ``"\\n"``-separated string (a few C calls) and asks
    ``present`` whether a pinned name is among them; only then does
    ``strip`` walk the fields.
    """

    __slots__ = ("lines", "names", "pairs", "present")

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.names = frozenset(fold(n.encode("ascii")) for n, _ in fields)
        alternatives = b"|".join(re.escape(n) for n in sorted(self.names))
        self.present = re.compile(b"\n(?:" + alternatives + b")\n").search
        lines: list[bytes] = []
        for name, value in fields:
            lines += (name.encode("ascii"), b": ", value.encode("ascii"), b"\r\n")
        self.lines = tuple(lines)
        # HTTP/2 (gRPC routes): names lowercase, as HTTP/2 requires.
        self.pairs = tuple((n.lower().encode("ascii"), v.encode("ascii")) for n, v in fields)

    def strip_pairs(
        self, fields: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], int]:
        """HTTP/2 fields without the client's copies, then ours; and how many
        copies there were (a gRPC call costs far more than this walk)."""
        names = self.names
        kept = [f for f in fields if fold(f[0]) not in names]
        return [*kept, *self.pairs], len(fields) - len(kept)

    def strip(self, forward: list[bytes], folded: bytes) -> tuple[list[bytes], int]:
        """``forward`` (name, b": ", value, b"\\r\\n", ...) without the client's
        copies of pinned fields, and how many there were; ``folded`` is its
        names as ``fold`` spells them, each between newlines."""
        out = list(forward)
        dropped = 0
        folded_names = folded[1:-1].split(b"\n")
        # One pass per pinned name (and copy), each a C-level list search.
        for name in self.names:
            while name in folded_names:
                i = folded_names.index(name)
                del folded_names[i]
                del out[4 * i : 4 * i + 4]
                dropped += 1
        return out, dropped

    def apply(self, forward: list[bytes]) -> tuple[list[bytes], int]:
        """The fields as sent: ``forward`` without the client's copies, then ours."""
        folded = fold_names(forward)
        if self.present(folded) is None:
            return [*forward, *self.lines], 0
        out, dropped = self.strip(forward, folded)
        return [*out, *self.lines], dropped


def fold_names(forward: list[bytes]) -> bytes:
    """The field names of ``forward``, folded, each between newlines."""
    return b"\n" + b"\n".join(forward[0::4]).lower().replace(b"_", b"-") + b"\n"
