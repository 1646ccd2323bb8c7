"""``python -m bench profile``: where the gateway's CPU goes under load.

Starts the sink and the gateway, drives one workload with wrk and samples
the gateway with py-spy (``record --format raw``: collapsed stacks, which
speedscope and flamegraph.pl both read).  Idle samples (the loop waiting in
epoll) are not recorded, so percentages are of busy CPU.  Prints, and saves
next to the stacks, a top table: self time by function, inclusive time by
function, and self time by file.  With ``perf`` (Debian: linux-perf)
installed, a second window is sampled with ``perf record`` for the split
Python cannot see: kernel (TCP on loopback, wake-ups) vs the CPython
interpreter vs llhttp vs uvloop/libuv, by shared object and by symbol.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench import load
from bench.payloads import write_payload
from bench.peers import Stack
from bench.procs import Procs, tree
from bench.workloads import RESULTS, WORKLOADS

__all__ = ["main", "top_table"]


def _frame(raw: str) -> tuple[str, str]:
    """``func (path/to/file.py:123)`` → (``func (file.py)``, ``file.py``)."""
    func, _, where = raw.rpartition(" (")
    if not func:
        return raw, raw
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    # Keep the package: gateway/proxy.py, asyncio/events.py, structlog/_log.py.
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{func} ({short})", short


def top_table(collapsed: str, rows: int = 25) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if f]
        # Thread/process roots ("process 123:...", "thread (0x...)") are not code.
        frames = [f for f in frames if "(" in f[0] and not f[0].startswith(("thread", "process"))]
        if not frames:
            continue
        own[frames[-1][0]] += n
        files[frames[-1][1]] += n
        for name in {f[0] for f in frames}:
            incl[name] += n
    if not total:
        return "(no samples: is the gateway busy, and may py-spy ptrace it?)"

    def section(title: str, counter: Counter[str]) -> list[str]:
        out = [f"| {title} | % of busy samples |", "|---|--:|"]
        out += [f"| `{k}` | {v / total * 100:.1f} |" for k, v in counter.most_common(rows)]
        return [*out, ""]

    return "\n".join(
        [
            f"{total} samples",
            "",
            *section("self time: function (file)", own),
            *section("inclusive time: function (file)", incl),
            *section("self time by file", files),
        ]
    )


def perf_tables(data: Path, rows: int = 25) -> str:
    """``perf report`` by shared object, then by symbol, as text."""

    def report(sort: str) -> list[str]:
        out = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", sort,
             "--stdio", "-g", "none"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        return [ln.rstrip() for ln in out.stdout.splitlines() if ln.strip() and ln[0] != "#"]

    return "\n".join(
        ["by shared object (% of CPU samples)", *report("dso")[:12], "",
         "by symbol", *report("dso,sym")[:rows]]
    )  # fmt: skip


def _pyspy() -> str:
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("bench profile: py-spy not found (pip install -e '.[bench]')")
    return found


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1k", choices=list(WORKLOADS))
    p.add_argument("--duration", type=int, default=10, help="seconds sampled (10)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (250)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--native", action="store_true", help="also sample C frames (uvloop, llhttp)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-perf", action="store_true", help="skip the perf record window")
    args = p.parse_args(argv)
    pyspy = _pyspy()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    rundir = RESULTS / "tmp" / f"profile-{stamp}"
    rundir.mkdir(parents=True)
    wl = WORKLOADS[args.size]
    payload = write_payload(wl.name, wl.kind, wl.max_bytes, rundir)
    token = secrets.token_hex(32)
    out = rundir / f"gateway-{wl.name}.collapsed.txt"
    with Procs(rundir) as procs:
        stack = Stack(procs, rundir, token, workers=args.workers, sink_workers=1, access_log=False)
        stack.start_sink()
        gw = stack.start("gateway")
        load.wrk(gw.port, payload, token, connections=wl.connections, duration=1)  # warm-up
        use_perf = shutil.which("perf") is not None and not args.no_perf
        windows = 2 if use_perf else 1
        driver = threading.Thread(
            target=load.wrk,
            args=(gw.port, payload, token),
            kwargs={"connections": wl.connections, "duration": windows * args.duration + 3},
        )
        driver.start()
        time.sleep(1.0)
        argv_spy = [
            pyspy,
            "record",
            "--pid",
            str(gw.pid),
            "--duration",
            str(args.duration),
            "--rate",
            str(args.rate),
            "--format",
            "raw",
            "--output",
            str(out),
        ]
        if args.workers > 1:
            argv_spy.append("--subprocesses")
        # Without --native, sample without pausing the process (less overhead);
        # native unwinding needs the process stopped.
        argv_spy.append("--native" if args.native else "--nonblocking")
        spy = subprocess.run(
            argv_spy, capture_output=True, text=True, timeout=args.duration + 60, check=False
        )
        perf_data = rundir / "perf.data"
        if use_perf:
            pids = ",".join(str(p) for p in tree(gw.pid).pids)
            subprocess.run(
                ["perf", "record", "-F", "999", "-g", "-o", str(perf_data), "-p", pids,
                 "--", "sleep", str(args.duration)],
                capture_output=True, timeout=args.duration + 60, check=False,
            )  # fmt: skip
        driver.join(timeout=windows * args.duration + 90)
    if spy.returncode != 0 or not out.exists():
        print(f"bench profile: py-spy failed: {spy.stderr.strip()}")
        return 1
    table = top_table(out.read_text(), args.rows)
    if perf_data.exists():
        table += "\n\nperf record -g, same load:\n\n" + perf_tables(perf_data, args.rows)
    (rundir / f"gateway-{wl.name}.top.md").write_text(table + "\n")
    print(table)
    print(f"\ncollapsed stacks (speedscope.app or flamegraph.pl read them): {out}")
    return 0
