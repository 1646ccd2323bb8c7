"""The route cases every §3 functional test runs for both protocols, the
credentials that give each route an in-scope and an out-of-scope token, and
what a gateway-made error body must look like on each."""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.rpc import status_pb2

from tests.conftest import OTHER_TOKEN, TOKEN, TWO_CREDENTIALS, sha256
from tests.support.wire import Response

__all__ = [
    "ALL_TOKENS",
    "OTLP",
    "ROUTES",
    "ROUTE_IDS",
    "RW",
    "THREE_CREDENTIALS",
    "TRACES_TOKEN",
    "RouteCase",
    "assert_error_body",
]

# A third credential, scoped to the OTLP route only, so that both routes have
# a credential that is valid but out of scope (the 403 row).
TRACES_TOKEN = "test-token-0123456789abcdef-traces"
THREE_CREDENTIALS = f"""{TWO_CREDENTIALS}
[[credentials]]
name = "traces"
token_sha256 = "{sha256(TRACES_TOKEN.encode())}"
routes = ["otlp_traces"]
"""
ALL_TOKENS = (TOKEN, OTHER_TOKEN, TRACES_TOKEN)


@dataclass(frozen=True)
class RouteCase:
    """One route of the test config, with what §3 expects of it."""

    name: str
    path: str
    otlp: bool
    # A valid credential that is not scoped to this route.
    out_of_scope_token: str

    def status(self, remote_write: int, otlp: int) -> int:
        return otlp if self.otlp else remote_write


RW = RouteCase("remote_write", "/api/v1/write", otlp=False, out_of_scope_token=TRACES_TOKEN)
OTLP = RouteCase("otlp_traces", "/v1/traces", otlp=True, out_of_scope_token=OTHER_TOKEN)
ROUTES = [RW, OTLP]
ROUTE_IDS = ["remote_write", "otlp"]


def assert_error_body(resp: Response, case: RouteCase | None, *, as_json: bool = False) -> None:
    """A gateway-made error body: text for remote-write and unmatched paths,
    google.rpc.Status (protobuf, or JSON if the request was JSON) for OTLP;
    and nothing on the connection so far leaks an address, a traceback or a token."""
    ctype = resp.header("Content-Type") or ""
    if case is not None and case.otlp:
        if as_json:
            assert ctype == "application/json", ctype
            decoded = json.loads(resp.body)
            assert isinstance(decoded["code"], int)
            assert decoded["code"] != 0
            assert decoded["message"]
        else:
            assert ctype == "application/x-protobuf", ctype
            status = status_pb2.Status()
            status.ParseFromString(resp.body)
            assert status.code != 0
            assert status.message
    else:
        assert ctype.startswith("text/plain"), ctype
        assert resp.body.endswith(b"\n")
    for leak in (b"127.0.0.1", b"http://", b"Traceback", *(t.encode() for t in ALL_TOKENS)):
        assert leak not in resp.raw, leak
