"""The live table view of decrypted batches (rich), and the JSON lines writer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from consumers._otlpview import LINES_PER_BATCH, NOUNS, expand
from consumers._subscription import Stats
from sealstream.crypto import Batch
from sealstream.otlp import SIGNAL_BY_STREAM, Signal

__all__ = ["JsonLinesWriter", "LiveTable", "cell", "printable", "rejections", "summary"]

log = structlog.get_logger(__name__)

_MAX_COLUMNS = 9
_ROWS_SHOWN = 8
_MAX_CELL = 28
#: an OTLP line's cells: a 32-digit trace id, a histogram's summary
_MAX_OTLP_CELL = 64
_REFRESH_S = 0.25

# What a column holds, by its name (the sources' conventions; the page's format.js reads
# them the same way): unix times, durations in ns, sizes and rates in bytes, percentages.
_TIME = re.compile(r"^time_?$|^ts$|_time$")
_DURATION = re.compile(r"_ns$")
_RATE = re.compile(r"_rate$")
_SIZE = re.compile(r"_size$|(^|_)bytes(_|$)|^mem_(total|available)$")
_PERCENT = re.compile(r"_percent$")


def _short(x: float) -> str:
    """Three significant digits at most."""
    a = abs(x)
    if a >= 100 or x == int(x):
        return f"{x:.0f}"
    return f"{x:.1f}" if a >= 10 else f"{x:.2f}"


def _duration(ns: float) -> str:
    a = abs(ns)
    if a < 1e3:
        return f"{_short(ns)} ns"
    if a < 1e6:
        return f"{_short(ns / 1e3)} µs"
    if a < 1e9:
        return f"{_short(ns / 1e6)} ms"
    return f"{_short(ns / 1e9)} s"


def _size(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    i = 0
    n /= 1024
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{_short(n)} {units[i]}"


def _clock(t: int | float) -> str:
    """Local time with ms (the date in front when not today's), from unix s, ms, µs or ns,
    told apart by magnitude."""
    a = abs(t)
    if isinstance(t, int) and a >= 1e17:
        seconds = t // 1_000_000 / 1e3  # a float holds unix ns to about 256 ns only
    else:
        seconds = t / 1e9 if a >= 1e17 else t / 1e6 if a >= 1e14 else t / 1e3 if a >= 1e11 else t
    try:
        stamp = datetime.fromtimestamp(seconds).astimezone()
    except (OverflowError, OSError, ValueError):
        return str(t)
    shown = stamp.strftime("%H:%M:%S.%f")[:-3]
    if stamp.date() != datetime.now().astimezone().date():
        shown = f"{stamp:%Y-%m-%d} {shown}"
    return shown


#: C0 and C1 control characters (and DEL): in decrypted text they would reach the terminal as
#: commands (ESC [2J clears it, OSC 52 writes the clipboard)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with each control character shown escaped (``\\x1b``), never sent as is."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cell(column: str, value: Any, *, width: int = _MAX_CELL) -> str:
    """``value`` as its column reads: formatted when the column's kind (by its name) and the
    value's type agree, else its text, control characters escaped; cut to ``width``."""
    text = printable(str(value))
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        if _TIME.search(column):
            text = _clock(value)
        elif _DURATION.search(column):
            text = _duration(value)
        elif _RATE.search(column):
            text = f"{_size(value)}/s"
        elif _SIZE.search(column):
            text = _size(value)
        elif _PERCENT.search(column):
            text = f"{value:.1f} %"
        elif isinstance(value, float):
            text = f"{value:.2f}"
    return text if len(text) <= width else text[: width - 1] + "…"


def rejections(stats: Stats) -> str:
    """``rejected 3 (bad_signature 2, replay 1)``: envelopes refused, by reason."""
    total = sum(stats.rejected.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.rejected.items()))
    return f"rejected {total} ({reasons})" if reasons else "rejected 0"


def summary(stats: Stats) -> str | None:
    """The exit summary, when something was refused, lost or dropped, or a session resumed."""
    if not (stats.rejected or stats.lost or stats.dropped or stats.sessions > 1):
        return None
    return (
        f"{rejections(stats)}, lost {stats.lost}, dropped {stats.dropped}, "
        f"sessions {stats.sessions}"
    )


@dataclass
class _StreamView:
    rows: int = 0
    batches: int = 0
    last: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_ROWS_SHOWN))
    columns: list[str] = field(default_factory=list)
    first_seen: float = field(default_factory=time.monotonic)
    latency_ms: float = 0.0
    #: an OTLP stream's: its rows are export requests, shown as a line per item
    signal: Signal | None = None
    items: int = 0
    hidden: int = 0
    undecodable: int = 0

    def title(self, name: str) -> str:
        elapsed = max(time.monotonic() - self.first_seen, 1e-3)
        rate = f"{self.rows / elapsed:.1f}"
        latency = f"latency {self.latency_ms:.1f} ms"
        if self.signal is None:
            return f"{name}: {self.rows} rows, {rate} rows/s, {latency}"
        requests = f"{self.rows} request{'' if self.rows == 1 else 's'}"
        counts = [requests, f"{self.items} {NOUNS[self.signal.name]}"]
        if self.hidden:
            counts.append(f"{self.hidden} not shown (at most {LINES_PER_BATCH} a batch)")
        if self.undecodable:
            counts.append(f"{self.undecodable} undecodable")
        return f"{name}: {', '.join(counts)}, {rate} requests/s, {latency}"


class LiveTable:
    """Keeps the last rows of each stream and renders them, with the subscription's counters
    in a footer: rows, and envelopes rejected by reason."""

    def __init__(
        self, cluster: str, session: str, *, stats: Callable[[], Stats] | None = None
    ) -> None:
        self.cluster = cluster
        self.session = session
        self.streams: dict[str, _StreamView] = {}
        self._stats = stats
        self.stats: Stats | None = stats() if stats else None

    def add(self, batch: Batch) -> None:
        signal = SIGNAL_BY_STREAM.get(batch.stream)
        view = self.streams.setdefault(batch.stream, _StreamView(signal=signal))
        view.rows += len(batch.rows)
        view.batches += 1
        view.latency_ms = max(0.0, (time.time_ns() - batch.ts) / 1e6)
        rows = batch.rows
        if signal is not None:  # an export request a row: a line per span, record, point
            expanded = expand(signal, batch.rows)
            view.items += expanded.items
            view.hidden += expanded.hidden
            view.undecodable += expanded.undecodable
            if expanded.undecodable:
                log.warning(
                    "view.otlp_undecodable",
                    stream=batch.stream,
                    seq=batch.seq,
                    rows=expanded.undecodable,
                    reason=expanded.reason,
                )
            rows = expanded.lines
        for raw in rows[-_ROWS_SHOWN:]:
            row = {_key(k): v for k, v in raw.items()}  # msgpack also allows bytes keys
            view.last.append(row)
            for col in row:
                if col not in view.columns and len(view.columns) < _MAX_COLUMNS:
                    view.columns.append(col)

    @contextlib.contextmanager
    def live(self, console: Console) -> Iterator[Live]:
        """Show the table until the block ends, redrawn 4 times a second with fresh counters,
        batches or not (a relay whose every envelope is refused shows in the footer). The
        redraw is a callback of the running loop: the counters are read in its thread."""
        loop = asyncio.get_running_loop()
        with Live(self.render(), console=console, auto_refresh=False, transient=False) as live:
            handle: asyncio.TimerHandle | None = None

            def redraw() -> None:
                nonlocal handle
                if self._stats is not None:
                    self.stats = self._stats()
                live.update(self.render(), refresh=True)
                handle = loop.call_later(_REFRESH_S, redraw)

            redraw()
            try:
                yield live
            finally:
                if handle is not None:
                    handle.cancel()
                if self._stats is not None:
                    self.stats = self._stats()
                live.update(self.render(), refresh=True)

    def render(self) -> Group:
        parts: list[Any] = []
        status = Text(
            f"cluster {self.cluster}  session {self.session[:12]}…  end-to-end encrypted, "
            "signature verified",
            style="bold green",
        )
        parts.append(status)
        for name, view in sorted(self.streams.items()):
            # decrypted names and values are Text: rich markup in them ("[link=...]") is shown
            # as written, never applied
            table = Table(title=Text(view.title(name)), title_justify="left", expand=False)
            for col in view.columns:
                # the newest value, or the newest known one (OTLP's unknown time is "")
                known = (r[col] for r in reversed(view.last) if r.get(col, "") != "")
                value = next(known, None)
                number = isinstance(value, int | float) and not isinstance(value, bool)
                table.add_column(  # numbers line up by their units
                    Text(printable(col)),
                    overflow="ellipsis",
                    no_wrap=True,
                    justify="right" if number else "left",
                )
            width = _MAX_CELL if view.signal is None else _MAX_OTLP_CELL
            for row in view.last:
                table.add_row(*(Text(cell(c, row.get(c, ""), width=width)) for c in view.columns))
            parts.append(table)
        if not self.streams:
            parts.append(Text("waiting for the first batch…", style="dim"))
        s = self.stats
        if s is not None:
            parts.append(
                Text(
                    f"received {s.received}  batches {s.batches}  rows {s.rows}  "
                    f"{rejections(s)}  dropped {s.dropped}  gaps {s.gaps} (lost {s.lost})"
                    + (f"  deferred {s.deferred} (read from the store)" if s.deferred else ""),
                    style="bold red" if s.rejected or s.lost or s.dropped else "dim",
                )
            )
        return Group(*parts)


class JsonLinesWriter:
    """One JSON object per row on ``out``: ``{"stream": ..., "seq": ..., "ts": ..., "row":
    {...}}``. The row is nested, so a column named like an envelope field cannot pass for it;
    bytes values are written as base64 strings."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out or sys.stdout

    def add(self, batch: Batch) -> None:
        write = self._out.write
        for row in batch.rows:
            line = {"stream": batch.stream, "seq": batch.seq, "ts": batch.ts, "row": row}
            write(json.dumps(_jsonable(line), allow_nan=False))
            write("\n")
        self._out.flush()


def _json_value(value: object) -> str:
    """JSON for what msgpack rows hold and JSON does not: bytes as base64, the rest as text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _jsonable(value: object) -> object:
    """``value`` as JSON can hold it: map keys strings, bytes base64, floats finite (else
    their text), anything else its text."""
    if isinstance(value, dict):
        return {_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | int | float):
        return value
    return _json_value(value)


def _key(key: object) -> str:
    return key if isinstance(key, str) else _json_value(key)
