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
start-up and shutdown cancel out.  ``--tls``: the gateway terminates TLS
(the bench's self-signed P-256 certificate); ``--new-connection``: every
request on a new connection (with ``--tls``, a full handshake each: the
client keeps no session), so the figure is what a connection costs.

``--protocol h2c`` sends the same workload over HTTP/2 (h2load, prior
knowledge, one stream at a time) to the same HTTP/1.1 route, the config
gaining an ``otlp-grpc`` route so that the listener speaks HTTP/2;
``--protocol grpc`` makes OTLP/gRPC export calls (``bench grpc``'s body,
~16 KiB) to the nginx gRPC sink through an ``otlp-grpc`` route.  Both need
h2load (Debian ``nghttp2-client``) and go without ``--tls``.
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
import ssl
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine
from bench.payloads import Payload, otlp_body, write_payload
from bench.peers import ECHO_MODULE, GATEWAY_TEMPLATES, REPO, Stack, render
from bench.procs import Procs, free_port
from bench.workloads import RESULTS, WORKLOADS

__all__ = ["main"]

_START_TIMEOUT = 180.0  # Python start-up under callgrind is slow
_GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# What makes the listener speak HTTP/2 at all (never called in an h2c run).
_GRPC_ROUTE = f"""
[[routes]]
name = "bench_grpc"
path = "{_GRPC_METHOD}"
protocol = "otlp-grpc"
upstream = "http://127.0.0.1:9"

[[credentials]]"""


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


def _connection(port: int, tls: bool) -> http.client.HTTPConnection:
    if not tls:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench's own self-signed certificate
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=ctx)


def _send(port: int, payload: Payload, token: str, n: int, *, tls: bool, new: bool) -> None:
    body = payload.file.read_bytes()
    headers = {**payload.headers, "Authorization": f"Bearer {token}"}
    conn = _connection(port, tls)
    for _ in range(n):
        if new:
            conn.close()
            conn = _connection(port, tls)
        conn.request("POST", payload.path, body, headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"gateway answered {resp.status}")
    conn.close()


def _h2load(port: int, payload: Payload, token: str, n: int) -> None:
    """``n`` requests on one HTTP/2 connection, one stream at a time."""
    argv = ["h2load", f"-n{n}", "-c1", "-m1", "-t1", f"-d{payload.file}"]
    for name, value in {**payload.headers, "Authorization": f"Bearer {token}"}.items():
        argv += ["-H", f"{name.lower()}: {value}"]
    argv.append(f"http://127.0.0.1:{port}{payload.path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    done = re.search(r"(\d+) 2xx", out.stdout)
    if done is None or int(done.group(1)) != n:
        raise RuntimeError(f"h2load: not {n} answers 2xx:\n{out.stdout[-1500:]}{out.stderr}")


def _grpc_payload(directory: Path) -> Payload:
    raw, spans = otlp_body(16 * 1024)
    body = b"\x00" + len(raw).to_bytes(4, "big") + raw
    file = directory / "grpc.bin"
    file.write_bytes(body)
    # The OTel Python gRPC exporter's, as ``bench grpc`` sends them.
    headers = {
        "content-type": "application/grpc",
        "te": "trailers",
        "grpc-accept-encoding": "identity,deflate,gzip",
        "user-agent": "OTel-OTLP-Exporter-Python/1.45.2 grpc-python/1.85.3",
    }
    return Payload("grpc", _GRPC_METHOD, file, len(body), spans, headers)


def count(
    procs: Procs,
    conf: Path,
    port: int,
    payload: Payload,
    sends: list[tuple[str, int]],
    out: Path,
    repo: Path,
    *,
    tls: bool = False,
    new: bool = False,
    http2: bool = False,
) -> int:
    """Total instructions of one gateway process (config ``conf``, public
    ``port``) that served ``n`` requests with each (token, n) in order;
    ``http2``: over h2c (h2load) instead of HTTP/1.1."""
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
            if http2:
                _h2load(port, payload, token, n)
            else:
                _send(port, payload, token, n, tls=tls, new=new)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(_START_TIMEOUT)
    m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no totals in {out}")
    return int(m.group(1))


def _run(
    stack: Stack,
    rundir: Path,
    payload: Payload,
    requests: int,
    tag: str,
    repo: Path,
    new: bool,
    protocol: str,
    target: str = "gateway",
) -> int:
    """Total instructions of one gateway process that served ``requests``."""
    assert stack.sink is not None
    port, admin = free_port(), free_port()
    digest = hashlib.sha256(stack.token.encode()).hexdigest()
    dest = rundir / f"gateway-{tag}.toml"
    if protocol == "grpc":
        values = {"port": port, "admin": admin, "sink": stack.sink.port, "token_sha256": digest}
        conf = render("gateway-grpc.toml", dest, **values)
    else:
        template, extra = GATEWAY_TEMPLATES[target]
        conf = render(
            template,
            dest,
            port=port,
            admin=admin,
            sink=stack.sink.port,
            sink2=stack.sink_port2,
            **extra,
            stream_sink=stack.stream_sink_port,
            vm=9,
            access="false",
            token_sha256=digest,
            tls=stack.tls_block(),
        )
        if protocol == "h2c":
            conf.write_text(conf.read_text().replace("[[credentials]]", _GRPC_ROUTE))
    out = rundir / f"callgrind-{tag}.out"
    sends = [(stack.token, requests)]
    http2 = protocol != "http1.1"
    return count(
        stack.procs, conf, port, payload, sends, out, repo, tls=stack.tls, new=new, http2=http2
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__)
    p.add_argument("--size", default="1k", choices=list(WORKLOADS))
    p.add_argument("--protocol", default="http1.1", choices=["http1.1", "h2c", "grpc"])
    p.add_argument(
        "--target",
        default="gateway",
        choices=list(GATEWAY_TEMPLATES),
        help="gateway (one backend per route), gateway-2b (two, replay copies kept), "
        "gateway-2b-nocopy (two, no copies); HTTP/1.1 and h2c",
    )
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument(
        "--gateway-repo",
        type=Path,
        default=REPO,
        help="run the gateway from this checkout (e.g. a worktree of another commit)",
    )
    p.add_argument("--tls", action="store_true", help="the gateway terminates TLS")
    p.add_argument(
        "--new-connection", action="store_true", help="a new connection for every request"
    )
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench instructions: valgrind is not installed (Debian: apt-get install valgrind)")
        return 2
    if args.protocol != "http1.1" and (args.tls or args.new_connection):
        print("bench instructions: --protocol h2c/grpc go without --tls and --new-connection")
        return 2
    if args.protocol != "http1.1" and shutil.which("h2load") is None:
        print("bench instructions: h2load is missing (Debian: apt-get install nghttp2-client)")
        return 2
    stamp = time.strftime("%Y%m%dT%H%M%S")
    rundir = RESULTS / "tmp" / f"instructions-{stamp}"
    rundir.mkdir(parents=True)
    wl = WORKLOADS[args.size]
    payload = write_payload(wl.name, wl.kind, wl.max_bytes, rundir)
    if args.protocol == "grpc":
        payload = _grpc_payload(rundir)
    token = secrets.token_urlsafe(32)
    with Procs(rundir) as procs:
        stack = Stack(
            procs, rundir, token, workers=1, sink_workers=1, access_log=False, tls=args.tls
        )
        if args.protocol == "grpc":
            stack.sink = stack._nginx("grpc-sink", "grpc-sink.conf", 1, echo_module=ECHO_MODULE)
        else:
            stack.start_sink()
        repo = args.gateway_repo.resolve()
        new = args.new_connection
        runs = [(args.warmup, "base"), (args.warmup + args.requests, "more")]
        base, more = (
            _run(stack, rundir, payload, n, tag, repo, new, args.protocol, args.target)
            for n, tag in runs
        )
    per_request = (more - base) / args.requests
    how = "".join(
        (
            ", TLS" if args.tls else "",
            ", a new connection each" if new else ", keep-alive",
            f", {args.protocol}" if args.protocol != "http1.1" else "",
            f", {args.target}" if args.target != "gateway" else "",
        )
    )
    host = machine(repo)
    (rundir / "result.json").write_text(
        json.dumps(
            {
                "size": args.size,
                "bytes": payload.size,
                "instructions_per_request": per_request,
                "requests": args.requests,
                "warmup": args.warmup,
                "how": how.lstrip(", "),
                "gateway_repo": str(repo),
                "host": host,
            },
            indent=1,
        )
    )
    print(
        f"{payload.name} ({payload.size:,} B{how}): {per_request:,.0f} instructions per request "
        f"(callgrind, user space, {args.requests} requests after {args.warmup}; "
        f"gateway from {repo}, build {host['gateway_build']}; {host['cpu_model']}; {rundir})"
    )
    return 0
