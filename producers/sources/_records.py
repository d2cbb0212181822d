"""Rows handed over by Python code, behind a bounded queue."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any, Final

from producers.sources._rows import Row, validate_row
from sealstream.errors import WireError
from sealstream.ids import check_stream

__all__ = ["Records"]

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
