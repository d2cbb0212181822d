"""Telemetry sources of the cluster agent: where the rows that get sealed come from.

A source has a ``stream`` name and an async ``rows()`` iterator of row batches. A row is a flat
``dict`` of ``str`` keys to scalars (``int``, ``float``, ``str``, ``bool``, ``None``).

- :class:`HttpEvents`: synthetic HTTP events shaped like Pixie's ``http_events`` table.
- :class:`HostMetrics`: real figures of this machine, read with psutil.
- :class:`JsonLines`: JSON objects, one a line, from a file, a file object or stdin.
- :class:`Records`: rows handed over by Python code, behind a bounded queue.

:func:`validate_row` is the one pure check of a row from outside (JSON lines, Python callers).
Row contents are the user's telemetry: they are never logged, and neither are the inputs they
came from.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import os
import queue
import random
import select
import stat
import sys
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, Literal, Protocol, TextIO, TypeAlias

import psutil  # type: ignore[import-untyped,unused-ignore]
import structlog

from sealstream.errors import WireError
from sealstream.ids import check_stream

__all__ = [
    "HostMetrics",
    "HttpEvents",
    "JsonLines",
    "Records",
    "RejectReason",
    "Row",
    "Scalar",
    "Source",
    "validate_row",
]

log = structlog.get_logger(__name__)

Scalar: TypeAlias = int | float | str | bool | None
#: One row: a flat mapping of column name to :data:`Scalar`.
Row: TypeAlias = dict[str, Any]
#: Why :func:`validate_row` (or :class:`JsonLines`) refused an input.
RejectReason: TypeAlias = Literal[
    "not_json",  # not one JSON value (syntax, NaN/Infinity, bad UTF-8, absurdly deep)
    "not_object",  # valid JSON (or a Python value) that is not an object/mapping
    "too_long",  # a line longer than ``max_line``
    "nested_value",  # a value is a list/dict (or another container)
    "bad_key",  # a key is not a string, or not encodable as UTF-8
    "bad_value",  # NaN/inf float, int outside 64 bits, lone surrogate, unsupported type
]

_Sleep: TypeAlias = Callable[[float], Awaitable[object]]


class Source(Protocol):
    """What the agent reads from: a stream name and an iterator of row batches.

    ``rows()`` yields non-empty batches, forever or until the source is exhausted, as an async
    generator: a reader that stops early ``aclose()``s it (``contextlib.aclosing``) so that it
    releases what it holds at once.
    """

    @property
    def stream(self) -> str: ...

    def rows(self) -> AsyncGenerator[list[Row], None]: ...


# --------------------------------------------------------------------------- row validation

_INT_MIN: Final = -(2**63)
_UINT_MAX: Final = 2**64 - 1  # msgpack's integer range
_CONTAINERS: Final = (list, tuple, dict, set, frozenset, Mapping)


def _utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _value_reason(value: object) -> RejectReason | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT_MIN <= value <= _UINT_MAX else "bad_value"
    if isinstance(value, float):
        return None if math.isfinite(value) else "bad_value"
    if isinstance(value, str):
        return None if _utf8_ok(value) else "bad_value"
    if isinstance(value, _CONTAINERS):
        return "nested_value"
    return "bad_value"


#: value types a row may hold, exactly (subclasses, and floats, which must be finite, take the
#: row-by-row checks)
_PLAIN_VALUES: Final = frozenset({str, int, bool, type(None)})
_DICT: Final = frozenset({dict})


def plain_rows(rows: object) -> bool:
    """True if ``rows`` is a list of dicts whose keys are all ``str`` and whose values are
    ``str``, ``int``, ``bool`` or ``None`` (pure). Checked in C (``set(map(type, ...))`` over
    every value at once, ``str.join`` over every key), so a batch of rows costs a fraction of
    :func:`validate_row` per row. What it leaves to packing: an int beyond 64 bits and a str
    that is not UTF-8 encodable make msgpack raise, and the caller then checks row by row.
    False means only "check row by row", never "invalid"."""
    if type(rows) is not list or not set(map(type, rows)) <= _DICT:
        return False
    if not set(map(type, itertools.chain.from_iterable(map(dict.values, rows)))) <= _PLAIN_VALUES:
        return False
    try:
        "".join(itertools.chain.from_iterable(rows))  # a dict iterates its keys
    except TypeError:  # a key that is not a str
        return False
    return True


def validate_row(obj: object) -> Row | RejectReason:
    """A copy of ``obj`` as a row, or why it is not one (pure).

    A row is a mapping of ``str`` keys to ``None``, ``bool``, ``int`` (64-bit), finite ``float``
    or ``str`` (UTF-8 encodable) values. The copy is a new ``dict``: later changes to ``obj``
    do not reach it.
    """
    if not isinstance(obj, Mapping):
        return "not_object"
    for key, value in obj.items():
        if not (type(key) is str and key.isascii()) and not (
            isinstance(key, str) and _utf8_ok(key)
        ):
            return "bad_key"
        # Fast paths for the common exact types; _value_reason decides everything else.
        kind = type(value)
        if kind is str:
            if value.isascii():
                continue
        elif kind is int:
            if _INT_MIN <= value <= _UINT_MAX:
                continue
        elif kind is float:
            if value - value == 0.0:  # finite: inf - inf and nan - nan are nan
                continue
        elif value is None or kind is bool:
            continue
        reason = _value_reason(value)
        if reason is not None:
            return reason
    return dict(obj)


# --------------------------------------------------------------------------- HttpEvents

_TICK: Final = 0.1
#: A clock step larger than this (or backwards) restarts the pacing instead of catching up.
_MAX_STEP_NS: Final = 5 * 10**9

# (method, path template, weight): templates take ``n`` and ``m`` ids.
_ENDPOINTS: Final[tuple[tuple[str, str, int], ...]] = (
    ("GET", "/api/v1/products/{n}", 22),
    ("GET", "/api/v1/products?page={m}", 10),
    ("GET", "/api/v1/users/{n}", 12),
    ("GET", "/api/v1/orders/{n}", 8),
    ("GET", "/api/v1/carts/{n}", 8),
    ("GET", "/healthz", 6),
    ("GET", "/metrics", 4),
    ("POST", "/api/v1/orders", 9),
    ("POST", "/api/v1/carts/{n}/items", 7),
    ("POST", "/api/v1/auth/login", 4),
    ("PUT", "/api/v1/users/{n}/profile", 4),
    ("PUT", "/api/v1/carts/{n}/items/{m}", 2),
    ("DELETE", "/api/v1/carts/{n}/items/{m}", 3),
    ("DELETE", "/api/v1/sessions/{n}", 1),
)
_ENDPOINT_CUM: Final = tuple(
    sum(weight for _, _, weight in _ENDPOINTS[: i + 1]) for i in range(len(_ENDPOINTS))
)
_OK_STATUS: Final = {"GET": 200, "POST": 201, "PUT": 200, "DELETE": 204}


def _check_positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")
    return float(value)


class HttpEvents:
    """Synthetic HTTP events shaped like Pixie's ``http_events`` table.

    Emits ``rate`` rows per second in total, in batches every ~0.1 s. The count is derived from
    the time elapsed on ``clock`` since the start, so the long-run rate is exact whatever the
    sleeps overshoot. Rows are deterministic for a given ``seed`` and ``clock``.
    """

    def __init__(
        self,
        *,
        rate: float = 50.0,
        seed: int | None = None,
        clock: Callable[[], int] = time.time_ns,
        sleep: _Sleep = asyncio.sleep,
    ) -> None:
        self.stream: str = "http_events"
        self.rate = _check_positive("rate", rate)
        self._rng = random.Random(seed)  # noqa: S311 - synthetic data, not secrets
        self._clock = clock
        self._sleep = sleep
        rng = self._rng
        self._upids = [
            f"{rng.randint(1, 3)}:{rng.randint(100, 65535)}:{rng.randint(10**5, 10**8)}"
            for _ in range(6)
        ]
        self._clients = [
            f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            for _ in range(48)
        ]

    async def rows(self) -> AsyncGenerator[list[Row], None]:
        start = prev = self._clock()
        emitted = 0
        while True:
            await self._sleep(_TICK)
            now = self._clock()
            if now < prev or now - prev > _MAX_STEP_NS:
                log.warning("http_events.clock_step", stream=self.stream, step_ns=now - prev)
                start = prev = now
                emitted = 0
                continue
            due = math.floor(self.rate * (now - start) / 1e9 + 1e-6)
            count = due - emitted
            if count > 0:
                emitted = due
                span = now - prev
                yield [self._event(prev + span * (i + 1) // count) for i in range(count)]
            prev = now

    def _event(self, t_ns: int) -> Row:
        rng = self._rng
        method, template, _ = rng.choices(_ENDPOINTS, cum_weights=_ENDPOINT_CUM)[0]
        path = template.format(n=rng.randint(1, 99_999), m=rng.randint(1, 400))
        draw = rng.random()
        if draw < 0.92:
            status = _OK_STATUS[method]
        elif draw < 0.93:
            status = 301 if method == "GET" else _OK_STATUS[method]
        elif draw < 0.975:
            status = 404
        elif draw < 0.995:
            status = 500
        else:
            status = 503
        latency = rng.lognormvariate(math.log(4e6), 0.9)
        if status == 500:
            latency *= 3.0
        elif status == 503:
            latency *= 0.1
        req_size = int(rng.lognormvariate(math.log(600), 0.7)) if method in ("POST", "PUT") else 0
        if status in (204, 301):
            resp_size = 0
        elif status >= 400:
            resp_size = rng.randint(40, 240)
        else:
            resp_size = int(rng.lognormvariate(math.log(2500), 1.0))
        return {
            "time_": t_ns,
            "upid": rng.choice(self._upids),
            "remote_addr": rng.choice(self._clients),
            "remote_port": rng.randint(32768, 60999),
            "req_method": method,
            "req_path": path,
            "resp_status": status,
            "latency_ns": max(1, int(latency)),
            "req_body_size": req_size,
            "resp_body_size": resp_size,
        }


# --------------------------------------------------------------------------- HostMetrics


@dataclass(frozen=True, slots=True)
class _NetMark:
    mono_ns: int
    sent: int
    recv: int


def _net_mark() -> _NetMark:
    net = psutil.net_io_counters()
    if net is None:  # no interface at all
        return _NetMark(time.monotonic_ns(), 0, 0)
    return _NetMark(time.monotonic_ns(), int(net.bytes_sent), int(net.bytes_recv))


def _host_prime() -> _NetMark:
    psutil.cpu_percent(interval=None)  # the first call only sets the baseline
    return _net_mark()


def _rate(now: int, before: int, seconds: float) -> float:
    return max(0, now - before) / seconds if seconds > 0 else 0.0


def _host_sample(prev: _NetMark) -> tuple[Row, _NetMark]:
    """One row of host figures (blocking: run it in a thread)."""
    t_ns = time.time_ns()
    cpu = float(psutil.cpu_percent(interval=None))
    mem = psutil.virtual_memory()
    swap = psutil.swap_memory()
    mark = _net_mark()
    disk = psutil.disk_io_counters()
    seconds = (mark.mono_ns - prev.mono_ns) / 1e9
    row: Row = {
        "time_": t_ns,
        "cpu_percent": cpu,
        "load1": float(psutil.getloadavg()[0]),
        "mem_total": int(mem.total),
        "mem_available": int(mem.available),
        "mem_percent": float(mem.percent),
        "swap_percent": float(swap.percent),
        "net_bytes_sent": mark.sent,
        "net_bytes_recv": mark.recv,
        "net_send_rate": _rate(mark.sent, prev.sent, seconds),
        "net_recv_rate": _rate(mark.recv, prev.recv, seconds),
        "disk_read_bytes": int(disk.read_bytes) if disk is not None else 0,
        "disk_write_bytes": int(disk.write_bytes) if disk is not None else 0,
        "procs": len(psutil.pids()),
        "boot_time": float(psutil.boot_time()),
    }
    return row, mark


class HostMetrics:
    """Real figures of this machine, one row every ``interval`` seconds.

    Counters (``net_bytes_*``, ``disk_*_bytes``) are totals since boot; ``net_*_rate`` are
    bytes per second since the previous row; ``boot_time`` is in unix seconds, ``time_`` in
    unix nanoseconds. psutil is called in a worker thread.
    """

    def __init__(self, *, interval: float = 1.0, sleep: _Sleep = asyncio.sleep) -> None:
        self.stream: str = "host_metrics"
        self.interval = _check_positive("interval", interval)
        self._sleep = sleep

    async def rows(self) -> AsyncGenerator[list[Row], None]:
        prev = await asyncio.to_thread(_host_prime)
        while True:
            await self._sleep(self.interval)
            row, prev = await asyncio.to_thread(_host_sample, prev)
            yield [row]


# --------------------------------------------------------------------------- JsonLines

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


# --------------------------------------------------------------------------- Records

_RECORDS_BATCH: Final = 1000


class Records:
    """Rows handed over by Python code, behind a bounded queue of ``maxsize`` rows.

    ``put`` validates every row of a call before accepting any (``WireError("bad_row")``), then
    waits for room (backpressure); ``put_nowait`` accepts all the rows of a call or raises
    ``asyncio.QueueFull``. After ``close()``, ``rows()`` yields what is queued and ends; putting
    is then a ``ValueError`` (a ``put`` waiting for room when ``close()`` comes raises it too,
    having queued only part of its rows).
    """

    def __init__(self, stream: str, *, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be positive")
        self.stream = check_stream(stream)
        self.maxsize = maxsize
        self._buf: collections.deque[Row] = collections.deque()
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def qsize(self) -> int:
        return len(self._buf)

    def _checked(self, rows: Iterable[Mapping[str, Any]]) -> list[Row]:
        checked: list[Row] = []
        for index, obj in enumerate(rows):
            row = validate_row(obj)
            if isinstance(row, str):
                raise WireError("bad_row", f"row {index} of the call is invalid: {row}")
            checked.append(row)
        if self._closed:
            raise ValueError(f"Records({self.stream!r}) is closed")
        return checked

    async def put(self, rows: Iterable[Mapping[str, Any]]) -> None:
        checked = self._checked(rows)
        start = 0
        while start < len(checked):
            if self._closed:
                raise ValueError(f"Records({self.stream!r}) was closed during put")
            room = self.maxsize - len(self._buf)
            if room <= 0:
                self._writable.clear()
                await self._writable.wait()
                continue
            self._buf.extend(checked[start : start + room])
            start += room
            self._readable.set()

    def put_nowait(self, rows: Iterable[Mapping[str, Any]]) -> None:
        checked = self._checked(rows)
        if len(checked) > self.maxsize - len(self._buf):
            raise asyncio.QueueFull
        self._buf.extend(checked)
        if checked:
            self._readable.set()

    def close(self) -> None:
        """End the iteration once the queued rows are yielded (idempotent)."""
        self._closed = True
        self._readable.set()
        self._writable.set()

    async def rows(self) -> AsyncGenerator[list[Row], None]:
        buf = self._buf
        while True:
            if buf:
                batch = [buf.popleft() for _ in range(min(len(buf), _RECORDS_BATCH))]
                self._writable.set()
                yield batch
            elif self._closed:
                return
            else:
                self._readable.clear()
                await self._readable.wait()
