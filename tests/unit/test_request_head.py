"""RequestHead: which Content-Types make a request OTLP-encoded (issue 10
item 14: an unrouted OTLP request is answered with a google.rpc.Status) and
which of those are JSON (the Status is then JSON)."""

from __future__ import annotations

import pytest

from gateway.policy.request import RequestHead


@pytest.mark.parametrize(
    ("value", "otlp", "as_json"),
    [
        (b"application/x-protobuf", True, False),
        (b"APPLICATION/X-PROTOBUF", True, False),
        (b"application/x-protobuf; proto=opentelemetry", True, False),
        (b"application/json", True, True),
        (b"application/json; charset=utf-8", True, True),
        (b"text/plain", False, False),
        (b"application/x-www-form-urlencoded", False, False),
        (b"application/protobuf", False, False),
        (b"", False, False),
    ],
)
def test_otlp_content_types(value: bytes, otlp: bool, as_json: bool) -> None:
    head = RequestHead(0.0)
    head.header(b"Content-Type", value)
    assert (head.otlp_encoded, head.json) == (otlp, as_json)


def test_no_content_type_is_not_otlp() -> None:
    head = RequestHead(0.0)
    head.header(b"Content-Length", b"3")
    assert not head.otlp_encoded
    assert not head.json
