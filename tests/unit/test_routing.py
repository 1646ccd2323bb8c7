"""routing: request-target splitting without decoding, exact-match lookup (no
normalisation), and the upstream request-target and Host a route builds."""

from __future__ import annotations

import pytest

from gateway.config.loader import loads
from gateway.policy.errors import Protocol
from gateway.policy.routing import HEALTH, RouteTable, split_target
from tests.conftest import config_text


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api/v1/write", (b"/api/v1/write", b"")),
        (b"/api/v1/write?", (b"/api/v1/write", b"")),
        (b"/api/v1/write?extra_label=a%3Db&x=1", (b"/api/v1/write", b"extra_label=a%3Db&x=1")),
        (b"/api/v1/write?a=?b", (b"/api/v1/write", b"a=?b")),
        (b"/api/v1/%2e%2e/write", (b"/api/v1/%2e%2e/write", b"")),
        (b"/api/v1/write/../x", (b"/api/v1/write/../x", b"")),
        (b"//api/v1/write", (b"//api/v1/write", b"")),
        # Absolute-form (RFC 9112 §3.2.2) is reduced to its path.
        (b"http://obs.example/api/v1/write?x=1", (b"/api/v1/write", b"x=1")),
        (b"HTTPS://obs.example:443/v1/traces", (b"/v1/traces", b"")),
        (b"http://obs.example", (b"/", b"")),
        (b"http://obs.example?x", (b"/", b"x")),
        # The authority ends at the first "/", "?" or "#" (RFC 3986 §3.2), as
        # a proxy in front parses it: what follows "?" is the query (at
        # 70f0a08 "http://h?/api/v1/write" was routed to /api/v1/write).
        (b"http://h?/api/v1/write", (b"/", b"/api/v1/write")),
        (b"http://h?x=/api/v1/write", (b"/", b"x=/api/v1/write")),
        (b"https://h:443?/v1/traces", (b"/", b"/v1/traces")),
        (b"http://h#/api/v1/write", (b"/#/api/v1/write", b"")),
        (b"http://h\\/api/v1/write", (b"/\\/api/v1/write", b"")),
        (b"http://u@h:8080/api/v1/write?q", (b"/api/v1/write", b"q")),
        (b"http://h/api/v1/write?/v1/traces", (b"/api/v1/write", b"/v1/traces")),
        # Neither origin- nor absolute-form: a path that matches nothing.
        (b"*", (b"*", b"")),
        (b"obs.example:443", (b"obs.example:443", b"")),
        (b"", (b"", b"")),
    ],
)
def test_split_target(target: bytes, expected: tuple[bytes, bytes]) -> None:
    assert split_target(target) == expected


TABLE = RouteTable(loads(config_text(), environ={}).routes)


def test_exact_paths_match() -> None:
    rw = TABLE.get(b"/api/v1/write")
    otlp = TABLE.get(b"/v1/traces")
    assert rw is not None
    assert otlp is not None
    assert (rw.name, rw.protocol) == ("remote_write", Protocol.REMOTE_WRITE)
    assert (otlp.name, otlp.protocol) == ("otlp_traces", Protocol.OTLP)
    assert TABLE.get(b"/health") is HEALTH


@pytest.mark.parametrize(
    "path",
    [
        b"/api/v1/write/",
        b"/api/v1/write/../x",
        b"/api/v1/write/..",
        b"//api/v1/write",
        b"/api//v1/write",
        b"/./api/v1/write",
        b"/api/v1/./write",
        b"/api/v1/%77rite",
        b"/api/v1/write%2F",
        b"/api/v1/%2e%2e/v1/write",
        b"/API/v1/write",
        b"/api/v1/write;x",
        b"/api/v1/write\x00",
        b"/api/v1/writex",
        b"/api/v1/wr",
        b"/v1/traces/",
        b"/health/",
        b"/",
        b"",
        b"*",
    ],
)
def test_anything_else_matches_nothing(path: bytes) -> None:
    assert TABLE.get(path) is None


def test_route_methods_and_allow_line() -> None:
    rw = TABLE.get(b"/api/v1/write")
    assert rw is not None
    assert rw.methods == frozenset({b"POST"})
    assert rw.allow_line == b"Allow: POST\r\n"
    assert HEALTH.allow_line == b"Allow: GET, HEAD\r\n"


def routes_for(rw_upstream: str) -> RouteTable:
    return RouteTable(loads(config_text(rw_upstream=rw_upstream), environ={}).routes)


@pytest.mark.parametrize(
    ("upstream", "query", "target"),
    [
        ("http://10.0.0.1:8428/api/v1/write", b"", b"/api/v1/write"),
        (
            "http://10.0.0.1:8428/api/v1/write",
            b"extra_label=a%3Db",
            b"/api/v1/write?extra_label=a%3Db",
        ),
        (
            "http://10.0.0.1:8428/insert/0/prometheus?tenant=7",
            b"",
            b"/insert/0/prometheus?tenant=7",
        ),
        (
            "http://10.0.0.1:8428/insert/0/prometheus?tenant=7",
            b"x=1",
            b"/insert/0/prometheus?tenant=7&x=1",
        ),
        ("http://10.0.0.1:8428", b"x=1", b"/?x=1"),
    ],
)
def test_upstream_target_appends_the_query(upstream: str, query: bytes, target: bytes) -> None:
    rw = routes_for(upstream).get(b"/api/v1/write")
    assert rw is not None
    assert rw.target(query) == target


@pytest.mark.parametrize(
    ("upstream", "host", "port", "host_header"),
    [
        ("http://vm.internal:8428/api/v1/write", "vm.internal", 8428, b"vm.internal:8428"),
        ("http://vm.internal/api/v1/write", "vm.internal", 80, b"vm.internal"),
        ("https://vm.internal/api/v1/write", "vm.internal", 443, b"vm.internal"),
        ("https://vm.internal:8443/x", "vm.internal", 8443, b"vm.internal:8443"),
        ("http://[::1]:8428/x", "::1", 8428, b"[::1]:8428"),
    ],
)
def test_upstream_address_and_host_header(
    upstream: str, host: str, port: int, host_header: bytes
) -> None:
    rw = routes_for(upstream).get(b"/api/v1/write")
    assert rw is not None
    assert rw.upstream is not None
    assert (rw.upstream.host, rw.upstream.port, rw.upstream.host_header) == (
        host,
        port,
        host_header,
    )
