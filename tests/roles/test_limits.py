"""Proxy limits (each refused with limit_exceeded and counted), consumer backpressure, and the
metrics and health endpoints of proxy and producer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.request

import pytest

from broker_proxy import Limits
from consumers import Client
from sealstream import SessionError
from tests.support.pipeline import collect_rows, eventually, make_stack


async def test_sessions_per_user(nats_url: str) -> None:
    async with make_stack(nats_url, limits=Limits(sessions_per_user=1)) as stack:
        async with stack.client() as client, client.subscribe(stack.cluster, ["records"]):
            with pytest.raises(SessionError) as err:
                async with client.subscribe(stack.cluster, ["records"]):
                    pass
            assert err.value.code == "limit_exceeded"
            # another user is not affected
            async with (
                stack.client(token=stack.token(sub="bob")) as other,
                other.subscribe(stack.cluster, ["records"]),
            ):
                pass
        assert stack.proxy.refused["limit_exceeded"] == 1


async def test_streams_per_session(nats_url: str) -> None:
    async with make_stack(
        nats_url, streams=("a", "b"), limits=Limits(streams_per_session=1)
    ) as stack:
        async with stack.client() as client:
            with pytest.raises(SessionError) as err:
                async with client.subscribe(stack.cluster, ["a", "b"]):
                    pass
            assert err.value.code == "limit_exceeded"
            async with client.subscribe(stack.cluster, ["a"]):
                pass
        assert stack.proxy.refused["limit_exceeded"] == 1


async def test_envelope_size_limit(nats_url: str) -> None:
    async with make_stack(nats_url, limits=Limits(envelope_bytes=4096)) as stack:
        async with (
            stack.client(policy="discard") as client,
            client.subscribe(stack.cluster, ["records"]) as sub,
        ):
            await stack.agent.emit("records", [{"blob": "x" * 8000}])
            await eventually(lambda: stack.proxy.rejected["oversize"] >= 1)
            await stack.agent.emit("records", [{"small": 1}])
            rows, batches = await collect_rows(sub, 1)
            assert rows == [{"small": 1}]
            assert batches[0].lost_before == 1  # the consumer sees the gap


async def test_relay_rate_limit(nats_url: str) -> None:
    async with make_stack(nats_url, limits=Limits(session_rate=20.0, session_burst=5.0)) as stack:
        async with (
            stack.client(policy="discard") as client,
            client.subscribe(stack.cluster, ["records"]) as sub,
        ):
            await eventually(lambda: stack.agent.published >= 1)  # the key envelope
            for i in range(40):
                await stack.agent.emit("records", [{"i": i}])
                await stack.agent._publish(
                    "records", stack.agent._batchers["records"].flush() or b""
                )
            await eventually(lambda: stack.proxy.rejected["rate_limited"] >= 10)
            await asyncio.sleep(0.2)  # the bucket refills: the next envelope passes
            await stack.agent.emit("records", [{"last": True}])
            got = 0
            async with asyncio.timeout(5):
                async for batch in sub:
                    got += len(batch.rows)
                    if sub.stats().lost >= 10:
                        break
            assert got < 40
            assert sub.stats().lost >= 10


async def test_slow_consumer_drops_are_counted(nats_url: str) -> None:
    async with make_stack(nats_url) as stack:
        config = dataclasses.replace(stack.config(policy="discard"), queue_size=3)
        async with (
            Client(config, trust=stack.trust()) as client,
            client.subscribe(stack.cluster, ["records"]) as sub,
        ):
            for i in range(30):
                await stack.agent.emit("records", [{"i": i}])
                flushed = stack.agent._batchers["records"].flush()
                if flushed:
                    await stack.agent._publish("records", flushed)
            await eventually(lambda: sub.stats().dropped >= 20)
            assert sub.stats().received == sub.stats().dropped + 3


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_metrics_and_health(nats_url: str) -> None:
    async with make_stack(nats_url) as stack:
        from broker_proxy import Proxy
        from producers import Agent

        proxy_cfg = dataclasses.replace(stack.proxy.config, metrics_port=0, queue_group="m")
        agent_cfg = dataclasses.replace(stack.agent.config, metrics_port=0, cluster="c2")
        async with (
            Proxy(proxy_cfg) as proxy,
            Agent(agent_cfg, identity=stack.identity, streams=["records"]) as agent,
        ):
            assert proxy.metrics is not None
            assert agent.metrics is not None
            status, body = await asyncio.to_thread(_get, proxy.metrics.port, "/healthz")
            assert (status, json.loads(body)) == (200, {"status": "ok"})
            status, body = await asyncio.to_thread(_get, proxy.metrics.port, "/metrics")
            assert status == 200
            assert "sealstream_proxy_envelopes_relayed_total" in body
            assert "sealstream_proxy_relay_seconds_bucket" in body
            assert "sealstream_proxy_sessions" in body
            status, body = await asyncio.to_thread(_get, agent.metrics.port, "/metrics")
            assert "sealstream_producer_envelopes_published_total" in body
            assert (await asyncio.to_thread(_get, agent.metrics.port, "/nope"))[0] == 404
            proxy.rejected["unknown_session"] += 2
            _, body = await asyncio.to_thread(_get, proxy.metrics.port, "/metrics")
            assert 'sealstream_proxy_envelopes_rejected_total{reason="unknown_session"} 2.0' in body
            await agent._nc.close()
            status, _ = await asyncio.to_thread(_get, agent.metrics.port, "/healthz")
            assert status == 503
