"""The deployment files agree with each other and with the gateway.

The linters in `make check-deploy` validate each file against its own
schema; these tests check what no schema knows: that the configs shipped in
deploy/ load with the gateway's own loader, that grace periods cover the
drain timeout, that the admin port is never published, that every mounted
file exists, and that the image's runtime lock pins what the dev lock pins.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.loader import Settings, loads
from tests.conftest import config_text
from tests.support.process import GatewayProcess

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yml"
K8S = REPO / "deploy" / "k8s"
MEMORY_CAP = 256 * 1024 * 1024  # the seed's per-service budget
TOKENS = {"OBS_INGEST_TOKEN": "x" * 32, "OBS_SELFMON_TOKEN": "y" * 32}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = _yaml(COMPOSE)
    return doc


def _k8s(kind: str) -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        doc = _yaml(path)
        if doc["kind"] == kind:
            return dict(doc)
    raise AssertionError(f"no {kind} in {K8S}")


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)b?", size.lower())
    assert m, size
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)]


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)", duration)
    assert m, duration
    return float(m.group(1)) * (60 if m.group(2) == "m" else 1)


def _deploy_settings() -> Settings:
    return loads((REPO / "deploy" / "gateway.toml").read_text(), environ=TOKENS)


def _configmap_settings(tmp_path: Path) -> Settings:
    text = _k8s("ConfigMap")["data"]["gateway.toml"]
    # Point the Secret's mount path at files of our own.
    for path in re.findall(r'token_file = "(/run/secrets/obs-gateway/[^"]+)"', text):
        local = tmp_path / Path(path).name
        local.write_text("z" * 32)
        text = text.replace(path, str(local))
    return loads(text, environ={})


# ---------------------------------------------------------------- gateway configs


def test_container_configs_load_with_the_gateway_loader(tmp_path: Path) -> None:
    for settings in (_deploy_settings(), _configmap_settings(tmp_path)):
        assert settings.server.listen == "0.0.0.0:8080"
        assert settings.server.admin_listen == "0.0.0.0:9091"
        assert {r.name for r in settings.routes} == {"remote_write", "otlp_traces"}
        # 0 means one worker per CPU of the host, whatever the container's
        # quota: enough ~40 MB workers to break the memory cap.
        assert settings.server.workers >= 1


def test_compose_upstreams_are_compose_services() -> None:
    services = _compose()["services"]
    for route in _deploy_settings().routes:
        for _, backend in route.backends():
            host = re.match(r"https?://([^:/]+)", backend.url)
            assert host, backend.url
            assert host.group(1) in services, f"{route.name} → {host.group(1)}: no such service"


# ---------------------------------------------------------------- compose


def test_compose_caps_memory_and_checks_health() -> None:
    for name, service in _compose()["services"].items():
        if service.get("restart") == "no":
            continue  # one-shot init container: exits before the stack serves
        assert _bytes(service["mem_limit"]) <= MEMORY_CAP, name
        assert "healthcheck" in service, f"{name}: no healthcheck"


def test_compose_never_publishes_the_admin_port() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert not str(port).endswith(":9091"), f"{name} publishes {port}"
    gateway = _compose()["services"]["obs-gateway"]
    assert [str(p).rsplit(":", 1)[-1] for p in gateway["ports"]] == ["8080"]


def test_compose_grace_period_covers_the_drain() -> None:
    drain = _deploy_settings().server.drain_timeout_seconds
    grace = _seconds(_compose()["services"]["obs-gateway"]["stop_grace_period"])
    assert grace > drain


def test_compose_mounts_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_compose_secrets_are_documented_and_ignored() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required >= {"OBS_INGEST_TOKEN", "OBS_SELFMON_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
    example = (REPO / ".env.example").read_text()
    for var in required:
        # Present and empty: a copied example must not start with a known secret.
        assert re.search(rf"^{var}=$", example, re.M), var
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_grafana_provisioning_matches_the_mounts() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    dashboards = _yaml(REPO / "deploy/grafana/provisioning/dashboards/dashboards.yml")
    [provider] = dashboards["providers"]
    assert mounts["./deploy/grafana/obs-gateway.json"].startswith(provider["options"]["path"])
    datasources = _yaml(REPO / "deploy/grafana/provisioning/datasources/datasources.yml")
    by_type = {d["type"]: d for d in datasources["datasources"]}
    assert by_type["prometheus"]["url"] == "http://victoriametrics:8428"
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"


def test_vmagent_scrapes_the_admin_port_as_job_obs_gateway() -> None:
    scrape = _yaml(REPO / "deploy/vmagent/scrape.yml")
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    # The alert rules' ObsGatewayDown/Absent select up{job="obs-gateway"}.
    assert jobs["obs-gateway"]["static_configs"][0]["targets"] == ["obs-gateway:9091"]


# ---------------------------------------------------------------- image


def healthchecks() -> list[str]:
    """The Python one-liner of the image's and of compose's healthcheck."""
    dockerfile = (REPO / "Dockerfile").read_text()
    [image] = re.findall(r'^\s+CMD \["python", "-c", "(.*)"\]$', dockerfile, re.M)
    test = _compose()["services"]["obs-gateway"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return [image, test[3]]


def test_healthcheck_probes_the_configured_admin_and_public_ports() -> None:
    settings = _deploy_settings().server
    admin = settings.admin_listen.rsplit(":", 1)[1]
    public = settings.listen.rsplit(":", 1)[1]
    for check in healthchecks():
        assert f"http://127.0.0.1:{admin}/readyz" in check
        assert f"('127.0.0.1', {public})" in check
    assert re.search(rf"^EXPOSE {public} {admin}$", (REPO / "Dockerfile").read_text(), re.M)


async def test_the_healthcheck_passes_on_a_serving_gateway_only(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text())

    def run(check: str) -> int:
        return subprocess.run(
            [sys.executable, "-c", check], capture_output=True, timeout=10, check=False
        ).returncode

    for check in healthchecks():
        with_ports = check.replace("9091", "{admin}").replace("8080", "{public}")
        gw = GatewayProcess(config)
        try:
            await gw.start()
            here = with_ports.format(admin=gw.admin_port, public=gw.port)
            assert await asyncio.to_thread(run, here) == 0
        finally:
            await gw.stop()
        # Nothing serves those ports any more.
        assert await asyncio.to_thread(run, here) != 0


def _pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", path.read_text(), re.M))


def test_runtime_lock_pins_what_the_dev_lock_pins() -> None:
    runtime = _pins(REPO / "requirements-runtime.lock")
    dev = _pins(REPO / "requirements.lock")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower() for d in declared}
    assert names <= set(runtime), "run `make lock`: a runtime dependency is not in the image lock"
    assert {k: dev.get(k) for k in runtime} == runtime, "run `make lock`: the locks disagree"


# ---------------------------------------------------------------- kubernetes


def test_k8s_shutdown_budget_covers_prestop_and_drain(tmp_path: Path) -> None:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = _configmap_settings(tmp_path).server.drain_timeout_seconds
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + drain + 5


def test_k8s_probes_and_hardening() -> None:
    deployment = _k8s("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9091}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert _bytes(container["resources"]["limits"]["memory"].replace("Mi", "m")) <= MEMORY_CAP
    secrets = [v for v in pod["volumes"] if "secret" in v]
    assert secrets, "tokens should come from a Secret"
    assert not any(d["kind"] == "Secret" for d in map(_yaml, K8S.glob("*.yaml"))), (
        "a Secret manifest would mean a committed token"
    )


def test_k8s_service_and_policy_keep_admin_private() -> None:
    service = _k8s("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    policy = _k8s("NetworkPolicy")
    admin_rules = [
        rule
        for rule in policy["spec"]["ingress"]
        if any(p["port"] in ("admin", 9091) for p in rule.get("ports", []))
    ]
    assert admin_rules
    assert all(rule.get("from") for rule in admin_rules), "admin port open to everyone"


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"])
def test_k8s_selectors_match_the_pods(kind: str) -> None:
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    spec = _k8s(kind)["spec"]
    selector = spec.get("selector") or spec.get("podSelector")
    selector = selector.get("matchLabels", selector)
    assert selector.items() <= labels.items()
