"""Lossless delivery: the broker keeps what the cluster sealed (a JetStream stream per
cluster, file storage), a producer acknowledges only what is stored, and without JetStream
nothing changes. Real nats-servers, real roles."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumers import Client
from producers import Agent, ProducerConfig
from sealstream import BrokerError, IntegrityError, SessionError
from sealstream.crypto import ClusterIdentity
from sealstream.nats import connect
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.store import Store, stream_name
from tests.support.pipeline import collect_rows, contains_marker, eventually, make_stack
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


# --- sessions outlive connections: 0 lost, 0 duplicates, 0 out of order -----------------------


@dataclass
class Numbered:
    """Emits rows numbered 0, 1, 2... one emit at a time; ``returned`` counts the emits that
    returned (stored, with a store)."""

    agent: Agent
    pause_s: float = 0.005
    returned: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.agent.emit("records", [{"n": self.returned, "secret": MARKER}])
            self.returned += 1
            await asyncio.sleep(self.pause_s)  # a pace, not a synchronisation

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Reader:
    """Reads a subscription in the background: the row numbers in the order they came."""

    sub: Any
    numbers: list[int] = field(default_factory=list)
    error: BaseException | None = None

    async def run(self) -> None:
        try:
            async for batch in self.sub:
                self.numbers.extend(row["n"] for row in batch.rows)
        except (SessionError, IntegrityError) as exc:
            self.error = exc


@contextlib.asynccontextmanager
async def streaming(agent: Agent, sub: Any) -> AsyncIterator[tuple[Numbered, Reader]]:
    """Numbered rows flow from ``agent`` to ``sub`` while the block runs; at its end the
    emitting stops, and every row whose emit returned has to arrive."""
    emitter, reader = Numbered(agent), Reader(sub)
    async with asyncio.TaskGroup() as tg:
        reading = tg.create_task(reader.run())
        emitting = tg.create_task(emitter.run())
        await eventually(lambda: len(reader.numbers) >= 20, timeout=10)
        try:
            yield emitter, reader
        finally:
            emitter.stop()
            await emitting
            await eventually(
                lambda: len(reader.numbers) >= emitter.returned or reader.error is not None,
                timeout=30,
            )
            reading.cancel()


def check_lossless(emitter: Numbered, reader: Reader, sub: Any) -> None:
    assert reader.error is None
    assert reader.numbers == list(range(emitter.returned))  # none lost, duplicated, reordered
    stats = sub.stats()
    assert (stats.lost, stats.rejected, stats.sessions) == (0, {}, 1)


async def test_a_broker_restart_loses_nothing(broker: Broker) -> None:
    """nats-server killed (SIGKILL) and started again on its file store: the session goes on
    (same key, same seq line), what was in flight is replayed from the store."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(ack_timeout_s=1.0)) as stack,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
        streaming(stack.agent, sub) as (emitter, reader),
    ):
        broker.kill()
        await asyncio.to_thread(broker.start)
        before = len(reader.numbers)
        await eventually(lambda: len(reader.numbers) > before + 50, timeout=30)
    check_lossless(emitter, reader, sub)


class Splice:
    """A TCP relay to a NATS server whose connections can be cut for a while (a consumer's
    network going away): while cut, every connection is closed and the port refuses new
    ones (nats-py leaks the socket of a connection closed before the server's INFO)."""

    def __init__(self, target: str) -> None:
        host, port = target.split("//")[-1].rsplit(":", 1)
        self._target = (host, int(port))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._serving = 0
        self._idle = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Splice:
        await self.mend()
        self.port = self._server.sockets[0].getsockname()[1] if self._server else 0
        self._idle.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sever()
        await self._idle.wait()  # every connection handled to its end

    def sever(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.close()

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._serving += 1
        self._idle.clear()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._writers |= {writer, up_writer}
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(_pipe(reader, up_writer))
                    tg.create_task(_pipe(up_reader, writer))
            finally:
                self._writers -= {writer, up_writer}
                await _close(up_writer)
        finally:
            await _close(writer)
            self._serving -= 1
            if not self._serving:
                self._idle.set()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_a_consumer_cut_off_for_5_s_loses_nothing(broker: Broker) -> None:
    url = broker.start()
    async with (
        make_stack(url, store=Store()) as stack,
        Splice(url) as splice,
        Client(
            dataclasses.replace(stack.config(), nats_url=splice.url), trust=stack.trust()
        ) as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
        streaming(stack.agent, sub) as (emitter, reader),
    ):
        splice.sever()
        await asyncio.sleep(5.0)  # the outage itself
        await splice.mend()
        before = len(reader.numbers)
        await eventually(lambda: len(reader.numbers) > before + 50, timeout=30)
    check_lossless(emitter, reader, sub)
