"""``python -m bench tenancy``: what a credential's forward table costs per
request, against a plain credential, in the same run.

One gateway process (``templates/gateway-tenancy.toml``: a remote-write
route to the nginx sink, a plain credential and one that pins two
``extra_label`` arguments and an ``X-Scope-OrgID`` header) serves wrk runs
that alternate between the two tokens, the order rotated every repeat; the
gateway's CPU seconds (utime + stime from /proc) around each run divided by
the requests it completed is CPU µs per request.  Each request of the
tenant carries a client ``X-Scope-OrgID`` (replaced) and no query, as
vmagent sends it.  With ``--instructions`` the same two requests are also
counted by callgrind (deterministic: the figure to compare commits with):
one process serves the warm-up of both tokens, one more serves N plain
requests after it, one N tenant requests.  Both tokens send the same
bytes (1 KiB remote-write, vmagent's headers plus a client
``X-Scope-OrgID``, no query): only the credential differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import load
from bench.instructions import count
from bench.machine import cpu_model
from bench.payloads import Payload, write_payload
from bench.peers import REPO, Stack, render
from bench.procs import Procs, cpu_seconds, free_port, tree, wait_port
from bench.workloads import RESULTS, WORKLOADS

__all__ = ["main"]


def _config(stack: Stack, rundir: Path, tag: str, tokens: dict[str, str]) -> tuple[Path, int]:
    assert stack.sink is not None
    port = free_port()
    conf = render(
        "gateway-tenancy.toml",
        rundir / f"gateway-{tag}.toml",
        port=port,
        admin=free_port(),
        sink=stack.sink.port,
        plain_sha256=hashlib.sha256(tokens["plain"].encode()).hexdigest(),
        tenant_sha256=hashlib.sha256(tokens["tenant"].encode()).hexdigest(),
    )
    return conf, port


def _cpu(
    stack: Stack, rundir: Path, payload: Payload, tokens: dict[str, str], args: argparse.Namespace
) -> dict[str, list[float]]:
    conf, port = _config(stack, rundir, "cpu", tokens)
    argv = [sys.executable, "-m", "gateway", "run", "--config", str(conf), "--workers", "1"]
    proc = stack.procs.start("gateway", argv, cwd=REPO)
    wait_port(port, proc)
    gateway = tree(proc.pid)
    per_request: dict[str, list[float]] = {"plain": [], "tenant": []}
    order = ["plain", "tenant"]
    for name in order:  # warm-up, not measured
        load.wrk(port, payload, tokens[name], connections=args.connections, duration=1)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            before = sum(cpu_seconds(gateway))
            result = load.wrk(
                port, payload, tokens[name], connections=args.connections, duration=args.duration
            )
            used = sum(cpu_seconds(gateway)) - before
            if result["errors"] or not result["requests"]:
                raise RuntimeError(f"{name}: wrk reported errors: {result}")
            per_request[name].append(used / result["requests"] * 1e6)
            print(
                f"  {name:6} run {repeat + 1}: {result['req_s']:8.0f} req/s, "
                f"{per_request[name][-1]:6.1f} µs CPU/req"
            )
    stack.procs.stop(proc)
    return per_request


def _instructions(
    stack: Stack, rundir: Path, payload: Payload, tokens: dict[str, str], args: argparse.Namespace
) -> dict[str, float]:
    warm = [(tokens["plain"], args.warmup), (tokens["tenant"], args.warmup)]
    totals = {}
    for tag, more in (
        ("base", []),
        ("plain", [("plain", args.requests)]),
        ("tenant", [("tenant", args.requests)]),
    ):
        conf, port = _config(stack, rundir, f"callgrind-{tag}", tokens)
        sends = warm + [(tokens[name], n) for name, n in more]
        totals[tag] = count(
            stack.procs, conf, port, payload, sends, rundir / f"callgrind-{tag}.out", REPO
        )
    return {name: (totals[name] - totals["base"]) / args.requests for name in ("plain", "tenant")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench tenancy", description=__doc__)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    p.add_argument("--repeats", type=int, default=5, help="runs per credential (5)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--instructions", action="store_true", help="also count with callgrind")
    p.add_argument(
        "--cpu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the wrk runs (default: on; --no-cpu with --instructions counts only)",
    )
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--requests", type=int, default=1000)
    args = p.parse_args(argv)
    if args.instructions and shutil.which("valgrind") is None:
        print("bench tenancy: valgrind is not installed (Debian: apt-get install valgrind)")
        return 2
    rundir = RESULTS / "tmp" / f"tenancy-{time.strftime('%Y%m%dT%H%M%S')}"
    rundir.mkdir(parents=True)
    wl = WORKLOADS["1k"]
    payload = write_payload(wl.name, wl.kind, wl.max_bytes, rundir)
    # Both senders write the header the tenant's credential pins: the same
    # bytes on the wire, only the credential differs.
    payload = replace(payload, headers={**payload.headers, "X-Scope-OrgID": "evil"})
    tokens = {"plain": secrets.token_urlsafe(32), "tenant": secrets.token_urlsafe(32)}
    result: dict[str, Any] = {"cpu_model": cpu_model(), "payload_bytes": payload.size}
    print(f"bench tenancy: {result['cpu_model']}, 1 KiB remote-write, {rundir}")
    with Procs(rundir) as procs:
        stack = Stack(procs, rundir, tokens["plain"], workers=1, sink_workers=1, access_log=False)
        stack.start_sink()
        cpu = _cpu(stack, rundir, payload, tokens, args) if args.cpu else {}
        result["cpu_us_per_request"] = cpu
        if args.instructions:
            result["instructions_per_request"] = _instructions(stack, rundir, payload, tokens, args)
    if cpu:
        plain, tenant = (statistics.median(cpu[n]) for n in ("plain", "tenant"))
        print(
            f"CPU per request (median of {args.repeats}): plain {plain:.1f} µs, tenant "
            f"{tenant:.1f} µs, difference {tenant - plain:+.1f} µs ({tenant / plain - 1:+.1%})"
        )
    if args.instructions:
        ins = result["instructions_per_request"]
        print(
            f"instructions per request (callgrind): plain {ins['plain']:,.0f}, "
            f"tenant {ins['tenant']:,.0f}, difference {ins['tenant'] - ins['plain']:+,.0f} "
            f"({ins['tenant'] / ins['plain'] - 1:+.2%})"
        )
    (rundir / "result.json").write_text(json.dumps(result, indent=2))
    return 0
