"""TLS on the public listener: versions, handshake timeout, certificate swap
on reload without dropping open connections (in-process and through the
real CLI with SIGHUP), required client certificates, and the per-credential
client-certificate subject condition."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
import warnings
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.config.loader import ConfigError, loads
from tests.conftest import OTHER_TOKEN, TOKEN, StartGateway, sha256, wait_for
from tests.hostile.conftest import FAST_SERVER, hostile_config
from tests.hostile.pki import Issued, Pki
from tests.support.client import RawClient, raw_client
from tests.support.process import GatewayProcess
from tests.support.upstreams import RawUpstream, UpConn
from tests.support.wire import Response, parse_statuses, request

SLACK = 1.0


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def _tls(
    server: Issued, client_auth: str = "none", ca: Path | None = None, *, base: str = FAST_SERVER
) -> str:
    text = f'\n[server.tls]\ncert_file = "{server.cert}"\nkey_file = "{server.key}"\n'
    if ca is not None:
        text += f'client_ca_file = "{ca}"\nclient_auth = "{client_auth}"\n'
    return base + text


def _tls_conn(port: int, ctx: ssl.SSLContext) -> AbstractAsyncContextManager[RawClient]:
    return raw_client(port, ssl=ctx, server_hostname="localhost")


def _peer_der(conn: RawClient) -> bytes:
    sslobj = conn.writer.get_extra_info("ssl_object")
    assert sslobj is not None
    der = sslobj.getpeercert(binary_form=True)
    assert der is not None
    return bytes(der)


async def _post(conn: RawClient, body: bytes, token: str = TOKEN) -> Response:
    await conn.send(request("POST", "/api/v1/write", body, token=token))
    return await conn.response()


async def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when no HTTP exchange is possible over this TLS setup."""
    try:
        async with _tls_conn(port, ctx) as conn:
            # TLS 1.3: a client-certificate failure arrives after the
            # client-side handshake completes, on the first read.
            await conn.send(request("POST", "/api/v1/write", b"sneak", token=TOKEN))
            await conn.response(timeout=3.0)
    except (ssl.SSLError, ConnectionError, OSError, EOFError) as exc:
        del exc
        return True
    except Exception as exc:  # Closed: the server hung up without an answer
        return type(exc).__name__ == "Closed"
    return False


async def test_tls_request_reaches_upstream_as_https(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    cert = pki.server("gw-1")
    gw = await start_gateway(hostile_config(strict_upstream, server=_tls(cert)))
    async with _tls_conn(gw.port, pki.client_context()) as conn:
        assert _peer_der(conn) == cert.der
        resp = await _post(conn, b"secret-payload")
        assert resp.status == 204
        sslobj = conn.writer.get_extra_info("ssl_object")
        assert sslobj.version() in ("TLSv1.2", "TLSv1.3")
        assert sslobj.selected_alpn_protocol() in (None, "http/1.1")
    [req] = strict_upstream.requests
    assert req.body == b"secret-payload"
    assert req.all("X-Forwarded-Proto") == ["https"]


async def test_a_large_body_over_tls_that_backs_up_is_not_taken_for_a_head(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A 12 MiB body over TLS to an upstream that reads nothing for its first
    0.3 s: the gateway stops reading the client, the TLS layer keeps what
    arrives, and hands it over in one read of hundreds of KiB when reading
    resumes.  That read is body, so the request is answered 204 and the
    upstream gets every byte.  It was answered 431: body reads were checked
    against the raw head limit before parsing, to bound a trailer line,
    so a read larger than the limit was refused whatever it carried."""
    body = b"b" * (12 << 20)

    async def slow_start(conn: UpConn) -> None:
        await asyncio.sleep(0.3)

    strict_upstream.on_connect = slow_start
    server = _tls(
        pki.server("gw"), base="header_timeout_seconds = 5\nbody_idle_timeout_seconds = 5\n"
    )
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            server=server,
            upstream="response_timeout_seconds = 10",
            max_body_bytes=16 << 20,
        )
    )
    async with _tls_conn(gw.port, pki.client_context()) as conn:
        resp = await _post(conn, body)
    assert resp.status == 204, resp.body
    [req] = strict_upstream.requests
    assert len(req.body) == len(body)


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
async def test_tls_below_1_2_is_refused(
    version: ssl.TLSVersion,
    pki: Pki,
    start_gateway: StartGateway,
    strict_upstream: RawUpstream,
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream, server=_tls(pki.server("gw"))))
    ctx = pki.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated: that is the point
        ctx.minimum_version = version
        ctx.maximum_version = version
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer the old version at all
    # The server answers the old ClientHello with an alert or a reset; a
    # client that could not even offer the version fails differently.
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
        async with _tls_conn(gw.port, ctx):
            pass
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value), "the client never offered it"
    tls12 = pki.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    async with _tls_conn(gw.port, tls12) as conn:
        assert (await _post(conn, b"ok")).status == 204
    assert [r.body for r in strict_upstream.requests] == [b"ok"]


async def test_plain_http_on_the_tls_port_gets_nothing(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream, server=_tls(pki.server("gw"))))
    async with raw_client(gw.port) as conn:
        await conn.send(request("POST", "/api/v1/write", b"x", token=TOKEN))
        stream = await conn.eof(timeout=3.0)
    assert parse_statuses(stream) == []
    assert strict_upstream.conns == []


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "partial"])
async def test_stalled_tls_handshake_is_closed_at_the_header_timeout(
    sent: bytes, pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    gw = await start_gateway(hostile_config(strict_upstream, server=_tls(pki.server("gw"))))
    async with raw_client(gw.port) as conn:
        t0 = time.monotonic()
        if sent:
            await conn.send(sent)
        assert await conn.closed(0.5 + SLACK + 1)
        assert time.monotonic() - t0 <= 0.5 + SLACK
    await wait_for(lambda: gw.stats.open_connections == 0)


async def test_certificate_swap_on_reload_keeps_open_connections(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    first = pki.server("gw-first")
    text = hostile_config(
        strict_upstream, server=_tls(first).replace("keepalive_timeout_seconds = 2.0", "")
    )
    gw = await start_gateway(text)
    ctx = pki.client_context()
    async with _tls_conn(gw.port, ctx) as old:
        assert (await _post(old, b"before")).status == 204
        # A certificate manager renews in place (same paths), then SIGHUP.
        second = pki.server("gw-second")
        assert second.cert == first.cert
        gw.reload(loads(text))
        async with _tls_conn(gw.port, ctx) as new:
            assert _peer_der(new) == second.der
            assert (await _post(new, b"new")).status == 204
        # The connection opened before the swap is still the same, still works.
        assert _peer_der(old) == first.der
        assert (await _post(old, b"after")).status == 204
    assert [r.body for r in strict_upstream.requests] == [b"before", b"new", b"after"]


async def test_mismatched_certificate_and_key_are_a_config_error(pki: Pki) -> None:
    one, two = pki.server("one", "one"), pki.server("two", "two")
    broken = Issued(one.cert, two.key, one.der)
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file"):
        loads(hostile_config(_unserved(), server=_tls(broken)))
    missing = Issued(one.cert.with_name("nope.crt"), one.key, one.der)
    with pytest.raises(ConfigError, match=r"server\.tls\.cert_file"):
        loads(hostile_config(_unserved(), server=_tls(missing)))


def _unserved() -> RawUpstream:
    """An upstream address for configs that are only loaded, never served."""
    up = RawUpstream()
    up.port = 9
    return up


async def test_required_client_certificate(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    server = _tls(pki.server("gw"), "required", pki.client_ca_file)
    gw = await start_gateway(hostile_config(strict_upstream, server=server))
    assert await _refused(gw.port, pki.client_context())
    intruder = pki.client("origin-pull", "Cloudflare", foreign=True)
    assert await _refused(gw.port, pki.client_context(intruder))
    good = pki.client("origin-pull", "Cloudflare")
    async with _tls_conn(gw.port, pki.client_context(good)) as conn:
        assert (await _post(conn, b"with-cert")).status == 204
    assert [r.body for r in strict_upstream.requests] == [b"with-cert"]
    assert b"sneak" not in strict_upstream.received


def _subject_credentials(subject: str) -> str:
    return f"""
[[credentials]]
name = "ingest"
token_sha256 = "{sha256(TOKEN.encode())}"
routes = ["remote_write", "otlp_traces"]
client_cert_subjects = ["{subject}"]

[[credentials]]
name = "other"
token_sha256 = "{sha256(OTHER_TOKEN.encode())}"
routes = ["remote_write"]
"""


async def test_client_certificate_subject_per_credential(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A stolen token is useless without the matching client certificate."""
    server = _tls(pki.server("gw"), "optional", pki.client_ca_file)
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            server=server,
            credentials=_subject_credentials("O=Cloudflare,CN=origin-pull"),  # RFC 4514 order
        )
    )
    right = pki.client("origin-pull", "Cloudflare")
    wrong = pki.client("intruder", "Cloudflare")
    cases = [
        (None, TOKEN, 401),
        (wrong, TOKEN, 401),
        (right, TOKEN, 204),
        (None, OTHER_TOKEN, 204),  # a credential without the condition
        (wrong, OTHER_TOKEN, 204),
    ]
    for client, token, status in cases:
        async with _tls_conn(gw.port, pki.client_context(client)) as conn:
            resp = await _post(conn, b"%d" % status, token)
            assert resp.status == status, (client, token)
    assert [r.body for r in strict_upstream.requests] == [b"204"] * 3
    failures = {k: n for k, n in gw.stats.auth_failures.items() if k[0] == "client_cert"}
    assert sum(failures.values()) == 2


# Cloudflare's origin-pull client certificate names itself in this order
# (DER: C, O, OU, L, ST, CN), with a comma inside the organisation.
CLOUDFLARE_LIKE = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CloudFlare, Inc."),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Origin Pull"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "San Francisco"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "California"),
        x509.NameAttribute(NameOID.COMMON_NAME, "origin-pull.cloudflare.net"),
    ]
)


@pytest.mark.parametrize(
    "subject",
    [
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
                x509.NameAttribute(NameOID.COMMON_NAME, "origin"),
            ]
        ),
        CLOUDFLARE_LIKE,
    ],
    ids=["o_then_cn", "cloudflare_like"],
)
async def test_client_certificate_subject_in_rfc4514_form(
    subject: x509.Name, pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """The subject string of a certificate in the usual DER order (O before
    CN), written the RFC 4514 way (as README's "CN=origin,O=Example" and the
    gateway's docstring say; what `openssl x509 -nameopt RFC2253` prints),
    must match that certificate."""
    rfc4514 = subject.rfc4514_string()
    server = _tls(pki.server("gw"), "optional", pki.client_ca_file)
    gw = await start_gateway(
        hostile_config(
            strict_upstream,
            server=server,
            credentials=_subject_credentials(rfc4514.replace("\\", "\\\\")),
        )
    )
    client = pki.client("origin", None, subject=subject)
    async with _tls_conn(gw.port, pki.client_context(client)) as conn:
        assert (await _post(conn, b"x")).status == 204, rfc4514


async def test_sighup_swaps_certificates_in_every_worker(
    pki: Pki, tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """The real CLI (default workers): SIGHUP re-reads the certificate files;
    an open keep-alive connection survives; a broken pair is refused and the
    current certificate keeps serving."""
    first = pki.server("gw-first")
    config = tmp_path / "gateway.toml"
    text = hostile_config(strict_upstream, server=_tls(first)).replace(
        "keepalive_timeout_seconds = 2.0", "keepalive_timeout_seconds = 30"
    )
    config.write_text(text)
    proc = GatewayProcess(config)
    try:
        await proc.start()
        assert proc.proc is not None
        ctx = pki.client_context()
        async with _tls_conn(proc.port, ctx) as old:
            assert (await _post(old, b"before")).status == 204
            second = pki.server("gw-second")
            os.kill(proc.proc.pid, signal.SIGHUP)
            await proc.wait_event("config_reloaded")
            # Every worker serves the new certificate to new connections.
            for _ in range(6):
                async with _tls_conn(proc.port, ctx) as new:
                    assert _peer_der(new) == second.der
            assert (await _post(old, b"after")).status == 204
            assert _peer_der(old) == first.der
            # A key that does not match: refused, the second cert stays.
            third = pki.server("gw-third", "third")
            second.key.write_bytes(third.key.read_bytes())
            os.kill(proc.proc.pid, signal.SIGHUP)
            await proc.wait_event("config_reload_failed")
            async with _tls_conn(proc.port, ctx) as new:
                assert _peer_der(new) == second.der
                assert (await _post(new, b"still")).status == 204
    finally:
        await proc.stop()
    assert [r.body for r in strict_upstream.requests] == [b"before", b"after", b"still"]


# -- client_auth across reloads ------------------------------------------------------
# Each handshake takes the context of the config in force at accept, with its
# verify mode: OpenSSL copies a context's verify mode into a connection when
# the connection is created, so switching contexts later (SNI) changes the
# certificate but never what is asked of the client.

_MODES = [("none", "required"), ("optional", "required"), ("required", "none")]


@pytest.mark.parametrize(("before", "after"), _MODES, ids=[f"{a}-{b}" for a, b in _MODES])
async def test_client_auth_change_applies_to_new_handshakes_after_reload(
    before: str, after: str, pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    server = pki.server("gw")
    good = pki.client("origin-pull", "Cloudflare")

    def text(mode: str) -> str:
        return hostile_config(
            strict_upstream,
            server=_tls(server, mode, pki.client_ca_file).replace(
                "keepalive_timeout_seconds = 2.0", "keepalive_timeout_seconds = 30"
            ),
        )

    gw = await start_gateway(text(before))
    assert await _refused(gw.port, pki.client_context()) == (before == "required")
    async with _tls_conn(gw.port, pki.client_context(good)) as old:
        assert (await _post(old, b"before")).status == 204
        gw.reload(loads(text(after)))
        # Every new handshake: with no certificate, refused exactly when required.
        for _ in range(3):
            assert await _refused(gw.port, pki.client_context()) == (after == "required")
        async with _tls_conn(gw.port, pki.client_context(good)) as new:
            assert (await _post(new, b"with-cert")).status == 204
        # The connection from before keeps its session.
        assert (await _post(old, b"old-session")).status == 204
    # _refused sends b"sneak" without a certificate: it passed only when allowed.
    sneaked = [r.body for r in strict_upstream.requests].count(b"sneak")
    assert sneaked == (before != "required") + 3 * (after != "required")


async def test_client_auth_none_asks_for_no_certificate_even_with_a_ca_file(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """A client holding a certificate from another CA is not asked for it."""
    server = _tls(pki.server("gw"), "none", pki.client_ca_file)
    gw = await start_gateway(hostile_config(strict_upstream, server=server))
    foreign = pki.client("someone", "Elsewhere", foreign=True)
    async with _tls_conn(gw.port, pki.client_context(foreign)) as conn:
        assert (await _post(conn, b"foreign")).status == 204
        assert conn.writer.get_extra_info("ssl_object").getpeercert() is not None


async def test_tls_turned_on_and_off_by_reload(
    pki: Pki, start_gateway: StartGateway, strict_upstream: RawUpstream
) -> None:
    """New connections follow [server.tls] of the config in force, both ways."""
    plain = hostile_config(strict_upstream)
    tls = hostile_config(strict_upstream, server=_tls(pki.server("gw")))
    gw = await start_gateway(plain)
    async with raw_client(gw.port) as conn:
        assert (await _post(conn, b"plain")).status == 204
    gw.reload(loads(tls))
    async with _tls_conn(gw.port, pki.client_context()) as conn:
        assert (await _post(conn, b"tls")).status == 204
    gw.reload(loads(plain))
    async with raw_client(gw.port) as conn:
        assert (await _post(conn, b"plain-again")).status == 204
    requests = strict_upstream.requests
    assert [r.body for r in requests] == [b"plain", b"tls", b"plain-again"]
    assert [r.header("X-Forwarded-Proto") for r in requests] == ["http", "https", "http"]


async def test_sighup_to_client_auth_required_is_enforced_by_every_worker(
    pki: Pki, tmp_path: Path, strict_upstream: RawUpstream
) -> None:
    """The real CLI with 2 workers: none → required by SIGHUP.  Afterwards
    no new connection without a certificate gets in, on any worker (the
    kernel spreads connections by their ports: a dozen reach both), and
    clients with one are served by both workers."""
    config = tmp_path / "gateway.toml"
    server = pki.server("gw")

    def write(mode: str) -> None:
        config.write_text(
            hostile_config(strict_upstream, server=_tls(server, mode, pki.client_ca_file))
        )

    write("none")
    good = pki.client("origin-pull", "Cloudflare")
    proc = GatewayProcess(config, args=("--workers", "2"))
    try:
        await proc.start()
        assert proc.proc is not None
        assert not await _refused(proc.port, pki.client_context())
        write("required")
        since = proc.mark()
        os.kill(proc.proc.pid, signal.SIGHUP)
        await proc.wait_event("config_reloaded", since)
        for _ in range(12):
            assert await _refused(proc.port, pki.client_context())
        workers: set[object] = set()
        for _ in range(40):
            async with _tls_conn(proc.port, pki.client_context(good)) as conn:
                assert (await _post(conn, b"with-cert")).status == 204
            await asyncio.sleep(0.3)  # access lines are flushed a few times a second
            workers = {e.get("worker") for e in proc.find("request", status=204)}
            if len(workers) == 2:
                break
        assert workers == {0, 1}
    finally:
        await proc.stop()
    # Only the probe before the reload got in without a certificate.
    assert [r.body for r in strict_upstream.requests].count(b"sneak") == 1
