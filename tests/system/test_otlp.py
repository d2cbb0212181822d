"""OpenTelemetry end to end: an application on the stock SDK (its own process) exports OTLP/HTTP
to the producer's receiver; a consumer decrypts and its exporter re-exports to an OTLP
endpoint; what arrives equals what the application exported, message for message, and a tap
on every subject of the relay sees none of the application's marker values."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import generate_latest

from consumers import ExportConfig, OtlpExporter, Resumed
from producers import OtlpConfig, OtlpReceiver
from sealstream.metrics import collector_registry
from sealstream.otlp import OTLP_STREAMS
from tests.support.broker import Broker
from tests.support.otlp_sink import OtlpSink, run_app
from tests.support.pipeline import Tap, contains_marker, eventually, make_stack


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_sdk_to_producer_to_consumer_to_otlp_endpoint_unchanged_and_unread(
    nats_url: str, tmp_path: Path, protocol: str
) -> None:
    """OTLP/HTTP or OTLP/gRPC all the way: the SDK's exporters, the receiver, the exporter."""
    marker = f"mk{secrets.token_hex(6)}"
    grpc = protocol == "grpc"
    async with (
        Tap(nats_url) as tap,
        make_stack(nats_url, streams=OTLP_STREAMS) as st,
        OtlpReceiver(st.agent, config=OtlpConfig(port=0, grpc_port=0)) as receiver,
        OtlpSink() as endpoint,
        st.client() as client,
        client.subscribe(st.cluster, list(OTLP_STREAMS)) as sub,
        OtlpExporter(
            ExportConfig(
                endpoint=endpoint.grpc_url if grpc else endpoint.url,
                protocol="grpc" if grpc else "http/protobuf",
            )
        ) as exporter,
    ):
        st.agent.more_samples.append(receiver.samples)
        target = f"127.0.0.1:{receiver.grpc_port}" if grpc else f"http://127.0.0.1:{receiver.port}"
        sent = await run_app(target, tmp_path / "sent", marker, protocol=protocol)
        rows = 0
        async with asyncio.timeout(30):
            async for batch in sub:
                await exporter.put(batch)
                rows += len(batch.rows)
                if rows >= len(sent):
                    break
            await endpoint.wait_for(len(sent))
        # a bad request on the way: refused, counted in the producer's metrics
        async with aiohttp.ClientSession() as http:
            bad = await http.post(
                f"http://127.0.0.1:{receiver.port}/v1/logs",
                data=b"\xff",
                headers={"Content-Type": "application/x-protobuf"},
            )
            assert bad.status == 400
        metrics = generate_latest(collector_registry(st.agent.samples)).decode()
        await tap.flush()
    # message for message, in the order exported
    assert [(r.path, r.body) for r in endpoint.received] == [
        (f"/{signal.service}/Export" if grpc else signal.path, body) for signal, body in sent
    ]
    for received, (signal, body) in zip(endpoint.received, sent, strict=True):
        assert received.message == signal.request.FromString(body)
    assert exporter.failed == {}
    assert (sub.stats().rejected, sub.stats().lost) == ({}, 0)
    assert 'sealstream_producer_otlp_refused_total{reason="bad_protobuf"} 1.0' in metrics
    assert 'sealstream_producer_otlp_requests_total{signal="traces"} 3.0' in metrics
    # the relay carried the data (sealed) and read none of it
    assert [m for m in tap.messages if m.subject.startswith(f"{st.prefix}.")]
    assert not [m.subject for m in tap.messages if contains_marker(m.data, marker)]


def _request(size: int) -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id = secrets.token_bytes(16)
    span.name = "s" * size
    return request.SerializeToString()


async def test_an_outage_gives_503_with_retry_after_not_drops_then_requests_pass_again(
    broker: Broker,
) -> None:
    """NATS down: sealed requests wait in the outbox; past half its bound the receiver refuses
    (503, ``Retry-After``) instead of letting the outbox drop the oldest; back up, it drains
    and requests pass again."""
    url = broker.start()
    body = _request(100_000)
    async with (
        make_stack(url, streams=OTLP_STREAMS) as st,
        OtlpReceiver(st.agent, config=OtlpConfig(port=0)) as receiver,
        st.client() as client,
        client.subscribe(st.cluster, list(OTLP_STREAMS), resume=True) as sub,
        aiohttp.ClientSession() as http,
    ):
        endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"
        headers = {"Content-Type": "application/x-protobuf"}
        broker.kill()
        await eventually(lambda: not st.agent._connected.is_set())
        statuses: list[int] = []
        while 503 not in statuses and len(statuses) < 100:
            async with http.post(endpoint, data=body, headers=headers) as response:
                statuses.append(response.status)
                retry_after = response.headers.get("Retry-After")
        accepted = statuses.count(200)
        assert statuses == [200] * accepted + [503]
        assert accepted >= 5
        assert retry_after == "1"
        assert receiver.refused == {"backpressure": 1}
        outbox = st.agent.outbox
        assert outbox.dropped == {}
        assert outbox.largest() <= outbox.max_bytes // 2 + 200_000
        broker.start()
        await eventually(lambda: st.agent.backlog() < 0.5, timeout=30)
        async with http.post(endpoint, data=body, headers=headers) as response:
            assert response.status == 200
        # what was acknowledged reaches the reader: the session outlived the outage
        rows: list[bytes] = []
        async with asyncio.timeout(30):
            async for batch in sub:
                assert not isinstance(batch, Resumed)
                rows.extend(row["otlp"] for row in batch.rows)
                if len(rows) >= accepted + 1:
                    break
        assert rows == [body] * (accepted + 1)


def _spans(count: int, size: int) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for _ in range(count):
        span = scope.spans.add()
        span.trace_id = secrets.token_bytes(16)
        span.name = secrets.token_hex(size // 2)
    return request


async def test_concurrent_requests_in_an_outage_are_never_acknowledged_then_dropped(
    broker: Broker,
) -> None:
    """NATS down, sixteen requests at a time whose sealed envelopes together are far over the
    outbox's bound: each reserves its room once its body is read, those that would not fit
    get 503, and the outbox drops nothing; every request answered 200 reaches the reader."""
    url = broker.start()
    async with (
        make_stack(url, streams=OTLP_STREAMS) as st,
        OtlpReceiver(st.agent, config=OtlpConfig(port=0)) as receiver,
        st.client() as client,
        client.subscribe(st.cluster, list(OTLP_STREAMS), resume=True) as sub,
        aiohttp.ClientSession() as http,
    ):
        endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"
        headers = {"Content-Type": "application/x-protobuf"}
        broker.kill()
        await eventually(lambda: not st.agent._connected.is_set())

        async def post(request: ExportTraceServiceRequest) -> int:
            async with http.post(
                endpoint, data=request.SerializeToString(), headers=headers
            ) as response:
                return response.status

        requests = [_spans(300, 2000) for _ in range(16)]  # ~0.6 MB each
        assert sum(r.ByteSize() for r in requests) > 2 * st.agent.outbox.max_bytes
        statuses = await asyncio.gather(*(post(r) for r in requests))
        assert st.agent.outbox.dropped == {}
        assert set(statuses) == {200, 503}
        accepted = {
            span.trace_id
            for request, status in zip(requests, statuses, strict=True)
            if status == 200
            for span in request.resource_spans[0].scope_spans[0].spans
        }
        broker.start()
        received: set[bytes] = set()
        async with asyncio.timeout(30):
            async for batch in sub:
                assert not isinstance(batch, Resumed)
                for row in batch.rows:
                    part = ExportTraceServiceRequest.FromString(row["otlp"])
                    received |= {s.trace_id for s in part.resource_spans[0].scope_spans[0].spans}
                if len(received) >= len(accepted):
                    break
        assert received == accepted
