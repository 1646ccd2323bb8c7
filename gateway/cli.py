"""Command line: ``run``, ``check-config``, ``hash-token [--stdin]``, ``status``.

The only module that exits the process or installs signal handlers.
Exit codes: 0 clean stop, 1 runtime failure (cannot listen), 2 bad config
or usage.  uvloop is started through ``asyncio.Runner(loop_factory=...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import uvloop

from gateway import __version__, build
from gateway.config.credentials import token_digest
from gateway.config.loader import ConfigError, Settings, expiry_warnings, load
from gateway.config.routes import RouteSpec
from gateway.config.tenants import forwarding_lines, tenancy_warnings
from gateway.policy.auth import MAX_AUTHORIZATION_BYTES
from gateway.process.memory import tune_malloc
from gateway.process.watch import watch_files
from gateway.telemetry import log

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="obs-gateway",
        description="Authenticated ingest gateway for remote-write and OTLP/HTTP.",
    )
    p.add_argument("--version", action="version", version=f"obs-gateway {__version__}")
    # The metavar lists the public commands: argparse would show the
    # internal _worker in the usage line, and "==SUPPRESS==" as its help.
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{run,check-config,hash-token,status}"
    )
    run = sub.add_parser("run", help="serve with a config file")
    run.add_argument("--config", "-c", required=True, type=Path)
    run.add_argument(
        "--workers",
        "-w",
        type=int,
        default=None,
        help="worker processes (default: [server] workers, else one per CPU)",
    )
    worker = sub.add_parser("_worker")  # started by the supervisor; no help: not listed
    worker.add_argument("--fd", type=int, required=True)
    worker.add_argument("--index", type=int, required=True)
    check = sub.add_parser("check-config", help="validate a config; print credential × route")
    check.add_argument("config", type=Path)
    hash_token = sub.add_parser(
        "hash-token", help="print a fresh 256-bit token and its sha256 config line"
    )
    hash_token.add_argument(
        "--stdin",
        action="store_true",
        help="digest the existing token read from standard input instead (surrounding "
        "whitespace, such as echo's newline, is not part of it, as for token_env/token_file)",
    )
    status = sub.add_parser(
        "status", help="a running gateway's credentials, routes, config and workers"
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument("--admin", metavar="HOST:PORT", help="its admin listener")
    where.add_argument(
        "--config", "-c", type=Path, help="read [server] admin_listen from this config"
    )
    status.add_argument("--json", action="store_true", help="the same data as JSON, for scripts")
    status.add_argument("--watch", action="store_true", help="refresh in place every 2 s")
    status.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between the two samples the rates come from (default 1)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("run", "_worker"):
        tune_malloc()
    if args.command == "hash-token":
        return _digest_stdin() if args.stdin else _hash_token()
    if args.command == "status":
        # Standard library only: no event loop, no aiohttp, no config secrets.
        from gateway.admin.status_cli import main as status  # noqa: PLC0415

        return status(
            args.admin, args.config, as_json=args.json, watch=args.watch, interval=args.interval
        )
    if args.command == "_worker":
        # Workers import only the data path: no aiohttp, no prometheus-client.
        from gateway.process.worker import serve_worker  # noqa: PLC0415

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve_worker(args.fd, args.index))
    # check-config often runs in a shell without the service's environment:
    # a variable it lacks is checked with a placeholder and reported, not
    # fatal.  run needs every one of them.
    environ = _Placeholders(os.environ) if args.command == "check-config" else None
    try:
        settings = load(args.config, environ=environ)
    except ConfigError as exc:
        print(f"obs-gateway: config error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if environ is not None:
        print(_matrix(settings))  # noqa: T201
        for warning in tenancy_warnings(settings):
            print(f"obs-gateway: warning: {warning}", file=sys.stderr)  # noqa: T201
        for name in environ.unset:
            print(  # noqa: T201
                f"obs-gateway: warning: {name} is not set here, so it was checked with a "
                "placeholder; 'run' refuses to start without it",
                file=sys.stderr,
            )
        return 0
    workers = args.workers if args.workers is not None else settings.server.workers
    workers = workers or default_workers()
    if workers < 1:
        print("obs-gateway: --workers must be at least 1", file=sys.stderr)  # noqa: T201
        return 2
    log.configure(settings.log.level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if workers == 1:
            return runner.run(_serve(settings, args.config))
        return runner.run(_supervise(settings, args.config, workers))


class _Placeholders(Mapping[str, str]):
    """The environment, where a variable that is not set reads as a
    placeholder (per name, long enough for any secret) and is remembered."""

    def __init__(self, real: Mapping[str, str]) -> None:
        self._real = real
        self.unset: list[str] = []

    def __getitem__(self, name: str) -> str:
        if name in self._real:
            return self._real[name]
        if name not in self.unset:
            self.unset.append(name)
        return f"placeholder-for-unset-{name}-{'x' * 32}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._real)

    def __len__(self) -> int:
        return len(self._real)


def default_workers(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """One worker per CPU this process may use: the affinity mask, capped by
    a cgroup v2 CPU quota (a container limited to 1 CPU on a 16-CPU host
    gets 1 worker, not 16 that would blow its memory limit)."""
    cpus = len(os.sched_getaffinity(0)) or 1
    try:
        with open(cpu_max, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def _hash_token() -> int:
    token = secrets.token_urlsafe(32)  # 256 bits from the OS CSPRNG
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token:  {token}")  # noqa: T201
    print(f'config: token_sha256 = "{digest}"')  # noqa: T201
    print(f'        (in a [[credentials.tokens]] entry: sha256 = "{digest}")')  # noqa: T201
    print("Give the token to the sender; put only the digest in the config.")  # noqa: T201
    return 0


def _digest_stdin() -> int:
    """The config line for a token that already exists (the runbook's first
    step); the token itself is never printed."""
    if sys.stdin.isatty():
        print("token, then Enter and Ctrl-D:", file=sys.stderr)  # noqa: T201
    try:
        digest = _stdin_token_digest(sys.stdin.buffer.read(MAX_AUTHORIZATION_BYTES + 1))
    except ConfigError as exc:
        print(f"obs-gateway: hash-token --stdin: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(f'config: token_sha256 = "{digest}"')  # noqa: T201
    print(f'        (in a [[credentials.tokens]] entry: sha256 = "{digest}")')  # noqa: T201
    return 0


def _stdin_token_digest(data: bytes) -> str:
    if len(data) > MAX_AUTHORIZATION_BYTES:
        raise ConfigError(f"longer than {MAX_AUTHORIZATION_BYTES} bytes: not a bearer token")
    if len(data.split()) > 1:
        # The gateway refuses such a header: the digest would match nothing.
        raise ConfigError("whitespace inside: not one bearer token (a 'Bearer ' prefix?)")
    return token_digest(data, "token").hex()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matrix(settings: Settings) -> str:
    routes = [r.name for r in settings.routes]
    width = max([len(c.name) for c in settings.credentials] + [10])
    lines = [f"config OK: {settings.source}", ""]
    lines.append("credential".ljust(width) + "  " + "  ".join(routes) + "  health")
    for cred in settings.credentials:
        cells = ["yes".center(len(r)) if r in cred.routes else "-".center(len(r)) for r in routes]
        lines.append(cred.name.ljust(width) + "  " + "  ".join(cells) + "  " + "yes".center(6))
    lines += ["", "tokens (credential/id: not_before → not_after):"]
    for cred in settings.credentials:
        for t in cred.tokens:
            lines.append(f"  {cred.name}/{t.id}: {_when(t.not_before)} → {_when(t.not_after)}")
        for r in cred.revoked:
            lines.append(f"  {cred.name}/{r.id}: revoked {_when(r.revoked_at)}")
        if cred.jwt is not None:
            jwt = cred.jwt
            for k in jwt.keys:
                lines.append(
                    f"  {cred.name}/{k.kid or 'jwt'}: JWT {','.join(jwt.algorithms)} "
                    f"iss={jwt.issuer} aud={jwt.audience} (validity from each token's exp)"
                )
    lines += ["", "routes (backends in order: label, weight, URL):"]
    for route in settings.routes:
        lines += _backends(route)
    lines += ["", *forwarding_lines(settings)]
    return "\n".join(lines)


def _backends(route: RouteSpec) -> list[str]:
    backends = route.backends()
    several = len(backends) > 1
    policy = (
        f"balance {route.balance}, attempts {min(route.attempts, len(backends))}, "
        f"retry on {', '.join(map(str, route.retry_statuses)) or 'no status'}, "
        f"replay up to {route.replay_buffer_bytes:,} B"
        if several
        else "one backend: no balancing, no retry"
    )
    check = route.health_check
    probe = (
        f"health check GET {check.path} every {check.interval_seconds:g} s "
        f"(timeout {check.timeout_seconds:g} s, up after {check.healthy_threshold}, "
        f"down after {check.unhealthy_threshold})"
        if check is not None
        else "no health check (passive only)"
    )
    lines = [f"  {route.name} {route.path}: {policy}; {probe}"]
    width = max(len(label) for label, _ in backends)
    for i, (label, spec) in enumerate(backends):
        lines.append(f"    {i}  {label.ljust(width)}  weight {spec.weight}  {spec.url}")
    return lines


def _listening(settings: Settings, port: int, admin_port: int, workers: int) -> None:
    host = settings.server.listen.rpartition(":")[0]
    admin_host = settings.server.admin_listen.rpartition(":")[0]
    kind, why = build.running()
    log.get_logger().info(
        "listening",
        listen=f"{host}:{port}",
        admin=f"{admin_host}:{admin_port}",
        version=__version__,
        # The hot path as compiled by mypyc or as Python (gateway/build.py);
        # build_reason says why a compiled build installed here is not used.
        build=kind,
        **({"build_reason": why} if why else {}),
        workers=workers,
        routes=[r.name for r in settings.routes],
        credentials=[c.name for c in settings.credentials],
    )
    log.flush()


def _log_expiry(settings: Settings) -> None:
    logger = log.get_logger()
    for warning in expiry_warnings(settings, time.time()):
        event = "token_expired" if warning.pop("expired") else "token_expiring"
        logger.warning(event, **warning)
    log.flush()


async def _lifecycle(
    settings: Settings,
    workers: int,
    start: Callable[[], Awaitable[tuple[int, int]]],
    current: Callable[[], Settings],
    reload: Callable[[], Awaitable[bool]],
    stop: Callable[[], Awaitable[None]],
) -> int:
    """Start, serve until SIGTERM/SIGINT, drain.  SIGHUP (and, if enabled, a
    file change) reloads.  Handlers are installed before anything listens:
    a SIGHUP that arrives during start-up is applied once serving, never
    the default action (which would kill the process)."""
    loop = asyncio.get_running_loop()
    logger = log.get_logger()
    stopping = asyncio.Event()
    lock = asyncio.Lock()  # one reload at a time, in arrival order
    tasks: set[asyncio.Task[None]] = set()
    started = False
    pending_reload = False

    async def reload_once() -> None:
        async with lock:
            if await reload():
                _log_expiry(current())

    def spawn_reload() -> None:
        task = loop.create_task(reload_once())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_sighup() -> None:
        nonlocal pending_reload
        if started:
            spawn_reload()
        else:
            pending_reload = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        port, admin_port = await start()
    except OSError as exc:
        error = exc.strerror or str(exc)
        logger.error("listen_failed", error=error)
        log.flush()
        print(f"obs-gateway: {error}", file=sys.stderr)  # noqa: T201
        await stop()
        return 1
    started = True
    _listening(settings, port, admin_port, workers)
    if pending_reload:
        spawn_reload()
    _log_expiry(settings)
    if settings.reload.watch:
        watcher = loop.create_task(
            watch_files(
                lambda: current().files, reload_once, settings.reload.watch_interval_seconds
            )
        )
        tasks.add(watcher)
    await stopping.wait()
    for task in list(tasks):
        task.cancel()
    logger.info("draining", timeout_seconds=current().server.drain_timeout_seconds)
    log.flush()
    await stop()
    logger.info("stopped")
    log.flush()
    return 0


async def _supervise(settings: Settings, path: Path, workers: int) -> int:
    from gateway.process.supervisor import Supervisor  # noqa: PLC0415  (see _worker above)

    supervisor = Supervisor(settings, path, workers)

    async def start() -> tuple[int, int]:
        await supervisor.start()
        return supervisor.port, supervisor.admin_port

    return await _lifecycle(
        settings, workers, start, lambda: supervisor.settings, supervisor.reload, supervisor.stop
    )


async def _serve(settings: Settings, path: Path) -> int:
    logger = log.get_logger()
    # Imported here: a supervisor never serves traffic, so it does not
    # load the data path (uvloop and the config are all it shares with it).
    from gateway.process.gateway import Gateway  # noqa: PLC0415

    gateway = Gateway(settings)
    started = False

    async def start() -> tuple[int, int]:
        nonlocal started
        await gateway.start()
        started = True
        # What start-up allocated lives as long as the process: keep the
        # cyclic collector from rescanning it.
        gc.collect()
        gc.freeze()
        return gateway.port, gateway.admin_port

    async def reload() -> bool:
        try:
            new = load(path)
        except ConfigError as exc:
            gateway.reload_failed()
            logger.error("config_reload_failed", error=str(exc))
            return False
        if new.server.listen != gateway.settings.server.listen:
            logger.warning("config_reload_listen_ignored", reason="listen changes need a restart")
        try:
            gateway.reload(new)
        except Exception as exc:  # noqa: BLE001  (a config the loader missed must not end reloads)
            gateway.reload_failed()
            logger.error("config_reload_failed", error=type(exc).__name__)
            return False
        logger.info("config_reloaded", source=str(path))
        return True

    async def stop() -> None:
        await (gateway.drain() if started else gateway.close())

    return await _lifecycle(settings, 1, start, lambda: gateway.settings, reload, stop)
