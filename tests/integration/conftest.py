"""Fixtures of the integration tier: every process and in-test server a test
starts is stopped in a finalizer, whatever happens; a failed test prints
the tail of each process log it started."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import config_text
from tests.integration.components import Gateway, VictoriaMetrics
from tests.integration.harness import Procs
from tests.integration.payloads import exposition
from tests.integration.receivers import OtlpReceiver, ScrapeTarget, Server

S = TypeVar("S", bound=Server)

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Procs]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    supervisor = Procs(log_dir)
    yield supervisor
    problems = supervisor.stop_all()
    if request.node.stash.get(_FAILED, False):
        print(f"\nprocess logs of the failed test ({log_dir}):\n{supervisor.tails()}")
    assert not problems, f"could not stop: {problems}"


@pytest.fixture
def servers() -> Iterator[Callable[[S], S]]:
    """Start in-test HTTP servers; all stopped at teardown."""
    started: list[Server] = []

    def start(server: S) -> S:
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def scrape_target(servers: Callable[[ScrapeTarget], ScrapeTarget]) -> ScrapeTarget:
    """Serves payloads.TARGET_SERIES at /metrics."""
    return servers(ScrapeTarget(exposition()))


@pytest.fixture
def otlp_receiver(servers: Callable[[OtlpReceiver], OtlpReceiver]) -> OtlpReceiver:
    return servers(OtlpReceiver())


@pytest.fixture
def victoria_metrics(procs: Procs, tmp_path: Path) -> VictoriaMetrics:
    return VictoriaMetrics(procs, tmp_path / "vm-data")


StartGateway = Callable[..., Gateway]


@pytest.fixture
def start_gateway(procs: Procs, tmp_path: Path) -> StartGateway:
    """``start_gateway(rw_upstream=…, otlp_upstream=…)``: the CLI with a config
    from tests.conftest.config_text (credential "ingest" = TOKEN on both
    routes, "other" = OTHER_TOKEN on remote_write only)."""

    def start(**kwargs: Any) -> Gateway:
        return Gateway(procs, tmp_path / "gateway", config_text(**kwargs))

    return start
