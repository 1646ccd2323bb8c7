"""Client addresses: forwarding headers are believed only from trusted
proxies; allow/deny lists (global and per credential) refuse with 403; and
the upstream's X-Forwarded-For is never a chain the client invented."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest

from tests.conftest import OTHER_TOKEN, TOKEN, StartGateway, sha256
from tests.hostile.conftest import hostile_config
from tests.support.client import raw_client
from tests.support.upstreams import RawUpstream
from tests.support.wire import Response, request


async def _ask(
    port: int, headers: list[tuple[str, str]], token: str | None = TOKEN, body: bytes = b"x"
) -> Response:
    async with raw_client(port) as conn:
        await conn.send(request("POST", "/api/v1/write", body, token=token, headers=headers))
        return await conn.response()


def _clients(**keys: str) -> str:
    return "[clients]\n" + "\n".join(f"{k} = {v}" for k, v in keys.items())


def _logged_clients(events: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["client"] for e in events if e.get("event") == "request"]


async def test_untrusted_peer_cannot_choose_its_address(
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    """No trusted proxies: XFF / CF-Connecting-IP are ignored for decisions
    and replaced upstream; a deny list on the peer still applies."""
    gw = await start_gateway(
        hostile_config(strict_upstream, extra=_clients(deny='["203.0.113.0/24"]'))
    )
    spoof = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("CF-Connecting-IP", "203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
    ]
    assert (await _ask(gw.port, spoof)).status == 204
    [req] = strict_upstream.requests
    assert req.all("X-Forwarded-For") == ["127.0.0.1"]
    assert _logged_clients(log_capture) == ["127.0.0.1"]
    # Denying the real peer works, whatever the headers claim.
    gw2 = await start_gateway(
        hostile_config(strict_upstream, extra=_clients(deny='["127.0.0.0/8"]'))
    )
    resp = await _ask(gw2.port, [("X-Forwarded-For", "198.51.100.1")])
    assert resp.status == 403
    assert len(strict_upstream.requests) == 1


TRUSTED = {"trusted_proxies": '["127.0.0.1/32", "10.0.0.0/8"]'}


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("203.0.113.9, 10.1.2.3", "203.0.113.9"),  # right-most untrusted hop
        ("6.6.6.6, 203.0.113.9", "203.0.113.9"),  # the left part is the client's claim
        ("6.6.6.6, 203.0.113.9, 10.0.0.1, 10.0.0.2", "203.0.113.9"),
        ("garbage", "127.0.0.1"),  # unparseable: trust nothing from the header
        ("203.0.113.9, garbage", "127.0.0.1"),
        ("10.0.0.1", "127.0.0.1"),  # only trusted hops: the peer
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("", "127.0.0.1"),
    ],
)
async def test_trusted_proxy_chain_resolution(
    xff: str,
    client: str,
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream, extra=_clients(**TRUSTED)))
    assert (await _ask(gw.port, [("X-Forwarded-For", xff)])).status == 204
    assert _logged_clients(log_capture) == [client]
    [req] = strict_upstream.requests
    # From a trusted proxy the chain is kept and the peer appended.
    assert req.all("X-Forwarded-For") == [f"{xff}, 127.0.0.1"]


async def test_deny_list_applies_to_the_resolved_address(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            extra=_clients(**TRUSTED, deny='["203.0.113.0/24", "2001:db8::/32"]'),
        )
    )
    for xff in ("203.0.113.9", "6.6.6.6, 203.0.113.9", "2001:db8::5", "::ffff:203.0.113.1"):
        resp = await _ask(gw.port, [("X-Forwarded-For", xff)])
        assert resp.status == 403, xff
        # 403 comes before authentication: no token needed to be refused.
        assert (await _ask(gw.port, [("X-Forwarded-For", xff)], token=None)).status == 403
    # Hiding behind an extra spoofed hop does not help, neither does a
    # trusted-looking hop appended by the client.
    resp = await _ask(gw.port, [("X-Forwarded-For", "203.0.113.9, 10.9.9.9")])
    assert resp.status == 403
    assert (await _ask(gw.port, [("X-Forwarded-For", "198.51.100.1")])).status == 204
    assert len(strict_upstream.requests) == 1
    assert gw.stats.limit_rejections == {"client_denied": 9}


async def test_allow_list_refuses_everyone_else(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(strict_upstream, extra=_clients(**TRUSTED, allow='["198.51.100.0/24"]'))
    )
    assert (await _ask(gw.port, [("X-Forwarded-For", "198.51.100.7")])).status == 204
    assert (await _ask(gw.port, [("X-Forwarded-For", "203.0.113.7")])).status == 403
    assert (await _ask(gw.port, [])).status == 403  # the proxy itself is not allowed
    assert (await _ask(gw.port, [("X-Forwarded-For", "not-an-ip")])).status == 403
    assert len(strict_upstream.requests) == 1


async def test_deny_wins_over_allow(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            extra=_clients(**TRUSTED, allow='["198.51.100.0/24"]', deny='["198.51.100.66/32"]'),
        )
    )
    assert (await _ask(gw.port, [("X-Forwarded-For", "198.51.100.65")])).status == 204
    assert (await _ask(gw.port, [("X-Forwarded-For", "198.51.100.66")])).status == 403


async def test_cf_connecting_ip_replaces_xff_when_configured(
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            extra=_clients(
                **TRUSTED, client_ip_header='"CF-Connecting-IP"', deny='["203.0.113.0/24"]'
            ),
        )
    )
    # XFF is now just a header: it cannot pick the address.
    ok = [("CF-Connecting-IP", "198.51.100.4"), ("X-Forwarded-For", "203.0.113.9")]
    assert (await _ask(gw.port, ok)).status == 204
    bad = [("CF-Connecting-IP", "203.0.113.9"), ("X-Forwarded-For", "198.51.100.4")]
    assert (await _ask(gw.port, bad)).status == 403
    # A list is not an address: the peer is used.
    assert (await _ask(gw.port, [("CF-Connecting-IP", "203.0.113.9, 1.1.1.1")])).status == 204
    assert _logged_clients(log_capture) == ["198.51.100.4", "203.0.113.9", "127.0.0.1"]


def _credentials(ingest_cidrs: str) -> str:
    return f"""
[[credentials]]
name = "ingest"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]
allow_cidrs = {ingest_cidrs}

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["remote_write"]
"""


async def test_per_credential_allow_cidrs(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A stolen token is useless from outside its sender's network."""
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            extra=_clients(**TRUSTED),
            credentials=_credentials('["198.51.100.0/24"]'),
        )
    )
    inside = [("X-Forwarded-For", "198.51.100.20")]
    outside = [("X-Forwarded-For", "203.0.113.20")]
    assert (await _ask(gw.port, inside)).status == 204
    assert (await _ask(gw.port, outside)).status == 403
    assert (await _ask(gw.port, outside, token=OTHER_TOKEN)).status == 204
    # Unauthenticated from outside: 401, the credential's rule is not revealed.
    assert (await _ask(gw.port, outside, token="nope-0123456789abcdef")).status == 401
    assert [r.body for r in strict_upstream.requests] == [b"x", b"x"]
    assert gw.stats.limit_rejections == {"client_denied": 1}


async def test_denied_otlp_client_gets_403_protobuf(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(
        hostile_config(strict_upstream, extra=_clients(deny='["127.0.0.1/32"]'))
    )
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/v1/traces", b"x", token=TOKEN))
        resp = await conn.response()
    assert resp.status == 403
    assert resp.header("Content-Type") == "application/x-protobuf"
    assert strict_upstream.conns == []


async def test_one_ipv6_64_is_one_throttled_address(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A host owns its whole /64: at 70f0a08 a fresh address from it per
    attempt was never throttled.  Clients behind a trusted proxy, so the
    test can speak from IPv6 addresses over 127.0.0.1."""
    limits = "[limits]\nauth_failure_limit = 3\n"
    gw = await start_gateway(
        hostile_config(strict_upstream, extra=_clients(**TRUSTED) + "\n" + limits)
    )
    bad = "wrong-token-0123456789abcdef"
    statuses = [
        (await _ask(gw.port, [("X-Forwarded-For", f"2001:db8:7:1::{i:x}")], token=bad)).status
        for i in range(1, 6)
    ]
    assert statuses == [401, 401, 401, 429, 429]
    # Its neighbour /64 is someone else; a valid token from the /64 still works.
    assert (await _ask(gw.port, [("X-Forwarded-For", "2001:db8:7:2::1")], token=bad)).status == 401
    assert (await _ask(gw.port, [("X-Forwarded-For", "2001:db8:7:1::99")])).status == 204
    assert gw.stats.limit_rejections == {"auth_throttle": 2}


# Fields that name the client or the original request as some proxy saw it.
# At 70f0a08 X-Real-IP and CF-Connecting-IP always reached the upstream, and
# every other one of these too; now only what the gateway itself sends does.
CLIENT_COPIES = [
    ("X-Real-IP", "203.0.113.9"),
    ("x-real-ip", "203.0.113.9"),
    ("CF-Connecting-IP", "203.0.113.9"),
    ("CF-Connecting-IPv6", "2001:db8::9"),
    ("True-Client-IP", "203.0.113.9"),
    ("X-Client-IP", "203.0.113.9"),
    ("X-Cluster-Client-IP", "203.0.113.9"),
    ("Fastly-Client-IP", "203.0.113.9"),
    ("Forwarded", "for=203.0.113.9;host=evil.example;proto=https"),
    ("FORWARDED", "for=203.0.113.9"),
    ("X-Forwarded", "for=203.0.113.9"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "8443"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-Server", "evil.example"),
    ("X-Forwarded-Proto", "https"),
]
OWN = {"x-forwarded-for", "x-forwarded-proto", "x-real-ip"}


def _sent_by_the_gateway(names: set[str]) -> set[str]:
    copies = {name.lower() for name, _ in CLIENT_COPIES}
    return names & (copies | OWN)


async def test_no_client_copy_of_an_address_header_reaches_the_upstream(
    start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """From an untrusted peer the upstream sees what the gateway knows: the
    peer as X-Forwarded-For and X-Real-IP, and the scheme it was reached on."""
    gw = await start_gateway(hostile_config(strict_upstream))
    assert (await _ask(gw.port, CLIENT_COPIES)).status == 204
    [req] = strict_upstream.requests
    assert _sent_by_the_gateway(req.names()) == OWN
    assert req.all("X-Forwarded-For") == ["127.0.0.1"]
    assert req.all("X-Real-IP") == ["127.0.0.1"]
    assert req.all("X-Forwarded-Proto") == ["http"]
    for claim in (b"203.0.113.9", b"2001:db8::9", b"evil.example", b"8443", b"/evil"):
        assert claim not in strict_upstream.received, claim
    assert strict_upstream.errors == []


@pytest.mark.parametrize(
    ("header", "claim", "client"),
    [
        ("X-Forwarded-For", "6.6.6.6, 203.0.113.9", "203.0.113.9"),
        ("CF-Connecting-IP", "198.51.100.4", "198.51.100.4"),
        ("X-Real-IP", "198.51.100.5", "198.51.100.5"),
        ("X-Real-IP", "not-an-address", "127.0.0.1"),
    ],
)
async def test_from_a_trusted_proxy_the_upstream_gets_the_chain_and_the_resolved_client(
    header: str,
    claim: str,
    client: str,
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
) -> None:
    """The configured header names the client; X-Real-IP carries the address
    the gateway resolved from it, the X-Forwarded-For chain is kept with the
    peer appended; every other copy is dropped, even from a trusted proxy
    (it passes its own client's copies on unchanged)."""
    gw = await start_gateway(
        hostile_config(strict_upstream, extra=_clients(**TRUSTED, client_ip_header=f'"{header}"'))
    )
    others = [(n, v) for n, v in CLIENT_COPIES if n.lower() != header.lower()]
    headers = [*others, (header, claim)]
    if header != "X-Forwarded-For":
        headers.append(("X-Forwarded-For", "192.0.2.44"))
    assert (await _ask(gw.port, headers)).status == 204
    [req] = strict_upstream.requests
    assert _sent_by_the_gateway(req.names()) == OWN
    assert req.all("X-Real-IP") == [client]
    chain = claim if header == "X-Forwarded-For" else "192.0.2.44"
    assert req.all("X-Forwarded-For") == [f"{chain}, 127.0.0.1"]
    assert req.all("X-Forwarded-Proto") == ["http"]
    for header_name in ("CF-Connecting-IP", "Forwarded", "X-Forwarded-Host", "True-Client-IP"):
        assert req.all(header_name) == [], header_name
