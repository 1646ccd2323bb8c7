"""scripts/ensure-system-deps, the step `make test`/`check`/`bench` run first.

A package-less machine cannot be recreated on a shared one, so the script
runs with PATH holding only fakes that record their arguments: ``id`` (who
we are), ``sudo`` (password-less or not), ``apt-get`` (whose ``install``
puts stub programs on PATH, as the real packages would), ``systemctl`` and
``env``.  `.ci/run` runs the same script once for real on a clean machine.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import require_binary

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ensure-system-deps"
TABLE = REPO / "scripts" / "system-deps.txt"


def table() -> dict[str, tuple[str, set[str]]]:
    """program → (package, targets), as the script reads it."""
    out = {}
    for line in TABLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            program, package, *targets = line.split()
            out[program] = (package, set(targets))
    return out


def fake(path: Path, body: str) -> None:
    path.write_text(f'#!/bin/bash\nprintf "%s\\n" "${{0##*/}} $*" >> "$RECORD"\n{body}\n')
    path.chmod(0o755)


@dataclass
class Run:
    code: int
    out: str
    err: str
    calls: list[str]


class Machine:
    """A PATH of fakes; ``present`` programs exist before the run."""

    def __init__(self, tmp: Path, *, uid: int = 0, sudo: str | None = "ok") -> None:
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.record = tmp / "calls"
        self.record.touch()
        fake(self.bin / "id", f'[ "$1" = -u ] && echo {uid}')
        (self.bin / "env").symlink_to("/usr/bin/env")
        # apt-get install: each package drops its programs on PATH, unless
        # the test says a package ships nothing (a wrong table entry).
        ships: dict[str, list[str]] = {}
        for program, (package, _) in table().items():
            ships.setdefault(package, []).append(program)
        stubs = " ".join(f"{package}) programs='{' '.join(p)}';;" for package, p in ships.items())
        fake(
            self.bin / "apt-get",
            f"""[ "$1" = install ] || exit 0
for p in "$@"; do
  programs=""
  case "$p" in {stubs} esac
  case " $BROKEN " in *" $p "*) continue;; esac
  for prog in $programs; do
    printf '#!/bin/bash\\n' > "${{0%/*}}/$prog"; /bin/chmod +x "${{0%/*}}/$prog"
  done
done""",
        )
        fake(self.bin / "systemctl", "exit 0")
        if sudo == "ok":
            fake(self.bin / "sudo", '[ "$1" = -n ] && shift\n[ "$1" = true ] && exit 0\nexec "$@"')
        elif sudo == "password":
            fake(self.bin / "sudo", "echo 'sudo: a password is required' >&2; exit 1")

    def present(self, *programs: str) -> None:
        for program in programs:
            fake(self.bin / program, "exit 0")

    def run(self, *targets: str, broken: str = "") -> Run:
        self.record.write_text("")
        result = subprocess.run(
            ["/bin/bash", str(SCRIPT), *targets],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={"PATH": str(self.bin), "RECORD": str(self.record), "BROKEN": broken},
            cwd=REPO,
        )
        calls = self.record.read_text().splitlines()
        return Run(result.returncode, result.stdout, result.stderr, calls)


def apt_calls(run: Run) -> list[str]:
    return [c for c in run.calls if c.startswith("apt-get")]


def test_the_table_names_what_each_target_runs() -> None:
    t = table()
    for_test = {p for p, (_, targets) in t.items() if "test" in targets}
    # The integration tier's real peers, node + npm for the JS SDK sender,
    # and curl, an HTTP/2 client of its own (nghttp2) for the functional tier.
    assert for_test == {"victoria-metrics", "vmagent", "prometheus", "node", "npm", "curl"}
    assert {p for p, (_, targets) in t.items() if "check" in targets} == {
        "promtool",
        "vmalert",
        "vmagent",
        "docker-compose",
    }
    assert t["vmagent"][0] == t["vmalert"][0] == "victoria-metrics"
    assert t["promtool"][0] == "prometheus"


def test_root_installs_the_missing_packages_once_and_stops_their_daemons(
    tmp_path: Path,
) -> None:
    m = Machine(tmp_path, uid=0)
    m.present("node", "npm", "curl")
    run = m.run("test")
    assert run.code == 0, run.err
    assert apt_calls(run) == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends victoria-metrics prometheus",
    ]
    # One line: what and why.
    [line] = run.out.splitlines()
    assert "installing victoria-metrics prometheus" in line
    assert "vmagent" in line
    assert "sudo" not in " ".join(run.calls)
    assert [c for c in run.calls if c.startswith("systemctl")] == [
        "systemctl stop victoria-metrics",
        "systemctl stop prometheus",
    ]
    # Installed now: a second run does nothing and says nothing.
    again = m.run("test")
    assert (again.code, again.out, again.err, apt_calls(again)) == (0, "", "", [])


def test_nothing_missing_is_silent_and_touches_nothing(tmp_path: Path) -> None:
    m = Machine(tmp_path, uid=1000, sudo="password")
    m.present(*table())
    run = m.run("test", "check", "bench")
    assert (run.code, run.out, run.err) == (0, "", "")
    assert run.calls == []


def test_only_what_the_target_runs_is_installed(tmp_path: Path) -> None:
    m = Machine(tmp_path, uid=0)
    m.present("victoria-metrics", "vmagent", "vmalert", "promtool")
    run = m.run("check")
    assert run.code == 0, run.err
    assert apt_calls(run)[-1] == "apt-get install -y -qq --no-install-recommends docker-compose"
    # A daemon this run did not install is not this run's to stop.
    assert not [c for c in run.calls if c.startswith(("systemctl", "service"))]
    bench = m.run("bench")
    assert apt_calls(bench)[-1].endswith("--no-install-recommends victoria-metrics nginx-light wrk")
    assert "systemctl stop nginx" in bench.calls


def test_passwordless_sudo_installs_through_sudo(tmp_path: Path) -> None:
    m = Machine(tmp_path, uid=1000, sudo="ok")
    run = m.run("test")
    assert run.code == 0, run.err
    assert "sudo -n true" in run.calls
    install = "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
    assert any(c.startswith(install) for c in run.calls), run.calls
    assert "sudo -n systemctl stop victoria-metrics" in run.calls


@pytest.mark.parametrize("sudo", ["password", None])
def test_without_root_it_stops_before_anything_with_the_command_to_run(
    tmp_path: Path, sudo: str | None
) -> None:
    m = Machine(tmp_path, uid=1000, sudo=sudo)
    m.present("prometheus", "node", "npm", "curl")
    run = m.run("test")
    assert run.code == 1
    assert apt_calls(run) == []
    assert "  sudo apt-get install --no-install-recommends victoria-metrics\n" in run.err
    assert "victoria-metrics: victoria-metrics, vmagent" in run.err


def test_a_program_still_missing_after_install_fails_naming_it(tmp_path: Path) -> None:
    m = Machine(tmp_path, uid=0)
    run = m.run("test", broken="prometheus")
    assert run.code == 1
    assert "still not on PATH: prometheus (prometheus)" in run.err


def test_not_debian_names_what_to_install(tmp_path: Path) -> None:
    m = Machine(tmp_path, uid=0)
    (m.bin / "apt-get").unlink()
    run = m.run("test")
    assert run.code == 1
    assert "no apt-get" in run.err
    assert "prometheus: prometheus" in run.err


def test_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    run = Machine(tmp_path).run("tset")
    assert run.code == 2
    assert "unknown target 'tset'" in run.err


@pytest.mark.parametrize(
    ("target", "first_work"),
    [
        ("test", "pytest"),
        ("check", "hadolint"),
        ("check-deploy", "hadolint"),
        ("bench", "-m bench"),
    ],
)
def test_make_targets_ensure_their_programs_before_running_anything(
    target: str, first_work: str
) -> None:
    planned = subprocess.run(
        ["make", "-n", target], capture_output=True, text=True, check=True, cwd=REPO, timeout=30
    ).stdout.splitlines()
    ensure = [i for i, line in enumerate(planned) if "scripts/ensure-system-deps" in line]
    work = [i for i, line in enumerate(planned) if first_work in line]
    assert ensure, planned
    assert work, planned
    assert ensure[0] < work[0]
    assert planned[ensure[0]].split()[-1] == target.removesuffix("-deploy")


def test_ci_calls_the_same_step_and_keeps_no_package_list_of_its_own() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/ensure-system-deps check test" in ci
    commands = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in commands if "apt-get" in line]
    assert os.access(SCRIPT, os.X_OK)


def test_a_missing_peer_fails_the_integration_tier_naming_its_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    for program, (package, _) in table().items():
        with pytest.raises(pytest.fail.Exception) as failed:
            require_binary(program)
        assert f"Debian package {package!r}" in str(failed.value)


# Skipping is allowed for the soak tier only (it runs in `make soak`).
SKIP = re.compile(r"\bpytest\.(?:skip|importorskip)\b|\bmark\.skip(?:if)?\b")


def test_no_tier_skips_quietly() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        if "soak" not in path.parts and path != Path(__file__)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if SKIP.search(line)
    ]
    assert offenders == []
