"""Broker outages of any length, on loopback with real processes: no role crashes, every role
recovers, every loss is counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from broker_proxy import Limits, Proxy, ProxyConfig
from consumers import Batch, Client, ClientConfig, Resumed, Subscription
from producers import Agent, HttpEvents
from sealstream import IntegrityError, SessionError, TokenVerifier, mint_token
from sealstream.crypto import ClusterIdentity, ProducerSession, TrustStore
from sealstream.server import free_port
from tests.support.broker import Broker
from tests.support.pipeline import FAST_BATCHING, Gate, collect_rows, eventually, make_stack


@dataclass
class Reader:
    """Reads a ``resume=True`` subscription in the background, recording what arrives."""

    sub: Subscription[Batch | Resumed]
    batches: list[tuple[float, Batch]] = field(default_factory=list)
    resumes: list[Resumed] = field(default_factory=list)
    error: BaseException | None = None

    async def run(self) -> None:
        try:
            async for item in self.sub:
                if isinstance(item, Resumed):
                    self.resumes.append(item)
                else:
                    self.batches.append((time.monotonic(), item))
        except (SessionError, IntegrityError) as exc:
            self.error = exc

    def rows_after(self, t: float) -> int:
        return sum(len(b.rows) for at, b in self.batches if at > t)


@contextlib.asynccontextmanager
async def reading(sub: Subscription[Batch | Resumed]) -> AsyncIterator[Reader]:
    reader = Reader(sub)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(reader.run())
        try:
            yield reader
        finally:
            task.cancel()


def _dropped(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(
        r'^sealstream_producer_envelopes_dropped_total\{reason="buffer_full"\} (\S+)$', text, re.M
    )
    return int(float(match.group(1))) if match else 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("outage_s", [30, 120])
async def test_long_outage_producer_lives_and_counts_what_it_drops(
    broker: Broker, tmp_path: Path, outage_s: int
) -> None:
    """500 rows/s into a 1 MiB buffer: the producer process lives through the outage with
    bounded memory, drops the oldest envelopes and counts them; the consumer (resume on)
    streams again after the outage with no duplicate, and its lost count is the producer's
    drops plus at most what was in flight when the server died."""
    url = broker.start()
    prefix = "outage"
    secret = os.urandom(32)
    key_file = tmp_path / "cluster.jwk"
    identity = ClusterIdentity.load_or_create(key_file)
    buffer = 1024 * 1024
    metrics_port = free_port()
    env = {
        **os.environ,
        "NATS_URL": url,
        "SEALSTREAM_PREFIX": prefix,
        "SEALSTREAM_METRICS_PORT": str(metrics_port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "producers",
        "--cluster",
        "c1",
        "--key-file",
        str(key_file),
        "--source",
        "http_events",
        "--rate",
        "500",
        "--buffer-bytes",
        str(buffer),
        "--trust-relay-authorization",  # this test is about outages, not who may read
        "--log-level",
        "info",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    proxy_config = ProxyConfig(
        nats_url=url, prefix=prefix, token_secret=secret, keepalive_s=2.0, control_timeout_s=2.0
    )
    config = ClientConfig(
        nats_url=url,
        prefix=prefix,
        token=mint_token(sub="alice", clusters=["c1"], ttl_s=3600, secret=secret),
        key_kind="x25519",
        policy="discard",
        request_timeout_s=2.0,
    )
    try:
        async with (
            Proxy(proxy_config, verifier=TokenVerifier(secret=secret)),
            Client(config, trust=TrustStore({"c1": [identity.public_jwk]})) as client,
            client.subscribe("c1", ["http_events"], resume=True, retry_s=30) as sub,
            reading(sub) as reader,
        ):
            await eventually(lambda: reader.rows_after(0) > 1000, timeout=20)
            rss = psutil.Process(proc.pid)
            before = rss.memory_info().rss
            broker.kill()
            down_at = time.monotonic()
            peak = before
            while time.monotonic() - down_at < outage_s:
                await asyncio.sleep(1)
                assert proc.returncode is None, "the producer died during the outage"
                peak = max(peak, rss.memory_info().rss)
            await asyncio.to_thread(broker.start)
            back = time.monotonic()
            await eventually(lambda: reader.rows_after(back) > 0, timeout=15)
            await asyncio.sleep(3)  # what the producer held has arrived
            dropped = await asyncio.to_thread(_dropped, metrics_port)
            stats = sub.stats()
            assert reader.error is None
            assert peak - before < buffer + 32 * 1024 * 1024
            assert dropped > 0
            # nothing replayed, nothing reordered: seq only grows within a session
            assert "replay" not in stats.rejected
            seqs = [b.seq for _, b in reader.batches]
            assert seqs == sorted(set(seqs))
            # the session lived through the outage (the proxy does not count its own outage
            # against it); what it lost is what the producer dropped, and at most what was in
            # flight when the server was killed
            assert reader.resumes == []
            assert dropped <= stats.lost <= dropped + 5, (dropped, stats)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await proc.communicate()
    assert proc.returncode == 0
    text = stderr.decode()
    assert "Traceback" not in text
    assert "envelopes.dropped" in text  # counted, and said in the log


async def test_proxy_with_short_keepalive_does_not_end_sessions_for_its_own_outage(
    broker: Broker,
) -> None:
    """keepalive 2 s, a 10 s outage: neither the pings the proxy could not send nor the
    keepalives it could not receive end the session; it streams again afterwards."""
    url = broker.start()
    source = Gate(HttpEvents(rate=200, seed=3))
    async with (
        make_stack(url, sources=[source], streams=(), keepalive_s=2.0) as stack,
        stack.client(policy="discard") as client,
        client.subscribe(stack.cluster, ["http_events"]) as sub,
    ):
        source.open()
        await collect_rows(sub, 10)
        session = sub.session_id
        broker.kill()
        await asyncio.sleep(10)
        await asyncio.to_thread(broker.start)
        rows, _ = await collect_rows(sub, 50, timeout=20)
        assert len(rows) >= 50
        assert sub.session_id == session
        assert session in stack.agent.sessions
        assert stack.proxy.registry.get(session) is not None


async def test_resume_replaces_a_session_the_cluster_forgot(nats_url: str) -> None:
    """A producer that restarts forgets its sessions: the proxy ends them, and a resuming
    subscription opens a new one with a fresh key and says so."""
    async with make_stack(nats_url, keepalive_s=1.0) as stack:
        async with (
            stack.client() as client,
            client.subscribe(stack.cluster, ["records"], resume=True, retry_s=5) as sub,
        ):
            first = sub.session_id
            await stack.agent.emit("records", [{"i": 1}])
            item = await anext(sub)
            assert isinstance(item, Batch)
            await stack.agent._nc.close()  # a crash: no end envelope
            async with Agent(stack.agent.config, identity=stack.identity, streams=["records"]) as a:
                marker = await asyncio.wait_for(anext(sub), timeout=15)
                assert isinstance(marker, Resumed)
                assert marker.previous == first
                assert marker.session == sub.session_id != first
                assert "no longer serves" in marker.reason
                await a.emit("records", [{"i": 2}])
                item = await asyncio.wait_for(anext(sub), timeout=10)
                assert isinstance(item, Batch)
                assert item.rows == [{"i": 2}]
                assert sub.stats().sessions == 2
                assert sub.resumes == [marker]


async def test_an_authenticated_end_is_not_resumed(nats_url: str) -> None:
    async with make_stack(nats_url) as stack:
        async with (
            stack.client() as client,
            client.subscribe(stack.cluster, ["records"], resume=True) as sub,
        ):
            await stack.agent.emit("records", [{"i": 1}])
            assert isinstance(await anext(sub), Batch)
            await stack.agent.end_session(sub.session_id, "maintenance")
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(sub), timeout=10)
            assert sub.end_reason == "maintenance"
            assert sub.resumes == []


async def test_an_integrity_failure_under_fail_policy_is_not_resumed(nats_url: str) -> None:
    async with make_stack(nats_url) as stack:
        async with (
            stack.client(policy="fail") as client,
            client.subscribe(stack.cluster, ["records"], resume=True) as sub,
        ):
            await stack.agent.emit("records", [{"i": 1}])
            assert isinstance(await anext(sub), Batch)
            # the relay's position: publish a forged envelope on the inbox
            crypto = stack.agent.sessions[sub.session_id].crypto
            assert isinstance(crypto, ProducerSession)
            forged = bytearray(crypto.seal("records", b"\x80")[-1])
            forged[-3] ^= 1
            await stack.proxy._nc.publish(stack.subjects.inbox(sub.session_id), bytes(forged))
            with pytest.raises(IntegrityError):
                await asyncio.wait_for(anext(sub), timeout=10)
            assert sub.resumes == []


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_storm_of_600_opens_is_absorbed(nats_url: str) -> None:
    """600 sessions of 30 users opened at once against one proxy whose pending bound is 64,
    with the library's defaults: some opens are refused as busy, retried with backoff, and
    every session streams."""
    limits = Limits(pending_requests=64)
    source = Gate(HttpEvents(rate=20, seed=4))
    async with make_stack(
        nats_url,
        sources=[source],
        streams=(),
        limits=limits,
        batching=FAST_BATCHING,
        keepalive_s=10.0,
    ) as stack:
        source.open()
        async with contextlib.AsyncExitStack() as stack_of_clients:
            clients = [
                await stack_of_clients.enter_async_context(
                    stack.client(token=stack.token(sub=f"user{u}"), policy="discard")
                )
                for u in range(30)
            ]

            async def one(client: Client) -> int:
                # the library's defaults: busy refusals are retried for 30 s
                async with client.subscribe(stack.cluster, ["http_events"]) as sub:
                    async for item in sub:
                        if isinstance(item, Batch) and item.rows:
                            return len(item.rows)
                return 0

            async with asyncio.timeout(60):
                got = await asyncio.gather(*(one(clients[i % 30]) for i in range(600)))
        assert all(n > 0 for n in got)
        assert stack.proxy.refused["limit_exceeded"] > 0  # the storm did meet the bound
        assert stack.proxy.pending_peak <= limits.pending_requests
