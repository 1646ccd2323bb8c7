"""Workers forked from the supervisor, sharing its memory until they write it.

A worker started by exec loads Python and every module again (about 18 MiB
of private memory each, bench/README.md § Compiled or pure).  Forked from
the supervisor after the worker's modules are imported and the cyclic
collector's objects frozen, it shares those pages copy-on-write and only
pays for what it allocates or touches itself.

Forking a process that runs an event loop needs care, all of it here:

- signals are blocked across the fork, so a SIGTERM for the new worker
  cannot run the supervisor's handler (which would write to the
  supervisor's wakeup socket and stop the supervisor);
- in the child, every inherited descriptor but stdio and the control
  socket is replaced by /dev/null (``dup2``): the supervisor's listeners,
  its end of every worker's channel (so each channel still sees EOF when
  the supervisor dies) and its event loop's epoll and wakeup descriptors.
  The numbers stay taken, so no object the child inherited can close a
  descriptor the worker opened later;
- the child forgets the running loop, never returns into the supervisor's
  stack and leaves with ``os._exit``, so nothing of the supervisor's loop
  runs or is torn down in it.

Must not know: the control protocol, config, the data path (beyond the
worker entry point it calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import sys
import traceback

import uvloop

from gateway.process.worker import serve_worker

__all__ = ["WORKER_NAME", "ForkedProcess", "fork_worker"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_FAILED = 70  # EX_SOFTWARE: the worker could not run
_PR_SET_NAME = 15
# A forked worker's command line is the supervisor's: its name (ps -o comm,
# top, /proc/PID/comm) tells it apart.  15 bytes at most.
WORKER_NAME = "obsgw-worker-%d"


class ForkedProcess:
    """A forked worker, with what the supervisor uses of
    ``asyncio.subprocess.Process``: ``pid``, ``returncode``, ``wait``,
    ``send_signal``, ``kill``."""

    def __init__(self, pid: int, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(pid)
        # Readable once the process has exited (Linux >= 5.3).
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8  # reaped elsewhere: status unknown
        if pid == 0:
            return  # not yet (spurious wake-up)
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_worker(fd: int, index: int) -> ForkedProcess:
    """Fork a worker serving the control channel ``fd`` (inherited)."""
    loop = asyncio.get_running_loop()
    # What the supervisor holds now is shared with the child: keep both
    # collectors from walking it (a walk writes every object's header, and
    # a written page is a copied page).
    gc.collect()
    gc.freeze()
    # Buffered output would be written twice, once by each process.
    sys.stdout.flush()
    sys.stderr.flush()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    pid = os.fork()
    if pid == 0:
        _child(fd, index, old)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return ForkedProcess(pid, loop)


def _child(fd: int, index: int, mask: set[int | signal.Signals]) -> None:
    code = _FAILED
    try:
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _neutralise_inherited(keep={0, 1, 2, fd})
        _name(WORKER_NAME % index)
        asyncio.events._set_running_loop(None)  # the supervisor's, not ours
        code = uvloop.run(serve_worker(fd, index))
    except BaseException:  # noqa: BLE001  (a child must never return into the parent's stack)
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _name(name: str) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux / not glibc: unnamed
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _neutralise_inherited(keep: set[int]) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd != devnull:
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                os.dup2(devnull, fd)
    os.close(devnull)
