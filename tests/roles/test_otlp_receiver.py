"""The producer's OTLP/HTTP receiver, on a real socket, in front of a recording sink (our own
Protocol, :class:`producers._otlp.SealingSink`): the real OpenTelemetry SDK's exports become
rows unchanged; JSON, gzip, splitting, every refusal with its status and counter;
backpressure, the outbox room reserved by the requests in hand, the bearer token, the body
deadline, decoding off the event loop. The sealed path through a real agent is in
tests/system/test_otlp.py."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import secrets
import sys
import types
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
import structlog
from google.protobuf import json_format
from google.rpc import status_pb2
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from producers import _otlp_codec
from producers._otlp import SEALED_PER_BYTE, OtlpConfig, OtlpReceiver
from producers._otlp_codec import split_request
from sealstream.otlp import OTLP_STREAMS, SIGNALS, count_items
from tests.support.otlp_sink import run_app
from tests.support.pipeline import eventually

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: what the tests' rows may hold: a small budget makes splitting easy to reach
ROW_BYTES = 64 * 1024


class RecordingSink:
    """Records the rows it is given; ``backlog`` (``level``, and what a reservation adds for
    each of ``readers`` sessions), the envelopes ``dropped`` while sealing and a gate on
    sealing are the test's."""

    def __init__(
        self, *, max_row_bytes: int = ROW_BYTES, buffer_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.max_row_bytes = max_row_bytes
        self.buffer_bytes = buffer_bytes
        self.streams = frozenset(OTLP_STREAMS)
        self.rows: list[tuple[str, dict[str, Any]]] = []
        self.level = 0.0
        self.readers = 1
        self.dropped = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def backlog(self, reserve: int = 0) -> float:
        return self.level + reserve * self.readers / self.buffer_bytes

    async def seal_rows(self, stream: str, rows: list[dict[str, Any]]) -> tuple[int, int]:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.rows.extend((stream, row) for row in rows)
        return 0, self.dropped


@pytest_asyncio.fixture
async def sink() -> RecordingSink:
    return RecordingSink()


@pytest_asyncio.fixture
async def receiver(sink: RecordingSink) -> AsyncIterator[OtlpReceiver]:
    config = OtlpConfig(port=0, grpc_port=0, max_body_bytes=256 * 1024, max_concurrent=2)
    async with OtlpReceiver(sink, config=config) as receiver:
        yield receiver


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _url(receiver: OtlpReceiver, path: str = "/v1/traces") -> str:
    return f"http://127.0.0.1:{receiver.port}{path}"


def _spans(count: int, *, marker: str = "m", size: int = 10) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    group = request.resource_spans.add()
    attribute = group.resource.attributes.add()
    attribute.key = "service.name"
    attribute.value.string_value = f"svc-{marker}"
    scope = group.scope_spans.add()
    scope.scope.name = "lib"
    scope.schema_url = "https://example.com/s"
    for i in range(count):
        span = scope.spans.add()
        span.trace_id = secrets.token_bytes(16)
        span.span_id = secrets.token_bytes(8)
        span.name = f"{marker}-{i}-" + "x" * size
        span.kind = Span.SPAN_KIND_SERVER
        span.status.code = Status.STATUS_CODE_ERROR
        event = span.events.add()
        event.name = f"event-{i}"
        link = span.links.add()
        link.trace_id = secrets.token_bytes(16)
        link.span_id = secrets.token_bytes(8)
    return request


def _otlp_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """The OTLP/JSON form: hex ids, integer enums."""
    as_dict = json_format.MessageToDict(request, use_integers_for_enums=True)

    def hexify(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId"):
                    node[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(node, list):
            for value in node:
                hexify(value)

    hexify(as_dict)
    return as_dict


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    content_type: str = PROTOBUF,
    encoding: str | None = None,
    method: str = "POST",
) -> tuple[int, bytes, Mapping[str, str]]:
    headers = {"Content-Type": content_type}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    async with http.request(method, url, data=body, headers=headers) as response:
        return response.status, await response.read(), response.headers


# --- the real SDK -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_the_sdk_exports_become_rows_unchanged(
    receiver: OtlpReceiver, sink: RecordingSink, tmp_path: Path, protocol: str
) -> None:
    marker = f"mk{secrets.token_hex(4)}"
    endpoint = _url(receiver, "") if protocol == "http" else f"127.0.0.1:{receiver.grpc_port}"
    sent = await run_app(endpoint, tmp_path / "sent.msgpack", marker, protocol=protocol)
    assert {signal.name for signal, _ in sent} == {"traces", "metrics", "logs"}
    # one row per request, in order, the bytes the exporter encoded
    assert [(signal.stream, body) for signal, body in sent] == [
        (stream, row["otlp"]) for stream, row in sink.rows
    ]
    for stream, row in sink.rows:
        signal = SIGNALS[row["signal"]]
        assert signal.stream == stream
        assert row["service"] == f"svc-{marker}"
        request: Any = signal.request.FromString(row["otlp"])
        items = [
            item
            for group in getattr(request, signal.resources)
            for scope in getattr(group, signal.scopes)
            for item in getattr(scope, signal.items)
        ]
        assert row["items"] == count_items(signal, items) > 0
    metric_types = {
        metric.WhichOneof("data")
        for _, row in sink.rows
        if row["signal"] == "metrics"
        for group in SIGNALS["metrics"].request.FromString(row["otlp"]).resource_metrics  # type: ignore[attr-defined]
        for scope in group.scope_metrics
        for metric in scope.metrics
    }
    assert metric_types == {"sum", "gauge", "histogram", "exponential_histogram"}
    assert receiver.refused == {}
    assert receiver.requests == {"traces": 3, "metrics": 2, "logs": 2}


# --- JSON, gzip -------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [None, "gzip"])
@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
async def test_json_and_gzip_carry_the_same_message(
    receiver: OtlpReceiver,
    sink: RecordingSink,
    http: aiohttp.ClientSession,
    content_type: str,
    encoding: str | None,
) -> None:
    request = _spans(3)
    request.resource_spans[0].scope_spans[0].spans[0].span_id = b"\x00" * 7 + b"\x2d"
    if content_type == JSON:
        body = json.dumps(_otlp_json(request)).encode()
    else:
        body = request.SerializeToString()
    if encoding == "gzip":
        body = gzip.compress(body)
    status, answer, headers = await _post(
        http, _url(receiver), body, content_type=content_type, encoding=encoding
    )
    assert status == 200
    assert headers["Content-Type"] == content_type
    if content_type == JSON:
        assert answer == b"{}"
    else:
        assert ExportTraceServiceResponse.FromString(answer) == ExportTraceServiceResponse()
    [(stream, row)] = sink.rows
    assert stream == "otlp_traces"
    assert ExportTraceServiceRequest.FromString(row["otlp"]) == request
    assert row["items"] == 3


# --- refusals ---------------------------------------------------------------------------

_BOMB = gzip.compress(b"\0" * (8 * 1024 * 1024))


@pytest.mark.parametrize(
    ("path", "method", "content_type", "encoding", "body", "status", "reason"),
    [
        ("/v1/traces", "POST", PROTOBUF, None, b"\xff\xff\xff", 400, "bad_protobuf"),
        ("/v1/logs", "POST", JSON, None, b"{not json", 400, "bad_json"),
        ("/v1/logs", "POST", JSON, None, b"[1, 2]", 400, "bad_json"),
        ("/v1/logs", "POST", JSON, None, b'{"resourceLogs": 5}', 400, "bad_json"),
        (
            "/v1/traces",
            "POST",
            JSON,
            None,
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}',
            400,
            "bad_json",
        ),
        (
            "/v1/traces",
            "POST",
            JSON,
            None,
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"spanId":"0a 0b 0c 0d"}]}]}]}',
            400,
            "bad_json",
        ),
        ("/v1/traces", "POST", JSON, None, b"[" * 100_000, 400, "bad_json"),
        ("/v1/metrics", "POST", PROTOBUF, "gzip", b"not gzip", 400, "bad_gzip"),
        ("/v1/metrics", "POST", PROTOBUF, "gzip", gzip.compress(b"x")[:-4], 400, "bad_gzip"),
        ("/v1/metrics", "POST", PROTOBUF, "br", b"", 415, "unsupported_encoding"),
        ("/v1/traces", "POST", "text/plain", None, b"", 415, "unsupported_media_type"),
        ("/v1/traces", "GET", PROTOBUF, None, b"", 405, "method_not_allowed"),
        ("/v1/-traces", "POST", PROTOBUF, None, b"", 404, "not_found"),
        ("/v1/traces", "POST", PROTOBUF, None, b"\0" * (256 * 1024 + 1), 413, "too_large"),
        ("/v1/traces", "POST", PROTOBUF, "gzip", _BOMB, 413, "too_large"),
    ],
)
async def test_each_bad_input_has_its_status_and_counter(
    receiver: OtlpReceiver,
    sink: RecordingSink,
    http: aiohttp.ClientSession,
    path: str,
    method: str,
    content_type: str,
    encoding: str | None,
    body: bytes,
    status: int,
    reason: str,
) -> None:
    valid = _spans(2).SerializeToString()
    # a valid request at the same time is not lost
    (got, answer, headers), (ok, _, _) = await asyncio.gather(
        _post(
            http,
            _url(receiver, path),
            body,
            content_type=content_type,
            encoding=encoding,
            method=method,
        ),
        _post(http, _url(receiver), valid),
    )
    assert (got, ok) == (status, 200)
    assert receiver.refused == {reason: 1}
    answer_type = JSON if content_type == JSON else PROTOBUF
    assert headers["Content-Type"] == answer_type
    message = (
        json_format.Parse(answer, status_pb2.Status())
        if answer_type == JSON
        else status_pb2.Status.FromString(answer)
    )
    assert message.message
    assert [row["otlp"] for _, row in sink.rows] == [valid]


@pytest.mark.parametrize("encoding", [None, "gzip"])
async def test_a_chunked_body_is_measured_as_it_comes(
    receiver: OtlpReceiver, sink: RecordingSink, http: aiohttp.ClientSession, encoding: str | None
) -> None:
    """No Content-Length: the bytes are counted as they arrive, as sent (gzip: 300 KB of
    empty members, which inflate to nothing)."""
    empty = gzip.compress(b"")
    body = empty * (300 * 1024 // len(empty)) if encoding else secrets.token_bytes(300 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16 * 1024):
            yield body[i : i + 16 * 1024]

    headers = {"Content-Type": PROTOBUF, **({"Content-Encoding": "gzip"} if encoding else {})}
    async with http.post(_url(receiver), data=chunks(), headers=headers) as response:
        assert response.status == 413
    assert receiver.refused == {"too_large": 1}
    assert sink.rows == []


async def test_a_body_cut_short_is_counted(receiver: OtlpReceiver, sink: RecordingSink) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    writer.write(
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
        b"Content-Length: 1000\r\n\r\n" + _spans(1).SerializeToString()[:20]
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: bool(receiver.refused))
    assert receiver.refused == {"incomplete_body": 1}
    assert sink.rows == []


async def test_a_sink_without_the_otlp_streams_is_refused(sink: RecordingSink) -> None:
    sink.streams = frozenset({"otlp_traces", "records"})
    with pytest.raises(ValueError, match="otlp_logs"):
        async with OtlpReceiver(sink, config=OtlpConfig(port=0)):
            pass


async def test_a_request_too_large_for_one_row_is_split_losslessly(
    receiver: OtlpReceiver, sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    request = _spans(120, size=1500)  # ~190 KB: three or four rows of 62 KB
    huge = request.resource_spans[0].scope_spans[0].spans[7]
    huge.name = "h" * ROW_BYTES  # alone over a row: refused, the others kept
    status, answer, _ = await _post(http, _url(receiver), request.SerializeToString())
    assert status == 200
    response = ExportTraceServiceResponse.FromString(answer)
    assert response.partial_success.rejected_spans == 1
    assert response.partial_success.error_message
    assert receiver.items_refused == {"traces": 1}
    assert len(sink.rows) > 2
    parts = [ExportTraceServiceRequest.FromString(row["otlp"]) for _, row in sink.rows]
    assert all(len(row["otlp"]) <= ROW_BYTES - 2048 for _, row in sink.rows)
    for part in parts:
        [group] = part.resource_spans
        assert group.resource == request.resource_spans[0].resource
        [scope] = group.scope_spans
        assert scope.scope == request.resource_spans[0].scope_spans[0].scope
        assert scope.schema_url == "https://example.com/s"
    kept = [span for part in parts for span in part.resource_spans[0].scope_spans[0].spans]
    expected = [s for i, s in enumerate(request.resource_spans[0].scope_spans[0].spans) if i != 7]
    assert kept == expected
    assert sum(row["items"] for _, row in sink.rows) == 119


def test_split_keeps_resources_and_scopes_apart() -> None:
    signal = SIGNALS["traces"]
    request = _spans(3, marker="a")
    request.resource_spans.extend(_spans(2, marker="b").resource_spans)
    request.resource_spans[1].scope_spans.add().CopyFrom(request.resource_spans[0].scope_spans[0])
    parts, refused = split_request(signal, request, 10**6)
    assert (parts, refused) == ([request], 0)
    parts, refused = split_request(signal, request, 400)
    assert refused == 0
    assert len(parts) >= 3
    assert all(part.ByteSize() <= 400 for part in parts)
    merged: list[Any] = [
        (group.resource, scope.scope, span)
        for part in parts
        for group in part.resource_spans  # type: ignore[attr-defined]
        for scope in group.scope_spans
        for span in scope.spans
    ]
    assert merged == [
        (group.resource, scope.scope, span)
        for group in request.resource_spans
        for scope in group.scope_spans
        for span in scope.spans
    ]


# --- backpressure -----------------------------------------------------------------------


async def test_backpressure_answers_503_with_retry_after(
    receiver: OtlpReceiver, sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    sink.level = 0.5
    body = _spans(1).SerializeToString()
    status, _, headers = await _post(http, _url(receiver), body)
    assert (status, headers["Retry-After"]) == (503, "1")
    assert receiver.refused == {"backpressure": 1}
    assert sink.rows == []
    sink.level = 0.49
    assert (await _post(http, _url(receiver), body))[0] == 200


async def test_requests_beyond_max_concurrent_answer_503(
    receiver: OtlpReceiver, sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    sink.gate = asyncio.Event()
    body = _spans(1).SerializeToString()
    held = [asyncio.ensure_future(_post(http, _url(receiver), body)) for _ in range(2)]
    await asyncio.wait_for(sink.entered.wait(), 10)
    await eventually(lambda: receiver._busy == 2)
    status, _, headers = await _post(http, _url(receiver), body)
    assert (status, headers["Retry-After"]) == (503, "1")
    assert receiver.refused == {"busy": 1}
    sink.gate.set()
    assert [(await h)[0] for h in held] == [200, 200]
    assert len(sink.rows) == 2


async def test_the_sdk_retries_until_the_producer_catches_up(
    receiver: OtlpReceiver, sink: RecordingSink, tmp_path: Path
) -> None:
    sink.level = 1.0
    app = asyncio.ensure_future(run_app(_url(receiver, ""), tmp_path / "sent", "retry"))
    await eventually(lambda: bool(receiver.refused), timeout=30)
    sink.level = 0.0
    sent = await app
    assert [body for _, body in sent] == [row["otlp"] for _, row in sink.rows]
    assert receiver.refused["backpressure"] >= 1


# --- OTLP/gRPC --------------------------------------------------------------------------


async def _grpc_export(
    receiver: OtlpReceiver, body: bytes, *, compression: grpc.Compression | None = None
) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
        export: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{SIGNALS['traces'].service}/Export"
        )
        return bytes(await export(body, compression=compression, timeout=10))


async def test_grpc_refusals_have_their_codes_and_counters(
    receiver: OtlpReceiver, sink: RecordingSink
) -> None:
    cases: list[tuple[bytes, grpc.Compression | None, grpc.StatusCode]] = [
        (b"\xff\xff\xff", None, grpc.StatusCode.INVALID_ARGUMENT),
        (b"\0" * (256 * 1024 + 1), None, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (b"\0" * (8 * 1024 * 1024), grpc.Compression.Gzip, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for body, compression, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _grpc_export(receiver, body, compression=compression)
        assert refused.value.code() == code
    # the size limit is gRPC's own: only the undecodable request reaches the counters
    assert receiver.refused == {"bad_protobuf": 1}
    valid = _spans(2).SerializeToString()
    assert ExportTraceServiceResponse.FromString(await _grpc_export(receiver, valid)) == (
        ExportTraceServiceResponse()
    )
    assert [row["otlp"] for _, row in sink.rows] == [valid]


async def test_grpc_backpressure_is_unavailable_with_retry_info(
    receiver: OtlpReceiver, sink: RecordingSink
) -> None:
    sink.level = 1.0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _grpc_export(receiver, _spans(1).SerializeToString())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    trailers = dict(refused.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    [detail] = status.details
    info = RetryInfo()
    assert detail.Unpack(info)
    assert info.retry_delay.seconds == 1
    assert receiver.refused == {"backpressure": 1}
    assert sink.rows == []


# --- the outbox room of the requests in hand ---------------------------------------------


def _need(body: bytes, sink: RecordingSink) -> float:
    """The share of the sink's bound a request's reservation takes (its headers' 16 KiB too)."""
    return (len(body) * SEALED_PER_BYTE + 16 * 1024) / sink.buffer_bytes


async def test_requests_in_hand_reserve_room_in_the_outbox(
    sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    """Admitted together, requests could overflow the outbox with their sealed envelopes: the
    first one's reservation counts against the next one's admission."""
    sink.buffer_bytes = 1024 * 1024
    sink.gate = asyncio.Event()
    body = _spans(100, size=2000).SerializeToString()  # ~210 KB
    sink.level = 0.45
    assert sink.level + _need(body, sink) < 1  # either alone fits
    config = OtlpConfig(port=0, grpc_port=0, max_body_bytes=256 * 1024, max_concurrent=4)
    async with OtlpReceiver(sink, config=config) as receiver:
        first = asyncio.ensure_future(_post(http, _url(receiver), body))
        await asyncio.wait_for(sink.entered.wait(), 10)
        try:
            async with asyncio.timeout(10):  # admitted, they would wait for the gate
                status, _, headers = await _post(http, _url(receiver), body)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _grpc_export(receiver, body)
        finally:
            sink.gate.set()
        assert (status, headers["Retry-After"]) == (503, "1")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert receiver.refused == {"backpressure": 2}
        assert (await first)[0] == 200
        # the reservation ends with its request
        assert receiver._reserved == 0
        assert (await _post(http, _url(receiver), body))[0] == 200
        assert receiver.requests == {"traces": 2}


async def test_a_request_whose_sealed_form_would_overflow_is_refused_after_reading(
    receiver: OtlpReceiver, sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    """Under half the bound, but sealed for three sessions the body would not fit: 503 once
    its size is known, nothing sealed."""
    body = _spans(100, size=2000).SerializeToString()
    sink.buffer_bytes = 1024 * 1024
    sink.readers = 3
    sink.level = 0.3
    assert sink.level + 3 * _need(body, sink) > 1
    status, _, headers = await _post(http, _url(receiver), body)
    assert (status, headers["Retry-After"]) == (503, "1")
    assert receiver.refused == {"backpressure": 1}
    assert sink.rows == []
    sink.level = 0.0
    assert (await _post(http, _url(receiver), body))[0] == 200


async def test_envelopes_dropped_while_sealing_answer_503_not_200(
    receiver: OtlpReceiver, sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    """The outbox overflowed while the request was sealed: its rows may be what was lost, so
    the client is told to retry (HTTP 503 with Retry-After; gRPC UNAVAILABLE)."""
    sink.dropped = 1
    body = _spans(2).SerializeToString()
    status, _, headers = await _post(http, _url(receiver), body)
    assert (status, headers["Retry-After"]) == (503, "1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _grpc_export(receiver, body)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert receiver.refused == {"outbox_full": 2}
    assert receiver.requests == {}


async def test_the_body_limit_is_what_the_outbox_takes_above_high_water(
    http: aiohttp.ClientSession,
) -> None:
    """A request whose sealed form alone would overflow the outbox is over the size limit."""
    sink = RecordingSink(buffer_bytes=512 * 1024)
    config = OtlpConfig(port=0, grpc_port=None, max_body_bytes=4 * 1024 * 1024)
    async with OtlpReceiver(sink, config=config) as receiver:
        assert receiver.max_body_bytes == int((256 * 1024 - 16 * 1024) / SEALED_PER_BYTE)
        over = _spans(100, size=2000).SerializeToString()
        assert receiver.max_body_bytes < len(over) < config.max_body_bytes
        assert (await _post(http, _url(receiver), over))[0] == 413
        assert receiver.refused == {"too_large": 1}
    with pytest.raises(ValueError, match="buffer_bytes"):
        async with OtlpReceiver(RecordingSink(buffer_bytes=32 * 1024), config=config):
            pass


# --- the event loop, the item cap, slow bodies ---------------------------------------------


async def test_decoding_and_splitting_run_off_the_event_loop(
    receiver: OtlpReceiver, sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    """The CPU-bound part of a request (decoding, splitting into rows) never runs on the
    thread of the event loop, which serves the producer's sessions meanwhile."""
    codec = {f.__code__ for f in (_otlp_codec.decode, _otlp_codec.to_rows, split_request)}
    seen: list[str] = []

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code in codec:
            seen.append(frame.f_code.co_name)

    body = _spans(120, size=1500).SerializeToString()  # split into several rows
    previous = sys.getprofile()
    sys.setprofile(profile)  # this thread's: the event loop's
    try:
        status, _, _ = await _post(http, _url(receiver), body)
    finally:
        sys.setprofile(previous)
    assert status == 200
    assert len(sink.rows) > 1
    assert seen == []


async def test_a_request_over_max_items_is_refused_whole(
    sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    config = OtlpConfig(port=0, grpc_port=0, max_items=10)
    async with OtlpReceiver(sink, config=config) as receiver:
        assert (await _post(http, _url(receiver), _spans(11).SerializeToString()))[0] == 413
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _grpc_export(receiver, _spans(11).SerializeToString())
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert receiver.refused == {"too_many_items": 2}
        ok = _spans(10).SerializeToString()
        assert (await _post(http, _url(receiver), ok))[0] == 200
    assert [row["otlp"] for _, row in sink.rows] == [ok]


async def test_a_body_that_does_not_arrive_in_time_is_refused_and_frees_its_slot(
    sink: RecordingSink,
) -> None:
    """A client that sends its headers and then a trickle (or nothing) holds a slot only
    until the body deadline."""
    config = OtlpConfig(port=0, grpc_port=None, max_concurrent=1, body_timeout_s=0.2)
    async with OtlpReceiver(sink, config=config) as receiver:
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        writer.write(
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: 1000\r\n\r\n" + _spans(1).SerializeToString()[:20]
        )
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        assert status_line.split()[1] == b"408"
        assert receiver.refused == {"slow_body": 1}
        assert receiver._busy == 0
    assert sink.rows == []


# --- the bearer token ---------------------------------------------------------------------


async def test_a_token_is_required_over_http_and_grpc_when_configured(
    sink: RecordingSink, http: aiohttp.ClientSession
) -> None:
    token = "-tok_" + secrets.token_urlsafe(16)  # a leading '-', an '_': data, not syntax
    config = OtlpConfig(port=0, grpc_port=0, token=token)
    assert token not in repr(config)
    body = _spans(1).SerializeToString()
    async with OtlpReceiver(sink, config=config) as receiver:
        for authorization in (None, f"Bearer {token}x", token, f"Basic {token}"):
            headers = {"Content-Type": PROTOBUF}
            if authorization is not None:
                headers["Authorization"] = authorization
            async with http.post(_url(receiver), data=body, headers=headers) as response:
                assert response.status == 401
        async with grpc.aio.insecure_channel(f"127.0.0.1:{receiver.grpc_port}") as channel:
            export: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/{SIGNALS['traces'].service}/Export"
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await export(body, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await export(body, timeout=10, metadata=(("authorization", f"Bearer {token}"),))
        # a header that is not UTF-8: refused like any other, not an error
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        writer.write(
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Authorization: Bearer \xff\xfe\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        assert status_line.split()[1] == b"401"
        assert receiver.refused == {"unauthenticated": 6}
        headers = {"Content-Type": PROTOBUF, "Authorization": f"Bearer {token}"}
        async with http.post(_url(receiver), data=body, headers=headers) as response:
            assert response.status == 200
    assert len(sink.rows) == 2


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_the_sdk_sends_the_token_from_its_environment(
    sink: RecordingSink, tmp_path: Path, protocol: str
) -> None:
    """As the README says: OTEL_EXPORTER_OTLP_HEADERS, its value URL-encoded."""
    token = secrets.token_urlsafe(16)
    config = OtlpConfig(port=0, grpc_port=0, token=token)
    async with OtlpReceiver(sink, config=config) as receiver:
        endpoint = _url(receiver, "") if protocol == "http" else f"127.0.0.1:{receiver.grpc_port}"
        env = {"OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{token}"}
        sent = await run_app(endpoint, tmp_path / "sent", "tok", protocol=protocol, env=env)
        assert receiver.refused == {}
    assert [body for _, body in sent] == [row["otlp"] for _, row in sink.rows]


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", "t", False), ("127.0.0.1", None, False)],
)
async def test_listening_beyond_loopback_without_a_token_warns(
    sink: RecordingSink, host: str, token: str | None, warned: bool
) -> None:
    config = OtlpConfig(host=host, port=0, grpc_port=None, token=token)
    with structlog.testing.capture_logs() as logs:
        async with OtlpReceiver(sink, config=config):
            pass
    events = [entry for entry in logs if entry["event"] == "otlp.unauthenticated"]
    assert [(e["host"], e["log_level"]) for e in events] == ([(host, "warning")] if warned else [])
