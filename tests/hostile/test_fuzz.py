"""Fuzzing: hypothesis properties of the pure modules (bearer parsing, header
filtering, config decoding, the error mapping) and a bounded, seeded fuzz
run of the HTTP entry point over a real socket.

The socket run mutates valid requests (and sends some pure noise), 8000
cases or 20 s, whichever comes first (about 5 s on two cores), and checks
that the gateway never answers 500, never lets an exception escape, never
logs an internal fault, never forwards anything but a configured route,
keeps serving, and ends with no connection, slot or in-flight count left.
A failing case prints its seed and bytes so it can be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httptools
import pytest
from google.rpc import status_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.config.loader import ConfigError, loads
from gateway.policy.auth import Authenticator, Failure, Principal
from gateway.policy.errors import ErrorRenderer, Kind, Protocol, grpc_trailers_only, status_of
from gateway.policy.generation import Generation
from gateway.policy.headers import (
    CLIENT_ADDRESS,
    HOP_BY_HOP,
    REQUEST_DROP,
    connection_tokens,
    drop_listed,
)
from tests.conftest import OTHER_TOKEN, TOKEN, StartGateway, config_text, sha256, wait_for
from tests.hostile.conftest import hostile_config
from tests.support.client import raw_client
from tests.support.heads import ParsedHead
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import (
    ParsedRequest,
    Response,
    parse_request,
    parse_response,
    parse_statuses,
)

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- bearer parsing ---------------------------------------------------------------

JWT_SECRET = "jwt-hmac-secret-0123456789abcdef0123456789abcdef"
JWT_CREDENTIAL = """
[[credentials]]
name = "apps"
routes = ["remote_write"]
[credentials.jwt]
algorithms = ["HS256"]
issuer = "https://issuer.test"
audience = "obs-gateway"
hmac_secret_env = "FUZZ_JWT_SECRET"
"""
TOKENS = {TOKEN.encode(): "ingest", OTHER_TOKEN.encode(): "other"}


def _authenticator() -> Authenticator:
    base = config_text()
    settings_ = loads(base + JWT_CREDENTIAL, environ={"FUZZ_JWT_SECRET": JWT_SECRET})
    return Authenticator(settings_.credentials)


AUTH = _authenticator()
NOW = time.time()


def _configured(header: bytes) -> str | None:
    """The credential a header *should* authenticate as (static tokens only).
    Whitespace around the field value is not part of it (RFC 9110 §5.5)."""
    header = header.strip(b" \t")
    if header[:7].lower() != b"bearer ":
        return None
    return TOKENS.get(header[7:].lstrip(b" "))


@PROPERTY
@given(st.one_of(st.none(), st.binary(max_size=6000)))
def test_authenticate_never_raises_on_any_bytes(header: bytes | None) -> None:
    result = AUTH.authenticate(header, NOW)
    assert isinstance(result, Principal | Failure)
    if isinstance(result, Principal):
        assert header is not None
        assert _configured(header) == result.credential


_SCHEME = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR", "Bearer\t", "Basic", "Bearerx"])


@PROPERTY
@given(
    scheme=_SCHEME,
    spaces=st.text(alphabet=" \t", min_size=0, max_size=4),
    token=st.one_of(
        st.sampled_from([TOKEN, OTHER_TOKEN]),
        st.text(min_size=0, max_size=200),
        st.from_regex(r"[A-Za-z0-9_-]{1,80}\.[A-Za-z0-9_-]{0,200}\.[A-Za-z0-9_-]{0,80}"),
    ),
    tail=st.sampled_from(["", " ", "x", "\x00", " extra"]),
)
def test_bearer_variants_authenticate_only_configured_tokens(
    scheme: str, spaces: str, token: str, tail: str
) -> None:
    header = f"{scheme}{spaces}{token}{tail}".encode(errors="surrogatepass")
    result = AUTH.authenticate(header, NOW)
    expected = _configured(header)
    if expected is None:
        assert isinstance(result, Failure), header
        assert result.reason in {"malformed", "unknown", "jwt_invalid", "missing"}
    else:
        assert isinstance(result, Principal)
        assert result.credential == expected
    # Nothing the client sent is ever carried in the answer.
    if len(token) >= 8:
        assert token not in repr(result)


@PROPERTY
@given(
    st.sampled_from([TOKEN, OTHER_TOKEN]),
    st.integers(min_value=0, max_value=200),
    st.sampled_from(["flip", "drop", "add", "case"]),
)
def test_any_change_to_a_valid_token_fails(token: str, where: int, how: str) -> None:
    i = where % len(token)
    if how == "flip":
        mutated = token[:i] + chr(ord(token[i]) ^ 1) + token[i + 1 :]
    elif how == "drop":
        mutated = token[:i] + token[i + 1 :]
    elif how == "add":
        mutated = token[:i] + "a" + token[i:]
    else:
        mutated = token[:i] + token[i:].swapcase()
    assume(mutated != token)
    assert isinstance(AUTH.authenticate(b"Bearer " + mutated.encode(), NOW), Failure)


# -- header filtering -------------------------------------------------------------

_NAMES = st.one_of(
    st.sampled_from(
        [
            *sorted(n.decode() for n in REQUEST_DROP),
            *sorted(n.decode() for n in CLIENT_ADDRESS),
            *("X-Custom", "Content-Type", "X-Listed", "traceparent", "User-Agent", "X-Request-Id"),
            *("X-Forwarded-Host", "X_Custom", "X-Custom_", "Transfer_Encoding", "X-Real_IP"),
            *("X_Listed", "Content_Type", "X-Forwarded_For", "traceparent_"),
        ]
    ).flatmap(
        lambda n: st.builds(
            lambda flips: "".join(c.upper() if f else c for c, f in zip(n, flips, strict=False)),
            st.lists(st.booleans(), min_size=len(n), max_size=len(n)),
        )
    ),
    st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20}", fullmatch=True),
)
_VALUES = st.from_regex(r"[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?", fullmatch=True)


@PROPERTY
@given(
    headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=25),
    connection=st.lists(st.lists(_NAMES, min_size=1, max_size=4).map(" , ".join), max_size=3),
)
def test_drop_listed_removes_exactly_the_named_fields(
    headers: list[tuple[str, str]], connection: list[str]
) -> None:
    raw = [(n.encode(), v.encode()) for n, v in headers]
    listed = connection_tokens([c.encode() for c in connection])
    named = {t.strip().lower() for c in connection for t in c.split(",") if t.strip()}
    assert listed == frozenset(t.encode() for t in named)
    kept = drop_listed(raw, listed)
    assert kept == [(n, v) for n, v in raw if n.lower() not in listed]  # order preserved


@PROPERTY
@given(
    headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=30),
    connection=st.lists(st.lists(_NAMES, min_size=1, max_size=3).map(", ".join), max_size=2),
    chunked=st.booleans(),
    underscores=st.booleans(),
)
def test_upstream_head_carries_no_hop_by_hop_field(
    headers: list[tuple[str, str]], connection: list[str], chunked: bool, underscores: bool
) -> None:
    """Whatever the client sends, the head built for the upstream is one
    well-formed request with our framing, Host and X-Forwarded-*, none of
    the hop-by-hop, listed, credential or client-address fields, and no
    two fields that a backend folding "_" into "-" would read as one."""
    lines = ["POST /api/v1/write HTTP/1.1", "Host: client.example"]
    lines += [
        f"{n}: {v}"
        for n, v in headers
        if n.lower() not in ("content-length", "transfer-encoding", "host", "upgrade")
    ]
    lines += [f"Connection: {c}" for c in connection]
    lines.append("Transfer-Encoding: chunked" if chunked else "Content-Length: 4")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    sink = ParsedHead()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserError:
        return  # refused by llhttp: never reaches RequestHead
    assume(sink.done)
    head = sink.head
    head.finish(parser, sink.url, b"rid-1", b"x-forwarded-for")
    assert not head.malformed
    out = head.upstream_head(
        b"/api/v1/write", b"upstream:8428", b"127.0.0.1", False, b"http", b"127.0.0.1", underscores
    )
    body = b"4\r\nabcd\r\n0\r\n\r\n" if chunked else b"abcd"
    req, used = parse_request(out + body)
    assert used == len(out + body)
    assert req.body == b"abcd"
    names = req.names()
    # Connection fields may also come from the generated headers, in any case.
    values = [*connection, *(v for n, v in headers if n.lower() == "connection")]
    listed = {t.strip().lower() for c in values for t in c.split(",")}
    assert not (names & {n.decode() for n in HOP_BY_HOP} - {"transfer-encoding"})
    assert "authorization" not in names
    assert "expect" not in names
    assert req.all("Host") == ["upstream:8428"]
    assert req.all("X-Forwarded-For") == ["127.0.0.1"]
    assert req.all("X-Forwarded-Proto") == ["http"]
    assert req.all("X-Real-IP") == ["127.0.0.1"]
    # X-Request-Id: the gateway adds its own when the client sent none.
    own = {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-real-ip",
        "content-length",
        "transfer-encoding",
        "x-request-id",
    }
    for name in names - own:
        assert name not in listed, name
        assert name.encode() not in CLIENT_ADDRESS, name
        assert not name.startswith("x-forwarded-"), name
    folded: dict[str, set[str]] = {}
    for name in names:
        folded.setdefault(name.replace("_", "-"), set()).add(name)
    if underscores:
        for name in (n for n in names if "_" in n):
            assert len(folded[name.replace("_", "-")]) == 1, folded
            assert name.replace("_", "-") not in own | {"content-type"}, name
            assert name.replace("_", "-") not in listed, name
    else:
        assert not [n for n in names if "_" in n]
    # Every other field arrives, in order.
    expected = [
        (n, v)
        for n, v in (tuple(x.decode() for x in h) for h in sink.headers)
        if n.lower().encode() not in REQUEST_DROP | CLIENT_ADDRESS
        and not n.lower().startswith("x-forwarded-")
        and "_" not in n
        and n.lower() not in listed
    ]
    got = [(n, v) for n, v in req.headers if n.lower() not in own and "_" not in n]
    assert [h for h in got if h[0].lower() != "x-request-id"] == [
        h for h in expected if h[0].lower() != "x-request-id"
    ]


# -- config decoding ----------------------------------------------------------------

SECRET_ENV = "fuzz-secret-env-token-4f1d0c0ffee"
SECRET_FILE = "fuzz-secret-file-token-9a8b7c6d5e"
SECRET_PASTED = "fuzz-pasted-token-0123456789abcdef"
SECRETS = (SECRET_ENV, SECRET_FILE, SECRET_PASTED, JWT_SECRET)


def _toml(value: Any) -> str:
    """A TOML value (inline form) for hypothesis-made data."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _document(doc: dict[str, Any]) -> str:
    return "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items()) + "\n"


def _base(tmp: Path) -> dict[str, Any]:
    (tmp / "token").write_text(SECRET_FILE)
    return {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "workers": 1},
        "upstream": {"connect_timeout_seconds": 1.0},
        "clients": {"trusted_proxies": ["10.0.0.0/8"], "allow": [], "deny": []},
        "limits": {"max_connections": 10, "queue_size": 1},
        "routes": [
            {
                "name": "remote_write",
                "path": "/api/v1/write",
                "protocol": "prometheus-remote-write",
                "upstream": "http://127.0.0.1:8428/api/v1/write",
            },
            {
                "name": "otlp_traces",
                "path": "/v1/traces",
                "protocol": "otlp-http",
                "upstream": "http://127.0.0.1:4318/v1/traces",
            },
        ],
        "credentials": [
            {"name": "env", "token_env": "FUZZ_TOKEN", "routes": ["remote_write"]},
            {"name": "file", "token_file": "token", "routes": ["otlp_traces"]},
            {
                "name": "rot",
                "routes": ["remote_write"],
                "tokens": [{"id": "a", "sha256": sha256(b"x" * 20)}],
                "revoked": [{"id": "b", "sha256": sha256(b"y" * 20)}],
            },
            {
                "name": "jwt",
                "routes": ["remote_write"],
                "jwt": {
                    "algorithms": ["HS256"],
                    "issuer": "i",
                    "audience": "a",
                    "hmac_secret_env": "FUZZ_JWT_SECRET",
                },
            },
        ],
    }


_LEAF = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "127.0.0.1:99999",
            "[::1]:80",
            "http://ö..x/api",
            "http://127.0.0.1:0/x",
            "https://h/x#frag",
            "http://u:p@h/x",
            "/health",
            "/api/v1/write",
            "remote_write",
            "10.0.0.0/33",
            "::/0",
            SECRET_PASTED,
            "none",
            "FUZZ_TOKEN",
            "token",
        ]
    ),
    st.datetimes(timezones=st.sampled_from([dt.UTC, None])),
)
_VALUE = st.recursive(
    _LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["name", "path", "x", "id", "sha256"]), inner, max_size=3),
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: dict[str, Any], path: tuple[Any, ...], how: str, value: Any) -> None:
    *parents, last = path
    node: Any = doc
    for key in parents:
        node = node[key]
    if how == "delete":
        del node[last]
    elif how == "unknown" and isinstance(node, dict):
        node[f"{last}_unknown"] = value
    else:
        node[last] = value


@settings(max_examples=400, deadline=None, database=None)
@given(
    st.data(),
    st.lists(st.sampled_from(["set", "set", "delete", "unknown"]), min_size=1, max_size=4),
)
def test_config_mutations_raise_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, hows: list[str]
) -> None:
    """Any mutated config is either accepted, and then buildable into a
    serving generation, or refused with a ConfigError that names no secret."""
    tmp = tmp_path_factory.getbasetemp() / "fuzzcfg"
    tmp.mkdir(exist_ok=True)
    doc = _base(tmp)
    for how in hows:
        paths = _paths(doc)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        _mutate(doc, path, how, data.draw(_VALUE))
    text = _document(doc)
    env = {"FUZZ_TOKEN": SECRET_ENV, "FUZZ_JWT_SECRET": JWT_SECRET}
    try:
        settings_ = loads(text, environ=env, base=tmp)
    except ConfigError as exc:
        message = str(exc)
        assert message
        for secret in SECRETS:
            assert secret not in message, (secret, message)
        return
    # Accepted: what check-config accepts, the server must be able to serve.
    Generation.build(settings_)


_HOSTS = st.one_of(
    st.sampled_from(["127.0.0.1", "[::1]", "localhost", "ö..x", "a..b", "xn--", "é́.test", "-"]),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/?#@[]:"),
        min_size=1,
        max_size=70,
    ),
)


@PROPERTY
@given(
    scheme=st.sampled_from(["http", "https"]),
    host=_HOSTS,
    port=st.one_of(st.none(), st.integers(min_value=0, max_value=70000)),
)
def test_an_accepted_upstream_url_is_servable(scheme: str, host: str, port: int | None) -> None:
    """check-config must not accept an upstream the server cannot build
    (a reload with it would fail half-way, a start would crash)."""
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}/api/v1/write"
    try:
        settings_ = loads(config_text(rw_upstream=url))
    except ConfigError:
        return
    gen = Generation.build(settings_)
    up = gen.routes.routes[0].upstream
    assert up is not None
    if port is not None:
        assert up.port == port, url  # never silently another port (":0" became 80)


@PROPERTY
@given(st.text(max_size=400))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        loads(text, environ={})


@PROPERTY
@given(
    field=st.sampled_from(["token_sha256", "token_env"]),
    pasted=st.sampled_from([SECRET_PASTED, SECRET_ENV, f" {SECRET_PASTED}\n"]),
)
def test_a_token_pasted_into_a_secret_field_is_not_echoed(field: str, pasted: str) -> None:
    text = config_text(credentials=f'[[credentials]]\nname = "x"\n{field} = {json.dumps(pasted)}\n')
    with pytest.raises(ConfigError) as refused:
        loads(text, environ={}, base=Path("/nonexistent"))
    assert pasted.strip() not in str(refused.value)


# -- the error mapping ------------------------------------------------------------


def _parse_rendered(data: bytes) -> Response:
    resp, used = parse_response(data, eof=True)
    assert used == len(data), "bytes after the response"
    return resp


def test_error_mapping_every_kind_and_protocol() -> None:
    """Exhaustive: every answer the gateway makes is a well-formed 4xx/5xx,
    never 500; OTLP never 429; 429/503 carry Retry-After unless the upstream
    failed; bodies match the
    protocol (OTLP: google.rpc.Status in the request's encoding)."""
    renderer = ErrorRenderer("obs-gateway")
    date = b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
    for kind in Kind:
        fields = dict(grpc_trailers_only(kind))
        # gRPC: trailers-only HTTP 200; never UNKNOWN (2) or INTERNAL (13);
        # pushback exactly where HTTP/1.1 has Retry-After.
        assert fields[b":status"] == b"200"
        assert fields[b"content-type"] == b"application/grpc"
        code = int(fields[b"grpc-status"])
        assert code not in (0, 2, 13), kind
        assert fields[b"grpc-message"]
        pushback = b"grpc-retry-pushback-ms" in fields
        assert pushback == (code == 14 and not kind.name.startswith("UPSTREAM_")), kind
        assert pushback == (b"google.rpc.retryinfo-bin" in fields)
        for protocol in (Protocol.PLAIN, Protocol.REMOTE_WRITE, Protocol.OTLP):
            for as_json in (False, True):
                for close in (False, True):
                    status, data, body_len = renderer.render(kind, protocol, as_json, date, close)
                    assert status == status_of(kind, protocol)
                    assert 400 <= status <= 599
                    assert status != 500
                    if protocol is Protocol.OTLP:
                        assert status != 429, kind
                    resp = _parse_rendered(data)
                    assert resp.status == status
                    assert len(resp.body) == body_len
                    assert (resp.header("Connection") == "close") is close
                    if kind.name.startswith("UPSTREAM_"):
                        # The upstream's return is unknown: the SDKs' own backoff.
                        assert resp.header("Retry-After") is None, kind
                    elif status in (429, 503):
                        assert resp.header("Retry-After") == "1"
                    if status == 401:
                        assert (resp.header("WWW-Authenticate") or "").startswith("Bearer ")
                    ctype = resp.header("Content-Type")
                    if protocol is Protocol.OTLP and as_json:
                        assert ctype == "application/json"
                        assert set(json.loads(resp.body)) == {"code", "message"}
                    elif protocol is Protocol.OTLP:
                        assert ctype == "application/x-protobuf"
                        msg = status_pb2.Status()
                        msg.ParseFromString(resp.body)
                        assert msg.code > 0
                        assert msg.message
                    else:
                        assert ctype == "text/plain; charset=utf-8"
                    head_only = renderer.render(kind, protocol, as_json, date, close, b"", True)
                    assert head_only[1] == data[: len(data) - body_len]


@PROPERTY
@given(st.from_regex(r"[\x21\x23-\x5b\x5d-\x7e ]{1,64}", fullmatch=True))
def test_any_valid_realm_keeps_the_answer_well_formed(realm: str) -> None:
    settings_ = loads(config_text(server=f"realm = {json.dumps(realm)}"))
    renderer = ErrorRenderer(settings_.server.realm)
    for kind in (Kind.AUTH_MISSING, Kind.AUTH_INVALID, Kind.SCOPE):
        _, data, _ = renderer.render(kind, Protocol.REMOTE_WRITE, False, b"", True)
        resp = _parse_rendered(data)
        assert resp.status in (401, 403)
        challenge = resp.header("WWW-Authenticate")
        assert challenge is not None
        assert challenge.startswith(f'Bearer realm="{realm}"')


# -- the HTTP entry point over a socket ----------------------------------------------------

FUZZ_SECONDS = 20.0
FUZZ_CASES = 8000
CONCURRENCY = 64
ROUTE_PATHS = {"/api/v1/write", "/v1/traces"}
# Every status the gateway may make itself, plus what our upstream answers.
# The upstream answers every request at once, so 502 and 504 would be the
# gateway's own fault; 503 for an OTLP body stalled past its timeout (and, on
# an OTLP route, for what would be 502/504 on remote-write: issue 10 item 13).
ALLOWED = {100, 200, 204, 400, 401, 403, 404, 405, 408, 413, 414, 431, 503}


def _req(
    method: str,
    target: str,
    body: bytes = b"",
    token: str | None = TOKEN,
    extra: str = "",
    version: str = "1.1",
    chunked: bool = False,
) -> bytes:
    head = f"{method} {target} HTTP/{version}\r\nHost: gw\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    head += extra
    if chunked:
        half = len(body) // 2
        data = (
            b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p)
            + b"0\r\n\r\n"
        )
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + data
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


SEEDS = [
    _req("POST", "/api/v1/write", b"\x00snappy\xff" * 20, extra="Content-Encoding: snappy\r\n"),
    _req("POST", "/v1/traces", b"\x0a\x02proto", extra="Content-Type: application/x-protobuf\r\n"),
    _req("POST", "/v1/traces", b'{"resourceSpans":[]}', extra="Content-Type: application/json\r\n"),
    _req("POST", "/api/v1/write", b"chunked-body-data", chunked=True),
    _req("GET", "/health", token=TOKEN).replace(b"Content-Length: 0\r\n", b""),
    _req("HEAD", "/health").replace(b"Content-Length: 0\r\n", b""),
    _req("POST", "/api/v1/write", b"x", token=None),
    _req("POST", "/v1/traces", b"x", token=OTHER_TOKEN),
    _req("POST", "/api/v1/write/../v1/traces", b"x"),
    _req("PUT", "/api/v1/write", b"x"),
    _req("POST", "/api/v1/write", b"x" * 100, extra="Expect: 100-continue\r\n"),
    _req("POST", "/api/v1/write", b"ten bytes!", version="1.0"),
    _req("POST", "/api/v1/write", b"a") + _req("POST", "/v1/traces", b"b"),
    _req("POST", "/api/v1/write", b"", extra="Content-Length: 999999999\r\n").replace(
        b"Content-Length: 0\r\n", b""
    ),
    _req("POST", "http://gw/api/v1/write?x=1", b"abs"),
    _req("POST", "/api/v1/write", b"k", extra="Connection: close, X-A\r\nX-A: 1\r\n"),
]
TOKENS_IN = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"\r\n\r\n",
    b"0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 0\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive, Authorization\r\n",
    b"Expect: 100-continue\r\n",
    b"Upgrade: h2c\r\nConnection: upgrade\r\n",
    b"Host: x\r\n",
    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n",
    b"%2e%2e/",
    b"/../",
    b"//",
    b"\xff\xfe",
    b"HTTP/1.1",
    b"GET ",
    b"POST /v1/traces HTTP/1.1\r\n",
    b"X-Forwarded-For: 6.6.6.6\r\n",
    b"ffffffffffffffff\r\n",
    b" chunked",
    b"\r\n ",
]
PATHS_IN = [
    b"/api/v1/write",
    b"/v1/traces",
    b"/health",
    b"//api/v1/write",
    b"/api/v1/write/",
    b"/API/v1/write",
    b"/api/v1/%77rite",
    b"*",
    b"/admin",
    b"/api/v1/write?a=/../x",
]


# One branch per mutation kind, picked at random: a flat list is the catalogue.
def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:  # noqa: PLR0912
    b = bytearray(data)
    op = rng.randrange(11)
    pos = rng.randrange(len(b) + 1)
    if op == 0 and b:
        b[min(pos, len(b) - 1)] = rng.randrange(256)
    elif op == 1:
        b[pos:pos] = rng.choice(TOKENS_IN)
    elif op == 2:
        del b[pos : pos + rng.randrange(1, 20)]
    elif op == 3:
        end = min(len(b), pos + rng.randrange(1, 40))
        b[pos:pos] = b[pos:end]
    elif op == 4:
        del b[pos:]
    elif op == 5:
        b += rng.choice(SEEDS)
    elif op == 6:
        text = bytes(b)
        numbers = list(re.finditer(rb"\d+", text))
        if numbers:
            m = rng.choice(numbers)
            new = rng.choice(
                [b"0", b"-1", b"99999999999999999999", b"0x10", b"1e3", b"5", b"65536"]
            )
            b[m.start() : m.end()] = new
    elif op == 7:
        end = min(len(b), pos + rng.randrange(1, 30))
        b[pos:end] = bytes(b[pos:end]).swapcase()
    elif op == 8:
        text = bytes(b)
        first = text.find(b" ")
        second = text.find(b" ", first + 1)
        if 0 <= first < second:
            b[first + 1 : second] = rng.choice(PATHS_IN)
    elif op == 9:
        eol = bytes(b).find(b"\r\n")
        if eol >= 0:
            line = b"X-Fuzz: " + b"v" * rng.randrange(50) + rng.choice(TOKENS_IN)
            b[eol + 2 : eol + 2] = line
    else:
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(b)


def _case(rng: random.Random) -> bytes:
    if rng.random() < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    data = rng.choice(SEEDS)
    for _ in range(rng.randrange(1, 5)):
        data = _mutate_bytes(rng, data)
    return data


async def _upstream_answer(conn: UpConn, req: ParsedRequest) -> None:
    n = len(req.body) % 3
    if n == 0:
        await conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    elif n == 1:
        await conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    else:
        await conn.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )


# One scenario, read top to bottom: send, classify every answer, then check.
async def test_socket_fuzz_never_crashes_never_500_never_forwards_elsewhere(  # noqa: PLR0915
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
    log_capture: list[MutableMapping[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # FUZZ_SEED=<seed from a failure> replays the same inputs.
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    strict_upstream.responder = _upstream_answer
    server = (
        "header_timeout_seconds = 0.5\nbody_idle_timeout_seconds = 0.5\n"
        "keepalive_timeout_seconds = 0.5"
    )
    limits = "[limits]\nauth_failure_limit = 0\nmin_body_rate_bytes_per_second = 0"
    gw = await start_gateway(
        hostile_config(strict_upstream, server=server, extra=limits, max_body_bytes=4096)
    )
    failures: list[str] = []
    seen: Counter[int] = Counter()  # 0: closed without an answer
    sem = asyncio.Semaphore(CONCURRENCY)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FUZZ_SECONDS

    async def run(i: int, data: bytes, split: int, half_close: bool) -> None:
        try:
            async with raw_client(gw.port) as conn:
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    if split:
                        await conn.send(data[:split])
                        await asyncio.sleep(0)  # two segments, not synchronisation
                    await conn.send(data[split:])
                    if half_close:
                        conn.half_close()
                stream = await conn.eof(timeout=5.0)
        except TimeoutError:
            failures.append(f"case {i}: gateway never closed; sent {data[:300]!r}")
            return
        except OSError as exc:
            failures.append(f"case {i}: {exc!r}; sent {data[:300]!r}")
            return
        statuses = parse_statuses(stream)
        seen.update(statuses or [0])
        bad = [s for s in statuses if s not in ALLOWED]
        if bad:
            failures.append(f"case {i}: statuses {statuses}; sent {data[:300]!r}")

    # A continuous pool: a slow case (one that waits for a timeout) holds
    # one slot, not a whole batch.
    tasks: set[asyncio.Task[None]] = set()

    def _done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        sem.release()

    count = 0
    while count < FUZZ_CASES and loop.time() < deadline:
        await sem.acquire()
        data = _case(rng)
        split = rng.randrange(len(data)) if rng.random() < 0.2 and len(data) > 1 else 0
        task = asyncio.create_task(run(count, data, split, half_close=rng.random() < 0.9))
        tasks.add(task)
        task.add_done_callback(_done)
        count += 1
    if tasks:
        await asyncio.wait(set(tasks))
    summary = (
        f"socket fuzz: seed {seed}, {count} cases, {len(strict_upstream.requests)} forwarded, "
        f"answers {sorted(seen.items())}"
    )
    print(summary)
    problems: list[str] = []
    # 1. No exception escaped a protocol callback (asyncio logs those itself),
    #    no internal fault was logged, nothing answered 500.
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if crashes:
        first = crashes[0]
        problems.append(
            f"{len(crashes)} asyncio errors, first: {first.getMessage()} "
            f"{first.exc_info[1] if first.exc_info else ''!r}"
        )
    faults = [
        e
        for e in log_capture
        if e.get("event") in ("internal_error", "connection_fault", "deadline_fault")
    ]
    if faults:
        problems.append(f"{len(faults)} logged faults, first: {faults[0]}")
    codes = {c for pair in gw.stats.pairs.values() for c in pair.codes}
    if 500 in codes:
        problems.append("a 500 was counted")
    # 2. Every answer is one the contract allows.
    if failures:
        problems.append(f"{len(failures)} bad cases, first ones:\n" + "\n".join(failures[:8]))
    # 3. Nothing but the configured routes reached the upstream, well framed.
    if strict_upstream.errors:
        problems.append(f"upstream framing errors: {strict_upstream.errors[:3]}")
    hop = {n.decode() for n in HOP_BY_HOP} - {"transfer-encoding"}
    for req in strict_upstream.requests:
        if req.path not in ROUTE_PATHS or req.method != "POST":
            problems.append(f"forwarded {req.method} {req.target}")
        if req.names() & (hop | {"authorization"}):
            problems.append(f"forwarded fields {req.names() & (hop | {'authorization'})}")
    assert not problems, summary + "\n" + "\n".join(problems)

    # 4. Still serving, nothing left over.
    async with raw_client(gw.port) as conn:
        await conn.send(_req("POST", "/api/v1/write", b"final"))
        assert (await conn.response()).status in (200, 204)
    await wait_for(lambda: gw.stats.open_connections == 0, 5.0)
    assert gw.shared is not None
    assert gw.shared.admission.slots.in_use == 0
    assert all(r.in_flight == 0 for r in gw.stats.routes.values())
