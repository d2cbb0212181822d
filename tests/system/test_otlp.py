"""OpenTelemetry end to end: an application on the stock SDK (its own process) exports OTLP/HTTP
to the producer's receiver; a consumer decrypts and its exporter re-exports to an OTLP
endpoint; what arrives equals what the application exported, message for message, and a tap
on every subject of the relay sees none of the application's marker values."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
from prometheus_client import generate_latest

from consumers import ExportConfig, OtlpExporter
from producers import OtlpConfig, OtlpReceiver
from sealstream.metrics import collector_registry
from sealstream.otlp import OTLP_STREAMS
from tests.support.otlp_sink import OtlpSink, run_app
from tests.support.pipeline import Tap, contains_marker, make_stack


async def test_sdk_to_producer_to_consumer_to_otlp_endpoint_unchanged_and_unread(
    nats_url: str, tmp_path: Path
) -> None:
    marker = f"mk{secrets.token_hex(6)}"
    async with (
        Tap(nats_url) as tap,
        make_stack(nats_url, streams=OTLP_STREAMS) as st,
        OtlpReceiver(st.agent, config=OtlpConfig(port=0)) as receiver,
        OtlpSink() as endpoint,
        st.client() as client,
        client.subscribe(st.cluster, list(OTLP_STREAMS)) as sub,
        OtlpExporter(ExportConfig(endpoint=endpoint.url)) as exporter,
    ):
        st.agent.more_samples.append(receiver.samples)
        sent = await run_app(f"http://127.0.0.1:{receiver.port}", tmp_path / "sent", marker)
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
        (signal.path, body) for signal, body in sent
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
