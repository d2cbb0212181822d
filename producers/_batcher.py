"""Row batching by rows, bytes and time (pure: time is a parameter).

A batch's plaintext is the contract's msgpack ``{"rows": [...]}``, assembled from rows packed
once on arrival, and always small enough that its sealed envelope fits the server's
``max_payload`` (base64 grows it by 4/3, plus headers and the envelope map).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

__all__ = ["Batcher", "Batching", "array_header_size", "plaintext_budget"]

_ROWS_KEY: Final = b"\x81\xa4rows"
#: protected header (~400 B as base64), IV, tag, the envelope's own fields, with room to spare
_ENVELOPE_OVERHEAD: Final = 2048


def plaintext_budget(max_payload: int) -> int:
    """The largest data plaintext whose envelope stays within ``max_payload`` bytes."""
    budget = (max_payload - _ENVELOPE_OVERHEAD) * 3 // 4 - 16
    if budget < 1024:
        raise ValueError(f"max_payload {max_payload} is too small for sealed envelopes")
    return budget


@dataclass(frozen=True, slots=True, kw_only=True)
class Batching:
    """A batch is sealed at ``max_rows`` rows, ``max_bytes`` of plaintext (capped by the
    server's max_payload), or ``max_delay_s`` after its first row, whichever comes first.
    ``max_bytes`` defaults to 256,000 so that JOSE libraries with Pixie's limit can read it."""

    max_rows: int = 1000
    max_bytes: int = 256_000
    max_delay_s: float = 0.1

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_bytes < 64 or self.max_delay_s <= 0:
            raise ValueError("batching limits must be positive")


def array_header_size(n: int) -> int:
    """Bytes of a msgpack array header for ``n`` items."""
    return 1 if n < 16 else 3 if n < 65536 else 5


def array_header(n: int) -> bytes:
    """A msgpack array header for ``n`` items."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 65536:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


class Batcher:
    """Accumulates one stream's rows; hands out sealed-ready plaintexts."""

    def __init__(self, batching: Batching, *, budget: int) -> None:
        self._max_rows = batching.max_rows
        self._max_bytes = min(batching.max_bytes, budget) - 16
        self._max_delay = batching.max_delay_s
        self._rows: list[bytes] = []
        self._count_extra = 0  # rows beyond one per entry of _rows (see add_packed)
        self._size = 0
        self._since = 0.0
        self.oversize_rows = 0

    def __len__(self) -> int:
        """Rows in the open batch."""
        return len(self._rows) + self._count_extra

    def _take(self) -> bytes:
        count = len(self)
        rows, self._rows, self._size, self._count_extra = self._rows, [], 0, 0
        return _ROWS_KEY + array_header(count) + b"".join(rows)

    def add(
        self, rows: Sequence[Mapping[str, Any]], *, packed: bytes | None = None, now: float
    ) -> list[bytes]:
        """Add rows; return the plaintexts of every batch this completed. A row too large for
        any batch on its own is counted in ``oversize_rows`` and not sent. ``packed`` is
        ``rows`` as one msgpack array, when the caller has it: added in one piece when all the
        rows fit the open batch, else row by row."""
        if packed is not None and rows:
            fitted = self.add_packed(packed[array_header_size(len(rows)) :], len(rows), now=now)
            if fitted is not None:
                return fitted
        ready: list[bytes] = []
        for row in rows:
            item = msgpack.packb(row, use_bin_type=True)
            if len(item) > self._max_bytes:
                self.oversize_rows += 1
                continue
            if self._rows and self._size + len(item) > self._max_bytes:
                ready.append(self._take())
            if not self._rows:
                self._since = now
            self._rows.append(item)
            self._size += len(item)
            if len(self) >= self._max_rows:
                ready.append(self._take())
        return ready

    def add_packed(self, packed: bytes, count: int, *, now: float) -> list[bytes] | None:
        """Add ``count`` rows already packed back to back (a msgpack array's items) when they
        all fit the open batch by rows and bytes; the plaintexts this completed, or None when
        they do not fit (the caller then adds them row by row)."""
        if len(self) + count > self._max_rows or self._size + len(packed) > self._max_bytes:
            return None
        if not self._rows:
            self._since = now
        # one entry for several rows: _take() joins the bytes, the count goes in the header
        self._rows.append(packed)
        self._count_extra += count - 1
        self._size += len(packed)
        if len(self) >= self._max_rows:
            return [self._take()]
        return []

    def due(self, *, now: float) -> bytes | None:
        """The pending batch if its first row waited ``max_delay_s``."""
        if self._rows and now - self._since >= self._max_delay:
            return self._take()
        return None

    def flush(self) -> bytes | None:
        return self._take() if self._rows else None
