"""The ``[[routes]]`` part of the TOML schema: a route, its backends (one
``upstream`` or a list of ``upstreams``), how it balances and fails over
between them, and its optional active health check.

Field rules raised from ``__post_init__`` start with the field name, as in
``schema.py``.  No I/O.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from gateway.config.fields import (
    NAME,
    RESERVED_NAMES,
    RESERVED_PATHS,
    Positive,
    PositiveInt,
    Spec,
)
from gateway.config.urls import check_upstream_url as check_url

__all__ = [
    "BALANCE_POLICIES",
    "MAX_BACKENDS",
    "BackendSpec",
    "Entry",
    "HealthCheckSpec",
    "RouteSpec",
    "check_backend_list",
    "labelled",
]

_METHODS = frozenset({"POST", "PUT", "PATCH", "GET", "DELETE"})
BALANCE_POLICIES = ("least_outstanding", "round_robin", "first_available")
# The data path keeps the backends a request tried as bits of one int.
MAX_BACKENDS = 32
# A probe path goes on the request line as it is: printable ASCII, no spaces.
_PROBE_PATH = re.compile(r"^/[\x21-\x7e]{0,1023}$")
# A backend's default label: where its URL points, as the config spells it.
_DEFAULT_LABEL = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,128}$")


class BackendSpec(Spec, frozen=True):
    """One backend in a route's ``upstreams`` list, in its table form."""

    url: str
    # Its share of requests against the others (round_robin and
    # least_outstanding; first_available goes by order alone).
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    # The ``backend`` label in metrics and logs; host:port of the URL if unset.
    name: str | None = None

    def __post_init__(self) -> None:
        check_url(self.url, "url")
        if self.name is not None and (not NAME.match(self.name) or self.name in RESERVED_NAMES):
            raise ValueError("name: must match [A-Za-z0-9_.-]{1,64}")

    @property
    def label(self) -> str:
        """The backend label this entry gets before duplicates are told apart."""
        if self.name is not None:
            return self.name
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if not host.isascii():
            host = host.encode("idna").decode("ascii")  # check_url made sure it can
        shown = f"[{host}]" if ":" in host else host
        port = parts.port or (443 if parts.scheme == "https" else 80)
        label = f"{shown}:{port}"
        return label if _DEFAULT_LABEL.match(label) else "backend"


class HealthCheckSpec(Spec, frozen=True):
    """An active probe of each backend, run by every worker off the data path."""

    # GET of this path on the backend's host:port (VictoriaMetrics: /health;
    # a Jaeger collector: its admin port's /, via a URL of its own).
    path: str = "/health"
    interval_seconds: Positive = 2.0
    timeout_seconds: Positive = 1.0
    # Consecutive passes that bring a backend back, failures that eject it.
    healthy_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    unhealthy_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2

    def __post_init__(self) -> None:
        if not _PROBE_PATH.match(self.path):
            raise ValueError("path: must start with / and be printable ASCII")
        if self.timeout_seconds > self.interval_seconds:
            raise ValueError("timeout_seconds: must not exceed interval_seconds")


class RouteSpec(Spec, frozen=True):
    name: str
    path: str
    protocol: Literal["prometheus-remote-write", "otlp-http", "otlp-grpc"]
    # Exactly one of the two: ``upstream = "…"`` is a list of one.
    upstream: str | None = None
    upstreams: tuple[str | BackendSpec, ...] = ()
    balance: Literal["least_outstanding", "round_robin", "first_available"] = "least_outstanding"
    # Backends one request may be tried on (each at most once).
    attempts: Annotated[int, msgspec.Meta(ge=1, le=MAX_BACKENDS)] = 2
    # Answers that count as "this backend failed": another backend is tried
    # while attempts and the body's copy allow, else the answer passes.
    retry_statuses: tuple[Annotated[int, msgspec.Meta(ge=400, le=599)], ...] = (502, 503, 504)
    # Body bytes kept for a replay on another backend; a longer body streams
    # without a copy (and is retried only if nothing of it was sent yet).
    # vmagent's blocks are at most 8 MiB (-remoteWrite.maxBlockSize).
    replay_buffer_bytes: Annotated[int, msgspec.Meta(ge=0)] = 8 * 1024 * 1024
    health_check: HealthCheckSpec | None = None
    methods: tuple[str, ...] = ("POST",)
    # The client's query string: "pass" appends it to the upstream's (minus
    # any argument the gateway sets itself), "drop" sends none of it.
    query: Literal["pass", "drop"] = "pass"
    # vmagent retries a 413 forever (head-of-line blocking), so the default
    # sits far above its largest block; OTLP recommends 64 MiB too.
    max_body_bytes: PositiveInt = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not NAME.match(self.name) or self.name in RESERVED_NAMES:
            raise ValueError(
                f"name: must match [A-Za-z0-9_.-]{{1,64}} "
                f"and not be one of {sorted(RESERVED_NAMES)}"
            )
        if not self.path.startswith("/") or any(c in self.path for c in "?# \t%"):
            raise ValueError("path: must be an absolute path without query")
        if self.path in RESERVED_PATHS:
            raise ValueError(f"path: {self.path!r} is answered by the gateway itself")
        if not self.methods:
            raise ValueError("methods: at least one method")
        for method in self.methods:
            if method not in _METHODS:
                raise ValueError(f"methods: each is one of {sorted(_METHODS)}")
        self._check_backends()

    def _check_backends(self) -> None:
        if (self.upstream is None) == (not self.upstreams):
            raise ValueError("upstream: give exactly one of upstream and upstreams")
        self._check_grpc_route()
        if self.upstream is not None:
            check_url(self.upstream, "upstream")
            self._check_grpc(self.upstream, "upstream")
            return
        for i, entry in enumerate(self.upstreams):
            self._check_grpc(entry if isinstance(entry, str) else entry.url, f"upstreams[{i}]")
        check_backend_list(self.upstreams, "upstreams")

    def _check_grpc_route(self) -> None:
        if self.protocol != "otlp-grpc":
            return
        if self.health_check is not None:
            raise ValueError("health_check: not for an otlp-grpc route (its probe is HTTP/1.1)")
        if len(self.upstreams) > 1:
            # The HTTP/2 upstream path (datapath/h2upstream.py) has one pool
            # per route and no failover yet.
            raise ValueError("upstreams: an otlp-grpc route takes one backend")

    def _check_grpc(self, url: str, key: str) -> None:
        parts = urlsplit(url)
        if self.protocol == "otlp-grpc" and (parts.path not in ("", "/") or parts.query):
            raise ValueError(
                f"{key}: an otlp-grpc upstream is scheme, host and port only (the gRPC "
                f"method path is forwarded as it is)"
            )

    def backends(self) -> tuple[tuple[str, BackendSpec], ...]:
        """(label, backend) for every backend in order (``labelled``)."""
        if self.upstream is not None:
            return labelled((self.upstream,))
        return labelled(self.upstreams)


Entry = str | BackendSpec


def labelled(entries: tuple[Entry, ...]) -> tuple[tuple[str, BackendSpec], ...]:
    """(label, backend) for every entry of a backend list in order, each
    label its own: an unnamed backend sharing host:port with another gets
    ``#index``.  A route's ``upstreams`` and a credential's override
    (``forward.upstreams``) are labelled alike."""
    specs = tuple(BackendSpec(url=e) if isinstance(e, str) else e for e in entries)
    labels = [e.label for e in specs]
    return tuple(
        (f"{label}#{i}" if e.name is None and labels.count(label) > 1 else label, e)
        for i, (e, label) in enumerate(zip(specs, labels, strict=True))
    )


def check_backend_list(entries: tuple[Entry, ...], key: str) -> None:
    """The rules of any backend list: 1 to MAX_BACKENDS entries, each URL
    usable and listed once, names and labels unique.  Errors start with
    ``key[i]`` (``upstreams[1]: …``)."""
    if not entries:
        raise ValueError(f"{key}: at least one backend")
    if len(entries) > MAX_BACKENDS:
        raise ValueError(f"{key}: at most {MAX_BACKENDS} backends")
    urls: set[str] = set()
    names: set[str] = set()
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            check_url(entry, f"{key}[{i}]")
            url, name = entry, None
        else:
            url, name = entry.url, entry.name
        if url in urls:
            raise ValueError(f"{key}[{i}]: the same URL is listed twice")
        urls.add(url)
        if name is not None:
            if name in names:
                raise ValueError(f"{key}[{i}].name: used twice")
            names.add(name)
    labels = [label for label, _ in labelled(entries)]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise ValueError(f"{key}[{i}].name: the label is used twice")
