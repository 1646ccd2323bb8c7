"""auth.Authenticator: bearer parsing (RFC 6750), digest lookup over several
credentials and tokens, validity windows and revocation.  Every bad input is
a Failure value, never an exception, and no secret shows in any result."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.loader import Credential, Revoked, Token
from gateway.policy.auth import MAX_AUTHORIZATION_BYTES, Authenticator, Failure, Principal

NOW = 1_800_000_000.0
A1 = "alpha-token-one-0123456789abcdef"
A2 = "alpha-token-two-0123456789abcdef"
B1 = "bravo-token-one-0123456789abcdef"
OLD = "alpha-token-old-0123456789abcdef"
EXPIRED = "alpha-token-exp-0123456789abcdef"
FUTURE = "alpha-token-fut-0123456789abcdef"


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


CREDENTIALS = (
    Credential(
        "alpha",
        frozenset({"remote_write", "otlp_traces"}),
        (
            Token("one", digest(A1)),
            Token("two", digest(A2), not_before=NOW - 10, not_after=NOW + 10),
            Token("exp", digest(EXPIRED), not_after=NOW),
            Token("fut", digest(FUTURE), not_before=NOW + 1),
        ),
        (Revoked("old", digest(OLD), NOW - 100),),
    ),
    Credential("bravo", frozenset({"remote_write"}), (Token("default", digest(B1)),)),
)
AUTH = Authenticator(CREDENTIALS)


def check(header: bytes | None, now: float = NOW) -> Principal | Failure:
    return AUTH.authenticate(header, now)


def reason(header: bytes | None, now: float = NOW) -> str:
    result = check(header, now)
    assert isinstance(result, Failure), result
    return result.reason


@pytest.mark.parametrize(
    ("token", "credential", "token_id", "routes"),
    [
        (A1, "alpha", "one", {"remote_write", "otlp_traces"}),
        (A2, "alpha", "two", {"remote_write", "otlp_traces"}),
        (B1, "bravo", "default", {"remote_write"}),
    ],
)
def test_each_configured_token_finds_its_credential(
    token: str, credential: str, token_id: str, routes: set[str]
) -> None:
    result = check(b"Bearer " + token.encode())
    assert isinstance(result, Principal)
    assert (result.credential, result.token_id, result.routes) == (
        credential,
        token_id,
        frozenset(routes),
    )
    assert result.ok


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER", b"bEaReR"])
def test_scheme_is_case_insensitive(scheme: bytes) -> None:
    assert isinstance(check(scheme + b" " + A1.encode()), Principal)


def test_several_spaces_after_the_scheme() -> None:
    # RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token
    assert isinstance(check(b"Bearer    " + A1.encode()), Principal)


def test_missing_header() -> None:
    assert reason(None) == "missing"


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer    ",
        b"Basic " + A1.encode(),
        b"Bearer" + A1.encode(),
        b"Bearer\t" + A1.encode(),
        b"Bearer " + A1.encode() + b" extra",
        b"Token " + A1.encode(),
        b"Bearer " + b"a" * MAX_AUTHORIZATION_BYTES,
    ],
)
def test_malformed_headers(header: bytes) -> None:
    assert reason(header) == "malformed"


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer nope-not-a-configured-token",
        b"Bearer " + A1.encode()[:-1],
        b"Bearer " + A1.encode() + b"x",
        b"Bearer " + A1.upper().encode(),
        "Bearer tök€n-ünicode".encode(),
        "Bearer tök€n-latin1".encode("latin-1", "replace"),
        b"Bearer \xff\xfe\x00\x01",
        b"Bearer " + digest(A1).hex().encode(),  # the digest is not the token
    ],
)
def test_unknown_tokens(header: bytes) -> None:
    assert reason(header) == "unknown"


def test_length_limit_boundary() -> None:
    at_limit = b"Bearer " + b"a" * (MAX_AUTHORIZATION_BYTES - 7)
    assert len(at_limit) == MAX_AUTHORIZATION_BYTES
    assert reason(at_limit) == "unknown"
    assert reason(at_limit + b"a") == "malformed"


def test_revoked_token_names_its_credential_and_id() -> None:
    result = check(b"Bearer " + OLD.encode())
    assert result == Failure("revoked", "alpha", "old")


def test_expiry_window() -> None:
    assert isinstance(check(b"Bearer " + EXPIRED.encode(), NOW - 0.001), Principal)
    assert check(b"Bearer " + EXPIRED.encode(), NOW) == Failure("expired", "alpha", "exp")
    assert check(b"Bearer " + A2.encode(), NOW + 10) == Failure("expired", "alpha", "two")


def test_not_yet_valid_window() -> None:
    assert check(b"Bearer " + FUTURE.encode()) == Failure("not_yet_valid", "alpha", "fut")
    assert isinstance(check(b"Bearer " + FUTURE.encode(), NOW + 1), Principal)
    assert check(b"Bearer " + A2.encode(), NOW - 11) == Failure("not_yet_valid", "alpha", "two")


def test_principal_carries_expiry_for_health() -> None:
    result = check(b"Bearer " + A2.encode())
    assert isinstance(result, Principal)
    assert result.not_after == NOW + 10


def test_no_credentials_means_nothing_authenticates() -> None:
    assert Authenticator(()).authenticate(b"Bearer " + A1.encode(), NOW) == Failure("unknown")


def test_results_and_authenticator_never_show_a_secret() -> None:
    texts = [repr(AUTH), str(AUTH)]
    for token in (A1, A2, B1, OLD, EXPIRED, FUTURE, "nope-not-a-configured-token"):
        result = check(b"Bearer " + token.encode())
        texts += [repr(result), str(result)]
    joined = "\n".join(texts)
    for token in (A1, A2, B1, OLD, EXPIRED, FUTURE, "nope-not-a-configured-token"):
        assert token not in joined
        assert digest(token).hex() not in joined
        assert repr(digest(token)) not in joined


@given(st.binary(max_size=MAX_AUTHORIZATION_BYTES + 64))
def test_arbitrary_bytes_never_raise(header: bytes) -> None:
    result = check(header)
    assert isinstance(result, Failure)
    assert result.reason in {"malformed", "unknown"}


@given(st.text(max_size=200))
def test_arbitrary_text_tokens_never_raise(token: str) -> None:
    result = check(b"Bearer " + token.encode("utf-8", "surrogatepass"))
    assert isinstance(result, Failure)


def test_a_credential_may_keep_only_revoked_digests() -> None:
    """A retired sender: no valid token left, its old digests still named."""
    from gateway.config.loader import loads  # noqa: PLC0415

    old = "retired-sender-token-0123456789"
    settings = loads(f"""
[[routes]]
name = "remote_write"
path = "/api/v1/write"
protocol = "prometheus-remote-write"
upstream = "http://127.0.0.1:9/api/v1/write"

[[credentials]]
name = "ingest"
token_sha256 = "{hashlib.sha256(b"current-sender-token-0123456789").hexdigest()}"
routes = ["remote_write"]

[[credentials]]
name = "legacy"
routes = ["remote_write"]
[[credentials.revoked]]
id = "2025-01"
sha256 = "{hashlib.sha256(old.encode()).hexdigest()}"
""")
    authn = Authenticator(settings.credentials)
    assert authn.authenticate(b"Bearer " + old.encode(), 0.0) == Failure(
        "revoked", "legacy", "2025-01"
    )
