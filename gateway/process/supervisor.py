"""The supervisor of a multi-worker gateway (``run --workers N``, N > 1).

Owns no client traffic.  It validates the config, reserves the public port
(bound with SO_REUSEPORT but not listening, so port 0 resolves once and
every worker binds the same port; claimed so that no other gateway or
program shares it), starts N workers and restarts any that
die, pushes config on SIGHUP (validated here first), serves the admin
listener with metrics summed across workers (counters of a worker that
died are kept, so sums never go backwards), and on SIGTERM drains every
worker before exiting.

A reload is all or nothing: every running worker prepares the pushed
config (``control``'s two phases) and only when all of them said ok within
``RELOAD_TIMEOUT`` is it committed everywhere and adopted here (gauges,
watched files, the config a restarted worker gets).  Otherwise it is
dropped everywhere and the reload fails: every worker keeps serving the
previous config.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.admin.server import AdminServer
from gateway.config.loader import ConfigError, Settings, load
from gateway.process.control import (
    ChannelClosed,
    Commit,
    Committed,
    Configure,
    Failed,
    Ready,
    Reloaded,
    StatsReply,
    StatsRequest,
    read_message,
    write_message,
)
from gateway.process.fork import ForkedProcess, fork_worker
from gateway.process.gauges import config_gauges
from gateway.process.sockets import claim_port, listen_socket, split_hostport
from gateway.telemetry import log
from gateway.telemetry.snapshot import Gauges, ProcessSample, Snapshot, merge

__all__ = ["Supervisor"]

_START_TIMEOUT = 30.0
_STATS_TIMEOUT = 2.0
_RESTART_MAX_BACKOFF = 30.0
# How long every worker has to prepare a pushed config, and to confirm it
# serves it once committed.
RELOAD_TIMEOUT = 5.0


@dataclass
class _Worker:
    index: int
    process: ForkedProcess | None = None
    writer: asyncio.StreamWriter | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: dict[int, asyncio.Future[StatsReply]] = field(default_factory=dict)
    # Answers to config pushes, by generation: whatever else arrives is late.
    prepared: dict[int, asyncio.Future[Reloaded]] = field(default_factory=dict)
    committed: dict[int, asyncio.Future[Committed]] = field(default_factory=dict)
    last_snapshot: Snapshot | None = None
    last_process: ProcessSample | None = None
    started_at: float = 0.0
    backoff: float = 1.0
    restarts: int = 0


class Supervisor:
    def __init__(self, settings: Settings, path: Path, workers: int) -> None:
        self.settings = settings  # validated from settings.text, the one read of the file
        self.path = path
        self.workers = [_Worker(i) for i in range(workers)]
        self.log: Any = log.get_logger()
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = self.started_at = time.time()
        self.last_reload_ok = True
        self.last_reload_attempt = 0.0
        self.stopping = False
        self.port = 0
        self.admin_port = 0
        self._reserved: socket.socket | None = None
        self._claim: socket.socket | None = None
        self._retired: list[Snapshot] = []
        self._ids = itertools.count(1)
        self._latest: Snapshot = merge([])
        self._admin: AdminServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0  # of the last config push
        # Held by a reload from push to commit: a worker started meanwhile
        # gets the config that is in force when the reload is settled.
        self._configuring = asyncio.Lock()

    # -- start ----------------------------------------------------------------
    async def start(self) -> None:
        self._reserved = listen_socket(
            self.settings.server.listen, reuse_port=True, listen_now=False
        )
        self.port = self._reserved.getsockname()[1]
        # SO_REUSEPORT is for our own workers only: refuse a port that
        # another gateway (or anything else) already serves.
        self._claim = claim_port(self._reserved, probe=True)
        for worker in self.workers:
            await self._spawn(worker)
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                for worker in self.workers:
                    await worker.ready.wait()
        except TimeoutError:
            raise OSError("workers did not become ready") from None
        await self._start_admin()

    async def _spawn(self, worker: _Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Forked, not exec'd: the worker shares this process's pages
            # (fork.py says what the child gives up to make that safe).
            worker.process = fork_worker(child.fileno(), worker.index)
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        async with self._configuring:
            worker.writer = writer
            worker.ready.clear()
            worker.started_at = time.monotonic()
            write_message(writer, self._configure())
            await writer.drain()
        self._task(self._read(worker, reader))
        self._task(self._watch(worker, worker.process))

    def _configure(self, settings: Settings | None = None, generation: int = 0) -> Configure:
        settings = settings or self.settings
        return Configure(settings.text, str(self.path), self.port, generation)

    def _task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_message(reader)
                if isinstance(message, Ready):
                    worker.ready.set()
                elif isinstance(message, StatsReply):
                    _answer(worker.waiters, message.id, message)
                elif isinstance(message, Reloaded):
                    _answer(worker.prepared, message.generation, message)
                elif isinstance(message, Committed):
                    _answer(worker.committed, message.generation, message)
                elif isinstance(message, Failed):
                    self.log.error("worker_config_failed", worker=worker.index, error=message.error)
        except (ChannelClosed, ConnectionError):
            # Gone: a reload waiting on this worker need not wait for the deadline.
            for pending in (worker.prepared, worker.committed):
                for future in pending.values():
                    if not future.done():
                        future.set_exception(ChannelClosed("worker exited"))
                pending.clear()

    async def _watch(self, worker: _Worker, process: ForkedProcess) -> None:
        code = await process.wait()
        worker.ready.clear()
        if worker.last_snapshot is not None:
            self._retire(worker.last_snapshot)
            worker.last_snapshot = worker.last_process = None
        if self.stopping:
            return
        self.log.error("worker_exited", worker=worker.index, code=code)
        if time.monotonic() - worker.started_at > 60:
            worker.backoff = 1.0
        await asyncio.sleep(worker.backoff)
        worker.backoff = min(worker.backoff * 2, _RESTART_MAX_BACKOFF)
        if not self.stopping:
            worker.restarts += 1
            await self._spawn(worker)

    def _retire(self, snapshot: Snapshot) -> None:
        """Keep a dead worker's counters so the sums never decrease."""
        for route in snapshot.routes.values():
            route.in_flight = 0
        snapshot.open_connections = 0
        snapshot.replay_bytes = 0
        snapshot.health = []  # a dead worker has no view of the backends
        self._retired = [merge([*self._retired, snapshot])]

    # -- metrics ------------------------------------------------------------------
    async def _start_admin(self) -> None:
        async def refresh() -> None:
            self._latest = await self.snapshot()

        admin = AdminServer(lambda: self._latest, self._gauges, self.ready, refresh)
        self.admin_port = await admin.start(*split_hostport(self.settings.server.admin_listen))
        self._admin = admin

    def ready(self) -> bool:
        return not self.stopping and all(w.ready.is_set() for w in self.workers)

    def _gauges(self) -> Gauges:
        return config_gauges(
            self.settings,
            self.reloads,
            self.last_reload_success,
            len(self.workers),
            self.last_reload_ok,
            self._latest.processes,
            last_attempt=self.last_reload_attempt,
            restarts=[w.restarts for w in self.workers],
            started_at=self.started_at,
        )

    async def snapshot(self) -> Snapshot:
        loop = asyncio.get_running_loop()
        futures = []
        for worker in self.workers:
            if worker.writer is None or not worker.ready.is_set():
                continue
            request_id = next(self._ids)
            future: asyncio.Future[StatsReply] = loop.create_future()
            worker.waiters[request_id] = future
            write_message(worker.writer, StatsRequest(request_id))
            futures.append((worker, future))
        snapshots: list[Snapshot] = []
        processes: list[ProcessSample] = []
        for worker, future in futures:
            try:
                async with asyncio.timeout(_STATS_TIMEOUT):
                    reply = await future
            except TimeoutError:
                pass  # busy or dying: its last known counters stand
            else:
                worker.last_snapshot, worker.last_process = reply.snapshot, reply.process
            if worker.last_snapshot is not None:
                snapshots.append(worker.last_snapshot)
            if worker.last_process is not None:
                processes.append(worker.last_process)
        merged = merge([*snapshots, *self._retired])
        merged.processes = processes
        return merged

    # -- reload -------------------------------------------------------------------
    async def reload(self) -> bool:
        self.last_reload_attempt = time.time()
        try:
            settings = load(self.path)  # reads the file once: settings.text is what we push
        except ConfigError as exc:
            self._reload_failed()
            self.log.error("config_reload_failed", error=str(exc))
            return False
        if settings.server.listen != self.settings.server.listen:
            self.log.warning("config_reload_listen_ignored", reason="listen changes need a restart")
        async with self._configuring:
            self._generation += 1
            generation = self._generation
            # A worker between exit and restart is left out: it starts with
            # whatever config this reload leaves in force.
            workers = [
                w
                for w in self.workers
                if w.writer is not None and w.process is not None and w.process.returncode is None
            ]
            push = self._configure(settings, generation)
            answers = await asyncio.gather(
                *(self._ask(w, w.prepared, push, generation) for w in workers)
            )
            errors = [
                f"worker {w.index}: {error}"
                for w, error in zip(workers, answers, strict=True)
                if error is not None
            ]
            if errors:
                for worker in workers:  # the prepared config is dropped everywhere
                    assert worker.writer is not None
                    write_message(worker.writer, Commit(generation, apply=False))
                self._reload_failed()
                self.log.error(
                    "config_reload_failed", errors=errors, kept="the previous config, everywhere"
                )
                return False
            self.settings = settings
            commit = Commit(generation, apply=True)
            answers = await asyncio.gather(
                *(self._ask(w, w.committed, commit, generation) for w in workers)
            )
        unconfirmed = [w.index for w, error in zip(workers, answers, strict=True) if error]
        if unconfirmed:
            # Prepared fine: the commit waits in its channel and is served as
            # soon as the worker runs again.
            self.log.warning("config_commit_unconfirmed", workers=unconfirmed)
        self.reloads["success"] += 1
        self.last_reload_ok = True
        self.last_reload_success = time.time()
        self.log.info("config_reloaded", source=str(self.path), workers=len(workers))
        return True

    async def _ask(
        self,
        worker: _Worker,
        pending: dict[int, asyncio.Future[Any]],
        message: Configure | Commit,
        generation: int,
    ) -> str | None:
        """Send ``message``, wait for the answer of its generation: the
        reason it is not ok, or None."""
        assert worker.writer is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending[generation] = future
        write_message(worker.writer, message)
        try:
            async with asyncio.timeout(RELOAD_TIMEOUT):
                answer = await future
        except TimeoutError:
            return f"no answer within {RELOAD_TIMEOUT:g} s"
        except ChannelClosed:
            return "exited"
        finally:
            pending.pop(generation, None)
        if isinstance(answer, Reloaded) and not answer.ok:
            return answer.error
        return None

    def _reload_failed(self) -> None:
        self.reloads["failure"] += 1
        self.last_reload_ok = False

    # -- stop ---------------------------------------------------------------------
    async def stop(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        grace = self.settings.server.drain_timeout_seconds + 5.0
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                async with asyncio.timeout(grace):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in list(self._tasks):
            task.cancel()
        if self._admin is not None:
            await self._admin.close()
        if self._reserved is not None:
            self._reserved.close()
        if self._claim is not None:
            self._claim.close()
        log.flush()


def _answer(pending: dict[int, asyncio.Future[Any]], key: int, message: object) -> None:
    """Hand an answer to whoever waits for it; a late one (nobody waits) is dropped."""
    future = pending.pop(key, None)
    if future is not None and not future.done():
        future.set_result(message)
