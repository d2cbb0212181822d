"""OTLP rows as lines a person reads (docs/protocol.md, "OpenTelemetry streams"), pure.

A row of ``otlp_traces``, ``otlp_metrics`` or ``otlp_logs`` is one export request; its ``otlp``
bytes are decoded here with opentelemetry-proto's messages into one line per span, log record
or metric data point, as flat dicts of str and int that the table formats by column name
(``time`` in unix ns, ``""`` when unknown; ``duration_ns``):

- spans: time, service, name, kind, duration_ns, status, trace_id;
- log records: time, severity, body, service;
- data points: time, service, name, type, value (a number, or a summary: ``count 5 · sum 12.5
  · min 1 · max 4``), unit, attributes.

A batch gives at most ``limit`` lines, the first ones; the rest are only counted. The page's
twin is ``consumers/web/src/otlp.js``: the vectors in ``consumers/web/test/vectors/otlp.json``
hold both to the same lines.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, localcontext
from itertools import islice
from typing import Any, Final

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sealstream.otlp import Signal, count_items, service_names

__all__ = ["LINES_PER_BATCH", "NOUNS", "Expanded", "expand", "number"]

#: lines a batch gives at most: a request of thousands of spans must not flood a view
LINES_PER_BATCH: Final = 200
#: what a signal's items are called in a view's header
NOUNS: Final = {"traces": "spans", "metrics": "data points", "logs": "log records"}
#: nesting of array and map values shown, deeper ones are ``…``
_DEPTH: Final = 8
#: bytes values show their first bytes in base64, then ``…``
_BYTES: Final = 96

_KINDS: Final = ("unspecified", "internal", "server", "client", "producer", "consumer")
_STATUSES: Final = ("unset", "ok", "error")
_SEVERITIES: Final = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")


@dataclass
class Expanded:
    """A batch's lines (at most the limit), all its items, and its rows that were not OTLP."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    items: int = 0
    undecodable: int = 0
    #: why the last undecodable row was refused (never its content)
    reason: str = ""

    @property
    def hidden(self) -> int:
        return self.items - len(self.lines)


def number(x: float) -> str:
    """A number as the views write it: whole when it is, else three significant digits,
    halves rounded away from zero, no trailing zeros (twin: ``number`` in otlp.js, where
    toFixed and toExponential round so)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    a = abs(x)
    if x == int(x) and a < 1e15:
        return str(int(x))
    with localcontext() as context:  # the float's exact value, rounded as JavaScript does
        context.rounding = ROUND_HALF_UP
        exact = Decimal(x)
        if a < 0.01 or a >= 1e15:
            mantissa, exponent = f"{exact:.2e}".split("e")
            return f"{_trim(mantissa)}e{int(exponent)}"
        return _trim(f"{exact:.{0 if a >= 100 else 1 if a >= 10 else 2}f}")


def _trim(decimal: str) -> str:
    return decimal.rstrip("0").rstrip(".") if "." in decimal else decimal


def _text(value: AnyValue, depth: int = 0) -> str:
    """An attribute value or a log body as text (twin: ``anyText`` in otlp.js)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return number(value.double_value)
    if kind == "bytes_value":
        shown = base64.b64encode(value.bytes_value[:_BYTES]).decode("ascii")
        return shown + "…" if len(value.bytes_value) > _BYTES else shown
    if kind in ("array_value", "kvlist_value") and depth >= _DEPTH:
        return "…"
    if kind == "array_value":
        return "[" + ", ".join(_text(v, depth + 1) for v in value.array_value.values) + "]"
    if kind == "kvlist_value":
        return "{" + _pairs(value.kvlist_value.values, depth + 1) + "}"
    return ""


def _pairs(attributes: Sequence[KeyValue], depth: int = 0) -> str:
    return ", ".join(f"{a.key}={_text(a.value, depth)}" for a in attributes)


def _time(unix_ns: int) -> int | str:
    """OTLP's 0 is "unknown": shown empty, not as 1970."""
    return unix_ns or ""


def _named(names: tuple[str, ...], value: int) -> str:
    """An enum's name, or its number when it has none."""
    return names[value] if 0 <= value < len(names) else str(value)


def _span(span: Span, service: str) -> dict[str, Any]:
    status = span.status
    shown = _named(_STATUSES, status.code)
    return {
        "time": _time(span.start_time_unix_nano),
        "service": service,
        "name": span.name,
        "kind": _named(_KINDS, span.kind),
        "duration_ns": span.end_time_unix_nano - span.start_time_unix_nano,
        "status": f"{shown}: {status.message}" if status.message else shown,
        "trace_id": span.trace_id.hex(),
    }


def _severity(record: LogRecord) -> str:
    n = record.severity_number
    if record.severity_text or n == 0:
        return record.severity_text
    if not 0 < n <= 4 * len(_SEVERITIES):
        return str(n)
    step = (n - 1) % 4
    return _SEVERITIES[(n - 1) // 4] + (str(step + 1) if step else "")


def _log(record: LogRecord, service: str) -> dict[str, Any]:
    return {
        "time": _time(record.time_unix_nano or record.observed_time_unix_nano),
        "severity": _severity(record),
        "body": _text(record.body),
        "service": service,
    }


def _summary(point: Any, kind: str) -> str:
    """A histogram's or summary's data point in one line."""
    parts = [f"count {point.count}", f"sum {number(point.sum)}"]
    if kind == "summary":
        parts += [f"p{number(q.quantile * 100)} {number(q.value)}" for q in point.quantile_values]
        return " · ".join(parts)
    if kind == "histogram" and not point.HasField("sum"):
        parts.pop()
    if kind == "exponential_histogram":
        parts.append(f"scale {point.scale}")
    parts += [f"{m} {number(getattr(point, m))}" for m in ("min", "max") if point.HasField(m)]
    return " · ".join(parts)


def _points(metric: Metric, service: str) -> Iterator[dict[str, Any]]:
    kind = metric.WhichOneof("data")
    if kind is None:
        return
    for point in getattr(metric, kind).data_points:
        if kind in ("gauge", "sum"):
            which = point.WhichOneof("value")
            value = "" if which is None else number(getattr(point, which))
            if which == "as_int":
                value = str(point.as_int)  # exact beyond 2**53
        else:
            value = _summary(point, kind)
        yield {
            "time": _time(point.time_unix_nano),
            "service": service,
            "name": metric.name,
            "type": kind,
            "value": value,
            "unit": metric.unit,
            "attributes": _pairs(point.attributes),
        }


def _items(signal: Signal, request: Any) -> Iterator[tuple[str, Any]]:
    """Each span, metric or log record of ``request``, with its resource's service."""
    for group in getattr(request, signal.resources):
        service = service_names([group.resource])
        for scope in getattr(group, signal.scopes):
            for item in getattr(scope, signal.items):
                yield service, item


def _lines(signal: Signal, request: Any) -> Iterator[dict[str, Any]]:
    for service, item in _items(signal, request):
        if signal.name == "traces":
            yield _span(item, service)
        elif signal.name == "logs":
            yield _log(item, service)
        else:
            yield from _points(item, service)


def expand(
    signal: Signal, rows: Sequence[Mapping[Any, Any]], *, limit: int = LINES_PER_BATCH
) -> Expanded:
    """The lines of a batch's rows, in order, at most ``limit``; a row whose ``otlp`` is not
    bytes of the signal's export request is counted as undecodable, with its reason."""
    out = Expanded()
    for row in rows:
        otlp = row.get("otlp")
        if not isinstance(otlp, bytes):
            out.undecodable += 1
            out.reason = "no otlp bytes"
            continue
        request = signal.request()
        try:
            request.ParseFromString(otlp)
        except DecodeError:
            out.undecodable += 1
            out.reason = f"not an {signal.request.DESCRIPTOR.name}"
            continue
        out.lines += islice(_lines(signal, request), max(limit - len(out.lines), 0))
        out.items += count_items(signal, (item for _, item in _items(signal, request)))
    return out
