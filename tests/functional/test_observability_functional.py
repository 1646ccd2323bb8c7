"""The gateway's own observability over real sockets: /metrics on the admin
port counts requests by route, credential and code with bounded labels
(DESIGN §4), and no token (nor its digest) ever appears in a log event, a
response or the metrics page, whatever path a request takes."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

import aiohttp

from tests.conftest import (
    OTHER_TOKEN,
    TOKEN,
    RecordingUpstream,
    StartGateway,
    StartRawUpstream,
    config_text,
    sha256,
    wait_for,
)
from tests.support.client import raw_client, raw_request
from tests.support.metrics import scrape
from tests.support.routes import THREE_CREDENTIALS, TRACES_TOKEN
from tests.support.sockets import refused_port
from tests.support.upstreams import hang
from tests.support.wire import chunked, request_bytes


async def test_metrics_reflect_requests(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(
        config_text(
            upstream.url + "/api/v1/write",
            upstream.url + "/v1/traces",
            credentials=THREE_CREDENTIALS,
        )
    )
    before = time.time()
    send = [
        request_bytes("POST", "/api/v1/write", body=b"a" * 100),
        request_bytes("POST", "/api/v1/write", body=b"b" * 50),
        request_bytes("POST", "/v1/traces", body=b"c" * 10, token=TRACES_TOKEN),
        request_bytes("POST", "/api/v1/write", body=b"d", token=None),
        request_bytes("POST", "/api/v1/write", body=b"e", token="wrong-token-0123456789"),
        request_bytes("GET", "/nope/secret-path", token=OTHER_TOKEN),
        request_bytes("POST", "/v1/traces", body=b"f", token=OTHER_TOKEN),
        request_bytes("GET", "/api/v1/write"),
    ]
    for data in send:
        await raw_request(gw.port, data)
    upstream.response_body = b"r" * 7
    upstream.status = 200
    await raw_request(gw.port, request_bytes("POST", "/api/v1/write", body=b"g"))
    m = await scrape(gw.admin_port)
    requests = "gateway_requests_total"
    assert m.sum(requests, route="remote_write", credential="ingest", code="204") == 2
    assert m.sum(requests, route="remote_write", credential="ingest", code="200") == 1
    assert m.sum(requests, route="otlp_traces", credential="traces", code="204") == 1
    assert m.sum(requests, route="remote_write", credential="none", code="401") == 2
    assert m.sum(requests, route="unmatched", credential="other", code="404") == 1
    assert m.sum(requests, route="otlp_traces", credential="other", code="403") == 1
    assert m.sum(requests, route="remote_write", credential="ingest", code="405") == 1
    assert m.sum(requests) == 9
    failures = "gateway_auth_failures_total"
    # "none" where the config names no credential, as in gateway_requests_total.
    assert m.sum(failures, reason="missing", credential="none", token_id="none") == 1
    assert m.sum(failures, reason="unknown", credential="none", token_id="none") == 1
    assert m.sum(failures, reason="scope", credential="other", token_id="default") == 1
    assert m.sum(failures) == 3
    assert m.sum("gateway_request_bytes_total", route="remote_write", credential="ingest") == 151
    assert m.sum("gateway_request_bytes_total", route="otlp_traces", credential="traces") == 10
    # The upstream's 7 bytes plus the gateway's own bodies on this route: two
    # 401s ("missing bearer token\n", "invalid bearer token\n": 21 each) and
    # one 405 ("method not allowed\n": 19).
    assert m.sum("gateway_response_bytes_total", route="remote_write") == 7 + 21 + 21 + 19
    assert m.sum("gateway_request_duration_seconds_count", route="remote_write") == 6
    assert m.sum("gateway_upstream_response_seconds_count", route="remote_write") == 3
    assert m.sum("gateway_upstream_response_seconds_count", route="otlp_traces") == 1
    assert m.sum("gateway_requests_in_flight") == 0
    last_used = m.sum("gateway_credential_last_used_timestamp_seconds", credential="ingest")
    assert before <= last_used <= time.time()
    assert m.sum("gateway_build_info") == 1
    # Bounded labels: nothing a client sent becomes a label value.
    assert "secret-path" not in m.text
    assert "/nope" not in m.text
    assert "wrong-token" not in m.text


async def test_in_flight_gauge_counts_a_held_request(
    start_gateway: StartGateway, upstream: RecordingUpstream
) -> None:
    upstream.hold = True
    gw = await start_gateway(config_text(upstream.url + "/api/v1/write"))
    async with raw_client(gw.port) as client:
        await client.send(request_bytes("POST", "/api/v1/write", body=b"x"))
        await wait_for(lambda: len(upstream.complete) == 1)
        m = await scrape(gw.admin_port)
        assert m.sum("gateway_requests_in_flight", route="remote_write") == 1
        upstream.release.set()
        assert (await client.response()).status == 204
    m = await scrape(gw.admin_port)
    assert m.sum("gateway_requests_in_flight", route="remote_write") == 0


async def test_admin_listener_health_endpoints(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    async with aiohttp.ClientSession() as session:
        for path in ("/livez", "/readyz"):
            async with session.get(f"http://127.0.0.1:{gw.admin_port}{path}") as admin:
                assert admin.status == 200
    # The admin paths are not served on the public listener.
    public = await raw_request(gw.port, request_bytes("GET", "/metrics"))
    assert public.status == 404


def secrets_of(token: str) -> list[str]:
    return [token, sha256(token.encode())]


async def test_tokens_never_appear_in_logs_responses_or_metrics(
    start_gateway: StartGateway,
    raw_upstream: StartRawUpstream,
    upstream: RecordingUpstream,
    log_capture: list[MutableMapping[str, Any]],
) -> None:
    wrong = "wrong-but-plausible-token-Zq9vW2xK7"
    hung = await raw_upstream(hang)
    with refused_port() as refused:
        gw_ok = await start_gateway(
            config_text(
                upstream.url + "/api/v1/write",
                f"http://127.0.0.1:{refused}/v1/traces",
                max_body_bytes=1000,
                credentials=THREE_CREDENTIALS,
                server="body_idle_timeout_seconds = 0.2",
            )
        )
        gw_hung = await start_gateway(
            config_text(hung.url + "/api/v1/write", upstream="response_timeout_seconds = 0.2")
        )
        requests: list[tuple[int, bytes]] = [
            (gw_ok.port, request_bytes("POST", "/api/v1/write", body=b"ok")),
            (gw_ok.port, request_bytes("POST", "/v1/traces", body=b"refused")),
            (gw_ok.port, request_bytes("POST", "/api/v1/write", body=b"x" * 2000)),
            (gw_ok.port, request_bytes("POST", "/v1/traces", body=b"x", token=OTHER_TOKEN)),
            (gw_ok.port, request_bytes("POST", "/api/v1/write", body=b"x", token=wrong)),
            (gw_ok.port, request_bytes("GET", "/health", token=TRACES_TOKEN)),
            (gw_ok.port, request_bytes("GET", "/nope", token=TOKEN)),
            (gw_ok.port, request_bytes("GET", f"/api/v1/write?token={TOKEN}", token=TOKEN)),
            (
                gw_ok.port,
                request_bytes(
                    "POST", "/v1/traces", [("Content-Type", "application/json")], b"{}", token=wrong
                ),
            ),
            (gw_hung.port, request_bytes("POST", "/api/v1/write", body=b"hang")),
        ]
        responses = [await raw_request(port, data) for port, data in requests]
    async with raw_client(gw_ok.port) as client:  # a stalled body: 408
        await client.send(request_bytes("POST", "/api/v1/write", content_length=100) + b"x")
        responses.append(await client.response())
    async with raw_client(gw_ok.port) as client:  # an aborted body: 499
        await client.send(
            request_bytes("POST", "/api/v1/write", [("Transfer-Encoding", "chunked")])
            + chunked(b"y" * 10, end=False)
        )
        await wait_for(lambda: len(upstream.requests) == 2)
        client.abort()
    statuses = sorted(r.status for r in responses)
    # 503: the refused OTLP upstream (issue 10 item 13); 504: the hung remote-write one.
    assert statuses == [200, 204, 401, 401, 403, 404, 405, 408, 413, 503, 504]
    await wait_for(lambda: sum(e.get("event") == "request" for e in log_capture) == 12)
    logs = "\n".join(repr(dict(e)) for e in log_capture)
    texts = {"logs": logs, "responses": "\n".join(r.raw.decode("latin-1") for r in responses)}
    texts["metrics"] = (await scrape(gw_ok.admin_port)).text + (
        await scrape(gw_hung.admin_port)
    ).text
    for where, text in texts.items():
        for token in (TOKEN, OTHER_TOKEN, TRACES_TOKEN, wrong):
            for secret in secrets_of(token):
                assert secret not in text, f"{secret[:8]}… in {where}"
    # Where the token only appeared in the query string, the path is not
    # logged either (the route matched), and upstream addresses stay internal.
    assert str(refused) not in texts["responses"]
