"""An application instrumented with the stock OpenTelemetry SDK, run as its own process by the
OTLP tests (``tests.support.otlp_sink.run_app``, or ``python -m tests.support.otlp_app
ENDPOINT OUT MARKER PROTOCOL``).

It exports spans (with events and links), metrics (sum, gauge, histogram, exponential
histogram) and logs, each carrying ``MARKER`` in names, attributes and bodies, to ``ENDPOINT``
with the SDK's OTLP exporters (PROTOCOL ``http``: OTLP/HTTP to a base URL; ``grpc``: OTLP/gRPC
to ``HOST:PORT``), and writes to ``OUT`` (msgpack, a list of
``[signal, request bytes]``) every export request as the exporter encoded it, so the test
can compare what arrives with what was sent, message for message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc import _log_exporter as grpc_logs
from opentelemetry.exporter.otlp.proto.grpc import metric_exporter as grpc_metrics
from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_traces
from opentelemetry.exporter.otlp.proto.http import _log_exporter as http_logs
from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_metrics
from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces
from opentelemetry.metrics import Observation
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import LogExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

SENT: list[list[Any]] = []


class _Spans(SpanExporter):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def export(self, spans: Sequence[Any]) -> Any:
        SENT.append(["traces", encode_spans(spans).SerializeToString()])
        return self.inner.export(spans)

    def shutdown(self) -> None:
        self.inner.shutdown()


class _Metrics(MetricExporter):
    def __init__(self, inner: Any) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> Any:
        SENT.append(["metrics", encode_metrics(metrics_data).SerializeToString()])
        return self.inner.export(metrics_data, timeout_millis=timeout_millis)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown()


class _Logs(LogExporter):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def export(self, batch: Sequence[Any]) -> Any:
        SENT.append(["logs", encode_logs(batch).SerializeToString()])
        return self.inner.export(batch)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        self.inner.shutdown()


def _exporters(endpoint: str, protocol: str) -> tuple[Any, Any, Any]:
    if protocol == "grpc":
        return (
            grpc_traces.OTLPSpanExporter(endpoint=endpoint, insecure=True),
            grpc_metrics.OTLPMetricExporter(endpoint=endpoint, insecure=True),
            grpc_logs.OTLPLogExporter(endpoint=endpoint, insecure=True),
        )
    return (
        http_traces.OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"),
        http_metrics.OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"),
        http_logs.OTLPLogExporter(endpoint=f"{endpoint}/v1/logs"),
    )


def main(endpoint: str, out: Path, marker: str, protocol: str) -> None:
    spans, metrics, logs = _exporters(endpoint, protocol)
    resource = Resource.create({"service.name": f"svc-{marker}", "marker": marker})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(_Spans(spans)))
    tracer = tracer_provider.get_tracer("otlp-app", "1.0", schema_url="https://example.com/s")
    with tracer.start_as_current_span(f"parent-{marker}", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("secret", marker)
        parent.add_event(f"event-{marker}", {"n": 1, "f": 0.5, "b": True})
        link = Link(parent.get_span_context(), {"link": marker})
        with tracer.start_as_current_span(f"child-{marker}", links=[link]) as child:
            child.set_attribute("list", [1, 2, 3])
            child.set_status(Status(StatusCode.ERROR, f"failed-{marker}"))

    reader = PeriodicExportingMetricReader(
        _Metrics(metrics),
        export_interval_millis=3_600_000,
    )
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[reader],
        views=[
            View(
                instrument_name="exp_latency",
                aggregation=ExponentialBucketHistogramAggregation(),
            )
        ],
    )
    meter = meter_provider.get_meter("otlp-app")
    meter.create_counter("requests").add(3, {"route": marker})
    meter.create_up_down_counter("queue").add(-2)
    meter.create_histogram("latency").record(12.5, {"route": marker})
    for value in (0.5, 3.0, 700.0):
        meter.create_histogram("exp_latency").record(value)
    meter.create_observable_gauge(
        "temperature", callbacks=[lambda _: [Observation(21.5, {"room": marker})]]
    )
    reader.collect()

    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(_Logs(logs)))
    logger = logging.getLogger("otlp-app")
    logger.propagate = False
    logger.addHandler(LoggingHandler(level=logging.INFO, logger_provider=logger_provider))
    logger.setLevel(logging.INFO)
    with tracer.start_as_current_span(f"logged-{marker}"):
        logger.warning("body-%s", marker, extra={"marker": marker})
    other = logger_provider.get_logger("otlp-app.direct")
    other.emit(body={"kv": marker}, severity_number=SeverityNumber.ERROR, attributes={"a": 1})

    tracer_provider.shutdown()
    meter_provider.shutdown()
    logger_provider.shutdown()
    out.write_bytes(msgpack.packb(SENT, use_bin_type=True))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4])
