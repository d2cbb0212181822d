"""JSON objects, one a line, from a file, a file object or stdin: read and parsed in a daemon
thread and handed to the event loop through a bounded hand-off."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import queue
import select
import stat
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, Protocol, TextIO, TypeAlias

import structlog

from producers.sources._rows import RejectReason, Row, validate_row
from sealstream.ids import check_stream

__all__ = ["JsonLines"]

log = structlog.get_logger(__name__)

#: How often a reader thread blocked on a full hand-off checks whether it should stop.
_POLL: Final = 0.1
_READ_CHUNK: Final = 64 * 1024
#: Chunks of lines the reader thread may have handed over and the loop not yet taken.
_HANDOFF_CHUNKS: Final = 2


@dataclass(frozen=True, slots=True)
class _Rejected:
    lineno: int
    reason: RejectReason


@dataclass(frozen=True, slots=True)
class _Failed:
    exc: Exception


@dataclass(frozen=True, slots=True)
class _End:
    lines: int


_Item: TypeAlias = Row | _Rejected | _Failed | _End


class _TooLong:
    """Marks a line longer than the limit (its content is skipped, never kept)."""


_TOO_LONG: Final = _TooLong()


def _ends_line(chunk: str | bytes) -> bool:
    if isinstance(chunk, bytes):
        return chunk.endswith(b"\n")
    return chunk.endswith("\n")


def _never_blocks(f: object) -> bool:
    """True for in-memory file objects and regular files: a read never waits for a writer."""
    fileno = getattr(f, "fileno", None)
    if fileno is None:
        return True
    try:
        return stat.S_ISREG(os.fstat(fileno()).st_mode)
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return True


class _Lines(Protocol):
    """A blocking source of lines, used by the reader thread only."""

    def next(self) -> str | bytes | _TooLong | None:
        """The next line, ``_TOO_LONG``, or None at EOF."""

    def ready(self) -> bool:
        """Whether :meth:`next` can return without waiting for input."""

    def close(self) -> None: ...


class _FileLines:
    """Lines of a file object (text or binary), through its ``readline``."""

    def __init__(self, f: IO[Any], limit: int, *, owned: bool) -> None:
        self._f = f
        self._limit = limit
        self._owned = owned
        self._never_blocks = _never_blocks(f)

    def next(self) -> str | bytes | _TooLong | None:
        chunk: str | bytes = self._f.readline(self._limit + 1)
        if not chunk:
            return None
        if _ends_line(chunk) or len(chunk) <= self._limit:
            return chunk
        while True:  # skip the rest of a long line in bounded chunks
            rest: str | bytes = self._f.readline(_READ_CHUNK)
            if not rest or _ends_line(rest):
                return _TOO_LONG

    def ready(self) -> bool:
        # A pipe behind a buffered file object gives no way to tell: hand every line over.
        return self._never_blocks

    def close(self) -> None:
        if self._owned:
            self._f.close()


class _FdLines:
    """Lines of a file descriptor (stdin), read with ``os.read``.

    No ``BufferedReader`` lock is held while waiting for input: a daemon thread blocked here
    does not stop the interpreter from exiting.
    """

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self._buf = bytearray()
        self._eof = False
        self._skipping = False  # inside a line already known to be too long

    def _discard(self) -> None:
        """While skipping a long line, drop its buffered bytes (up to its newline)."""
        if self._skipping:
            end = self._buf.find(b"\n")
            if end < 0:
                self._buf.clear()
            else:
                del self._buf[: end + 1]
                self._skipping = False

    def _fill(self) -> None:
        data = os.read(self._fd, _READ_CHUNK)
        if data:
            self._buf += data
            self._discard()
        else:
            self._eof = True

    def next(self) -> bytes | _TooLong | None:
        while True:
            if not self._skipping:
                end = self._buf.find(b"\n")
                if end > self._limit or (end < 0 and len(self._buf) > self._limit):
                    # Reported at once; the rest of the line is dropped as it comes.
                    self._skipping = True
                    self._discard()
                    return _TOO_LONG
                if end >= 0:
                    line = bytes(self._buf[: end + 1])
                    del self._buf[: end + 1]
                    return line
            if self._eof:
                self._skipping = False
                if self._buf:
                    line = bytes(self._buf)
                    self._buf.clear()
                    return line
                return None
            self._fill()

    def ready(self) -> bool:
        while not (
            self._eof
            or (not self._skipping and (b"\n" in self._buf or len(self._buf) > self._limit))
        ):
            try:
                readable, _, _ = select.select([self._fd], [], [], 0)
            except (OSError, ValueError):  # not selectable here: hand every line over
                return False
            if not readable:
                return False
            self._fill()
        return True

    def close(self) -> None:
        return None


def _open_lines(source: Path | TextIO | BinaryIO | None, limit: int) -> _Lines:
    """The lines to read; stdin (also when passed explicitly) is read from its descriptor."""
    if isinstance(source, Path):
        return _FileLines(source.open("rb"), limit, owned=True)
    stdin = sys.stdin
    if source is not None and source is not stdin and source is not getattr(stdin, "buffer", 0):
        return _FileLines(source, limit, owned=False)
    if stdin is None:
        raise ValueError("there is no stdin to read")
    try:
        return _FdLines(stdin.fileno(), limit)
    except (OSError, ValueError):  # stdin was replaced by an in-memory file
        buffer: IO[bytes] | None = getattr(stdin, "buffer", None)
        return _FileLines(buffer if buffer is not None else stdin, limit, owned=False)


def _no_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


#: One decoder for every line (``json.loads`` with options builds a new one per call).
_JSON: Final = json.JSONDecoder(parse_constant=_no_constant)


def _parse_line(line: str | bytes, lineno: int) -> Row | RejectReason | None:
    """A row, a reason, or None for a blank line (pure)."""
    if isinstance(line, bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return "not_json"
    else:
        text = line
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        obj = _JSON.decode(text)
    except (ValueError, RecursionError):
        return "not_json"
    return validate_row(obj)


class _Handoff:
    """A bounded hand-off of chunks of items from one reader thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.Queue[list[_Item]] = queue.Queue(_HANDOFF_CHUNKS)
        self._ready = asyncio.Event()
        self._waiting = False
        self.stopped = threading.Event()

    def send(self, chunk: list[_Item]) -> bool:
        """Reader side: block while full; False once the consumer is gone."""
        while not self.stopped.is_set():
            try:
                self._queue.put(chunk, timeout=_POLL)
            except queue.Full:
                continue
            if self._waiting:
                self._waiting = False
                try:
                    self._loop.call_soon_threadsafe(self._ready.set)
                except RuntimeError:  # the loop is closed
                    self.stopped.set()
                    return False
            return True
        return False

    def poll(self) -> list[_Item] | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    async def wait(self) -> None:
        """Loop side: return once a chunk is (probably) there."""
        self._ready.clear()
        self._waiting = True  # before the check, so that a concurrent send wakes us
        try:
            if self._queue.empty():
                await self._ready.wait()
        finally:
            self._waiting = False


class JsonLines:
    """Rows from JSON lines: a file (``Path``), a file object, or stdin (``None``).

    Each non-blank line must be one JSON object of scalar values (see :func:`validate_row`).
    Any other line is rejected, never fatal: counted in :attr:`rejected` by reason, logged
    (line number and reason only) and passed to ``on_reject(lineno, reason)``. Iteration ends
    at EOF; read errors (a missing file) are raised by ``rows()``.

    Lines are read and parsed in a daemon thread, so a read waiting on stdin holds up neither
    the event loop nor the exit. Batches of up to ``batch_rows`` rows are yielded as soon as
    the reader would have to wait for input, without waiting to fill them. ``max_line`` counts
    characters (bytes for a path or stdin), the newline excluded; a longer line is skipped
    without being held in memory.
    """

    def __init__(
        self,
        source: Path | TextIO | BinaryIO | None = None,
        *,
        stream: str,
        max_line: int = 1_000_000,
        batch_rows: int = 500,
        on_reject: Callable[[int, str], None] | None = None,
    ) -> None:
        if max_line < 1 or batch_rows < 1:
            raise ValueError("max_line and batch_rows must be positive")
        if not (source is None or isinstance(source, Path) or hasattr(source, "readline")):
            raise TypeError(f"source must be a Path, a file object or None, not {source!r:.80}")
        self.stream = check_stream(stream)
        self.max_line = max_line
        self.batch_rows = batch_rows
        self.rejected: collections.Counter[str] = collections.Counter()
        self._source = source
        self._on_reject = on_reject
        self._started = False

    async def rows(self) -> AsyncGenerator[list[Row], None]:
        if self._started:
            raise RuntimeError("JsonLines.rows() can be iterated only once")
        self._started = True
        handoff = _Handoff(asyncio.get_running_loop())
        reader = threading.Thread(
            target=self._read, args=(handoff,), name=f"jsonl-{self.stream}", daemon=True
        )
        reader.start()
        pending: collections.deque[_Item] = collections.deque()
        accepted = 0
        try:
            while True:
                batch: list[Row] = []
                end: _End | None = None
                while len(batch) < self.batch_rows and end is None:
                    if not pending:
                        chunk = handoff.poll()
                        if chunk is None:
                            break
                        pending.extend(chunk)
                        continue
                    item = pending.popleft()
                    if isinstance(item, _Rejected):
                        self._reject(item.lineno, item.reason)
                    elif isinstance(item, _Failed):
                        raise item.exc
                    elif isinstance(item, _End):
                        end = item
                    else:
                        batch.append(item)
                if batch:
                    accepted += len(batch)
                    yield batch
                if end is not None:
                    log.info(
                        "jsonl.eof",
                        stream=self.stream,
                        lines=end.lines,
                        rows=accepted,
                        rejected=sum(self.rejected.values()),
                    )
                    return
                if not batch and not pending:
                    await handoff.wait()
        finally:
            handoff.stopped.set()

    def _reject(self, lineno: int, reason: RejectReason) -> None:
        self.rejected[reason] += 1
        log.warning("jsonl.rejected", stream=self.stream, line=lineno, reason=reason)
        if self._on_reject is not None:
            self._on_reject(lineno, reason)

    def _read(self, handoff: _Handoff) -> None:
        """Reader thread: parse lines, hand rows, rejections and the end over in chunks.

        A chunk goes as soon as it holds ``batch_rows`` items or the next read would wait.
        """
        lineno = 0
        chunk: list[_Item] = []
        try:
            lines = _open_lines(self._source, self.max_line)
            try:
                while not handoff.stopped.is_set():
                    line = lines.next()
                    if line is None:
                        break
                    lineno += 1
                    if isinstance(line, _TooLong):
                        chunk.append(_Rejected(lineno, "too_long"))
                    else:
                        parsed = _parse_line(line, lineno)
                        if isinstance(parsed, str):
                            chunk.append(_Rejected(lineno, parsed))
                        elif parsed is not None:
                            chunk.append(parsed)
                    if chunk and (len(chunk) >= self.batch_rows or not lines.ready()):
                        if not handoff.send(chunk):
                            return
                        chunk = []
            finally:
                lines.close()
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            chunk.append(_Failed(exc))
        else:
            chunk.append(_End(lineno))
        handoff.send(chunk)
