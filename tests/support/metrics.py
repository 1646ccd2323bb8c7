"""The metrics reader: one scrape of a /metrics page (the gateway's admin
port, or VictoriaMetrics, vmagent, Prometheus), parsed by prometheus-client's
exposition parser, so a page it cannot parse fails the test, with lookups
by name and a subset of labels, by the exact label set, sums and per-label
tallies.  ``scrape`` is for async tests, ``scrape_sync`` for the
integration tier's threads and sync tests.

Knows nothing of what the gateway exports: metric names are the tests'.
"""

from __future__ import annotations

import http.client
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Metrics", "Sample", "scrape", "scrape_sync"]


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


class Metrics:
    """A parsed /metrics page (histograms as their _bucket/_sum/_count samples)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            Sample(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
        self._exact = {(s.name, frozenset(s.labels.items())): s.value for s in self.samples}

    def select(self, name: str, **labels: str) -> list[Sample]:
        """Every sample of ``name`` whose labels include ``labels``."""
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def sum(self, name: str, **labels: str) -> float:
        """Sum over every series matching ``labels`` (0 when there is none)."""
        return sum(s.value for s in self.select(name, **labels))

    def by(self, name: str, key: str, **labels: str) -> dict[str, float]:
        """``{label value of key: summed value}`` over the matching series."""
        out: dict[str, float] = {}
        for s in self.select(name, **labels):
            out[s.labels.get(key, "")] = out.get(s.labels.get(key, ""), 0.0) + s.value
        return out

    def get(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None."""
        return self._exact.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels, which must exist."""
        found = self.get(name, **labels)
        assert found is not None, f"no sample {name}{labels} in:\n{self.lines(name)}"
        return found

    def lines(self, *prefixes: str) -> str:
        """The exposition lines of these metrics, as an operator would grep them."""
        return "\n".join(
            line
            for line in self.text.splitlines()
            if line.startswith(prefixes) and not line.startswith("#")
        )


def _url(where: int | str) -> str:
    """An admin port on 127.0.0.1, or a full /metrics URL."""
    return f"http://127.0.0.1:{where}/metrics" if isinstance(where, int) else where


async def scrape(where: int | str) -> Metrics:
    async with (
        aiohttp.ClientSession() as session,
        session.get(_url(where)) as resp,
    ):
        assert resp.status == 200
        return Metrics(await resp.text())


def scrape_sync(where: int | str, timeout: float = 5.0) -> Metrics:
    # http.client rather than urllib: no proxy variables, no redirects.
    url = urlsplit(_url(where))
    assert url.hostname == "127.0.0.1", f"tests stay on loopback: {url.geturl()}"
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("GET", url.path or "/")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, f"GET {url.geturl()}: {resp.status} {body[:200]!r}"
    return Metrics(body.decode("utf-8", errors="replace"))
