"""``python -m bench grpc``: OTLP/gRPC export calls per second and CPU per
call, through the gateway, through nginx's ``grpc_pass`` and straight to
the sink, in one run.

- **sink**: nginx on h2c with the echo module (``templates/grpc-sink.conf``):
  reads each body, answers 200 + ``grpc-status: 0``.  C, so it costs little.
- **direct**: h2load straight at the sink (the floor).
- **gateway**: ``python -m gateway run`` with one ``otlp-grpc`` route
  (``templates/gateway-grpc.toml``), one process, access log off.
- **nginx-grpc**: nginx with the seed's bearer check and ``grpc_pass`` to the
  sink over a kept-alive upstream (``templates/nginx-grpc.conf``).

Load: h2load (Debian ``nghttp2-client``), ``--clients`` connections with
``--streams`` concurrent streams each, POSTing one gRPC-framed
``ExportTraceServiceRequest`` (``bench/payloads.py``'s OTLP body, ~16 KiB)
with the headers the OTel exporter sends, for ``--duration`` seconds per
target, targets in turn, ``--repeats`` times.  CPU per call is the
target's process tree's user+system CPU over the run divided by the calls
that succeeded (h2load counts HTTP 200; the gateway's own count of
``grpc-status`` 0 is checked once before measuring).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.machine import cpu_model
from bench.payloads import otlp_body
from bench.peers import ECHO_MODULE, REPO, render
from bench.procs import Procs, cpu_seconds, free_port, tree

__all__ = ["main"]

TARGETS = ("direct", "gateway", "nginx-grpc")
METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench grpc", description=__doc__)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per target and repeat")
    p.add_argument("--clients", type=int, default=4, help="h2load connections")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams per connection")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--size", type=int, default=16 * 1024, help="OTLP body bytes, at most")
    p.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tmp")
    return p


def _user() -> str:
    return "user root;" if os.geteuid() == 0 else ""


class Run:
    def __init__(self, procs: Procs, rundir: Path, token: str) -> None:
        self.procs = procs
        self.rundir = rundir
        self.token = token
        self.pids: dict[str, int] = {}
        self.ports: dict[str, int] = {}
        self.admin = 0

    def _dir(self, name: str) -> Path:
        d = self.rundir / name
        for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        return d

    def _nginx(self, name: str, template: str, **values: object) -> None:
        d = self._dir(name)
        port = free_port()
        conf = render(template, d / "nginx.conf", dir=d, port=port, user=_user(), **values)
        proc = self.procs.start(name, ["nginx", "-p", str(d), "-c", str(conf)], port=port)
        self.pids[name], self.ports[name] = proc.pid, port

    def start(self) -> None:
        self._nginx("direct", "grpc-sink.conf", echo_module=ECHO_MODULE)
        sink = self.ports["direct"]
        self._nginx("nginx-grpc", "nginx-grpc.conf", sink=sink, token=self.token)
        d = self._dir("gateway")
        port, self.admin = free_port(), free_port()
        conf = render(
            "gateway-grpc.toml",
            d / "gateway.toml",
            port=port,
            admin=self.admin,
            sink=sink,
            token_sha256=hashlib.sha256(self.token.encode()).hexdigest(),
        )
        argv = [sys.executable, "-m", "gateway", "run", "--config", str(conf)]
        proc = self.procs.start("gateway", argv, port=port, cwd=REPO)
        self.pids["gateway"], self.ports["gateway"] = proc.pid, port


def _h2load(port: int, body: Path, token: str, args: argparse.Namespace, seconds: float) -> str:
    argv = [
        "h2load",
        f"-c{args.clients}",
        f"-m{args.streams}",
        "-t1",
        f"-D{seconds:g}",
        f"-d{body}",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        "grpc-accept-encoding: identity,deflate,gzip",
        "-H",
        "user-agent: OTel-OTLP-Exporter-Python/1.45.2 grpc-python/1.85.3",
        "-H",
        f"authorization: Bearer {token}",
        f"http://127.0.0.1:{port}{METHOD}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    return out.stdout + out.stderr


def _parse(text: str) -> tuple[int, int, float]:
    """(succeeded, 2xx, req/s) from h2load's summary."""
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", text)
    codes = re.search(r"status codes: (\d+) 2xx", text)
    rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    if not (done and codes and rps):
        raise RuntimeError(f"unexpected h2load output:\n{text[-2000:]}")
    return int(done.group(1)), int(codes.group(1)), float(rps.group(1))


def _measure(run: Run, name: str, body: Path, args: argparse.Namespace) -> dict[str, float]:
    pid = run.pids[name]
    sink_pid = run.pids["direct"]
    before, sink_before = cpu_seconds(tree(pid)), cpu_seconds(tree(sink_pid))
    text = _h2load(run.ports[name], body, run.token, args, args.duration)
    after, sink_after = cpu_seconds(tree(pid)), cpu_seconds(tree(sink_pid))
    ok, two_xx, rps = _parse(text)
    # A timed run stops with streams in flight: a few may be cut either way.
    if ok == 0 or abs(two_xx - ok) > args.clients * args.streams:
        raise RuntimeError(f"{name}: {ok} succeeded, {two_xx} 2xx:\n{text[-1500:]}")
    cpu = sum(after) - sum(before)
    sink_cpu = sum(sink_after) - sum(sink_before)
    result = {"rps": rps, "calls": ok, "sink_us_per_call": sink_cpu / ok * 1e6}
    # The direct path's CPU is the sink's own; a proxy's excludes the sink.
    result["us_per_call"] = (sink_cpu if name == "direct" else cpu) / ok * 1e6
    return result


def _check_gateway(run: Run, body: Path, args: argparse.Namespace) -> None:
    """Before measuring: the gateway relays and counts gRPC answers as 200."""
    _h2load(run.ports["gateway"], body, run.token, args, 1.0)
    url = f"http://127.0.0.1:{run.admin}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    if not re.search(r'gateway_requests_total\{[^}]*code="200"[^}]*route="otlp_grpc_traces"', text):
        raise RuntimeError("the gateway did not count its gRPC calls as 200")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    targets = [t for t in args.only.split(",") if t]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    rundir = args.out / f"grpc-{stamp}"
    (rundir / "logs").mkdir(parents=True, exist_ok=True)
    raw, spans = otlp_body(args.size)
    body = rundir / "body.bin"
    body.write_bytes(b"\x00" + len(raw).to_bytes(4, "big") + raw)
    token = secrets.token_urlsafe(32)
    results: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    with Procs(rundir / "logs") as procs:
        run = Run(procs, rundir, token)
        run.start()
        _check_gateway(run, body, args)
        for _ in range(args.repeats):
            for name in targets:
                results[name].append(_measure(run, name, body, args))
    meta: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "body_bytes": len(raw),
        "spans": spans,
        "clients": args.clients,
        "streams": args.streams,
        "duration": args.duration,
        "nginx": subprocess.run(
            ["nginx", "-v"], capture_output=True, text=True, check=False
        ).stderr.strip(),
        "h2load": subprocess.run(
            ["h2load", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    (rundir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"OTLP/gRPC export, {len(raw)} B body ({spans} spans), {args.clients}x{args.streams}")
    print(f"CPU: {meta['cpu']} ({meta['cores']} cores); {meta['nginx']}; {meta['h2load']}")
    print(f"{'target':<12} {'calls/s':>9} {'µs CPU/call':>12} {'sink µs/call':>13}")
    best = {n: max(r["rps"] for r in rs) for n, rs in results.items()}
    for name, rs in results.items():
        rps = best[name]
        cpu = min(r["us_per_call"] for r in rs)
        sink = min(r["sink_us_per_call"] for r in rs)
        print(f"{name:<12} {rps:>9.0f} {cpu:>12.1f} {sink:>13.1f}")
    if "gateway" in best and "nginx-grpc" in best:
        gw = min(r["us_per_call"] for r in results["gateway"])
        ng = min(r["us_per_call"] for r in results["nginx-grpc"])
        print(
            f"gateway / nginx-grpc: {best['gateway'] / best['nginx-grpc']:.2f}x calls/s, "
            f"{gw / ng:.2f}x CPU per call"
        )
    print(f"results: {rundir / 'results.json'}")
    return 0
