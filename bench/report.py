"""From raw runs to what people read: medians, ratios against tuned nginx,
issue 5's targets with pass/miss, the console table, the chart and the
generated part of ``bench/RESULTS.md`` (between its ``bench:results``
markers; the rest of that file, e.g. the profile notes, is left alone).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.machine import machine_key

__all__ = ["chart", "run_line", "summarize", "table", "update_results_md"]

BASE = "nginx-tuned"  # every ratio is against tuned nginx in the same run
_METRICS = (
    "req_s",
    "mb_s",
    "p50_ms",
    "p99_ms",
    "cpu_us_per_req",
    "user_us_per_req",
    "sys_us_per_req",
    "sink_cpu_us_per_req",
    "cpu_cores",
)


def run_line(r: dict[str, Any]) -> str:
    err = f"  ERRORS {r['errors']:.0f}" if r["errors"] else ""
    return (
        f"  {r['workload']:>5} {r['target']:12} rep {r['repeat']}: {r['req_s']:9.0f} req/s "
        f"{r['mb_s']:8.1f} MB/s  p99 {r['p99_ms']:7.2f} ms  "
        f"CPU {r['cpu_us_per_req']:7.1f} µs/req{err}"
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in result["runs"]:
        groups.setdefault(r["target"], {}).setdefault(r["workload"], []).append(r)
    thr: dict[str, dict[str, dict[str, float]]] = {}
    for target, by_wl in groups.items():
        for wl, runs in by_wl.items():
            row = {m: _median([r[m] for r in runs]) for m in _METRICS}
            row["errors"] = sum(r["errors"] for r in runs)
            row["runs"] = len(runs)
            thr.setdefault(target, {})[wl] = row
    for per in thr.values():
        for wl, row in per.items():
            base = thr.get(BASE, {}).get(wl)
            if base:
                row["x_req_s"] = row["req_s"] / base["req_s"]
                row["x_cpu"] = row["cpu_us_per_req"] / base["cpu_us_per_req"]
    lat: dict[str, dict[str, float]] = {}
    for target in {r["target"] for r in result["latency"]}:
        runs = [r for r in result["latency"] if r["target"] == target]
        lat[target] = {
            "p50_ms": _median([r["p50_us"] / 1e3 for r in runs]),
            "p99_ms": _median([r["p99_us"] / 1e3 for r in runs]),
            "errors": sum(r["errors"] for r in runs),
        }
    if "direct" in lat:
        for row in lat.values():
            row["added_p99_ms"] = row["p99_ms"] - lat["direct"]["p99_ms"]
    summary = {"throughput": thr, "latency": lat}
    summary["targets"] = _targets(result, thr, lat)
    return summary


def _target(
    text: str,
    value: float | None,
    threshold: float,
    lower_is_better: bool,
    unit: str,
    per_cpu: float | None = None,
) -> dict[str, Any]:
    """One issue-5 target.  ``per_cpu`` restates a throughput ratio as the
    ratio of CPU per request (other / gateway): throughput per CPU-second,
    which the shared machine's noise barely moves."""
    row: dict[str, Any] = {"target": text, "unit": unit, "per_cpu": per_cpu}
    if value is None or math.isnan(value):
        return {**row, "measured": None, "result": "n/a"}
    ok = value <= threshold if lower_is_better else value >= threshold
    return {**row, "measured": value, "result": "pass" if ok else "MISS"}


def _get(thr: dict[str, Any], target: str, wl: str, metric: str) -> float | None:
    v = thr.get(target, {}).get(wl, {}).get(metric)
    return float(v) if v is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _targets(
    result: dict[str, Any], thr: dict[str, Any], lat: dict[str, Any]
) -> list[dict[str, Any]]:
    gw = "gateway"

    def cpu(other: str, wl: str) -> float | None:
        return _ratio(_get(thr, other, wl, "cpu_us_per_req"), _get(thr, gw, wl, "cpu_us_per_req"))

    out = [
        _target(
            "1 KiB: gateway CPU/request ≤ 2× tuned nginx",
            _ratio(_get(thr, gw, "1k", "cpu_us_per_req"), _get(thr, BASE, "1k", "cpu_us_per_req")),
            2.0,
            True,
            "×",
        ),
        _target(
            "1 KiB: gateway req/s ≥ 3× vmauth",
            _ratio(_get(thr, gw, "1k", "req_s"), _get(thr, "vmauth", "1k", "req_s")),
            3.0,
            False,
            "×",
            cpu("vmauth", "1k"),
        ),
        _target(
            "1 MiB: gateway MB/s ≥ 1.0× tuned nginx",
            _ratio(_get(thr, gw, "1m", "mb_s"), _get(thr, BASE, "1m", "mb_s")),
            1.0,
            False,
            "×",
            cpu(BASE, "1m"),
        ),
        _target(
            "64 KiB: gateway req/s ≥ 5× seed-default nginx",
            _ratio(_get(thr, gw, "64k", "req_s"), _get(thr, "nginx-seed", "64k", "req_s")),
            5.0,
            False,
            "×",
            cpu("nginx-seed", "64k"),
        ),
    ]
    stream = result.get("stream")
    growth = max(stream["growth_mib"], stream["hwm_growth_mib"]) if stream else None
    if stream and (stream["status"] != 204 or stream["bytes"] < 1 << 30):
        growth = None  # a failed or shortened stream proves nothing
    out.append(
        _target("1 GiB streamed body: gateway RSS growth < 32 MiB", growth, 32.0, True, "MiB")
    )
    stream_2b = result.get("stream_2b")
    if stream_2b:
        growth_2b = max(stream_2b["growth_mib"], stream_2b["hwm_growth_mib"])
        if stream_2b["status"] != 204 or stream_2b["bytes"] < 1 << 30:
            growth_2b = None
        out.append(
            _target(
                "1 GiB streamed body, two backends (copy dropped at 8 MiB): RSS growth < 32 MiB",
                growth_2b,
                32.0,
                True,
                "MiB",
            )
        )
    mem = result["memory"].get(gw)
    idle = None
    if mem:
        per = mem["idle_start"]["per_process_mib"] + mem.get("idle_after", {}).get(
            "per_process_mib", []
        )
        idle = max(per) * 1.048576 if per else None  # MiB → MB
    out.append(
        _target(
            "idle RSS per gateway process ≤ 50 MB (max of at start, after load)",
            idle,
            50.0,
            True,
            "MB",
        )
    )
    added = lat.get(gw, {}).get("added_p99_ms")
    out.append(
        _target(
            "p99 latency added over direct at 1,000 req/s of 1 KiB ≤ 2 ms", added, 2.0, True, "ms"
        )
    )
    return out


TWO_BACKENDS = ("gateway", "gateway-2b-nocopy", "gateway-2b")


def backends_table(result: dict[str, Any]) -> list[str]:
    """Issue 12: two backends against one in the same run, per workload: the
    CPU per request and peak RSS of balancing alone (no copy) and of
    balancing with the replay copy of every body."""
    thr = result["summary"]["throughput"]
    if "gateway" not in thr or not any(t in thr for t in TWO_BACKENDS[1:]):
        return []
    lines = [
        "",
        "| workload | target | CPU µs/req | Δ µs/req vs one backend | Δ % | peak RSS MiB |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for wl in result["payloads"]:
        one = _get(thr, "gateway", wl, "cpu_us_per_req")
        for target in TWO_BACKENDS:
            cpu = _get(thr, target, wl, "cpu_us_per_req")
            if cpu is None:
                continue
            delta = cpu - one if one is not None else None
            pct = delta / one * 100 if delta is not None and one else None
            peak = result["memory"].get(target, {}).get("peak_mib")
            lines.append(
                f"| {wl} | {target} | {_fmt(cpu)} | {_fmt(delta)} | {_fmt(pct)} | {_fmt(peak)} |"
            )
    return lines


def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:,.{digits}f}"


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    thr = s["throughput"]
    workloads = list(result["payloads"])
    lines = [
        "| workload | target | req/s | MB/s | p50 ms | p99 ms | CPU µs/req (user+sys) "
        "| CPU × nginx-tuned | req/s × nginx-tuned | cores used | sink µs/req | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for wl in workloads:
        size = result["payloads"][wl]["bytes"]
        for target, per in thr.items():
            row = per.get(wl)
            if row is None:
                continue
            lines.append(
                f"| {wl} ({size:,} B) | {target} | {_fmt(row['req_s'], 0)} | {_fmt(row['mb_s'])} "
                f"| {_fmt(row['p50_ms'], 2)} | {_fmt(row['p99_ms'], 2)} "
                f"| {_fmt(row['cpu_us_per_req'])} ({_fmt(row['user_us_per_req'])}"
                f"+{_fmt(row['sys_us_per_req'])}) | {_fmt(row.get('x_cpu'), 2)} "
                f"| {_fmt(row.get('x_req_s'), 2)} | {_fmt(row['cpu_cores'], 2)} "
                f"| {_fmt(row['sink_cpu_us_per_req'])} | {row['errors']:.0f} |"
            )
    lines += [
        "",
        "| target | idle RSS at start MiB | idle PSS at start MiB (per process) "
        "| idle RSS after load MiB | peak RSS (VmHWM) MiB | processes |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for target, mem in result["memory"].items():
        start = mem["idle_start"]
        per_pss = " + ".join(_fmt(x) for x in start.get("per_process_pss_mib", []))
        lines.append(
            f"| {target} | {_fmt(start['rss_mib'])} | {_fmt(start.get('pss_mib'))} ({per_pss}) "
            f"| {_fmt(mem.get('idle_after', {}).get('rss_mib'))} | {_fmt(mem.get('peak_mib'))} "
            f"| {len(start['per_process_mib'])} |"
        )
    lines += backends_table(result)
    if s["latency"]:
        lines += [
            "",
            "| target @ 1,000 req/s, 1 KiB | p50 ms | p99 ms | p99 added over direct ms | errors |",
            "|---|--:|--:|--:|--:|",
        ]
        for target, row in s["latency"].items():
            lines.append(
                f"| {target} | {_fmt(row['p50_ms'], 3)} | {_fmt(row['p99_ms'], 3)} "
                f"| {_fmt(row.get('added_p99_ms'), 3)} | {row['errors']:.0f} |"
            )
    lines += [
        "",
        "| issue 5 target | measured | result | same ratio from CPU/request |",
        "|---|--:|---|--:|",
    ]
    for t in s["targets"]:
        per_cpu = f"{_fmt(t['per_cpu'], 2)} ×" if t.get("per_cpu") is not None else ""
        lines.append(
            f"| {t['target']} | {_fmt(t['measured'], 2)} {t['unit']} | {t['result']} | {per_cpu} |"
        )
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> Path:
    import matplotlib  # noqa: PLC0415  (only a recorded run draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    thr = result["summary"]["throughput"]
    targets = list(thr)
    workloads = list(result["payloads"])
    panels = [
        ("req_s", "requests/s", True),
        ("mb_s", "MB/s of request bodies", True),
        ("cpu_us_per_req", "proxy CPU µs per request", True),
        ("p99_ms", "p99 latency ms (wrk, closed loop)", True),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    width = 0.8 / max(1, len(targets))
    for ax, (metric, label, log) in zip(axes.flat, panels, strict=True):
        for i, target in enumerate(targets):
            values = [thr[target].get(wl, {}).get(metric, 0.0) for wl in workloads]
            xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(workloads))]
            ax.bar(xs, values, width, label=target)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(
        f"obs-gateway bench {meta['timestamp']} — {meta['host'].get('cpu_model', '?')}, "
        f"{meta['host']['cpus']} CPUs, "
        f"{meta['workers']} worker(s), access log {meta['access_log']}, medians of "
        f"{meta['repeats']}×{meta['duration_s']:g}s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _loadavg(meta: dict[str, Any]) -> str:
    return ", ".join(f"{x:.1f}" for x in meta["host"]["loadavg_start"])


def markdown(result: dict[str, Any], json_path: Path, png: Path) -> str:
    meta = result["meta"]
    v = meta["versions"]
    payloads = ", ".join(
        f"{name} = {p['bytes']:,} B ({p['items']} "
        f"{'spans' if p['path'] == '/v1/traces' else 'samples'})"
        for name, p in result["payloads"].items()
    )
    stream = result.get("stream")
    stream_line = (
        f"1 GiB chunked upload through the gateway: {stream['mb_s']:.0f} MB/s, status "
        f"{stream['status']}, RSS {stream['rss_before_mib']:.1f} MiB before, growth "
        f"{stream['growth_mib']:.1f} MiB sampled every 10 ms / {stream['hwm_growth_mib']:.1f} "
        "MiB by VmHWM."
        if stream
        else "1 GiB stream: not run."
    )
    host = meta["host"]
    stream_2b = result.get("stream_2b")
    if stream_2b:
        stream_line += (
            f" Through two backends (gateway-2b): {stream_2b['mb_s']:.0f} MB/s, status "
            f"{stream_2b['status']}, growth {stream_2b['growth_mib']:.1f} MiB sampled / "
            f"{stream_2b['hwm_growth_mib']:.1f} MiB by VmHWM; copies given up for being "
            f"too large: {stream_2b.get('replay_skipped')}."
        )
    return "\n".join(
        [
            _begin(machine_key(host)),
            f"### {machine_key(host)}",
            "",
            f"CPU {host.get('cpu_model', '?')}; kernel {host['kernel']}; "
            f"{host.get('python_build', 'Python ' + host['python'])}; "
            f"gateway build: {host.get('gateway_build', '?')}.",
            "",
            f"Run {meta['timestamp']} (`{json_path.name}`), gateway commit {v['gateway_commit']}"
            f"{' (gateway/ modified)' if v['gateway_dirty'] else ''}; {meta['host']['cpus']} CPUs, "
            f"load average at start {_loadavg(meta)}; "
            f"{meta['workers']} worker(s) for both nginx and the gateway; access log "
            f"{meta['access_log']}; medians of {meta['repeats']} runs × {meta['duration_s']:g} s; "
            f"whole run {meta['elapsed_s']:.0f} s.",
            "",
            f"Versions: {v['nginx']}; vmauth {v['vmauth']} (Debian); {v['wrk']}; "
            f"Python {meta['host']['python']}; kernel {meta['host']['kernel']}.",
            "",
            f"Bodies: {payloads}.",
            "",
            table(result),
            "",
            stream_line,
            "",
            f"![bench chart](results/{png.name})",
            _end(machine_key(host)),
        ]
    )


def _begin(key: str) -> str:
    return f"<!-- bench:results:begin {key} -->"


def _end(key: str) -> str:
    return f"<!-- bench:results:end {key} -->"


def update_results_md(result: dict[str, Any], path: Path, json_path: Path, png: Path) -> None:
    """Replace this machine's block (CPU model and count), or add one after
    the others: RESULTS.md keeps one table per machine measured."""
    key = machine_key(result["meta"]["host"])
    block = markdown(result, json_path, png)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = _begin(key), _end(key)
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        path.write_text(head + block + tail)
        return
    # After the last machine's block, else at the end.
    last = text.rfind("<!-- bench:results:end")
    if last < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")
        return
    cut = text.index("-->", last) + 3
    path.write_text(text[:cut] + "\n\n" + block + text[cut:])
