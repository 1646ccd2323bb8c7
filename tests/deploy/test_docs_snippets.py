"""The config snippets of README.md and docs/deploy.md load with the gateway's
own loader (the runbook's are checked by tests/lifecycle/test_runbook.py),
and the copies of Cloudflare's address ranges agree with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gateway.config.loader import loads
from tests.conftest import config_text

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "docs" / "deploy.md"]


def toml_blocks(path: Path) -> list[str]:
    found = re.findall(r"^ *```toml\n(.*?)^ *```", path.read_text(), re.M | re.S)
    indent = [min(len(x) - len(x.lstrip()) for x in b.splitlines() if x.strip()) for b in found]
    return [
        "\n".join(line[n:] for line in b.splitlines()) for b, n in zip(found, indent, strict=True)
    ]


SNIPPETS = [(p.name, b) for p in DOCS for b in toml_blocks(p)]


@pytest.mark.parametrize(
    ("doc", "snippet"), SNIPPETS, ids=[f"{d}-{i}" for i, (d, _) in enumerate(SNIPPETS)]
)
def test_clients_snippets_load(doc: str, snippet: str) -> None:
    tomllib.loads(snippet)
    if "[clients]" not in snippet:
        return
    clients = snippet[snippet.index("[clients]") :]
    settings = loads(config_text() + "\n" + clients, environ={})
    assert settings.clients.trusted_proxies


TENANT_SNIPPETS = [s for _, s in SNIPPETS if "[credentials.forward" in s]


@pytest.mark.parametrize("snippet", TENANT_SNIPPETS, ids=range(len(TENANT_SNIPPETS)))
def test_multi_tenant_snippets_load(snippet: str, tmp_path: Path) -> None:
    """§ Multi-tenant: every example is a credential the loader accepts."""
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415
    from jwt.algorithms import RSAAlgorithm  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "jwks.json").write_text(f'{{"keys": [{RSAAlgorithm.to_jwk(key)}]}}')
    environ = dict.fromkeys(
        re.findall(r'"(OBS_\w+)"', snippet), "a-token-of-the-example-0123456789"
    )
    settings = loads(config_text(credentials=snippet), environ=environ, base=tmp_path)
    assert all(c.forward is not None for c in settings.credentials)
    assert len(TENANT_SNIPPETS) >= 5


def cloudflare_ranges(snippet: str) -> set[str]:
    proxies = tomllib.loads(snippet[snippet.index("[clients]") :])["clients"]["trusted_proxies"]
    return {p for p in proxies if not p.startswith(("127.", "172.18."))}


def test_every_copy_of_cloudflares_ranges_is_the_same() -> None:
    copies = [cloudflare_ranges(s) for _, s in SNIPPETS if "cloudflare.com/ips" in s]
    assert len(copies) >= 2
    assert all(c == copies[0] for c in copies)
