"""`[server] workers = 0`: one worker per CPU of the affinity mask, capped by
a cgroup v2 CPU quota, as docs/deploy.md and the k8s ConfigMap say."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cli import default_workers

CPUS = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", CPUS),  # no quota (compose without cpus:)
        ("100000 100000\n", 1),  # a Kubernetes limit of 1 CPU
        ("50000 100000\n", 1),  # 500m: never 0
        ("150000 100000\n", min(CPUS, 2)),  # 1.5 CPUs: rounded up
        (f"{(CPUS + 4) * 100000} 100000\n", CPUS),  # more quota than CPUs
    ],
)
def test_the_cgroup_quota_caps_the_cpu_count(tmp_path: Path, cpu_max: str, expected: int) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert default_workers(str(path)) == expected


def test_no_cgroup_v2_file_means_the_affinity_mask(tmp_path: Path) -> None:
    assert default_workers(str(tmp_path / "absent")) == CPUS
