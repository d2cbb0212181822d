"""OpenTelemetry data as sealstream rows (docs/protocol.md, "OpenTelemetry streams"), pure.

One row per OTLP export request: ``signal``, ``service``, ``items`` (index columns for views)
and ``otlp``, the request's protobuf bytes. :data:`SIGNALS` is the one table of the three
signals: their stream, their OTLP/HTTP path, their OTLP/gRPC service and their messages; the
producer's receiver and the consumer's exporter both read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

__all__ = [
    "OTLP_STREAMS",
    "SIGNALS",
    "SIGNAL_BY_STREAM",
    "Signal",
    "SignalName",
    "count_items",
    "otlp_row",
    "request_items",
    "service_names",
]

SignalName: TypeAlias = Literal["traces", "metrics", "logs"]

#: the ``service`` column's longest value
_MAX_SERVICE: Final = 256


@dataclass(frozen=True, slots=True)
class Signal:
    """One OTLP signal: where it travels and how its export request nests its items."""

    name: SignalName
    stream: str
    path: str  # OTLP/HTTP
    service: str  # OTLP/gRPC: the service whose method ``Export`` takes the request
    request: type[Message]
    response: type[Message]
    #: the request's list of resource groups, each group's list of scope groups, each scope
    #: group's list of items (spans, metrics, log records)
    resources: str
    scopes: str
    items: str
    #: the partial success field counting refused items
    rejected: str


SIGNALS: Final[dict[SignalName, Signal]] = {
    "traces": Signal(
        "traces",
        "otlp_traces",
        "/v1/traces",
        "opentelemetry.proto.collector.trace.v1.TraceService",
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
        "resource_spans",
        "scope_spans",
        "spans",
        "rejected_spans",
    ),
    "metrics": Signal(
        "metrics",
        "otlp_metrics",
        "/v1/metrics",
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        ExportMetricsServiceRequest,
        ExportMetricsServiceResponse,
        "resource_metrics",
        "scope_metrics",
        "metrics",
        "rejected_data_points",
    ),
    "logs": Signal(
        "logs",
        "otlp_logs",
        "/v1/logs",
        "opentelemetry.proto.collector.logs.v1.LogsService",
        ExportLogsServiceRequest,
        ExportLogsServiceResponse,
        "resource_logs",
        "scope_logs",
        "log_records",
        "rejected_log_records",
    ),
}
SIGNAL_BY_STREAM: Final = {s.stream: s for s in SIGNALS.values()}
OTLP_STREAMS: Final = tuple(SIGNAL_BY_STREAM)


def _item_count(signal: Signal, item: Any) -> int:
    """1 for a span or a log record; a metric's data points, whatever its type."""
    if signal.name != "metrics":
        return 1
    kind = item.WhichOneof("data")
    return 0 if kind is None else len(getattr(item, kind).data_points)


def count_items(signal: Signal, items: Iterable[Any]) -> int:
    return sum(_item_count(signal, item) for item in items)


def request_items(signal: Signal, request: Any) -> int:
    """What an export request carries (spans, log records, data points), counted per scope:
    ``len()`` of a scope's spans or log records, not a walk over each one."""
    scopes = (s for g in getattr(request, signal.resources) for s in getattr(g, signal.scopes))
    if signal.name != "metrics":
        return sum(len(getattr(scope, signal.items)) for scope in scopes)
    return sum(count_items(signal, getattr(scope, signal.items)) for scope in scopes)


def service_names(resources: Iterable[Resource]) -> str:
    """The distinct ``service.name`` strings of ``resources``, in order, joined by ``,``."""
    names: dict[str, None] = {}
    for resource in resources:
        for attribute in resource.attributes:
            if attribute.key == "service.name" and attribute.value.HasField("string_value"):
                names[attribute.value.string_value] = None
    return ",".join(names)[:_MAX_SERVICE]


def otlp_row(signal: Signal, request: Any, encoded: bytes) -> dict[str, Any]:
    """The row of one export request (``encoded``: its protobuf bytes)."""
    return {
        "signal": signal.name,
        "service": service_names(g.resource for g in getattr(request, signal.resources)),
        "items": request_items(signal, request),
        "otlp": encoded,
    }
