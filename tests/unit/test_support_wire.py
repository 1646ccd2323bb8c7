"""The strict parsers every socket tier reads with (tests/support/wire.py):
what they refuse is what makes a badly framed message from the gateway fail
a test, so each refusal is checked here, beside the shapes they must read."""

from __future__ import annotations

import pytest

from tests.support.wire import Incomplete, parse_request, parse_response, request

OK = b"HTTP/1.1 200 OK\r\n"

REFUSED_RESPONSES = {
    "two Content-Length": OK + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "Content-Length and Transfer-Encoding": (
        OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "Transfer-Encoding not chunked": OK + b"Transfer-Encoding: gzip\r\n\r\n",
    "signed Content-Length": OK + b"Content-Length: +1\r\n\r\nx",
    "hex chunk size": OK + b"Transfer-Encoding: chunked\r\n\r\n0x1\r\nx\r\n0\r\n\r\n",
    "chunk without CRLF": OK + b"Transfer-Encoding: chunked\r\n\r\n1\r\nxy0\r\n\r\n",
    "trailer": OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n",
    "space before colon": OK + b"X-A : 1\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    "four-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2 status line": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("data", REFUSED_RESPONSES.values(), ids=REFUSED_RESPONSES.keys())
def test_ambiguous_responses_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (the message names the rule; any rule will do)
        parse_response(data, eof=True)


def test_responses_are_read_one_at_a_time_with_their_framing() -> None:
    stream = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        + OK
        + b"Content-Length: 2\r\n\r\nok"
        + OK
        + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        + b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    seen = []
    while stream:
        resp, used = parse_response(stream)
        seen.append((resp.status, resp.body))
        stream = stream[used:]
    assert seen == [(100, b""), (200, b"ok"), (200, b"hi"), (204, b"")]


def test_head_answers_and_close_delimited_bodies() -> None:
    resp, used = parse_response(OK + b"Content-Length: 9\r\n\r\n", head=True)
    assert (resp.body, used) == (b"", len(OK) + 21)
    with pytest.raises(Incomplete):
        parse_response(OK + b"\r\nuntil-eof")  # the body ends with the connection
    resp, _ = parse_response(OK + b"\r\nuntil-eof", eof=True)
    assert resp.body == b"until-eof"
    with pytest.raises(Incomplete):
        parse_response(OK + b"Content-Length: 10\r\n\r\nshort", eof=True)


def test_requests_keep_their_exact_bytes() -> None:
    data = request("POST", "/api/v1/write", b"abc", chunked=True) + b"GET"
    req, used = parse_request(data)
    assert (req.body, req.chunked, req.raw) == (b"abc", True, data[:used])
    assert data[used:] == b"GET"
    with pytest.raises(ValueError, match="exactly one Host"):
        parse_request(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
