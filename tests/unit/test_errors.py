"""errors: every Kind and route protocol answers with DESIGN §3's status, and the
rendered responses are well-formed: framing, WWW-Authenticate, Retry-After,
Allow, and bodies (text for remote-write, google.rpc.Status for OTLP in the
request's encoding) that never carry an address or a traceback."""

from __future__ import annotations

import json

import pytest
from google.rpc import status_pb2

from gateway.policy.errors import (
    ErrorRenderer,
    Kind,
    Protocol,
    grpc_trailers_only,
    rpc_status_protobuf,
    status_of,
)

# DESIGN §3, written out independently of gateway/errors.py.
# kind: (remote-write, otlp)
CONTRACT: dict[Kind, tuple[int, int]] = {
    Kind.AUTH_MISSING: (401, 401),
    Kind.AUTH_INVALID: (401, 401),
    Kind.SCOPE: (403, 403),
    Kind.FORBIDDEN: (403, 403),  # client address or certificate not allowed
    Kind.TENANT: (403, 403),  # a JWT's tenant claim is missing or not allowed
    Kind.NOT_FOUND: (404, 404),
    Kind.METHOD: (405, 405),
    Kind.TOO_LARGE: (413, 413),
    Kind.URL_TOO_LONG: (414, 414),
    Kind.HEADERS_TOO_LARGE: (431, 431),
    Kind.BAD_REQUEST: (400, 400),
    Kind.CLIENT_TIMEOUT: (408, 503),
    Kind.OVERLOADED: (429, 503),
    Kind.DRAINING: (503, 503),
    # OTLP: 503, because the Go SDK's otlptracehttp before v1.20 retries only
    # 429 and 503 (issue 10 item 13).
    Kind.UPSTREAM_CONNECT: (502, 503),
    Kind.UPSTREAM_RESET: (502, 503),
    Kind.UPSTREAM_PROTOCOL: (502, 503),
    Kind.UPSTREAM_TIMEOUT: (504, 503),
    Kind.INTERNAL: (503, 503),
}
UPSTREAM = (
    Kind.UPSTREAM_CONNECT,
    Kind.UPSTREAM_RESET,
    Kind.UPSTREAM_PROTOCOL,
    Kind.UPSTREAM_TIMEOUT,
)
DATE = b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
RENDERER = ErrorRenderer("obs-gateway")


def test_contract_covers_every_kind() -> None:
    assert set(CONTRACT) == set(Kind)


@pytest.mark.parametrize("kind", list(Kind))
def test_status_per_protocol(kind: Kind) -> None:
    rw, otlp = CONTRACT[kind]
    assert status_of(kind, Protocol.REMOTE_WRITE) == rw
    assert status_of(kind, Protocol.OTLP) == otlp


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("protocol", list(Protocol))
def test_never_500_and_for_otlp_nothing_an_sdk_drops(kind: Kind, protocol: Protocol) -> None:
    status = status_of(kind, protocol)
    assert status != 500
    if protocol is Protocol.OTLP and status >= 500:
        # The Python SDK drops 429; the Go SDK before v1.20 drops 502 and 504.
        assert status == 503


def parse(data: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    status_line, *lines = head.decode("ascii").split("\r\n")
    version, code, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon, line
        assert name == name.strip(), line
        headers.setdefault(name.lower(), []).append(value.strip())
    return int(code), headers, body


def render(
    kind: Kind, protocol: Protocol, as_json: bool = False, **kwargs: object
) -> tuple[int, dict[str, list[str]], bytes]:
    status, data, _ = RENDERER.render(kind, protocol, as_json, DATE, False, **kwargs)  # type: ignore[arg-type]
    code, headers, body = parse(data)
    assert code == status
    return code, headers, body


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("protocol", list(Protocol))
@pytest.mark.parametrize("as_json", [False, True])
def test_rendered_response_is_well_formed(kind: Kind, protocol: Protocol, as_json: bool) -> None:
    code, headers, body = render(kind, protocol, as_json)
    assert code == status_of(kind, protocol)
    assert headers["content-length"] == [str(len(body))]
    assert headers["date"] == [DATE[6:-2].decode()]
    assert headers["cache-control"] == ["no-store"]
    assert "connection" not in headers
    assert body
    if code == 401:
        [challenge] = headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        assert 'realm="obs-gateway"' in challenge
    if kind in UPSTREAM:
        assert "retry-after" not in headers
    elif code in (429, 503):
        assert headers["retry-after"] == ["1"]
    text = body.decode("utf-8")
    for leak in ("127.0.0.1", "http://", "Traceback", "localhost", "Exception"):
        assert leak not in text


@pytest.mark.parametrize("kind", list(Kind))
def test_otlp_protobuf_body_is_a_google_rpc_status(kind: Kind) -> None:
    _, headers, body = render(kind, Protocol.OTLP, as_json=False)
    assert headers["content-type"] == ["application/x-protobuf"]
    status = status_pb2.Status()
    status.ParseFromString(body)
    assert status.code != 0  # 0 is OK
    assert status.message
    assert not status.details


@pytest.mark.parametrize("kind", list(Kind))
def test_otlp_json_body_when_the_request_was_json(kind: Kind) -> None:
    _, headers, body = render(kind, Protocol.OTLP, as_json=True)
    assert headers["content-type"] == ["application/json"]
    decoded = json.loads(body)
    assert isinstance(decoded["code"], int)
    assert decoded["code"] != 0
    assert isinstance(decoded["message"], str)
    assert decoded["message"]
    # Same status whichever the encoding.
    proto = status_pb2.Status()
    proto.ParseFromString(render(kind, Protocol.OTLP)[2])
    assert (proto.code, proto.message) == (decoded["code"], decoded["message"])


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("protocol", [Protocol.REMOTE_WRITE, Protocol.PLAIN])
def test_remote_write_and_plain_bodies_are_short_text(kind: Kind, protocol: Protocol) -> None:
    for as_json in (False, True):  # JSON is an OTLP thing only
        _, headers, body = render(kind, protocol, as_json)
        assert headers["content-type"][0].startswith("text/plain")
        assert body.endswith(b"\n")
        assert len(body) < 100


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        (Kind.AUTH_MISSING, None),
        (Kind.AUTH_INVALID, "invalid_token"),
        (Kind.SCOPE, "insufficient_scope"),
    ],
)
def test_www_authenticate_error_codes(kind: Kind, error: str | None) -> None:
    # RFC 6750 §3.1: no error attribute when no credentials were presented.
    _, headers, _ = render(kind, Protocol.REMOTE_WRITE)
    [challenge] = headers["www-authenticate"]
    if error is None:
        assert "error=" not in challenge
    else:
        assert f'error="{error}"' in challenge


def test_only_auth_kinds_challenge() -> None:
    for kind in Kind:
        _, headers, _ = render(kind, Protocol.OTLP)
        has = "www-authenticate" in headers
        assert has == (kind in (Kind.AUTH_MISSING, Kind.AUTH_INVALID, Kind.SCOPE)), kind


def test_client_timeout_differs_by_protocol() -> None:
    rw = render(Kind.CLIENT_TIMEOUT, Protocol.REMOTE_WRITE)
    otlp = render(Kind.CLIENT_TIMEOUT, Protocol.OTLP)
    assert rw[0] == 408
    assert otlp[0] == 503
    assert otlp[1]["retry-after"] == ["1"]


@pytest.mark.parametrize("kind", UPSTREAM)
def test_upstream_failures_carry_no_retry_after(kind: Kind) -> None:
    # The Python and JS SDKs obey Retry-After exactly for a fixed five
    # retries: "1" would shrink their retry window to ~5 s, and the gateway
    # cannot know when the upstream returns.  Their own backoff lasts longer.
    for protocol in (Protocol.PLAIN, Protocol.REMOTE_WRITE, Protocol.OTLP):
        _, headers, _ = render(kind, protocol)
        assert "retry-after" not in headers, (kind, protocol)
    # Nor their gRPC answer a pushback or RetryInfo (the SDKs read it as their delay).
    names = {name for name, _ in grpc_trailers_only(kind)}
    assert not names & {b"grpc-retry-pushback-ms", b"google.rpc.retryinfo-bin"}
    assert dict(grpc_trailers_only(kind))[b"grpc-status"] == b"14"


def test_allow_header_and_connection_close_and_head() -> None:
    status, data, _ = RENDERER.render(
        Kind.METHOD, Protocol.OTLP, False, DATE, True, b"Allow: POST\r\n", head_only=True
    )
    code, headers, body = parse(data)
    assert (status, code) == (405, 405)
    assert headers["allow"] == ["POST"]
    assert headers["connection"] == ["close"]
    assert body == b""
    assert int(headers["content-length"][0]) > 0  # HEAD: the length GET would have


def test_realm_is_configurable() -> None:
    status, data, _ = ErrorRenderer("ingest").render(
        Kind.AUTH_MISSING, Protocol.PLAIN, False, DATE, False
    )
    assert status == 401
    assert parse(data)[1]["www-authenticate"] == ['Bearer realm="ingest"']


@pytest.mark.parametrize("message", ["", "x", "é" * 200])
@pytest.mark.parametrize("code", [0, 1, 16, 127, 128, 300, 2**31 - 1])
def test_rpc_status_encoder_round_trips(code: int, message: str) -> None:
    decoded = status_pb2.Status()
    decoded.ParseFromString(rpc_status_protobuf(code, message))
    assert (decoded.code, decoded.message) == (code, message)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("protocol", [Protocol.PLAIN, Protocol.REMOTE_WRITE, Protocol.OTLP])
@pytest.mark.parametrize("as_json", [False, True])
def test_http2_answers_are_the_http1_ones(kind: Kind, protocol: Protocol, as_json: bool) -> None:
    """One table, two framings: the same status, body and fields (names in
    lower case, as HTTP/2 wants them), Date as given, nothing hop-by-hop."""
    status, data, _ = RENDERER.render(kind, protocol, as_json, DATE, False)
    h2_status, fields, body = RENDERER.render_h2(kind, protocol, as_json, b"Thu, 01 Jan 2026")
    head, _, h1_body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    h1 = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    assert h2_status == status
    assert body == h1_body
    assert fields[0] == (b":status", b"%d" % status)
    expected = [(n.lower(), v) for n, v in h1 if n != b"Date"] + [(b"date", b"Thu, 01 Jan 2026")]
    assert fields[1:] == expected
    assert all(n == n.lower() and n != b"connection" for n, _ in fields)
