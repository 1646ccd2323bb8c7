"""config.loads: valid documents decode, every error names its key path, and
no secret (token or digest) shows in a repr or an error message."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config.loader import ConfigError, Revoked, Settings, Token, loads
from tests.conftest import TOKEN, config_text
from tests.hostile.pki import Pki

SECRET = "plain-secret-token-Zq9vW2xK7"  # distinctive, easy to grep for


def cred(body: str, name: str = "ingest", routes: str = '["remote_write"]') -> str:
    return f'[[credentials]]\nname = "{name}"\nroutes = {routes}\n{body}\n'


def error_of(text: str, environ: dict[str, str] | None = None, base: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, environ=environ or {}, base=base)
    return str(info.value)


def test_default_test_config_loads() -> None:
    settings = loads(config_text(), environ={})
    assert [r.name for r in settings.routes] == ["remote_write", "otlp_traces"]
    assert [c.name for c in settings.credentials] == ["ingest", "other"]
    ingest = settings.credentials[0]
    assert ingest.routes == frozenset({"remote_write", "otlp_traces"})
    assert ingest.tokens[0].digest == hashlib.sha256(TOKEN.encode()).digest()


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (
            lambda t: t.replace('upstream = "http://127.0.0.1:9/api', 'upstream = "ftp://x/api', 1),
            "routes[0].upstream:",
        ),
        (lambda t: t.replace("http://127.0.0.1:9/v1/traces", "not a url"), "routes[1].upstream:"),
        (
            lambda t: t.replace("http://127.0.0.1:9/v1/traces", "http://u:p@h/v1/traces"),
            "routes[1].upstream:",
        ),
        (
            lambda t: t.replace("http://127.0.0.1:9/v1/traces", "http://h:99999/x"),
            "routes[1].upstream:",
        ),
        (lambda t: t.replace('protocol = "otlp-http"', 'protocol = "grpc"'), "routes[1].protocol"),
        (lambda t: t.replace('path = "/v1/traces"', 'path = "v1/traces"'), "routes[1].path:"),
        (lambda t: t.replace('path = "/v1/traces"', 'path = "/health"'), "routes[1].path:"),
        (lambda t: t.replace('path = "/v1/traces"', 'path = "/v1/traces?x=1"'), "routes[1].path:"),
        (lambda t: t.replace('name = "otlp_traces"', 'name = "bad name"'), "routes[1].name:"),
        (lambda t: t.replace('name = "otlp_traces"', 'name = "unmatched"'), "routes[1].name:"),
        (
            lambda t: t.replace("max_body_bytes = 67108864", "max_body_bytes = 0", 1),
            "routes[0].max_body_bytes",
        ),
        (lambda t: t.replace('listen = "127.0.0.1:0"', 'listen = "nope"', 1), "server.listen:"),
        (
            lambda t: t.replace("[server]", "[server]\nbody_idle_timeout_seconds = -1"),
            "server.body_idle_timeout_seconds",
        ),
        (lambda t: t.replace("[server]", "[server]\nrealm = 'a\"b'"), "server.realm:"),
        (
            lambda t: t.replace("[upstream]", "[upstream]\nconnect_timeout_seconds = 0"),
            "upstream.connect_timeout_seconds",
        ),
        (lambda t: t.replace('level = "debug"', 'level = "loud"'), "log.level"),
    ],
)
def test_value_errors_name_the_key_path(mutate: Callable[[str], str], key: str) -> None:
    message = error_of(mutate(config_text()))
    assert message.startswith(key), message


# A token pasted into the wrong key is the value of that key: the error names
# the key, never what it holds (the config fuzz found each of these echoing it).
PASTED = "pasted-token-9f8e7d6c5b4a"


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda t: t.replace("http://127.0.0.1:9/api/v1/write", PASTED), "routes[0].upstream"),
        (lambda t: t.replace('"prometheus-remote-write"', f'"{PASTED}"'), "routes[0].protocol"),
        (lambda t: t.replace('path = "/v1/traces"', f'path = "{PASTED}"'), "routes[1].path"),
        (lambda t: t.replace('listen = "127.0.0.1:0"', f'listen = "{PASTED}"', 1), "server.listen"),
        (
            lambda t: t.replace(
                "[upstream]", f'[clients]\ntrusted_proxies = ["{PASTED}"]\n[upstream]'
            ),
            "clients.trusted_proxies",
        ),
        (
            lambda t: t.replace(
                "http://127.0.0.1:9/api/v1/write", f"http://127.0.0.1:9/api/v1/write?{PASTED}#x"
            ),
            "routes[0].upstream",
        ),
        (
            lambda t: t + cred(f'token_file = "{PASTED}"', name="third"),
            "credentials[2].token_file",
        ),
        (
            lambda t: t + cred('token_env = "T"', routes=f'["{PASTED}"]', name="third"),
            "credentials[2].routes[0]",
        ),
    ],
)
def test_a_config_error_never_echoes_the_value(mutate: Callable[[str], str], key: str) -> None:
    message = error_of(mutate(config_text()), {"T": SECRET})
    assert message.startswith(key), message
    assert PASTED not in message, message


def test_methods_are_validated() -> None:
    text = config_text().replace('protocol = "otlp-http"', 'protocol = "otlp-http"\nmethods = []')
    assert error_of(text).startswith("routes[1].methods:")
    text = config_text().replace(
        'protocol = "otlp-http"', 'protocol = "otlp-http"\nmethods = ["BREW"]'
    )
    assert error_of(text).startswith("routes[1].methods:")


@pytest.mark.parametrize(
    ("insert_after", "line", "key"),
    [
        ("[server]", "listen_port = 1", "server.listen_port: unknown key"),
        ("[upstream]", "timeout = 1", "upstream.timeout: unknown key"),
        ('protocol = "otlp-http"', "rewrite = true", "routes[1].rewrite: unknown key"),
        ('name = "other"', "token = 'x'", "credentials[1].token: unknown key"),
    ],
)
def test_unknown_keys_are_errors(insert_after: str, line: str, key: str) -> None:
    text = config_text().replace(insert_after, f"{insert_after}\n{line}", 1)
    assert error_of(text) == key


def test_unknown_top_level_table() -> None:
    assert error_of(config_text() + "\n[tls]\ncert = 'x'\n") == "tls: unknown key"


def test_invalid_toml() -> None:
    assert error_of("[server\n").startswith("not valid TOML")


def test_duplicate_route_name_and_path() -> None:
    text = config_text().replace('name = "otlp_traces"', 'name = "remote_write"')
    assert error_of(text).startswith("routes[1].name: duplicate")
    text = config_text().replace('path = "/v1/traces"', 'path = "/api/v1/write"')
    assert error_of(text).startswith("routes[1].path: duplicate")


def test_duplicate_credential_name() -> None:
    text = config_text().replace('name = "other"', 'name = "ingest"')
    assert error_of(text).startswith("credentials[1].name: duplicate")


def test_no_routes_or_no_credentials() -> None:
    assert error_of(cred('token_env = "T"'), {"T": SECRET}).startswith("routes:")
    assert error_of(config_text(credentials="")).startswith("credentials:")


def test_credential_scoped_to_unknown_route() -> None:
    text = config_text(credentials=cred('token_env = "T"', routes='["remote_write", "logs"]'))
    assert error_of(text, {"T": SECRET}).startswith("credentials[0].routes[1]: no route")


def test_credential_without_any_token_source() -> None:
    assert error_of(config_text(credentials=cred(""))).startswith("credentials[0].tokens:")


def test_two_token_sources_are_an_error() -> None:
    body = f'token_env = "T"\ntoken_sha256 = "{"0" * 64}"'
    assert error_of(config_text(credentials=cred(body)), {"T": SECRET}).startswith(
        "credentials[0].token_sha256: exactly one"
    )


def test_token_sha256_must_be_a_hex_digest_and_is_not_echoed() -> None:
    # An operator pasting the plaintext token into token_sha256 must not see
    # it echoed into logs or CI output.
    message = error_of(config_text(credentials=cred(f'token_sha256 = "{SECRET}"')))
    assert message.startswith("credentials[0].token_sha256:")
    assert SECRET not in message


@pytest.mark.parametrize("environ", [{}, {"T": ""}, {"T": "   "}, {"T": "\n"}])
def test_unset_or_empty_token_env_is_an_error(environ: dict[str, str]) -> None:
    message = error_of(config_text(credentials=cred('token_env = "T"')), environ)
    assert message.startswith("credentials[0].token_env:"), message


def test_short_token_env_is_an_error_without_echoing_it() -> None:
    message = error_of(config_text(credentials=cred('token_env = "T"')), {"T": "Zq9short"})
    assert message.startswith("credentials[0].token_env:")
    assert "Zq9short" not in message


def test_token_env_resolves_to_a_digest() -> None:
    settings = loads(config_text(credentials=cred('token_env = "T"')), environ={"T": SECRET})
    [token] = settings.credentials[0].tokens
    assert token.digest == hashlib.sha256(SECRET.encode()).digest()


def test_token_file_resolves_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "ingest.token").write_text(SECRET + "\n")
    text = config_text(credentials=cred('token_file = "ingest.token"'))
    settings = loads(text, environ={}, base=tmp_path)
    # Surrounding whitespace (the trailing newline of `echo > file`) is not part of it.
    assert settings.credentials[0].tokens[0].digest == hashlib.sha256(SECRET.encode()).digest()


def test_missing_or_empty_token_file(tmp_path: Path) -> None:
    text = config_text(credentials=cred('token_file = "absent.token"'))
    assert error_of(text, base=tmp_path).startswith("credentials[0].token_file: cannot read")
    (tmp_path / "empty.token").write_text("\n")
    text = config_text(credentials=cred('token_file = "empty.token"'))
    assert error_of(text, base=tmp_path).startswith("credentials[0].token_file:")


def test_tokens_list_errors_name_the_token() -> None:
    body = (
        '[[credentials.tokens]]\nid = "a"\nenv = "A"\n[[credentials.tokens]]\nid = "b"\nenv = "B"'
    )
    text = config_text(credentials=cred(body))
    assert error_of(text, {"A": SECRET}).startswith("credentials[0].tokens[1].env:")
    naive = '[[credentials.tokens]]\nid = "a"\nenv = "A"\nnot_after = 2030-01-01T00:00:00'
    assert error_of(config_text(credentials=cred(naive)), {"A": SECRET}).startswith(
        "credentials[0].tokens[0].not_after:"
    )


def test_token_ids_unique_and_secrets_not_shared() -> None:
    body = (
        '[[credentials.tokens]]\nid = "a"\nenv = "A"\n[[credentials.tokens]]\nid = "a"\nenv = "B"'
    )
    env = {"A": SECRET, "B": SECRET + "-2"}
    assert error_of(config_text(credentials=cred(body)), env).startswith("credentials[0].tokens:")
    shared = cred('token_env = "A"') + cred('token_env = "B"', name="second")
    message = error_of(config_text(credentials=shared), {"A": SECRET, "B": SECRET})
    assert message.startswith("credentials[1]:")
    assert SECRET not in message


def test_validity_window_and_revoked_are_decoded() -> None:
    body = f"""
[[credentials.tokens]]
id = "new"
env = "A"
not_before = 2026-01-01T00:00:00Z
not_after = 2027-01-01T00:00:00Z
[[credentials.revoked]]
id = "old"
sha256 = "{"ab" * 32}"
"""
    settings = loads(config_text(credentials=cred(body)), environ={"A": SECRET})
    [token] = settings.credentials[0].tokens
    assert (token.not_before, token.not_after) == (1767225600.0, 1798761600.0)
    [revoked] = settings.credentials[0].revoked
    assert revoked.digest == bytes.fromhex("ab" * 32)


def settings_with_secret(tmp_path: Path) -> Settings:
    (tmp_path / "t").write_text(SECRET)
    body = f"""
[[credentials.tokens]]
id = "env"
env = "A"
[[credentials.tokens]]
id = "file"
file = "t"
[[credentials.revoked]]
id = "old"
sha256 = "{hashlib.sha256(b"old-secret-0123456789").hexdigest()}"
"""
    return loads(config_text(credentials=cred(body)), environ={"A": SECRET + "x"}, base=tmp_path)


def test_repr_never_shows_a_secret_or_its_digest(tmp_path: Path) -> None:
    settings = settings_with_secret(tmp_path)
    text = repr(settings) + str(settings)
    forbidden = [SECRET, SECRET + "x"]
    secrets: list[Token | Revoked] = []
    for c in settings.credentials:
        secrets += [*c.tokens, *c.revoked]
    assert len(secrets) == 3
    for t in secrets:
        forbidden += [t.digest.hex(), repr(t.digest)]
        assert t.digest.hex() not in repr(t)
    for needle in forbidden:
        assert needle not in text
    # The names an operator needs are still there.
    assert "ingest" in text
    assert "'env'" in text


def tls_config(cert: str, key: str, ca: str | None = None) -> str:
    extra = f'client_ca_file = "{ca}"\nclient_auth = "required"\n' if ca else ""
    server = f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n{extra}'
    return config_text().replace("[upstream]", f"{server}\n[upstream]", 1)


@pytest.mark.parametrize(
    ("missing", "key"),
    [("key", "key_file"), ("cert", "cert_file"), ("ca", "client_ca_file")],
)
def test_an_unreadable_tls_file_is_named_by_its_own_key(
    tmp_path: Path, missing: str, key: str
) -> None:
    pki = Pki(tmp_path)
    server = pki.server("gateway")
    files = {"cert": server.cert.name, "key": server.key.name, "ca": pki.client_ca_file.name}
    files[missing] = f"absent-{missing}.pem"
    error = error_of(tls_config(files["cert"], files["key"], files["ca"]), base=tmp_path)
    assert error.startswith(f"server.tls.{key}: cannot read "), error
    assert f"absent-{missing}.pem" not in error  # the key names it; values are never echoed
    assert "No such file" in error
    assert "None" not in error


def test_a_certificate_and_key_that_do_not_pair_name_key_file(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    one, two = pki.server("one", "one"), pki.server("two", "two")
    error = error_of(tls_config(one.cert.name, two.key.name), base=tmp_path)
    assert error.startswith("server.tls.key_file: certificate and key do not load as a pair")
    # And the matching pair loads.
    assert loads(tls_config(one.cert.name, one.key.name), environ={}, base=tmp_path).tls_context


_RW_UPSTREAM = 'upstream = "http://127.0.0.1:9/api/v1/write"'


def _upstreams(lines: str) -> str:
    return config_text().replace(_RW_UPSTREAM, lines, 1)


@pytest.mark.parametrize(
    ("lines", "key"),
    [
        ('upstreams = ["http://127.0.0.1:9/a", "ftp://x"]', "routes[0].upstreams[1]:"),
        ('upstreams = ["http://a:1/x", "http://a:1/x"]', "routes[0].upstreams[1]:"),
        (
            'upstreams = ["http://a:1/x", {url = "http://b:1/x", weight = 0}]',
            "routes[0].upstreams[1].weight",
        ),
        ('upstreams = [{url = "http://b:1/x", name = "a b"}]', "routes[0].upstreams[0].name:"),
        ('upstreams = [{url = "nope"}]', "routes[0].upstreams[0].url:"),
        (
            'upstreams = [{url = "http://b:1/x", name = "v"}, {url = "http://c:1/x", name = "v"}]',
            "routes[0].upstreams[1].name:",
        ),
        ('upstreams = [{url = "http://b:1/x", port = 1}]', "routes[0].upstreams[0].port: unknown"),
        ("upstreams = []", "routes[0].upstream: give exactly one"),
        (_RW_UPSTREAM + '\nupstreams = ["http://a:1/x"]', "routes[0].upstream: give exactly one"),
        ('upstreams = ["http://a:1/x"]\nbalance = "random"', "routes[0].balance"),
        ('upstreams = ["http://a:1/x"]\nattempts = 0', "routes[0].attempts"),
        ('upstreams = ["http://a:1/x"]\nretry_statuses = [200]', "routes[0].retry_statuses[0]"),
        ('upstreams = ["http://a:1/x"]\nreplay_buffer_bytes = -1', "routes[0].replay_buffer_bytes"),
        (
            'upstreams = ["http://a:1/x"]\nhealth_check = { path = "health" }',
            "routes[0].health_check.path:",
        ),
        (
            'upstreams = ["http://a:1/x"]\n'
            "health_check = { interval_seconds = 1, timeout_seconds = 2 }",
            "routes[0].health_check.timeout_seconds:",
        ),
        (
            'upstreams = ["http://a:1/x"]\nhealth_check = { healthy_threshold = 0 }',
            "routes[0].health_check.healthy_threshold",
        ),
    ],
)
def test_backend_errors_name_the_key_path(lines: str, key: str) -> None:
    message = error_of(_upstreams(lines))
    assert message.startswith(key), message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("replay_memory_bytes = -1", "upstream.replay_memory_bytes"),
        ("eject_after_failures = 0", "upstream.eject_after_failures"),
        ("eject_base_seconds = 5\neject_max_seconds = 1", "upstream.eject_max_seconds:"),
    ],
)
def test_failover_keys_of_upstream_name_the_key_path(line: str, key: str) -> None:
    message = error_of(config_text(upstream=line))
    assert message.startswith(key), message


def test_several_backends_decode_with_their_defaults() -> None:
    settings = loads(
        _upstreams(
            'upstreams = ["http://a:1/x", { url = "http://b/y", weight = 3, name = "vm-b" }]'
        ),
        environ={},
    )
    route = settings.routes[0]
    assert [(label, b.url, b.weight) for label, b in route.backends()] == [
        ("a:1", "http://a:1/x", 1),
        ("vm-b", "http://b/y", 3),
    ]
    assert (route.balance, route.attempts, route.retry_statuses) == (
        "least_outstanding",
        2,
        (502, 503, 504),
    )
    assert route.replay_buffer_bytes == 8 * 1024 * 1024
    assert route.health_check is None
    assert settings.upstream.replay_memory_bytes == 64 * 1024 * 1024
    # upstream = "…" is a list of one.
    assert [label for label, _ in settings.routes[1].backends()] == ["127.0.0.1:9"]
