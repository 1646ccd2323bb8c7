"""``[credentials.forward]``: what a credential, not its sender, decides
upstream (tenancy): ``extra_labels`` for remote-write, ``headers`` for every
route, ``upstreams`` replacing a route's backend, and ``claim_pattern`` for
values a JWT claim supplies (``"{claim:tenant}"``).

The schema and its per-field rules, and the template syntax that both the
rules here and ``policy/tenancy.py`` read.  Every key error starts with the
key, ``extra_labels.tenant: …``, which the loader prefixes with the path.
Must not know: requests, bytes on the wire, the route table.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import msgspec

from gateway.config.routes import BackendSpec, Entry, check_backend_list, labelled
from gateway.config.urls import check_upstream_url

__all__ = [
    "CLAIM_VALUE",
    "DEFAULT_CLAIM_PATTERN",
    "ForwardSpec",
    "Part",
    "claims_in",
    "parse_template",
]

# Prometheus label names; "__" names are reserved for the server's own use.
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Field names as RFC 9110 tokens, narrowed: no "_" (some backends fold it
# into "-", so "X_Scope_OrgID" would be an ambiguous second spelling).
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
# Fields the gateway writes, re-frames or reads itself: a credential cannot pin them.
_OWNED_HEADERS = frozenset(
    {
        "authorization",
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "expect",
        "forwarded",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-real-ip",
        "x-request-id",
    }
)
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_VALUE = 1024
_MAX_ENTRIES = 32
_CLAIM = re.compile(r"\{claim:([^{}]{1,128})\}")
# A claim value always: visible ASCII, bounded.  claim_pattern narrows it.
CLAIM_VALUE = re.compile(r"[\x21-\x7e]{1,128}")
DEFAULT_CLAIM_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"


class Part(NamedTuple):
    """One piece of a value: literal text, or the name of a claim."""

    claim: bool
    text: str


def parse_template(value: str) -> tuple[Part, ...]:
    """``"team-{claim:tenant}"`` → (text "team-", claim "tenant")."""
    parts: list[Part] = []
    at = 0
    for m in _CLAIM.finditer(value):
        if m.start() > at:
            parts.append(Part(False, value[at : m.start()]))
        parts.append(Part(True, m.group(1)))
        at = m.end()
    if at < len(value):
        parts.append(Part(False, value[at:]))
    return tuple(parts)


def claims_in(value: str) -> tuple[str, ...]:
    return tuple(p.text for p in parse_template(value) if p.claim)


def _check_value(key: str, value: str, pattern: re.Pattern[str] | None) -> None:
    literal = "".join(p.text for p in parse_template(value) if not p.claim)
    if "{claim:" in literal:
        raise ValueError(f"{key}: a claim is written {{claim:NAME}}")
    if not value:
        raise ValueError(f"{key}: must not be empty")
    if len(value) > _MAX_VALUE:
        raise ValueError(f"{key}: longer than {_MAX_VALUE} characters")
    if pattern is None:
        if _CONTROL.search(value):
            raise ValueError(f"{key}: control characters are not allowed")
    elif not pattern.fullmatch(value):
        raise ValueError(f"{key}: a header value is printable ASCII without surrounding spaces")


def _check_labels(labels: dict[str, str]) -> None:
    for name, value in labels.items():
        key = f"extra_labels.{name}"
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(
                f"{key}: not a label name ([A-Za-z_][A-Za-z0-9_]*, not starting with __)"
            )
        _check_value(key, value, None)


def _check_headers(headers: dict[str, str]) -> None:
    seen: set[str] = set()
    for name, value in headers.items():
        key = f"headers.{name}"
        if "_" in name:
            raise ValueError(f"{key}: use '-', not '_': backends fold one into the other")
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{key}: not a header name (letters, digits and '-')")
        if name.lower() in _OWNED_HEADERS or name.lower().startswith("x-forwarded-"):
            raise ValueError(f"{key}: the gateway sets or re-frames this header itself")
        if name.lower() in seen:
            raise ValueError(f"{key}: given twice (header names are case-insensitive)")
        seen.add(name.lower())
        _check_value(key, value, _HEADER_VALUE)


class ForwardSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per credential; every key optional."""

    # Sent to VictoriaMetrics as extra_label=name=value on remote-write routes.
    extra_labels: dict[str, str] = {}
    # Set on the upstream request of every route; the client's copies go.
    headers: dict[str, str] = {}
    # route name → a URL, or a list of backends (URLs or {url, weight, name}
    # tables, as a route's upstreams), replacing the route's backends; the
    # route's balance, failover and health check apply to them.
    upstreams: dict[str, str | tuple[Entry, ...]] = {}
    # What a claim value must match (besides: visible ASCII, ≤ 128 characters).
    claim_pattern: str = DEFAULT_CLAIM_PATTERN

    def __post_init__(self) -> None:
        if len(self.extra_labels) > _MAX_ENTRIES or len(self.headers) > _MAX_ENTRIES:
            raise ValueError(f"extra_labels: at most {_MAX_ENTRIES} labels and headers each")
        _check_labels(self.extra_labels)
        _check_headers(self.headers)
        for route, urls in self.upstreams.items():
            key = f"upstreams.{route}"
            if isinstance(urls, str):
                check_upstream_url(urls, key)
            else:
                check_backend_list(urls, key)
        try:
            pattern = re.compile(self.claim_pattern)
        except re.error as exc:
            raise ValueError(f"claim_pattern: not a regular expression: {exc}") from None
        if pattern.fullmatch(""):
            raise ValueError("claim_pattern: must not match an empty value")

    @property
    def claims(self) -> frozenset[str]:
        """Every claim a value of this table names."""
        values = [*self.extra_labels.values(), *self.headers.values()]
        return frozenset(c for v in values for c in claims_in(v))

    def backends(self, route: str) -> tuple[tuple[str, BackendSpec], ...] | None:
        """The labelled backends replacing ``route``'s, if this table has some."""
        urls = self.upstreams.get(route)
        if urls is None:
            return None
        return labelled((urls,) if isinstance(urls, str) else urls)

    def upstream_urls(self, route: str) -> tuple[str, ...]:
        """The URLs replacing ``route``'s backends (empty if none do)."""
        return tuple(spec.url for _, spec in self.backends(route) or ())
