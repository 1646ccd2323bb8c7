"""``obs-gateway status``: a running gateway's view, from a shell.

Reads ``GET /status`` on the admin listener (``--admin HOST:PORT``, or
``[server] admin_listen`` from ``--config``) twice, ``--interval`` apart,
for the rates, and prints aligned tables that fit 100 columns: credentials
and their tokens, routes, the config and the workers.  ``--json`` prints
the same data; ``--watch`` refreshes in place every 2 s.  Standard library
only: it runs where the gateway runs, over ssh, without Grafana.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any, TextIO

__all__ = ["admin_address", "collect", "main", "render"]

WATCH_SECONDS = 2.0
_RED, _RESET = "\x1b[31m", "\x1b[0m"


def admin_address(admin: str | None, config: Path | None) -> str:
    """HOST:PORT of the admin listener: given, or read from the config file
    (only ``[server] admin_listen``: no secret needs to be readable)."""
    if admin:
        return admin
    if config is None:
        return "127.0.0.1:9091"
    with config.open("rb") as f:
        doc = tomllib.load(f)
    server = doc.get("server", {})
    value = server.get("admin_listen", "127.0.0.1:9091") if isinstance(server, dict) else None
    if not isinstance(value, str):
        raise TypeError(f"{config}: server.admin_listen is not HOST:PORT")
    return value


def _fetch(address: str, timeout: float = 5.0) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104  (a wildcard bind is reached on loopback)
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/status"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def collect(address: str, interval: float, first: dict[str, Any] | None = None) -> dict[str, Any]:
    """The second of two samples ``interval`` apart, with the rates between them."""
    before = first if first is not None else _fetch(address)
    if first is None:
        time.sleep(interval)
    after = _fetch(address)
    elapsed = max(after["now"] - before["now"], 1e-6)
    old = {r["name"]: r for r in before["routes"]}
    for route in after["routes"]:
        prev = old.get(route["name"], {"requests": 0, "request_bytes": 0})
        route["requests_per_second"] = (route["requests"] - prev["requests"]) / elapsed
        route["bytes_per_second"] = (route["request_bytes"] - prev["request_bytes"]) / elapsed
    after["rate_seconds"] = round(elapsed, 3)
    return after


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _age(ts: float | None, now: float) -> str:
    return f"{_span(max(0.0, now - ts))} ago" if ts else "never"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(_plain(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - len(_plain(cell)))
            cells.append(pad + cell if i in right else cell + pad)
        out.append("  ".join(cells).rstrip())
    return out


def _plain(cell: str) -> str:
    return cell.replace(_RED, "").replace(_RESET, "")


def _failures(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "-"


def _backend_rows(view: dict[str, Any], colour: bool) -> list[str]:
    """Routes with several backends: each backend's health, load and the
    last minute's attempts and failures (a route of one backend says no more
    than its row above)."""
    rows = [["ROUTE", "BACKEND", "HEALTH", "IN FLIGHT", "REQ 1 MIN", "FAILED 1 MIN", "RETRIES"]]
    for r in view["routes"]:
        backends = r.get("backends", [])
        if len(backends) < 2:
            continue
        for i, b in enumerate(backends):
            health = "ok" if b["healthy"] else f"OUT {b['healthy_workers']}/{b['workers']} workers"
            if colour and not b["healthy"]:
                health = f"{_RED}{health}{_RESET}"
            rows.append(
                [
                    r["name"] if i == 0 else "",
                    b["name"],
                    health,
                    str(b["outstanding"]),
                    str(b["last_minute"]["requests"]),
                    str(b["last_minute"]["failures"]),
                    _failures(r["retries"]) if i == 0 else "",
                ]
            )
    return ["", *_table(rows, {3, 4, 5})] if len(rows) > 1 else []


def render(view: dict[str, Any], *, colour: bool = False) -> str:
    now = view["now"]
    cfg = view["config"]
    warn = cfg["expiry_warning_days"] * 86400
    reload_line = (
        f"last reload {'ok' if cfg['last_reload_ok'] else 'FAILED'} "
        f"{_age(cfg['last_reload_attempt'], now)}"
        if cfg["last_reload_attempt"]
        else "no reload since start"
    )
    lines = [
        f"obs-gateway {view['version']} · up {_span(now - view['started_at'])} · "
        f"config generation {cfg['generation']} · {reload_line} · "
        f"{view['open_connections']} connections",
        f"rates over {view['rate_seconds']:.1f} s (two samples); '1 min' columns over the "
        f"gateway's last {view['window_seconds']:.0f} s",
        "",
    ]
    rows = [["CREDENTIAL", "TOKEN", "LAST USED", "EXPIRES IN", "REQ 1 MIN", "BYTES 1 MIN"]]
    rows[0].append("AUTH FAILURES")
    for cred in view["credentials"]:
        for i, tok in enumerate(cred["tokens"]):
            expires = "-"
            if tok["not_after"] is not None:
                left = tok["not_after"] - now
                expires = f"{left / 86400:.1f} d" if left > 0 else "EXPIRED"
                if colour and left < warn:
                    expires = f"{_RED}{expires}{_RESET}"
            rows.append(
                [
                    cred["name"] if i == 0 else "",
                    tok["id"],
                    _age(tok["last_used"], now),
                    expires,
                    str(tok["last_minute"]["requests"]),
                    _bytes(tok["last_minute"]["request_bytes"]),
                    _failures(cred["auth_failures"]) if i == 0 else "",
                ]
            )
    lines += _table(rows, {4, 5})
    if view["unattributed_auth_failures"]:
        lines.append(f"no credential: {_failures(view['unattributed_auth_failures'])}")
    lines.append("")
    rows = [["ROUTE", "REQ/S", "BYTES/S", "2XX 1 MIN", "4XX", "5XX", "ADDED P50", "P99"]]
    for r in view["routes"]:
        minute = r["last_minute"]
        rows.append(
            [
                r["name"],
                f"{r['requests_per_second']:.1f}",
                _bytes(r["bytes_per_second"]) + "/s",
                str(minute["answers"]["2xx"]),
                str(minute["answers"]["4xx"]),
                str(minute["answers"]["5xx"]),
                _ms(minute["added_p50_seconds"]),
                _ms(minute["added_p99_seconds"]),
            ]
        )
    lines += _table(rows, {1, 2, 3, 4, 5, 6, 7})
    lines += _backend_rows(view, colour)
    lines.append("")
    rows = [["WORKER", "RSS", "CPU", "RESTARTS"]]
    for w in view["workers"]:
        rows.append(
            [
                str(w["index"]),
                _bytes(w["rss_bytes"]),
                f"{w['cpu_seconds']:.1f} s",
                str(w["restarts"]),
            ]
        )
    lines += _table(rows, {1, 2, 3})
    return "\n".join(lines)


def _colour(out: TextIO) -> bool:
    return out.isatty() and os.environ.get("TERM", "") != "dumb" and "NO_COLOR" not in os.environ


def main(
    admin: str | None,
    config: Path | None,
    *,
    as_json: bool,
    watch: bool,
    interval: float,
    out: TextIO = sys.stdout,
) -> int:
    try:
        address = admin_address(admin, config)
        view = collect(address, interval)
        while True:
            if as_json:
                out.write(json.dumps(view, indent=2, sort_keys=True) + "\n")
            else:
                text = render(view, colour=_colour(out))
                out.write(("\x1b[H\x1b[2J" if watch and out.isatty() else "") + text + "\n")
            out.flush()
            if not watch:
                return 0
            time.sleep(WATCH_SECONDS)
            view = collect(address, WATCH_SECONDS, view)
    except (OSError, ValueError, TypeError) as exc:  # URLError is an OSError; TOML a ValueError
        sys.stderr.write(f"obs-gateway status: cannot read the admin listener: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 0
