"""The agent's telemetry sources and the rules every row obeys.

A source has a ``stream`` name and an async ``rows()`` iterator of row batches:

- :class:`HttpEvents`: synthetic HTTP events shaped like Pixie's ``http_events`` table.
- :class:`HostMetrics`: real figures of this machine, read with psutil.
- :class:`JsonLines`: JSON objects, one a line, from a file, a file object or stdin.
- :class:`Records`: rows handed over by Python code, behind a bounded queue.

The row rules (:func:`validate_row`, :func:`check_rows`) are the one check of rows from outside.
"""

from producers.sources._host import HostMetrics
from producers.sources._http import HttpEvents
from producers.sources._jsonl import JsonLines
from producers.sources._records import Records
from producers.sources._rows import (
    CheckedRows,
    RejectReason,
    Row,
    Scalar,
    Source,
    check_rows,
    plain_rows,
    validate_row,
)

__all__ = [
    "CheckedRows",
    "HostMetrics",
    "HttpEvents",
    "JsonLines",
    "Records",
    "RejectReason",
    "Row",
    "Scalar",
    "Source",
    "check_rows",
    "plain_rows",
    "validate_row",
]
