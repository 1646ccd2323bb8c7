"""``python -m bench instructions``: the gateway's user-space instructions
per request, counted by callgrind.

Wall-clock CPU per request moves ±5 % between runs and more on a shared
machine; instruction counts do not (the same binary, inputs and config give
the same count, whatever else the machine runs).  So this is the figure to
compare two commits with on one machine: it counts the interpreter, llhttp
and uvloop, not the kernel (syscalls, TCP on loopback) and not time.

The gateway runs as one process under ``valgrind --tool=callgrind`` in
front of the nginx sink; one keep-alive connection sends the workload's
body ``--warmup`` times, then ``--requests`` more in a second run, and the
difference of the two totals divided by ``--requests`` is the figure, so
start-up and shutdown cancel out.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine
from bench.payloads import Payload, write_payload
from bench.peers import REPO, Stack, render
from bench.procs import Procs, free_port
from bench.workloads import RESULTS, WORKLOADS

__all__ = ["count", "main"]

_START_TIMEOUT = 180.0  # Python start-up under callgrind is slow


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode} under callgrind")
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
        except OSError:
            time.sleep(0.2)
        else:
            return
    raise RuntimeError(f"gateway did not listen within {_START_TIMEOUT}s")


def _send(port: int, payload: Payload, token: str, n: int) -> None:
    body = payload.file.read_bytes()
    headers = {**payload.headers, "Authorization": f"Bearer {token}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(n):
        conn.request("POST", payload.path, body, headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"gateway answered {resp.status}")
    conn.close()


def count(
    procs: Procs,
    conf: Path,
    port: int,
    payload: Payload,
    sends: list[tuple[str, int]],
    out: Path,
    repo: Path,
) -> int:
    """Total instructions of one gateway process (config ``conf``, public
    ``port``) that served ``n`` requests with each (token, n) in order."""
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        # Workers would be other processes; one process serves everything.
        sys.executable,
        "-m",
        "gateway",
        "run",
        "--config",
        str(conf),
        "--workers",
        "1",
    ]
    proc = procs.start(out.stem, argv, cwd=repo)
    try:
        _wait_port(port, proc)
        for token, n in sends:
            _send(port, payload, token, n)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(_START_TIMEOUT)
    m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no totals in {out}")
    return int(m.group(1))


def _run(stack: Stack, rundir: Path, payload: Payload, requests: int, tag: str, repo: Path) -> int:
    """Total instructions of one gateway process that served ``requests``."""
    assert stack.sink is not None
    port, admin = free_port(), free_port()
    conf = render(
        "gateway.toml",
        rundir / f"gateway-{tag}.toml",
        port=port,
        admin=admin,
        sink=stack.sink.port,
        stream_sink=stack.stream_sink_port,
        vm=9,
        access="false",
        token_sha256=hashlib.sha256(stack.token.encode()).hexdigest(),
    )
    out = rundir / f"callgrind-{tag}.out"
    return count(stack.procs, conf, port, payload, [(stack.token, requests)], out, repo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__)
    p.add_argument("--size", default="1k", choices=list(WORKLOADS))
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument(
        "--gateway-repo",
        type=Path,
        default=REPO,
        help="run the gateway from this checkout (e.g. a worktree of another commit)",
    )
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench instructions: valgrind is not installed (Debian: apt-get install valgrind)")
        return 2
    stamp = time.strftime("%Y%m%dT%H%M%S")
    rundir = RESULTS / "tmp" / f"instructions-{stamp}"
    rundir.mkdir(parents=True)
    wl = WORKLOADS[args.size]
    payload = write_payload(wl.name, wl.kind, wl.max_bytes, rundir)
    token = secrets.token_urlsafe(32)
    with Procs(rundir) as procs:
        stack = Stack(procs, rundir, token, workers=1, sink_workers=1, access_log=False)
        stack.start_sink()
        repo = args.gateway_repo.resolve()
        base = _run(stack, rundir, payload, args.warmup, "base", repo)
        more = _run(stack, rundir, payload, args.warmup + args.requests, "more", repo)
    per_request = (more - base) / args.requests
    host = machine(repo)
    (rundir / "result.json").write_text(
        json.dumps(
            {
                "size": args.size,
                "bytes": payload.size,
                "instructions_per_request": per_request,
                "requests": args.requests,
                "warmup": args.warmup,
                "gateway_repo": str(repo),
                "host": host,
            },
            indent=1,
        )
    )
    print(
        f"{args.size} ({payload.size:,} B): {per_request:,.0f} instructions per request "
        f"(callgrind, user space, {args.requests} requests after {args.warmup}; "
        f"gateway from {repo}, build {host['gateway_build']}; {host['cpu_model']}; {rundir})"
    )
    return 0
