"""The row rules: what a row is, what a source yields, and the one check of rows from outside.

A row is a flat ``dict`` of ``str`` keys to scalars (``int``, ``float``, ``str``, ``bool``,
``None``). :func:`validate_row` is the one pure check of a row from outside (JSON lines, Python
callers); :func:`check_rows` is what the agent asks once per call of ``emit``: the valid rows,
packed in one piece when they are plain, and why the others were refused. Row contents are the
user's telemetry: they are never logged, and neither are the inputs they came from.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TypeAlias, TypeGuard

import msgpack

__all__ = [
    "CheckedRows",
    "RejectReason",
    "Row",
    "Scalar",
    "Sleep",
    "Source",
    "check_positive",
    "check_rows",
    "plain_rows",
    "validate_row",
]

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

#: The sleep a paced source awaits between batches (a parameter, so tests pin time).
Sleep: TypeAlias = Callable[[float], Awaitable[object]]


class Source(Protocol):
    """What the agent reads from: a stream name and an iterator of row batches.

    ``rows()`` yields non-empty batches, forever or until the source is exhausted, as an async
    generator: a reader that stops early ``aclose()``s it (``contextlib.aclosing``) so that it
    releases what it holds at once.
    """

    @property
    def stream(self) -> str: ...

    def rows(self) -> AsyncGenerator[list[Row], None]: ...


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


def plain_rows(rows: object) -> TypeGuard[list[Row]]:
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


@dataclass(frozen=True, slots=True)
class CheckedRows:
    """What :func:`check_rows` made of one call's rows.

    ``rows`` are the valid rows in order; ``packed`` is them as one msgpack array when they
    were plain and packed in one call (None: each is packed on its own); ``rejected`` is the
    reason of every refused row, in order."""

    rows: list[Row]
    packed: bytes | None = None
    rejected: list[RejectReason] = field(default_factory=list)


def check_rows(rows: Iterable[Mapping[str, Any]]) -> CheckedRows:
    """The valid rows of ``rows`` and why the others are not rows (pure).

    A list of plain rows (see :func:`plain_rows`) is packed in one call and taken as is
    (msgpack refuses an int beyond 64 bits or a str that is not UTF-8: those lists take the
    checks row by row, as does any other iterable)."""
    if rows and plain_rows(rows):
        try:
            packed = msgpack.packb(rows, use_bin_type=True)
        except (OverflowError, ValueError):
            pass
        else:
            return CheckedRows(rows, packed)
    valid: list[Row] = []
    rejected: list[RejectReason] = []
    for row in rows:
        checked = validate_row(row)
        if isinstance(checked, str):
            rejected.append(checked)
        else:
            valid.append(checked)
    return CheckedRows(valid, None, rejected)


def check_positive(name: str, value: float) -> float:
    """``value`` as a float if it is a positive finite number (a source's parameter)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")
    return float(value)
