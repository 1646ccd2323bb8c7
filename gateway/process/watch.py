"""Opt-in reload on file change: polls the config file and every token or
key file it names (``Settings.files``) and calls back when one changes.

Polling stat() every couple of seconds costs nothing measurable, needs no
inotify dependency, and sees Kubernetes Secret updates (a symlink swap that
inotify watches on the old inode would miss).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

__all__ = ["watch_files"]

_Stamp = tuple[int, int, int, int] | None


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a swapped target counts as a change
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


async def watch_files(
    files: Callable[[], tuple[str, ...]], on_change: Callable[[], object], interval: float
) -> None:
    """Run until cancelled; ``files`` is re-read after each change."""
    seen = {path: _stamp(path) for path in files()}
    while True:
        await asyncio.sleep(interval)
        now = {path: _stamp(path) for path in files()}
        if now != seen:
            result = on_change()
            if asyncio.iscoroutine(result):
                await result
            seen = {path: _stamp(path) for path in files()}
