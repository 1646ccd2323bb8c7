"""Logging: structlog rendering JSON with orjson, one line per event, to stdout.

Access lines (one per request) are appended to an in-memory buffer that the
event loop flushes a few times a second and at shutdown: a write syscall
per request would cost more than the rest of the request's bookkeeping.
Warnings and errors are written at once.  Nothing here ever receives a
header value, and tracebacks carry no local variables (the one renderer
of every logger in every process), so no token or key can reach a log line.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import orjson
import structlog

__all__ = ["BufferedLineWriter", "access_logger", "configure", "get_logger"]

_FLUSH_AT = 64 * 1024
# Several workers share one stdout pipe; POSIX keeps writes of at most
# PIPE_BUF bytes whole, so each write is cut there, at a line end.
_PIPE_BUF = 4096


class BufferedLineWriter:
    """A structlog logger for rendered bytes: buffers info, flushes the rest."""

    __slots__ = ("_buf", "_file", "_max_write")

    def __init__(self, file: IO[bytes], max_write: int = 0) -> None:
        self._file = file
        self._buf = bytearray()
        self._max_write = max_write

    def _buffered(self, message: bytes) -> None:
        buf = self._buf
        buf += message
        buf += b"\n"
        if len(buf) >= _FLUSH_AT:
            self.flush()

    def _immediate(self, message: bytes) -> None:
        self._buf += message
        self._buf += b"\n"
        self.flush()

    debug = info = msg = _buffered
    warning = warn = error = critical = exception = fatal = _immediate

    def flush(self) -> None:
        if not self._buf:
            return
        data, self._buf = bytes(self._buf), bytearray()
        try:
            if not self._max_write:
                self._file.write(data)
                self._file.flush()
                return
            start, size = 0, len(data)
            while start < size:
                end = start + self._max_write
                if end < size:
                    cut = data.rfind(b"\n", start, end)
                    end = cut + 1 if cut >= start else end
                self._file.write(data[start:end])
                self._file.flush()
                start = end
        except (OSError, ValueError):
            # stdout closed or broken: logging must never take the gateway down.
            pass


class _Factory:
    def __init__(self, writer: BufferedLineWriter) -> None:
        self.writer = writer

    def __call__(self, *args: Any) -> BufferedLineWriter:
        return self.writer


_writer: BufferedLineWriter | None = None
# structlog's dict_tracebacks shows every frame's local variables: a fault
# inside the JWT check would log the presented token and the HMAC key.
# Frames keep file, line and function; values never.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure(
    level: str = "info", stream: IO[bytes] | None = None, *, pipe_safe: bool = False
) -> BufferedLineWriter:
    """Set up structlog for the process; returns the writer to flush."""
    global _writer  # noqa: PLW0603  (structlog's configuration is process-global too)
    if _writer is not None:
        _writer.flush()
    _writer = BufferedLineWriter(
        stream if stream is not None else sys.stdout.buffer, _PIPE_BUF if pipe_safe else 0
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _TRACEBACKS,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_Factory(_writer),
        cache_logger_on_first_use=False,
    )
    return _writer


def flush() -> None:
    if _writer is not None:
        _writer.flush()


def get_logger(name: str = "gateway") -> Any:
    return structlog.get_logger(logger_name=name)


def access_logger() -> Any:
    """The logger for the one line per request (event ``request``)."""
    return structlog.get_logger(logger_name="access")
