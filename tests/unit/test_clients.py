"""clients, in memory: the client address behind trusted proxies, the
allow/deny rules, and the certificate subject string."""

from __future__ import annotations

import pytest

from gateway.config.schema import ClientsSpec
from gateway.policy.clients import ClientPolicy, cert_subject, networks, within

CF = ClientPolicy(ClientsSpec(trusted_proxies=("173.245.48.0/20", "2400:cb00::/32")))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # From an untrusted peer the header means nothing.
        ("198.51.100.7", b"203.0.113.9", "198.51.100.7"),
        # From a trusted proxy: the right-most address that is not a proxy.
        ("173.245.48.1", b"203.0.113.9", "203.0.113.9"),
        ("173.245.48.1", b"1.1.1.1, 203.0.113.9", "203.0.113.9"),
        ("173.245.48.1", b"203.0.113.9, 173.245.48.5", "203.0.113.9"),
        ("173.245.48.1", b"203.0.113.9,173.245.48.5 , 173.245.48.6", "203.0.113.9"),
        # A malformed hop: trust nothing to its left.
        ("173.245.48.1", b"203.0.113.9, not-an-ip", "173.245.48.1"),
        # Only proxies in the chain: the peer.
        ("173.245.48.1", b"173.245.48.9", "173.245.48.1"),
        ("173.245.48.1", None, "173.245.48.1"),
        # IPv4-mapped IPv6 is the IPv4 address.
        ("173.245.48.1", b"::ffff:203.0.113.9", "203.0.113.9"),
        ("2400:cb00::1", b"2001:db8::5", "2001:db8::5"),
    ],
)
def test_x_forwarded_for(peer: str, xff: bytes | None, expected: str) -> None:
    assert CF.resolve(peer, xff) == expected


def test_single_address_headers() -> None:
    policy = ClientPolicy(
        ClientsSpec(trusted_proxies=("127.0.0.1/32",), client_ip_header="CF-Connecting-IP")
    )
    assert policy.header == b"cf-connecting-ip"
    assert policy.resolve("127.0.0.1", b" 203.0.113.9 ") == "203.0.113.9"
    assert policy.resolve("127.0.0.1", b"203.0.113.9, 1.1.1.1") == "127.0.0.1"
    assert policy.resolve("10.0.0.1", b"203.0.113.9") == "10.0.0.1"


def test_deny_wins_and_an_empty_allow_list_allows_all() -> None:
    policy = ClientPolicy(ClientsSpec(allow=("10.0.0.0/8",), deny=("10.6.6.0/24",)))
    assert policy.filtering
    assert policy.permitted("10.1.1.1")
    assert not policy.permitted("10.6.6.6")
    assert not policy.permitted("192.0.2.1")
    assert not policy.permitted("not-an-address")
    open_policy = ClientPolicy(ClientsSpec(deny=("10.6.6.0/24",)))
    assert open_policy.permitted("192.0.2.1")
    assert not ClientPolicy(ClientsSpec()).filtering


def test_trusted_cache_is_bounded() -> None:
    for i in range(5000):
        CF.trusted(f"198.18.{i // 256}.{i % 256}")
    assert len(CF._trusted_cache) <= 4096


def test_within_needs_an_address() -> None:
    nets = networks(("192.0.2.0/24",))
    assert within("192.0.2.9", nets)
    assert not within("", nets)
    assert not within("192.0.2.9/32", nets)


def test_cert_subject_is_rfc4514_last_rdn_first_and_escaped() -> None:
    cert: dict[str, object] = {
        "subject": (
            (("countryName", "US"),),
            (("organizationName", "Example, Inc."),),
            (("commonName", "#edge+1 "),),
        )
    }
    assert cert_subject(cert) == r"CN=\#edge\+1\ ,O=Example\, Inc.,C=US"
    assert cert_subject({}) == ""
