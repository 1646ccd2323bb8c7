"""Per-process state shared by every connection: the config generation in
force, counters, upstream pools, the clock line and the request-id source.

A ``Generation`` is everything derived from one config (route table,
authenticator, rendered errors); it is immutable and replaced as a whole on
reload, so an exchange that captured one at its start finishes on it.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from gateway.auth import Authenticator
from gateway.errors import ErrorRenderer
from gateway.routing import RouteTable

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.metrics import Stats
    from gateway.upstream import Pools

__all__ = ["Generation", "Shared"]


@dataclass(frozen=True, slots=True)
class Generation:
    settings: Settings
    routes: RouteTable
    auth: Authenticator
    errors: ErrorRenderer
    # Precomputed so the hot path reads attributes instead of nested settings.
    header_timeout: float = field(init=False)
    body_idle_timeout: float = field(init=False)
    keepalive_timeout: float = field(init=False)
    connect_timeout: float = field(init=False)
    response_timeout: float = field(init=False)
    pool_idle_timeout: float = field(init=False)

    @classmethod
    def build(cls, settings: Settings) -> Generation:
        return cls(
            settings,
            RouteTable(settings.routes),
            Authenticator(settings.credentials),
            ErrorRenderer(settings.server.realm),
        )

    def __post_init__(self) -> None:
        s, u = self.settings.server, self.settings.upstream
        for name, value in (
            ("header_timeout", s.header_timeout_seconds),
            ("body_idle_timeout", s.body_idle_timeout_seconds),
            ("keepalive_timeout", s.keepalive_timeout_seconds),
            ("connect_timeout", u.connect_timeout_seconds),
            ("response_timeout", u.response_timeout_seconds),
            ("pool_idle_timeout", u.pool_idle_timeout_seconds),
        ):
            object.__setattr__(self, name, value)


class Shared:
    """Mutable process-wide state; one instance per worker process."""

    __slots__ = (
        "_id_counter",
        "_id_prefix",
        "access",
        "connections",
        "date_line",
        "draining",
        "gen",
        "log",
        "loop",
        "pools",
        "stats",
        "tls",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        gen: Generation,
        stats: Stats,
        pools: Pools,
        access: Any,
        log: Any,
        *,
        tls: bool = False,
    ) -> None:
        self.loop = loop
        self.gen = gen
        self.stats = stats
        self.pools = pools
        self.access = access  # a structlog logger, or None when access logs are off
        self.log = log
        self.tls = tls
        self.draining = False
        self.connections: set[Any] = set()
        self.date_line = b""
        self.tick_date()
        # Request ids: a random per-process prefix and a counter, unique
        # across workers and restarts without a syscall per request.
        self._id_prefix = os.urandom(6).hex()
        self._id_counter = 0

    def tick_date(self) -> None:
        self.date_line = b"Date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"

    def next_request_id(self) -> str:
        self._id_counter += 1
        return f"{self._id_prefix}-{self._id_counter:x}"
