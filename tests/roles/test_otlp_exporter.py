"""The consumer's OTLP exporter against a real OTLP/HTTP endpoint (tests/support/otlp_sink.py):
requests sent unchanged and in order, the OTLP client's retry rules (429/502/503/504 only,
``Retry-After``, exponential backoff with jitter, a bounded time), what is not delivered
counted by reason. Sleeps are recorded, not slept."""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from consumers._otlp import ExportConfig, OtlpExporter, retry_after
from sealstream.crypto import Batch
from tests.support.otlp_sink import Answer, OtlpSink


class Sleeps:
    """Records the waits asked for; returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest_asyncio.fixture
async def sink() -> AsyncIterator[OtlpSink]:
    async with OtlpSink() as sink:
        yield sink


def _request(marker: str) -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.name = marker
    span.trace_id = secrets.token_bytes(16)
    return request.SerializeToString()


def _batch(stream: str, *bodies: bytes, seq: int = 1) -> Batch:
    rows = [{"signal": "traces", "service": "", "items": 1, "otlp": b} for b in bodies]
    return Batch(stream=stream, seq=seq, ts=0, rows=rows)


def _exporter(url: str, sleeps: Sleeps, **options: Any) -> OtlpExporter:
    return OtlpExporter(ExportConfig(endpoint=url, **options), sleep=sleeps, rng=random.Random(7))


async def test_requests_go_unchanged_and_in_order_with_the_headers(sink: OtlpSink) -> None:
    sleeps = Sleeps()
    bodies = [_request(f"span-{i}") for i in range(5)]
    async with _exporter(sink.url, sleeps, headers={"Authorization": "Bearer x-1"}) as exporter:
        await exporter.put(_batch("otlp_traces", *bodies[:2]))
        await exporter.put(_batch("otlp_traces", *bodies[2:]))
    assert [(r.path, r.body) for r in sink.received] == [("/v1/traces", b) for b in bodies]
    assert {r.headers["Authorization"] for r in sink.received} == {"Bearer x-1"}
    assert {r.headers["Content-Type"] for r in sink.received} == {"application/x-protobuf"}
    assert exporter.exported == {"traces": 5}
    assert exporter.items == {"traces": 5}
    assert (exporter.failed, sleeps.waits) == ({}, [])


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retryable_answers_are_retried_after_retry_after(sink: OtlpSink, status: int) -> None:
    sleeps = Sleeps()
    sink.answers.extend([Answer(status, {"Retry-After": "3"}), Answer(status)])
    body = _request("retried")
    async with _exporter(sink.url, sleeps) as exporter:
        await exporter.put(_batch("otlp_traces", body))
    assert [r.body for r in sink.received] == [body] * 3
    assert sleeps.waits[0] == 3.0
    assert 0.5 <= sleeps.waits[1] <= 1.0  # no Retry-After: backoff with jitter
    assert (exporter.exported, exporter.failed, exporter.retries) == ({"traces": 1}, {}, 2)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_a_delay_of_zero_from_the_server_still_waits_the_backoff(
    sink: OtlpSink, protocol: str
) -> None:
    """``Retry-After: 0`` (a zero RetryInfo over gRPC) is no licence for a tight loop: the
    wait is never below the backoff's."""
    sleeps = Sleeps()
    sink.answers.extend([Answer(429, {"Retry-After": "0"})] * 3)
    url = sink.grpc_url if protocol == "grpc" else sink.url
    async with _exporter(url, sleeps, protocol=protocol) as exporter:
        await exporter.put(_batch("otlp_traces", _request("a")))
    assert len(sleeps.waits) == 3
    assert min(sleeps.waits) >= 0.5  # half the initial backoff, at the least
    assert (exporter.exported, exporter.failed) == ({"traces": 1}, {})


async def test_an_unexpected_failure_is_counted_and_the_next_request_goes_on(
    sink: OtlpSink,
) -> None:
    """The sender runs in a task group entered by the task that opened the exporter: a failure
    it did not foresee (here, of the wait itself) is one request counted, not that task
    cancelled."""

    async def broken(seconds: float) -> None:
        raise RuntimeError("no timer")

    sink.answers.append(Answer(503))
    after = _request("after")
    exporter = OtlpExporter(ExportConfig(endpoint=sink.url), sleep=broken)
    async with exporter:
        await exporter.put(_batch("otlp_traces", _request("lost"), after))
    assert exporter.failed == {"error": 1}
    assert exporter.exported == {"traces": 1}
    assert sink.received[-1].body == after


async def test_backoff_doubles_up_to_its_cap(sink: OtlpSink) -> None:
    sleeps = Sleeps()
    sink.answers.extend([Answer(503)] * 5)
    async with _exporter(sink.url, sleeps, initial_backoff_s=1.0, max_backoff_s=4.0) as exporter:
        await exporter.put(_batch("otlp_traces", _request("a")))
    caps = [1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(sleeps.waits) == len(caps)
    for wait, cap in zip(sleeps.waits, caps, strict=True):
        assert cap / 2 <= wait <= cap
    assert exporter.exported == {"traces": 1}


async def test_a_request_that_stays_refused_is_given_up_and_counted(sink: OtlpSink) -> None:
    sleeps = Sleeps()
    sink.answers.append(Answer(503, {"Retry-After": "30"}))  # beyond max_elapsed_s
    after = _request("after")
    async with _exporter(sink.url, sleeps, max_elapsed_s=10.0) as exporter:
        await exporter.put(_batch("otlp_traces", _request("lost"), after))
    assert exporter.failed == {"gave_up": 1}
    assert sink.received[-1].body == after
    assert exporter.exported == {"traces": 1}


@pytest.mark.parametrize("status", [400, 401, 404, 413, 500])
async def test_other_errors_are_not_retried(sink: OtlpSink, status: int) -> None:
    sleeps = Sleeps()
    sink.answers.append(Answer(status))
    after = _request("after")
    async with _exporter(sink.url, sleeps) as exporter:
        await exporter.put(_batch("otlp_traces", _request("refused"), after))
    assert len(sink.received) == 2
    assert exporter.failed == {f"http_{status}": 1}
    assert (exporter.exported, sleeps.waits) == ({"traces": 1}, [])


async def test_an_unreachable_endpoint_is_retried_then_given_up() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    async with _exporter(f"http://127.0.0.1:{port}", sleeps, max_elapsed_s=5.0) as exporter:
        await exporter.put(_batch("otlp_traces", _request("x")))
    assert exporter.failed == {"gave_up": 1}
    assert len(sleeps.waits) >= 2


async def test_partial_success_and_rows_that_are_not_otlp_are_counted(sink: OtlpSink) -> None:
    sleeps = Sleeps()
    response = ExportLogsServiceResponse()
    response.partial_success.rejected_log_records = 4
    response.partial_success.error_message = "too old"
    sink.answers.append(Answer(200, body=response.SerializeToString()))
    async with _exporter(sink.url, sleeps) as exporter:
        await exporter.put(_batch("otlp_logs", b""))
        await exporter.put(Batch("otlp_logs", 2, 0, [{"otlp": "not bytes"}]))
        await exporter.put(Batch("records", 3, 0, [{"otlp": b"\x0a\x00"}]))
    assert exporter.rejected_items == {"logs": 4}
    assert exporter.exported == {"logs": 1}
    assert exporter.failed == {"not_otlp": 2}
    assert [r.path for r in sink.received] == ["/v1/logs"]


async def test_what_is_still_queued_at_close_is_counted(sink: OtlpSink) -> None:
    stuck = asyncio.Event()

    async def never(seconds: float) -> None:
        await stuck.wait()

    sink.answers.extend([Answer(503)] * 10)
    exporter = OtlpExporter(
        ExportConfig(endpoint=sink.url, close_timeout_s=0.2), sleep=never, rng=random.Random(1)
    )
    async with exporter:
        await exporter.put(_batch("otlp_traces", _request("a"), _request("b"), _request("c")))
    assert exporter.failed == {"closed": 3}
    assert exporter.exported == {}


# --- OTLP/gRPC --------------------------------------------------------------------------


def _grpc(sink: OtlpSink, sleeps: Sleeps, **options: Any) -> OtlpExporter:
    return _exporter(sink.grpc_url, sleeps, protocol="grpc", **options)


async def test_grpc_requests_go_unchanged_and_in_order_with_the_headers(sink: OtlpSink) -> None:
    sleeps = Sleeps()
    bodies = [_request(f"span-{i}") for i in range(3)]
    async with _grpc(sink, sleeps, headers={"X-Tenant": "t-1"}) as exporter:
        await exporter.put(_batch("otlp_traces", *bodies))
        await exporter.put(Batch("otlp_logs", 2, 0, [{"otlp": b""}]))
    path = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    assert [(r.path, r.body) for r in sink.received] == [
        *((path, b) for b in bodies),
        ("/opentelemetry.proto.collector.logs.v1.LogsService/Export", b""),
    ]
    assert {r.headers["x-tenant"] for r in sink.received} == {"t-1"}
    assert (exporter.exported, exporter.failed) == ({"traces": 3, "logs": 1}, {})


async def test_grpc_unavailable_is_retried_after_its_retry_info(sink: OtlpSink) -> None:
    sleeps = Sleeps()
    sink.answers.extend([Answer(503, {"Retry-After": "3"}), Answer(503)])
    async with _grpc(sink, sleeps) as exporter:
        await exporter.put(_batch("otlp_traces", _request("a")))
    assert len(sink.received) == 3
    assert sleeps.waits[0] == 3.0
    assert 0.5 <= sleeps.waits[1] <= 1.0
    assert (exporter.exported, exporter.failed) == ({"traces": 1}, {})


@pytest.mark.parametrize(
    ("answer", "retried"),
    [
        (Answer(429, {"Retry-After": "2"}), True),  # RESOURCE_EXHAUSTED with RetryInfo
        (Answer(429), False),  # RESOURCE_EXHAUSTED without: not retried
        (Answer(400), False),
        (Answer(500), False),
    ],
)
async def test_grpc_codes_are_retried_only_as_the_spec_says(
    sink: OtlpSink, answer: Answer, retried: bool
) -> None:
    sleeps = Sleeps()
    sink.answers.append(answer)
    async with _grpc(sink, sleeps) as exporter:
        await exporter.put(_batch("otlp_traces", _request("a")))
    assert len(sink.received) == (2 if retried else 1)
    assert exporter.exported == ({"traces": 1} if retried else {})
    assert bool(exporter.failed) is not retried


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after("7", now=0) == 7.0
    assert retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=4.0) == 6.0
    assert retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=40.0) == 0.0
    assert retry_after("soon", now=0) is None
    assert retry_after("-3", now=0) is None
    assert retry_after(None, now=0) is None


def test_the_endpoint_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        ExportConfig(endpoint="-h")
    with pytest.raises(ValueError, match="protocol"):
        ExportConfig(endpoint="http://h", protocol="http/json")  # type: ignore[arg-type]
