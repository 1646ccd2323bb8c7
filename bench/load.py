"""Load generators: wrk (closed loop, throughput), the paced client (latency
at a fixed rate) and the 1 GiB chunked upload (memory while streaming).

Every run is bounded: wrk by ``-d`` plus a subprocess timeout, the paced
client by its schedule plus a timeout, the upload by socket timeouts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.payloads import Payload
from bench.procs import rss_kib

__all__ = ["paced", "stream_upload", "wrk"]

TEMPLATES = Path(__file__).parent / "templates"
Result = dict[str, float]


def wrk(
    port: int,
    payload: Payload,
    token: str,
    *,
    connections: int,
    duration: float,
    threads: int = 2,
    tls: bool = False,
    new_connection: bool = False,
) -> Result:
    """One wrk run; raises if wrk fails or prints no result."""
    env = {
        **os.environ,
        "BENCH_CLOSE": "1" if new_connection else "",
        "BENCH_BODY": str(payload.file),
        "BENCH_PATH": payload.path,
        "BENCH_TOKEN": token,
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in payload.headers.items()),
    }
    argv = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(TEMPLATES / "post.lua"),
        f"{'https' if tls else 'http'}://127.0.0.1:{port}",
    ]
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            raw = json.loads(line.removeprefix("BENCH_JSON "))
            break
    else:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    seconds = raw["duration_us"] / 1e6
    requests = raw["requests"]
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    return {
        "requests": requests,
        "seconds": seconds,
        "errors": errors,
        "non2xx": raw["status"],
        "req_s": requests / seconds,
        "mb_s": requests * payload.size / seconds / 1e6,
        "p50_ms": raw["p50_us"] / 1e3,
        "p90_ms": raw["p90_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "max_ms": raw["max_us"] / 1e3,
    }


def paced(
    port: int,
    payload: Payload,
    token: str,
    *,
    rate: float,
    duration: float,
    connections: int = 8,
) -> Result:
    """The open-loop client (bench/paced.py) in its own process."""
    argv = [
        sys.executable,
        "-m",
        "bench.paced",
        "--port",
        str(port),
        "--path",
        payload.path,
        "--body",
        str(payload.file),
        "--token",
        token,
        "--headers",
        json.dumps(payload.headers),
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--connections",
        str(connections),
    ]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"paced client failed: {proc.stderr.strip()[-2000:]}")
    result: Result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def stream_upload(
    port: int,
    path: str,
    token: str,
    pids: tuple[int, ...],
    *,
    total: int = 1 << 30,
    chunk: int = 256 * 1024,
) -> Result:
    """POST ``total`` bytes with Transfer-Encoding: chunked while sampling the
    summed RSS of ``pids`` every 10 ms; return the peak growth over the start."""
    rss_before = sum(rss_kib(p) for p in pids)
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(rss_kib(p) for p in pids))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    data = memoryview(os.urandom(chunk))
    frame = (b"%x\r\n" % chunk, data, b"\r\n")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    sent = 0
    status = 0
    start = time.perf_counter()
    sampler.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head)
            while sent < total:
                for part in frame:
                    sock.sendall(part)
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
            answer = sock.recv(4096)
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0
    except OSError as exc:
        print(f"bench: stream upload failed after {sent} bytes: {exc}")
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    return {
        "bytes": sent,
        "seconds": seconds,
        "mb_s": sent / seconds / 1e6,
        "status": status,
        "rss_before_mib": rss_before / 1024,
        "rss_peak_mib": peak[0] / 1024,
        "growth_mib": (peak[0] - rss_before) / 1024,
    }
