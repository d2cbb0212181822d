"""The live table view of decrypted batches (rich), and the JSON lines writer."""

from __future__ import annotations

import base64
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Group
from rich.table import Table
from rich.text import Text

from consumers._client import Stats
from sealstream.crypto import Batch

__all__ = ["JsonLinesWriter", "LiveTable"]

_MAX_COLUMNS = 9
_ROWS_SHOWN = 8


def _cell(column: str, value: Any) -> str:
    if column.startswith("time") and isinstance(value, int) and value > 10**18:
        stamp = datetime.fromtimestamp(value / 1e9, tz=UTC)
        return stamp.strftime("%H:%M:%S.%f")[:-3]
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    return text if len(text) <= 28 else text[:27] + "…"


@dataclass
class _StreamView:
    rows: int = 0
    batches: int = 0
    last: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_ROWS_SHOWN))
    columns: list[str] = field(default_factory=list)
    first_seen: float = field(default_factory=time.monotonic)
    latency_ms: float = 0.0


class LiveTable:
    """Keeps the last rows of each stream and renders them with the session's counters."""

    def __init__(self, cluster: str, session: str) -> None:
        self.cluster = cluster
        self.session = session
        self.streams: dict[str, _StreamView] = {}
        self.stats: Stats | None = None

    def add(self, batch: Batch) -> None:
        view = self.streams.setdefault(batch.stream, _StreamView())
        view.rows += len(batch.rows)
        view.batches += 1
        view.latency_ms = max(0.0, (time.time_ns() - batch.ts) / 1e6)
        for raw in batch.rows[-_ROWS_SHOWN:]:
            row = {_key(k): v for k, v in raw.items()}  # msgpack also allows bytes keys
            view.last.append(row)
            for col in row:
                if col not in view.columns and len(view.columns) < _MAX_COLUMNS:
                    view.columns.append(col)

    def render(self) -> Group:
        parts: list[Any] = []
        s = self.stats
        status = Text(
            f"cluster {self.cluster}  session {self.session[:12]}…  end-to-end encrypted, "
            "signature verified",
            style="bold green",
        )
        parts.append(status)
        if s is not None:
            rejected = sum(s.rejected.values())
            parts.append(
                Text(
                    f"received {s.received}  batches {s.batches}  rows {s.rows}  "
                    f"rejected {rejected}  dropped {s.dropped}  gaps {s.gaps} (lost {s.lost})",
                    style="red" if rejected or s.lost or s.dropped else "dim",
                )
            )
        for name, view in sorted(self.streams.items()):
            elapsed = max(time.monotonic() - view.first_seen, 1e-3)
            table = Table(
                title=f"{name}: {view.rows} rows, {view.rows / elapsed:.1f} rows/s, "
                f"latency {view.latency_ms:.1f} ms",
                title_justify="left",
                expand=False,
            )
            for col in view.columns:
                table.add_column(col, overflow="ellipsis", no_wrap=True)
            for row in view.last:
                table.add_row(*(_cell(c, row.get(c, "")) for c in view.columns))
            parts.append(table)
        if not self.streams:
            parts.append(Text("waiting for the first batch…", style="dim"))
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
