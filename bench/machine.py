"""The machine a bench figure was taken on, recorded with every result.

CPU per request depends on the CPU as much as on the code (issue 15: the
same commit measured 2.3x nginx on one 2-core machine and 3.7-4.2x on
another), so every result file names the CPU model, the kernel, the Python
build and which build of the gateway ran (mypyc-compiled or pure Python,
as ``gateway/build.py`` decides with the same environment), and
RESULTS.md keeps one table per machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "gateway_build", "machine", "machine_key", "pss_kib"]

_PROBE = "import json, gateway.build as b; print(json.dumps(b.running()))"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gateway_build(repo: Path) -> str:
    """ "compiled" or "pure" (with the reason, if a build is installed but unused)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        kind, reason = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    return f"{kind} ({reason})" if reason else str(kind)


def machine(repo: Path) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_build": (
            f"{platform.python_implementation()} {platform.python_version()} "
            f"({', '.join(platform.python_build())}; {platform.python_compiler()})"
        ),
        "gateway_build": gateway_build(repo),
        "loadavg_start": os.getloadavg(),
    }


def machine_key(host: dict[str, Any]) -> str:
    """What tells two machines apart in RESULTS.md: CPU model and count."""
    return f"{host.get('cpu_model', 'CPU model not recorded')}, {host['cpus']} CPUs"


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split among their users), KiB."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
