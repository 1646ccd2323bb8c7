"""Request header hygiene over real sockets (DESIGN §2 step 4, RFC 9110
§7.6.1): end-to-end headers reach the upstream unchanged, hop-by-hop ones
and those named in Connection do not, the client's Authorization never
does, and X-Forwarded-For/-Proto are the gateway's own."""

from __future__ import annotations

import pytest

from tests.conftest import TOKEN, RecordingUpstream, StartGateway, config_text, sha256
from tests.support.client import raw_request
from tests.support.routes import ROUTE_IDS, ROUTES, RouteCase
from tests.support.wire import request_bytes

END_TO_END = [
    ("Content-Type", "application/x-protobuf"),
    ("Content-Encoding", "snappy"),
    ("X-Prometheus-Remote-Write-Version", "0.1.0"),
    ("User-Agent", "vmagent/1.102.0"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("tracestate", "vendor=opaque"),
    ("X-Request-Id", "req-42"),
    ("X-Scope-OrgID", "tenant-7"),
    ("Accept-Encoding", "gzip"),
]
HOP_BY_HOP = [
    ("Connection", "keep-alive, X-Client-Hop, x-other-hop"),
    ("X-Client-Hop", "dropped"),
    ("X-Other-Hop", "dropped too"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Upgrade", "websocket"),
]


@pytest.mark.parametrize("case", ROUTES, ids=ROUTE_IDS)
async def test_request_header_hygiene(
    start_gateway: StartGateway, upstream: RecordingUpstream, case: RouteCase
) -> None:
    gw = await start_gateway(
        config_text(upstream.url + "/api/v1/write", upstream.url + "/v1/traces")
    )
    body = b"\x00\x01payload\xff" * 10
    headers = END_TO_END + HOP_BY_HOP + [("X-Forwarded-Proto", "https")]
    resp = await raw_request(gw.port, request_bytes("POST", case.path, headers, body))
    assert resp.status == 204
    [seen] = upstream.complete
    assert seen.body == body
    names = [n.decode().lower() for n, _ in seen.raw_headers]
    for name, value in END_TO_END:
        assert seen.headers.get(name) == value, name
    for name, _ in HOP_BY_HOP:
        assert name.lower() not in names, name
    assert "authorization" not in names
    raw = b"\r\n".join(n + b": " + v for n, v in seen.raw_headers)
    assert TOKEN.encode() not in raw
    assert sha256(TOKEN.encode()).encode() not in raw
    # The gateway's own forwarding headers, one of each.
    assert names.count("x-forwarded-for") == 1
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert names.count("x-forwarded-proto") == 1
    assert seen.headers["X-Forwarded-Proto"] == "http"  # the client's "https" is not trusted
    # Host names the upstream, not the client's view of the gateway.
    assert seen.headers["Host"] == upstream.url.removeprefix("http://")
    assert seen.headers["Content-Length"] == str(len(body))


async def test_forwarding_chain_from_an_untrusted_peer_is_replaced(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    # Anyone can write X-Forwarded-For; from a peer that is not a trusted
    # proxy it is not believed, so the upstream sees only the real peer.
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    headers = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "10.0.0.1")]
    resp = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", headers, b"x"))
    assert resp.status == 204
    [seen] = upstream.complete
    xff = [v for n, v in seen.raw_headers if n.lower() == b"x-forwarded-for"]
    assert xff == [b"127.0.0.1"]


async def test_forwarding_chain_from_a_trusted_proxy_is_extended(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(
        config_text(
            upstream.url + "/api/v1/write", extra='[clients]\ntrusted_proxies = ["127.0.0.0/8"]'
        )
    )
    headers = [("X-Forwarded-For", "203.0.113.7")]
    resp = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", headers, b"x"))
    assert resp.status == 204
    [seen] = upstream.complete
    xff = [v for n, v in seen.raw_headers if n.lower() == b"x-forwarded-for"]
    assert xff == [b"203.0.113.7, 127.0.0.1"]


async def test_request_id_is_added_when_absent(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    for _ in range(2):
        resp = await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"x"))
        assert resp.status == 204
    ids = [r.headers.get("X-Request-Id") for r in upstream.complete]
    assert all(ids)
    assert ids[0] != ids[1]


async def test_chunked_request_is_forwarded_chunked(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    data = request_bytes("POST", "/api/v1/write", [("Transfer-Encoding", "chunked")])
    data += b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    resp = await raw_request(gw.port, data)
    assert resp.status == 204
    [seen] = upstream.complete
    assert seen.body == b"hello world"
    assert seen.chunked
    assert "Content-Length" not in seen.headers


async def test_query_string_is_passed_unchanged(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    target = "/api/v1/write?extra_label=job%3Dnode&extra_label=env%3Dprod&x=%2e%2e%2F"
    resp = await raw_request(gw.port, request_bytes("POST", target, body=b"x"))
    assert resp.status == 204
    [seen] = upstream.complete
    assert seen.path_qs == target
