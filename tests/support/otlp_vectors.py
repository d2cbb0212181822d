"""OTLP export requests built with opentelemetry-proto's messages (every signal, every metric
data point type, every attribute value type, a few broken ones), and the lines the Python view
makes of them (``consumers._otlpview``), written to ``consumers/web/test/vectors/otlp.json``
for the page's decoder (``consumers/web/src/otlp.js``, ``node --test``) to match.

Update after changing the cases or the lines: ``python -m tests.support.otlp_vectors``
(``--check`` only says whether the committed file is current; ``tests/web/test_vectors.py``
fails when it is not).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any, Final

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from consumers._otlpview import expand
from sealstream.otlp import SIGNALS, SignalName

__all__ = ["COMMAND", "OUT", "T0", "build", "cases", "current", "logs", "main", "metrics", "traces"]

OUT: Final = Path(__file__).resolve().parents[2] / "consumers/web/test/vectors/otlp.json"
COMMAND: Final = "python -m tests.support.otlp_vectors"
#: 2026-12-06 09:05:07.042 UTC in unix ns, and a few ns more: exact beyond a float's 2**53
T0: Final = 1_796_547_907_042_000_123


def _resource(service: str | None) -> Resource:
    attributes = [KeyValue(key="host.name", value=AnyValue(string_value="web-1"))]
    if service is not None:
        attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=service)))
    return Resource(attributes=attributes)


def _attr(key: str, **value: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def traces() -> ExportTraceServiceRequest:
    """Two services, every span kind and status; a trace id starting with a zero byte."""
    request = ExportTraceServiceRequest()
    group = request.resource_spans.add(resource=_resource("checkout"))
    spans = group.scope_spans.add().spans
    for kind in range(6):
        span = spans.add(
            trace_id=bytes([0, kind]) + bytes(range(14)),
            span_id=bytes(8),
            name=f"GET /api/orders/{kind}" if kind != 5 else "çà/ünïcode ✓",
            kind=kind,
            start_time_unix_nano=T0 + kind,
            end_time_unix_nano=T0 + kind + 10**kind * 4_210,
        )
        span.status.code = kind % 3  # type: ignore[assignment]
        if kind == 2:
            span.status.message = "card declined"
    other = request.resource_spans.add(resource=_resource(None))
    other.scope_spans.add().spans.add(name="no service", trace_id=b"\xff" * 16, kind=9)
    return request


def metrics() -> ExportMetricsServiceRequest:
    """Every data point type: gauge (double, int beyond 2**53), sum, histogram (with and
    without sum, min, max), exponential histogram, summary; and a metric with no data."""
    request = ExportMetricsServiceRequest()
    scope = request.resource_metrics.add(resource=_resource("checkout")).scope_metrics.add()
    gauge = scope.metrics.add(name="queue.depth", unit="{item}")
    gauge.gauge.data_points.add(time_unix_nano=T0, as_double=0.000123)
    gauge.gauge.data_points.add(time_unix_nano=T0, as_double=-0.125)  # a tie: away from zero
    gauge.gauge.data_points.add(
        time_unix_nano=T0,
        as_int=2**62 + 1,
        attributes=[_attr("queue", string_value="a"), _attr("shard", int_value=-3)],
    )
    counter = scope.metrics.add(name="http.requests", unit="1")
    counter.sum.is_monotonic = True
    counter.sum.data_points.add(time_unix_nano=T0, as_double=1234.5678)
    counter.sum.data_points.add(time_unix_nano=T0, as_double=12.25)
    latency = scope.metrics.add(name="http.duration", unit="ms")
    latency.histogram.data_points.add(
        time_unix_nano=T0,
        count=5,
        sum=12.5,
        min=1.0,
        max=4.0,
        bucket_counts=[1, 4],
        explicit_bounds=[2.0],
        attributes=[_attr("ok", bool_value=True), _attr("ratio", double_value=0.5)],
    )
    latency.histogram.data_points.add(time_unix_nano=T0, count=3, bucket_counts=[3])
    expo = scope.metrics.add(name="rpc.duration", unit="s")
    point = expo.exponential_histogram.data_points.add(
        time_unix_nano=T0, count=7, sum=3.75, scale=-2, zero_count=1, min=0.01, max=2.5
    )
    point.positive.offset = -1
    point.positive.bucket_counts.extend([2, 4])
    summary = scope.metrics.add(name="gc.pause", unit="ns")
    summary.summary.data_points.add(
        time_unix_nano=T0, count=10, sum=1e6, quantile_values=[{"quantile": 0.5, "value": 8e4}]
    )
    summary.summary.data_points[0].quantile_values.add(quantile=0.999, value=3.5e5)
    scope.metrics.add(name="empty")
    return request


def logs() -> ExportLogsServiceRequest:
    """Severity by text, by number only, none; a body of every value type; no time but the
    observed one."""
    request = ExportLogsServiceRequest()
    records = request.resource_logs.add(resource=_resource("checkout")).scope_logs.add()
    records.log_records.add(
        time_unix_nano=T0,
        severity_number=9,
        severity_text="Information",
        body=AnyValue(string_value="order 1042 charged"),
    )
    bodies: list[AnyValue] = [
        AnyValue(bool_value=False),
        AnyValue(int_value=-(2**63)),
        AnyValue(double_value=2.5),
        AnyValue(bytes_value=b"\xff\x00"),
        AnyValue(bytes_value=bytes(range(256)) * 2),
        AnyValue(),
    ]
    nested = AnyValue()
    nested.array_value.values.add(string_value="a")
    nested.array_value.values.add().kvlist_value.values.extend(
        [_attr("k", int_value=1), _attr("deep", array_value={"values": [{"bool_value": True}]})]
    )
    bodies.append(nested)
    deep = AnyValue(string_value="bottom")
    for _ in range(12):
        deep = AnyValue(array_value=ArrayValue(values=[deep]))
    bodies.append(deep)
    for n, body in zip((0, 1, 6, 18, 19, 24, 30, 2), bodies, strict=True):
        records.log_records.add(
            observed_time_unix_nano=T0 + n,
            severity_number=n,
            body=body,
        )
    records.log_records.add(body=bodies[-1])
    return request


def _broken() -> list[tuple[str, SignalName, bytes]]:
    good = traces().SerializeToString()
    return [
        ("truncated", "traces", good[:-3]),
        ("a wire type OTLP never uses", "logs", bytes([0x0F])),
        ("a name that is not UTF-8", "traces", bytes.fromhex("0a0712051203") + b"\x2a\x01\xff"),
    ]


def cases() -> list[tuple[str, SignalName, bytes]]:
    """Each case: its name, its signal, the request's protobuf bytes."""
    return [
        ("spans", "traces", traces().SerializeToString()),
        ("data points", "metrics", metrics().SerializeToString()),
        ("log records", "logs", logs().SerializeToString()),
        ("an empty request", "traces", b""),
        *_broken(),
    ]


def build(limit: int = 100) -> list[dict[str, Any]]:
    """The vectors: each case's bytes (base64) and what the Python view makes of them, ints
    as decimal strings (exact)."""
    out = []
    for name, signal, otlp in cases():
        expanded = expand(SIGNALS[signal], [{"otlp": otlp}], limit=limit)
        out.append(
            {
                "name": name,
                "signal": signal,
                "otlp": base64.b64encode(otlp).decode("ascii"),
                "items": expanded.items,
                "undecodable": expanded.undecodable,
                "lines": [{k: str(v) for k, v in line.items()} for line in expanded.lines],
            }
        )
    return out


def _text() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def current() -> bool:
    """Whether the committed file is what the cases give now."""
    return OUT.exists() and OUT.read_text(encoding="utf-8") == _text()


def main(argv: list[str]) -> int:
    if "--check" in argv:
        current_ = current()
        print("current" if current_ else f"stale: run {COMMAND}")
        return 0 if current_ else 1
    OUT.write_text(_text(), encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
