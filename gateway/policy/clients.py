"""Client addresses: who sent a request, and whether they may.

The address is the socket peer unless the peer is a trusted proxy (e.g.
Cloudflare's ranges), in which case the configured header names the
client: ``CF-Connecting-IP`` / ``X-Real-IP`` directly, ``X-Forwarded-For``
by its right-most address that is not itself a trusted proxy.  From an
untrusted peer the header is ignored, so nobody can pick their own
address.  Deny lists win over allow lists; an empty allow list allows all.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Final

from gateway.config.schema import ClientsSpec

__all__ = ["ClientPolicy", "cert_subject", "networks", "within"]

Network = IPv4Network | IPv6Network
_CACHE_LIMIT: Final = 4096


def networks(values: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ip_network(v, strict=False) for v in values)


def _parse(value: str) -> IPv4Address | IPv6Address | None:
    try:
        addr = ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def within(address: str, nets: tuple[Network, ...]) -> bool:
    addr = _parse(address)
    return addr is not None and any(addr in net for net in nets)


class ClientPolicy:
    __slots__ = (
        "_allow",
        "_deny",
        "_trusted",
        "_trusted_cache",
        "filtering",
        "header",
        "proxied",
        "xff",
    )

    def __init__(self, spec: ClientsSpec) -> None:
        self._trusted = networks(spec.trusted_proxies)
        self._allow = networks(spec.allow)
        self._deny = networks(spec.deny)
        self.header = spec.client_ip_header.lower().encode()
        self.xff = self.header == b"x-forwarded-for"
        self._trusted_cache: dict[str, bool] = {}
        # Plain attributes: read on every request.
        self.filtering = bool(self._allow or self._deny)
        self.proxied = bool(self._trusted)

    def trusted(self, peer: str) -> bool:
        if not self._trusted:
            return False
        known = self._trusted_cache.get(peer)
        if known is None:
            if len(self._trusted_cache) >= _CACHE_LIMIT:
                self._trusted_cache.clear()
            known = self._trusted_cache[peer] = within(peer, self._trusted)
        return known

    def resolve(self, peer: str, value: bytes | None) -> str:
        """The client address of a request arriving from ``peer``."""
        if value is None or not self.trusted(peer):
            return peer
        text = value.decode("latin-1")
        if not self.xff:
            addr = _parse(text.strip())
            return str(addr) if addr is not None else peer
        for part in reversed(text.split(",")):
            addr = _parse(part.strip())
            if addr is None:
                return peer  # a malformed hop: trust nothing to its left
            if not within(str(addr), self._trusted):
                return str(addr)
        return peer

    def permitted(self, address: str) -> bool:
        if self._deny and within(address, self._deny):
            return False
        return not self._allow or within(address, self._allow)


# RFC 4514 short names for the client-certificate subject string.
_RDN: Final = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _escape(value: str) -> str:
    """RFC 4514 §2.4 escaping of an attribute value."""
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def cert_subject(cert: dict[str, object]) -> str:
    """A peer certificate's subject (``ssl.getpeercert()``) as an RFC 4514
    string: the last RDN of the DER sequence first (what ``openssl x509
    -noout -subject -nameopt RFC2253`` and cryptography's
    ``rfc4514_string()`` print)."""
    rdns: Iterable[Iterable[tuple[str, str]]] = cert.get("subject", ())  # type: ignore[assignment]
    parts = [
        "+".join(f"{_RDN.get(name, name)}={_escape(value)}" for name, value in rdn)
        for rdn in reversed(list(rdns))
    ]
    return ",".join(parts)
