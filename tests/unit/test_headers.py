"""headers: the hop-by-hop set of RFC 9110 §7.6.1, the gateway's own drops,
and the Connection-listed field removal."""

from __future__ import annotations

import pytest

from gateway.policy.headers import (
    HOP_BY_HOP,
    REQUEST_DROP,
    RESPONSE_DROP,
    connection_tokens,
    drop_listed,
)

END_TO_END = [
    b"content-type",
    b"content-encoding",
    b"x-prometheus-remote-write-version",
    b"user-agent",
    b"traceparent",
    b"tracestate",
    b"x-request-id",
    b"retry-after",
    b"x-prometheus-remote-write-samples-written",
]


@pytest.mark.parametrize(
    "name",
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ],
)
def test_rfc9110_hop_by_hop_fields_are_dropped_both_ways(name: bytes) -> None:
    assert name in HOP_BY_HOP
    assert name in REQUEST_DROP
    assert name in RESPONSE_DROP


@pytest.mark.parametrize(
    "name", [b"authorization", b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto"]
)
def test_request_fields_the_gateway_owns(name: bytes) -> None:
    assert name in REQUEST_DROP


@pytest.mark.parametrize("name", END_TO_END)
def test_end_to_end_fields_are_kept(name: bytes) -> None:
    assert name not in REQUEST_DROP
    assert name not in RESPONSE_DROP


def test_sets_are_lowercase() -> None:
    for name in REQUEST_DROP | RESPONSE_DROP:
        assert name == name.lower()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"close"], {b"close"}),
        ([b"Keep-Alive, X-Hop"], {b"keep-alive", b"x-hop"}),
        ([b" X-A ,,x-b,  "], {b"x-a", b"x-b"}),
        ([b"x-a", b"X-B, x-c"], {b"x-a", b"x-b", b"x-c"}),
        ([b""], set()),
        ([], set()),
    ],
)
def test_connection_tokens(values: list[bytes], expected: set[bytes]) -> None:
    assert connection_tokens(values) == frozenset(expected)


def test_drop_listed_is_case_insensitive_and_keeps_order() -> None:
    headers = [
        (b"Content-Type", b"application/x-protobuf"),
        (b"X-Hop", b"1"),
        (b"User-Agent", b"vmagent"),
        (b"x-HOP", b"2"),
        (b"X-Other", b"3"),
    ]
    kept = drop_listed(headers, connection_tokens([b"X-Hop, x-other"]))
    assert kept == [(b"Content-Type", b"application/x-protobuf"), (b"User-Agent", b"vmagent")]
