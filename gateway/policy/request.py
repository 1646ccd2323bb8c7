"""One request head as the gateway needs it, built while llhttp parses.

The client connection feeds each header to ``RequestHead.header`` as it is
parsed (one pass, no list of pairs to walk again): framing and auth fields
are taken out, hop-by-hop fields dropped (RFC 9110 §7.6.1), so are the
client's copies of address fields (``headers.CLIENT_ADDRESS``) and names
with an underscore (set aside: some backends fold ``_`` into ``-``),
end-to-end fields kept as ready-to-send bytes (four pieces per field:
name, ": ", value, CRLF).  ``finish`` applies the checks that need the
whole head, and ``upstream_head`` renders what the upstream gets, with the
fields a credential pins in place of the client's copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from gateway.policy.headers import CLIENT_ADDRESS, REQUEST_DROP, connection_tokens, strip_listed
from gateway.policy.routing import split_target

if TYPE_CHECKING:
    import httptools

    from gateway.policy.forward import PinnedHeaders

__all__ = ["RequestHead"]

# How each request header is treated, by its name as sent.  Names repeat
# from request to request, so the lowercasing and set lookups are done
# once per spelling (bounded; unusual spellings just pay them again).
_FORWARD: Final = 0
_AUTHORIZATION: Final = 1
_CONTENT_LENGTH: Final = 2
_CONTENT_TYPE: Final = 3
_DROP: Final = 4
_TRANSFER_ENCODING: Final = 5
_REQUEST_ID: Final = 6
_CONNECTION: Final = 7
_EXPECT: Final = 8
_XFF: Final = 9
_CLIENT_IP: Final = 10
_HOST: Final = 11
_UNDERSCORE: Final = 12
_SPECIAL: Final = {
    b"authorization": _AUTHORIZATION,
    b"content-length": _CONTENT_LENGTH,
    b"content-type": _CONTENT_TYPE,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"x-request-id": _REQUEST_ID,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,
    b"x-forwarded-for": _XFF,
    b"cf-connecting-ip": _CLIENT_IP,
    b"x-real-ip": _CLIENT_IP,
    b"host": _HOST,
}
_KNOWN: Final[dict[bytes, tuple[bytes, int]]] = {}
_KNOWN_MAX: Final = 1024


def _classify(name: bytes) -> tuple[bytes, int]:
    lname = name.lower()
    action = _SPECIAL.get(lname)
    if action is not None:
        pass
    elif b"_" in lname:
        action = _UNDERSCORE
    elif lname in REQUEST_DROP or lname in CLIENT_ADDRESS or lname.startswith(b"x-forwarded-"):
        action = _DROP
    else:
        action = _FORWARD
    entry = (lname, action)
    if len(_KNOWN) < _KNOWN_MAX:
        _KNOWN[name] = entry
    return entry


class RequestHead:
    """A parsed request head: what dispatch and the upstream head need."""

    __slots__ = (
        "_client_ips",
        "_hosts",
        "_listed",
        "_rid",
        "authorization",
        "bad_framing",
        "chunked",
        "client_ip",
        "content_length",
        "expect_continue",
        "forward",
        "has_body",
        "http11",
        "json",
        "keep_alive",
        "malformed",
        "method",
        "otlp_encoded",
        "path",
        "pinned_dropped",
        "query",
        "request_id",
        "t0",
        "underscored",
        "upgrade",
        "version",
        "xff",
    )

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.authorization: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.bad_framing = False
        self.expect_continue = False
        self.json = False
        self.otlp_encoded = False  # Content-Type is OTLP/HTTP's (protobuf or JSON)
        self.xff: bytes | None = None
        self.forward: list[bytes] = []  # the client's fields: name, b": ", value, b"\r\n", ...
        self._client_ips: dict[bytes, bytes] | None = None
        self._hosts = 0
        self._rid: bytes | None = None
        self._listed: list[bytes] | None = None
        # Names with "_": name, value, ...; after upstream_head, the dropped ones.
        self.underscored: list[bytes] | None = None

    # Called once per header: one if-chain on the cached action costs less
    # than a table of bound methods (a Python call per header fewer).
    def header(self, name: bytes, value: bytes) -> None:  # noqa: PLR0912
        entry = _KNOWN.get(name)
        if entry is None:
            entry = _classify(name)
        action = entry[1]
        if action == _FORWARD:
            self.forward += (name, b": ", value, b"\r\n")
        elif action == _AUTHORIZATION:
            # A second Authorization header is ambiguous: treat as malformed.
            self.authorization = value if self.authorization is None else b"\x00"
        elif action == _CONTENT_LENGTH:
            self.content_length = int(value)  # llhttp validated it
        elif action == _CONTENT_TYPE:
            self.json = value[:16].lower() == b"application/json"
            self.otlp_encoded = self.json or value[:22].lower() == b"application/x-protobuf"
            self.forward += (name, b": ", value, b"\r\n")
        elif action == _DROP:
            pass
        elif action == _TRANSFER_ENCODING:
            self.chunked = True
            # llhttp only insists that chunked comes last; other codings
            # would reach the upstream undecoded.  RFC 9112 §6.1.
            if value.strip().lower() != b"chunked":
                self.bad_framing = True
        elif action == _HOST:
            self._hosts += 1
        elif action == _REQUEST_ID:
            self._rid = value  # forwarded by finish() if usable, else replaced
        elif action == _CONNECTION:
            self._listed = [*(self._listed or []), value]
        elif action == _EXPECT:
            self.expect_continue = value.strip().lower() == b"100-continue"
        elif action == _XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif action == _CLIENT_IP:  # CF-Connecting-IP / X-Real-IP: read, never copied
            if self._client_ips is None:
                self._client_ips = {}
            self._client_ips[entry[0]] = value
        else:  # _UNDERSCORE: forwarded or not by upstream_head, per config
            if self.underscored is None:
                self.underscored = []
            self.underscored += (name, value)

    def finish(
        self,
        parser: httptools.HttpRequestParser,
        url: bytes,
        request_id: bytes,
        client_header: bytes,
    ) -> None:
        """What needs the whole head: request line, framing and id checks."""
        self.method: bytes = parser.get_method()
        version = self.version = parser.get_http_version()
        self.http11 = version == "1.1"
        self.keep_alive: bool = parser.should_keep_alive()
        self.upgrade: bool = parser.should_upgrade()
        self.path, self.query = split_target(url)
        if self._listed is not None:
            self.forward = strip_listed(self.forward, self._listed)
        rid = self._rid
        if rid is None or len(rid) > 128 or not rid.isascii():
            rid = request_id
        self.request_id = rid  # sent by upstream_head; decoded only when logged
        if client_header == b"x-forwarded-for":
            self.client_ip = self.xff
        else:
            ips = self._client_ips
            self.client_ip = ips.get(client_header) if ips else None
        self.has_body = self.chunked or bool(self.content_length)
        if self.chunked and not self.http11:
            # RFC 9112 §6.1: an HTTP/1.0 sender may not know chunked framing,
            # so what follows this message cannot be trusted: close after it.
            self.keep_alive = False
        # RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host; and only
        # HTTP/1.x is spoken here (a 2.0 request line is not HTTP/2).
        hosts = self._hosts
        self.malformed = (hosts != 1 if self.http11 else hosts > 1) or version not in (
            "1.1",
            "1.0",
        )
        if self.upgrade and self.has_body:
            # llhttp stops parsing at an Upgrade head, so its body would be
            # taken for the next request.  We never upgrade.
            self.bad_framing = True

    def finish_h2(
        self,
        method: bytes,
        target: bytes,
        request_id: bytes,
        client_header: bytes,
        has_body: bool,
    ) -> None:
        """``finish`` for an HTTP/2 request: its pseudo-headers were taken out
        (h2 checked they are present once and well formed) and the regular
        fields went through ``header``, so both protocols share one policy."""
        self.method = method
        self.version = "2"
        self.http11 = True
        self.keep_alive = True
        self.upgrade = False
        self.path, self.query = split_target(target)
        rid = self._rid
        if rid is None or len(rid) > 128 or not rid.isascii():
            rid = request_id
        self.request_id = rid  # sent by upstream_head, or by the gRPC exchange
        if client_header == b"x-forwarded-for":
            self.client_ip = self.xff
        else:
            ips = self._client_ips
            self.client_ip = ips.get(client_header) if ips else None
        self.has_body = has_body
        # HTTP/2 framing is the frames': a declared length is only a claim
        # (h2 holds the DATA to it), Host is :authority.
        self.malformed = self._hosts > 1 or self.chunked
        # Relayed to an HTTP/1.1 upstream, a body of no declared length goes
        # chunked (RFC 9112 §7): HTTP/2 delimits it by END_STREAM alone.
        self.chunked = has_body and self.content_length is None

    def h2_fields(self) -> list[tuple[bytes, bytes]]:
        """The end-to-end fields as (name, value) pairs, names lowercase
        (HTTP/2 requires it, h2 enforces it on input)."""
        f = self.forward
        return list(zip(f[0::4], f[2::4], strict=True))

    def upstream_head(
        self,
        target: bytes,
        host: bytes,
        peer: bytes,
        trusted: bool,
        scheme: bytes,
        client: bytes,
        underscores: bool,
        pinned: PinnedHeaders | None = None,
    ) -> bytes:
        """``client`` is the resolved client address (X-Real-IP);
        ``underscores`` keeps names with "_" that fold into no other field
        (``[server] underscores_in_headers``); ``pinned``: the credential's
        fields, whose client copies, in any spelling, are counted in
        ``pinned_dropped`` and not sent."""
        # A forwarding chain is only kept from a trusted proxy; from anyone
        # else it could be invented, so the upstream sees the peer alone.
        xff = self.xff + b", " + peer if trusted and self.xff is not None else peer
        if underscores and self.underscored is not None:
            self.forward, self.underscored = _fold(self.forward, self.underscored, self._listed)
        forward = self.forward
        ours: tuple[bytes, ...] = ()
        if pinned is not None:
            # Last, over every field that would be sent (the "_" names kept
            # above included): no other step may add a client field after
            # this one.  Inline: no call when the client sent none of them.
            ours = pinned.lines
            folded = b"\n" + b"\n".join(forward[0::4]).lower().replace(b"_", b"-") + b"\n"
            if pinned.present(folded) is None:
                self.pinned_dropped = 0
            else:
                forward, self.pinned_dropped = pinned.strip(forward, folded)
        if self.chunked:
            framing = b"Transfer-Encoding: chunked\r\n\r\n"
        elif self.content_length is not None:
            framing = b"Content-Length: %d\r\n\r\n" % self.content_length
        else:
            framing = b"\r\n"
        return b"".join(
            (
                self.method,
                b" ",
                target,
                b" HTTP/1.1\r\nHost: ",
                host,
                b"\r\n",
                *forward,
                *ours,
                b"X-Request-Id: ",
                self.request_id,
                b"\r\nX-Forwarded-For: ",
                xff,
                b"\r\nX-Forwarded-Proto: ",
                scheme,
                b"\r\nX-Real-IP: ",
                client,
                b"\r\n",
                framing,
            )
        )


def _fold(
    forward: list[bytes], underscored: list[bytes], listed: list[bytes] | None
) -> tuple[list[bytes], list[bytes]]:
    """Underscore names kept by config: (forward with them, those dropped).

    A backend that folds "_" into "-" must not see a field it would read as
    another: one the gateway handles itself (``Transfer_Encoding``,
    ``X_Real_IP``, ``Proxy_Authorization``, …) or one that another field of
    this request also folds into (``X-Foo_Bar`` beside ``X-Foo-Bar``); nor
    one that Connection names, as sent or folded.  Off the hot path: only
    requests that carry such a name get here.
    """
    hop = connection_tokens(listed) if listed is not None else frozenset()
    spellings: dict[bytes, set[bytes]] = {}
    for i in range(0, len(forward), 4):
        lname = forward[i].lower()
        spellings.setdefault(lname, set()).add(lname)
    for i in range(0, len(underscored), 2):
        lname = underscored[i].lower()
        spellings.setdefault(lname.replace(b"_", b"-"), set()).add(lname)
    kept: list[bytes] = []
    dropped: list[bytes] = []
    for i in range(0, len(underscored), 2):
        name, value = underscored[i], underscored[i + 1]
        lname = name.lower()
        folded = lname.replace(b"_", b"-")
        entry = _KNOWN.get(folded) or _classify(folded)
        ordinary = entry[1] == _FORWARD and lname not in hop and folded not in hop
        if ordinary and len(spellings[folded]) == 1:
            kept += (name, b": ", value, b"\r\n")
        else:
            dropped += (name, value)
    return forward + kept, dropped
