"""Compiled or pure: the build that runs is the one the listening line names.

``make test`` runs this tier twice: against the compiled build (with
``OBS_GATEWAY_EXPECT_BUILD=compiled`` where a C compiler is present, so a
build that silently fell back to Python fails here) and with
``OBS_GATEWAY_PURE=1``.  Without the variable the tests check that the
line, the switch and the stale-build guard agree with what is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gateway import build
from tests.conftest import config_text
from tests.support.process import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
_PROBE = (
    "import json, gateway.build as b, gateway.datapath.connection as c; "
    "print(json.dumps([*b.running(), c.__file__]))"
)


def _probe(cwd: Path, **env: str) -> tuple[str, str, str]:
    """(build, reason, file of the hot module) in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if k != build.PURE_ENV}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=cwd,
        env={**environ, **env, "PYTHONPATH": str(cwd)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    kind, reason, path = json.loads(out)
    return kind, reason, path


def _installed_build() -> bool:
    return (ROOT / "gateway" / "_compiled.json").is_file()


async def test_the_listening_line_names_the_build_that_runs(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text())
    gw = GatewayProcess(config, args=("--workers", "1"))
    try:
        await gw.start()
        [line] = gw.find("listening")
    finally:
        await gw.stop()
    kind, reason = build.running()  # this interpreter decided the same way
    assert line["build"] == kind
    assert line.get("build_reason", "") == reason
    if os.environ.get(build.PURE_ENV):
        assert (line["build"], line["build_reason"]) == ("pure", build.PURE_ENV)
    elif expected := os.environ.get("OBS_GATEWAY_EXPECT_BUILD"):
        assert line["build"] == expected, "the build make installed is not the one running"


def test_the_switch_loads_the_python_modules() -> None:
    kind, reason, path = _probe(ROOT, OBS_GATEWAY_PURE="1")
    assert (kind, reason) == ("pure", "OBS_GATEWAY_PURE")
    assert path.endswith("connection.py")
    kind, reason, path = _probe(ROOT)
    if _installed_build():
        assert (kind, reason) == ("compiled", "")
        assert not path.endswith(".py")
    else:
        assert (kind, reason) == ("pure", "")


def test_a_stale_build_runs_the_edited_python_source(tmp_path: Path) -> None:
    if not _installed_build():
        # Nothing compiled here (no C compiler at install): nothing can be stale.
        assert _probe(ROOT)[:2] == ("pure", "")
        return
    copy = tmp_path / "checkout"
    shutil.copytree(
        ROOT / "gateway", copy / "gateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    for lib in ROOT.glob("gateway__mypyc*"):
        shutil.copy2(lib, copy / lib.name)
    assert _probe(copy)[:2] == ("compiled", "")
    source = copy / "gateway" / "policy" / "headers.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    kind, reason, path = _probe(copy)
    assert (kind, reason) == ("pure", "stale build")
    assert path.endswith("connection.py")
