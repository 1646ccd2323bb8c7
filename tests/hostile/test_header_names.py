"""Header names with underscores never reach the upstream as another field.

CGI-style backends and some frameworks map ``_`` to ``-`` (or both to
``_``), so ``Transfer_Encoding: chunked`` is Transfer-Encoding to them while
every HTTP parser on the way, the gateway's included, calls it an unknown
field: a desync scanner's mutation that reached the upstream unchanged at
70f0a08.  nginx drops such fields by default (``underscores_in_headers
off``), and so does the gateway, counting each; ``[server]
underscores_in_headers = true`` keeps the ones that cannot be mistaken
for another field.
"""

from __future__ import annotations

from tests.conftest import TOKEN, StartGateway
from tests.hostile.conftest import FAST_SERVER, hostile_config
from tests.support.client import raw_client
from tests.support.metrics import scrape
from tests.support.upstreams import RawUpstream
from tests.support.wire import Response, request

# Each would mean something else to a backend that folds "_" into "-".
MUTATIONS = [
    ("Transfer_Encoding", "chunked"),
    ("Content_Length", "0"),
    ("Content_Type", "text/html"),
    ("X_Forwarded_For", "203.0.113.9"),
    ("X_Real_IP", "203.0.113.9"),
    ("X_Request_Id", "spoofed-id"),
    ("Proxy_Authorization", "Basic YWRtaW46YWRtaW4="),
    ("Proxy_Connection", "keep-alive"),
]
KEEP = "\nunderscores_in_headers = true"


async def _send(port: int, headers: list[tuple[str, str]], body: bytes = b"payload") -> Response:
    async with raw_client(port) as conn:
        await conn.send(request("POST", "/api/v1/write", body, token=TOKEN, headers=headers))
        return await conn.response()


async def test_underscore_names_are_dropped_and_counted(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream))
    headers = [*MUTATIONS, ("X-Custom_Label", "v1"), ("X-Custom-Label", "v2")]
    assert (await _send(gw.port, headers)).status == 204
    [req] = strict_upstream.requests
    assert not [name for name in req.names() if "_" in name]
    assert req.all("X-Custom-Label") == ["v2"]
    assert req.all("Content-Length") == ["7"]
    assert req.all("Content-Type") == []
    assert req.all("X-Forwarded-For") == ["127.0.0.1"]
    assert req.body == b"payload"
    for claim in (b"203.0.113.9", b"spoofed-id", b"YWRtaW46"):
        assert claim not in strict_upstream.received, claim
    assert strict_upstream.errors == []
    dropped = len(MUTATIONS) + 1
    assert gw.stats.headers_dropped == {"underscore": dropped}
    metrics = await scrape(gw.admin_port)
    assert metrics.sum("gateway_request_headers_dropped_total", reason="underscore") == dropped


async def test_a_refused_request_counts_nothing(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """Counted as fields an upstream did not get: a scanner without a
    token is answered 401 and forwards nothing to drop."""
    gw = await start_gateway(hostile_config(strict_upstream))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"x", headers=MUTATIONS))
        assert (await conn.response()).status == 401
    assert gw.stats.headers_dropped == {}
    assert strict_upstream.conns == []


async def test_kept_underscores_pass_unless_they_fold_into_another_field(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream, server=FAST_SERVER + KEEP))
    headers = [
        *MUTATIONS,
        ("X-Tenant_Id", "t-1"),  # no other spelling: kept as sent
        ("x_scope_orgid", "7"),
        ("X-Dup_Name", "a"),  # folds into X-Dup-Name, also present: only that one passes
        ("X-Dup-Name", "b"),
        ("X_Twin-Name", "c"),  # two underscore spellings of one name: neither passes
        ("X-Twin_Name", "d"),
        ("Connection", "X_Hop_One, x-hop-two"),  # hop-by-hop, as sent or folded
        ("X_Hop_One", "e"),
        ("X-Hop_Two", "f"),
    ]
    assert (await _send(gw.port, headers)).status == 204
    [req] = strict_upstream.requests
    underscored = sorted(name for name in req.names() if "_" in name)
    assert underscored == ["x-tenant_id", "x_scope_orgid"]
    assert req.all("X-Tenant_Id") == ["t-1"]
    assert req.all("x_scope_orgid") == ["7"]
    assert req.all("X-Dup-Name") == ["b"]
    assert req.all("X-Dup_Name") == []
    assert "x-twin-name" not in req.names()
    assert req.all("Content-Length") == ["7"]
    assert req.all("X-Request-Id") != ["spoofed-id"]
    assert req.body == b"payload"
    assert strict_upstream.errors == []
    assert b"x_hop" not in strict_upstream.received.lower()
    assert gw.stats.headers_dropped == {"underscore": len(MUTATIONS) + 5}
