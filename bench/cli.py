"""``python -m bench``: run the benchmark, print the table, record the results.

One run: make the bodies, start the sink and every selected target, check
that each answers every body with a 2xx (and that VictoriaMetrics parses
the remote-write bodies), measure idle RSS, warm up, then wrk in
alternation (targets rotated every repeat) with CPU seconds read from /proc
around each run, then latency at a fixed rate, then the 1 GiB stream.
Everything is stopped in ``finally`` (``Procs``).  A run with every target
and workload is recorded in ``bench/results/`` and ``bench/RESULTS.md``;
partial runs go to ``bench/results/tmp/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from bench import load, report
from bench.machine import machine, pss_kib
from bench.payloads import Payload, validate_otlp, write_payload
from bench.peers import (
    ECHO_MODULE,
    REPO,
    TARGETS,
    TLS_TARGETS,
    Peer,
    Stack,
    gateway_supports_workers,
)
from bench.procs import Procs, cpu_seconds, reset_peak, rss_kib, tree
from bench.workloads import OPTIONAL_WORKLOADS, RESULTS, WORKLOADS, Workload

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        default=",".join(TARGETS),
        help=f"targets, comma-separated (default: all of {','.join(TARGETS)})",
    )
    p.add_argument(
        "--sizes",
        default=",".join(WORKLOADS),
        help=f"workloads, comma-separated (default: {','.join(WORKLOADS)}; also "
        f"{','.join(OPTIONAL_WORKLOADS)}: a new connection per request)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help=f"the targets ({','.join(TLS_TARGETS)} only) terminate TLS; "
        "no latency or stream test, never recorded",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    p.add_argument("--repeats", type=int, default=3, help="runs per target and workload (3)")
    p.add_argument(
        "--workers",
        default="auto",
        help="gateway and nginx worker processes; auto = CPUs if the gateway has --workers, else 1",
    )
    p.add_argument("--sink-workers", type=int, default=1)
    p.add_argument(
        "--access-log",
        action="store_true",
        help="access logging on for nginx and the gateway (default: off for both)",
    )
    p.add_argument(
        "--latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the fixed-rate latency test (default: on)",
    )
    p.add_argument("--latency-rate", type=float, default=1000.0)
    p.add_argument("--latency-duration", type=float, default=8.0)
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the 1 GiB streamed-body test (default: on)",
    )
    p.add_argument("--stream-bytes", type=int, default=1 << 30)
    p.add_argument(
        "--quick",
        action="store_true",
        help="iterate fast: gateway vs nginx-tuned, 1k, one 5 s run, "
        "no latency/stream tests (flags given explicitly still apply)",
    )
    p.add_argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write bench/results/<ts>.json, the chart and RESULTS.md "
        "(default: only for a run with every target and workload)",
    )
    return p


def _defaults_for_quick(args: argparse.Namespace, argv: list[str]) -> None:
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if "--only" not in given:
        args.only = "gateway,nginx-tuned"
    if "--sizes" not in given:
        args.sizes = "1k"
    if "--repeats" not in given:
        args.repeats = 1
    if not given & {"--latency", "--no-latency"}:
        args.latency = False
    if not given & {"--stream", "--no-stream"}:
        args.stream = False


def _workers(value: str) -> int:
    if value != "auto":
        return int(value)
    return (os.cpu_count() or 1) if gateway_supports_workers() else 1


def _version(argv: list[str], pattern: str = "") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    lines = [line for line in text if pattern in line]
    return lines[0].strip() if lines else "?"


def _admin_sample(peer: Peer, series: str) -> float | None:
    """One sample of a gateway's /metrics, by its exact series text."""
    url = f"http://127.0.0.1:{peer.info['admin_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def _meta(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": machine(REPO),
        "versions": {
            "nginx": _version(["nginx", "-v"]),
            "wrk": _version(["wrk", "-v"], "wrk"),
            "vmauth": _version(["dpkg-query", "-W", "-f", "${Version}", "victoria-metrics"]),
            "gateway_commit": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "gateway_dirty": bool(
                _version(["git", "-C", str(REPO), "status", "--porcelain", "gateway"])
                not in ("", "?")
            ),
        },
        "workers": workers,
        "sink_workers": args.sink_workers,
        "access_log": "on for nginx and the gateway" if args.access_log else "off for both",
        "tls": args.tls,
        "duration_s": args.duration,
        "repeats": args.repeats,
    }


# The bench's own self-signed certificate: nothing to verify on loopback.
_UNVERIFIED = ssl.create_default_context()
_UNVERIFIED.check_hostname = False
_UNVERIFIED.verify_mode = ssl.CERT_NONE


def _post(url: str, payload: Payload, token: str) -> int:
    """POST one body to a target on loopback (http or https); its status."""
    req = urllib.request.Request(  # noqa: S310  (our own loopback URLs)
        url,
        data=payload.file.read_bytes(),
        headers={**payload.headers, "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=30, context=_UNVERIFIED) as resp:  # noqa: S310
        return int(resp.status)


def _check(stack: Stack, peers: dict[str, Peer], payloads: dict[str, Payload]) -> None:
    """Every target answers every body with a 2xx; VM parses the bodies."""
    for peer in peers.values():
        for payload in payloads.values():
            status = _post(f"{peer.url}{payload.path}", payload, stack.token)
            if not 200 <= status < 300:
                raise RuntimeError(f"{peer.name} answered {payload.name} with {status}")
    for payload in payloads.values():
        if payload.path == "/v1/traces":
            spans = validate_otlp(payload.file.read_bytes())
            if spans not in (None, payload.items):
                raise RuntimeError(f"{payload.name}: OTLP decodes to {spans} spans")
    gw = peers.get("gateway")
    if stack.vm is None or gw is None:
        return
    for payload in payloads.values():
        if payload.path != "/api/v1/write":
            continue
        before = stack.vm_rows_inserted()
        status = _post(f"{gw.url}/bench/vm/api/v1/write", payload, stack.token)
        deadline = time.monotonic() + 5.0  # VM counts after answering: poll a little
        while (got := stack.vm_rows_inserted() - before) < payload.items:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if status != 204 or got != payload.items:
            raise RuntimeError(f"VictoriaMetrics: {payload.name} → {status}, {got} samples")
    print("bodies checked: every target answers 2xx; VictoriaMetrics parsed all samples")


def _memory(peer: Peer) -> dict[str, Any]:
    t = tree(peer.pid)
    per = {pid: rss_kib(pid) / 1024 for pid in t.pids}
    pss = {pid: pss_kib(pid) / 1024 for pid in t.pids}
    return {
        "rss_mib": sum(per.values()),
        "per_process_mib": list(per.values()),
        "pss_mib": sum(pss.values()),
        "per_process_pss_mib": list(pss.values()),
    }


def _one(
    peer: Peer, sink: Peer, payload: Payload, wl: Workload, token: str, duration: float
) -> dict[str, Any]:
    ptree, stree = tree(peer.pid), tree(sink.pid)
    (u0, k0), s0 = cpu_seconds(ptree), sum(cpu_seconds(stree))
    res: dict[str, Any] = load.wrk(
        peer.port,
        payload,
        token,
        connections=wl.connections,
        duration=duration,
        tls=peer.tls,
        new_connection=wl.new_connection,
    )
    (u1, k1), s1 = cpu_seconds(ptree), sum(cpu_seconds(stree))
    n = max(1, int(res["requests"]))
    cpu = (u1 - u0) + (k1 - k0)
    res["cpu_s"] = cpu
    res["cpu_us_per_req"] = cpu / n * 1e6
    res["user_us_per_req"] = (u1 - u0) / n * 1e6
    res["sys_us_per_req"] = (k1 - k0) / n * 1e6
    res["sink_cpu_us_per_req"] = (s1 - s0) / n * 1e6
    res["cpu_cores"] = cpu / res["seconds"]
    return res


def _rotate(items: list[str], k: int) -> list[str]:
    """Alternation: each repeat starts with the next target."""
    k %= len(items)
    return items[k:] + items[:k]


@dataclass
class Run:
    """One bench run's inputs and the results it accumulates."""

    args: argparse.Namespace
    token: str
    sink: Peer
    peers: dict[str, Peer]
    payloads: dict[str, Payload]
    workloads: list[Workload]
    result: dict[str, Any]

    def throughput(self) -> None:
        runs = self.result["runs"]
        for rep in range(self.args.repeats):
            for wl in self.workloads:
                payload = self.payloads[wl.name]
                for name in _rotate(list(self.peers), rep):
                    peer = self.peers[name]
                    if rep == 0:  # warm-up: pools, caches, first calls; not recorded
                        _one(peer, self.sink, payload, wl, self.token, 1)
                    res = _one(peer, self.sink, payload, wl, self.token, self.args.duration)
                    res.update(target=name, workload=wl.name, repeat=rep)
                    runs.append(res)
                    print(report.run_line(res))

    def latency(self) -> None:
        names: list[str] = [t for t in ("direct", "gateway", "nginx-tuned") if t in self.peers]
        for rep in range(self.args.repeats):
            for name in _rotate(names, rep):
                res: dict[str, Any] = dict(
                    load.paced(
                        self.peers[name].port,
                        self.payloads["1k"],
                        self.token,
                        rate=self.args.latency_rate,
                        duration=self.args.latency_duration,
                    )
                )
                res.update(target=name, repeat=rep)
                self.result["latency"].append(res)
                print(
                    f"  latency {name:12} rep {rep}: p50 {res['p50_us'] / 1e3:.3f} ms  "
                    f"p99 {res['p99_us'] / 1e3:.3f} ms  errors {res['errors']:.0f}"
                )

    def stream(self, target: str = "gateway", key: str = "stream") -> None:
        gw = self.peers[target]
        pids = tree(gw.pid).pids
        for pid in pids:
            reset_peak(pid)  # VmHWM from here on is this test's peak
        res: dict[str, Any] = dict(
            load.stream_upload(
                gw.port, "/bench/stream", self.token, pids, total=self.args.stream_bytes
            )
        )
        hwm = sum(rss_kib(p, "VmHWM") for p in pids) / 1024
        res["hwm_growth_mib"] = hwm - res["rss_before_mib"]
        if target != "gateway":
            # Proof that the copy was started and given up, not never made.
            res["replay_skipped"] = _admin_sample(
                gw, 'gateway_replay_skipped_total{reason="too_large",route="bench_stream"}'
            )
        self.result[key] = res
        print(
            f"  stream {res['bytes'] / 2**30:.2f} GiB through {target}: "
            f"{res['mb_s']:.0f} MB/s, status {res['status']}, RSS growth "
            f"{max(res['growth_mib'], res['hwm_growth_mib']):.1f} MiB"
        )

    def memory(self, key: str) -> None:
        for name, peer in self.peers.items():
            self.result["memory"].setdefault(name, {})[key] = _memory(peer)

    def peak_memory(self) -> None:
        for name, peer in self.peers.items():
            pids = tree(peer.pid).pids
            self.result["memory"][name]["peak_mib"] = sum(rss_kib(p, "VmHWM") for p in pids) / 1024


def _preflight() -> None:
    """Fail early, naming the Debian packages, when a peer is missing."""
    missing = [b for b in ("nginx", "wrk", "vmauth", "victoria-metrics") if not shutil.which(b)]
    if not ECHO_MODULE.exists():
        missing.append(str(ECHO_MODULE))
    if missing:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}; install the Debian packages: "
            "apt-get install nginx-light libnginx-mod-http-echo wrk victoria-metrics"
        )


def _selection(args: argparse.Namespace) -> tuple[list[str], list[Workload]]:
    targets = [t for t in TARGETS if t in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(TARGETS)
    if unknown:
        raise SystemExit(f"bench: unknown targets {sorted(unknown)}; known: {TARGETS}")
    if args.tls and set(targets) - set(TLS_TARGETS):
        raise SystemExit(f"bench: --tls runs {list(TLS_TARGETS)} only")
    known = {**WORKLOADS, **OPTIONAL_WORKLOADS}
    unknown = set(args.sizes.split(",")) - set(known)
    if unknown:
        raise SystemExit(f"bench: unknown workloads {sorted(unknown)}; known: {list(known)}")
    return targets, [known[w] for w in args.sizes.split(",")]


def run(args: argparse.Namespace) -> int:
    _preflight()
    targets, workloads = _selection(args)
    workers = _workers(args.workers)
    full = (
        set(targets) == set(TARGETS)
        and {w.name for w in workloads} == set(WORKLOADS)
        and not args.tls
    )
    record = full if args.record is None else args.record
    stamp = time.strftime("%Y%m%dT%H%M%S")
    rundir = RESULTS / "tmp" / stamp
    rundir.mkdir(parents=True)
    token = secrets.token_hex(32)  # 64 hex digits, like the seed's token
    print(
        f"bench: targets {targets}, workloads {[w.name for w in workloads]}, "
        f"{args.repeats}×{args.duration:g}s, workers {workers}, TLS {'on' if args.tls else 'off'}, "
        f"access log "
        f"{'on' if args.access_log else 'off'}; logs in {rundir}"
    )
    started = time.monotonic()
    payloads = {w.name: write_payload(w.name, w.kind, w.max_bytes, rundir) for w in workloads}
    result: dict[str, Any] = {
        "meta": _meta(args, workers),
        "payloads": {
            p.name: {"bytes": p.size, "items": p.items, "path": p.path} for p in payloads.values()
        },
        "runs": [],
        "latency": [],
        "memory": {},
    }
    with Procs(rundir) as procs:
        stack = Stack(
            procs,
            rundir,
            token,
            workers=workers,
            sink_workers=args.sink_workers,
            access_log=args.access_log,
            tls=args.tls,
        )
        sink = stack.start_sink()
        vm = stack.start_vm() if "gateway" in targets else None
        peers = {name: stack.start(name) for name in targets}
        _check(stack, peers, payloads)
        if vm is not None:  # only needed for the check; it merges in the background
            procs.stop(vm.proc)
            stack.vm = None
        bench = Run(args, token, sink, peers, payloads, workloads, result)
        time.sleep(0.5)
        bench.memory("idle_start")
        bench.throughput()
        bench.peak_memory()
        # The paced client and the stream upload speak plain HTTP only.
        if args.latency and "1k" in payloads and not args.tls:
            bench.latency()
        if args.stream and "gateway" in peers and not args.tls:
            bench.stream()
        if args.stream and "gateway-2b" in peers and not args.tls:
            # Two backends: the body's copy grows to 8 MiB, is dropped, and
            # the rest streams without one.
            bench.stream("gateway-2b", "stream_2b")
        time.sleep(1.0)
        bench.memory("idle_after")
    result["meta"]["elapsed_s"] = time.monotonic() - started
    result["summary"] = report.summarize(result)
    print()
    print(report.table(result))
    out_dir = RESULTS if record else rundir
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"\nresults: {json_path}")
    if record:
        png = report.chart(result, RESULTS / f"{stamp}.png")
        report.update_results_md(result, REPO / "bench" / "RESULTS.md", json_path, png)
        print(f"chart:   {png}\nupdated: bench/RESULTS.md")
    print(f"elapsed: {result['meta']['elapsed_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["instructions"]:
        from bench import instructions  # noqa: PLC0415  (valgrind runs are a tool apart)

        return instructions.main(argv[1:])
    if argv[:1] == ["tenancy"]:
        from bench import tenancy  # noqa: PLC0415  (a comparison apart from the main run)

        return tenancy.main(argv[1:])
    if argv[:1] == ["grpc"]:
        from bench import grpc_load  # noqa: PLC0415  (needs h2load and grpc templates only)

        return grpc_load.main(argv[1:])
    if argv[:1] == ["profile"]:
        from bench import profile  # noqa: PLC0415  (py-spy is only needed here)

        return profile.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.quick:
        _defaults_for_quick(args, argv)
    return run(args)
