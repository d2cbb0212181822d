"""Lossless delivery: the broker keeps what the cluster sealed (a JetStream stream per
cluster, file storage), a producer acknowledges only what is stored, and without JetStream
nothing changes. Real nats-servers, real roles."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from producers import Agent, ProducerConfig
from sealstream import BrokerError
from sealstream.crypto import ClusterIdentity
from sealstream.nats import connect
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.store import Store, stream_name
from tests.support.pipeline import collect_rows, contains_marker, make_stack
from tests.system.test_faults import free_port

MARKER = "PLAINTEXT-MARKER-h7Qz"


@dataclass
class Broker:
    """A single nats-server with a file store, killed and started again on the same port."""

    options: ServerOptions
    server: EmbeddedServer | None = None

    def start(self) -> str:
        self.server = EmbeddedServer(self.options)
        return self.server.start()

    def kill(self) -> None:
        assert self.server is not None
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.stop()
        self.server = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(ServerOptions(port=free_port(), store_dir=tmp_path / "js"))
    yield b
    if b.server is not None:
        b.server.stop()


async def stored(url: str, prefix: str, cluster: str) -> list[Any]:
    """Every message the cluster's store holds, read as a tap would (an ordered consumer)."""
    nc = await connect(url, name="test-store-tap")
    try:
        js = nc.jetstream()
        name = stream_name(prefix, cluster)
        count = (await js.stream_info(name)).state.messages
        sub = await js.subscribe(
            f"{prefix}.cluster.{cluster}.>", stream=name, ordered_consumer=True
        )
        messages = [await sub.next_msg(timeout=5) for _ in range(count)]
        await sub.unsubscribe()
        return messages
    finally:
        await nc.close()


async def test_emit_returns_once_stored_and_the_store_holds_ciphertext_only(
    broker: Broker,
) -> None:
    url = broker.start()
    async with (
        make_stack(url, store=Store(max_age_s=60)) as stack,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        rows = [{"i": i, "secret": f"{MARKER}-{i}"} for i in range(50)]
        for i in range(0, 50, 10):
            await stack.agent.emit("records", rows[i : i + 10])
            # returned: every envelope it sealed is in the store, none waits in the outbox
            assert not stack.agent.outbox
        got, _ = await collect_rows(sub, 50)
        assert got == rows
        messages = await stored(url, stack.prefix, stack.cluster)
        session = sub.session_id
        subjects = {m.subject for m in messages}
        assert subjects == {stack.subjects.data(stack.cluster, session)}
        assert len(messages) == stack.agent.published == 6  # the key envelope and 5 batches
        assert not any(contains_marker(m.data, MARKER) for m in messages)
        assert all(not m.headers for m in messages)  # the envelope, byte for byte, nothing else


async def test_while_the_broker_is_away_emit_waits_and_then_delivers(broker: Broker) -> None:
    """Backpressure, not "taken": an emit during the outage returns only after the broker is
    back and has stored its rows; none is lost, none duplicated."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(ack_timeout_s=1.0)) as stack,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"], resume=True) as sub,
    ):
        await stack.agent.emit("records", [{"i": 0}])
        broker.kill()
        async with asyncio.TaskGroup() as tg:
            pending = tg.create_task(stack.agent.emit("records", [{"i": 1}]))
            done, _ = await asyncio.wait({pending}, timeout=1.5)
            assert not done  # told to wait
            assert stack.agent.outbox  # held, not dropped
            broker.start()
        assert stack.agent.outbox.dropped == {}
        messages = await stored(url, stack.prefix, stack.cluster)
        data = stack.subjects.data(stack.cluster, sub.session_id)
        assert len({m.data for m in messages if m.subject == data}) == 3  # key, row 0, row 1


async def test_a_store_needs_jetstream_and_the_plain_path_needs_none(tmp_path: Path) -> None:
    """On a plain NATS (no JetStream) a producer asked for a store refuses to start, and one
    without a store works as before (at most once)."""
    with EmbeddedServer(ServerOptions(jetstream=False)) as server:
        identity = ClusterIdentity.generate()
        config = ProducerConfig(
            cluster="-plain_1",  # an id starting with "-": a subject token and a stream name
            nats_url=server.url,
            trust_relay_authorization=True,
            store=Store(),
        )
        with pytest.raises(BrokerError, match="no JetStream"):
            async with Agent(config, identity=identity, streams=["records"]):
                pass
        async with (
            make_stack(server.url, shared_registry=False) as stack,
            stack.client() as client,
            client.subscribe(stack.cluster, ["records"]) as sub,
        ):
            await stack.agent.emit("records", [{"i": 0}])
            got, _ = await collect_rows(sub, 1)
            assert got == [{"i": 0}]


def test_store_names_and_limits() -> None:
    assert stream_name("sealstream", "-a_b") == "sealstream_store_-a_b"
    assert stream_name("acme.prod", "c1") == "acme_prod_store_c1"
    config = Store().stream_config("sealstream", "c1")
    assert config.subjects == ["sealstream.cluster.c1.data.*", "sealstream.cluster.c1.group.*"]
    assert (config.max_age, config.max_bytes) == (600.0, 256 * 1024 * 1024)
    with pytest.raises(ValueError, match="prefix"):
        stream_name("bad prefix", "c1")
    with pytest.raises(ValueError, match="replicas"):
        Store(replicas=0)
