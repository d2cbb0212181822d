"""Lossless delivery: the broker keeps what the cluster sealed (a JetStream stream per
cluster, file storage), a producer acknowledges only what is stored, and without JetStream
nothing changes. Real nats-servers, real roles."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumers import Client, ClientConfig, Resumed
from producers import Agent, ProducerConfig
from sealstream import BrokerError, IntegrityError, KeyMode, SessionError, mint_token
from sealstream.control import KeptAlive, Ok, Replayed
from sealstream.crypto import ClusterIdentity, TrustStore
from sealstream.nats import connect
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.store import Store, ensure_stream, stream_name
from tests.support.broker import Broker, cluster_nodes
from tests.support.helpers import env_map, gen_key
from tests.support.pipeline import (
    FAST_BATCHING,
    Tap,
    collect_rows,
    contains_marker,
    eventually,
    make_stack,
)
from tests.system.test_ha import SECRET, ProxyProcess

MARKER = "PLAINTEXT-MARKER-h7Qz"


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


async def test_concurrent_emits_share_batches_and_each_returns_once_its_rows_are_stored(
    broker: Broker,
) -> None:
    """Group commit: 8 callers emitting 10 rows at a time get fewer, fuller batches than one
    per call; every row arrives once, each caller's rows in its order."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(max_age_s=60)) as stack,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):

        async def caller(c: int) -> None:
            for k in range(0, 100, 10):
                await stack.agent.emit("records", [{"c": c, "k": k + j} for j in range(10)])

        async with asyncio.TaskGroup() as tg:
            for c in range(8):
                tg.create_task(caller(c))
        assert not stack.agent.outbox  # every emit returned: all of it is stored
        got, _ = await collect_rows(sub, 800)
        assert len(got) == 800
        for c in range(8):
            assert [r["k"] for r in got if r["c"] == c] == list(range(100))
        # the 8 first calls are made together: one batch for them, not 8 (the key envelope
        # and at most 73 batches for 80 calls)
        assert stack.agent.published <= 74


async def test_many_large_concurrent_emits_are_all_stored_none_dropped(broker: Broker) -> None:
    """30 callers with a 200 kB row each: together 6 MB, more than the outbox's 4 MiB bound.
    Each batch waits for room before it is put (the outbox of a producer with a store never
    drops what callers were promised): every row arrives, nothing is dropped."""
    url = broker.start()
    big = "x" * 200_000
    async with (
        make_stack(url, store=Store(max_age_s=60)) as stack,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        await stack.agent.emit("records", [{"i": -1, "b": big}])
        async with asyncio.TaskGroup() as tg:
            for i in range(30):
                tg.create_task(stack.agent.emit("records", [{"i": i, "b": big}]))
        assert stack.agent.outbox.dropped == {}
        got, _ = await collect_rows(sub, 31, timeout=30)
        assert sorted(r["i"] for r in got) == list(range(-1, 30))


async def test_a_producer_stopping_while_emits_wait_for_the_broker_ends_them(
    broker: Broker,
) -> None:
    """The broker away, one commit waiting for its store and calls gathered behind it: the
    agent stops within its 2 s of grace, and every waiting emit ends with a BrokerError (its
    rows are not said to be stored), none hangs."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(ack_timeout_s=1.0)) as stack,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]),
    ):
        await stack.agent.emit("records", [{"i": 0}])
        broker.kill()
        async with asyncio.TaskGroup() as tg:
            emits = [
                tg.create_task(_outcome(stack.agent.emit("records", [{"i": i}]))) for i in range(5)
            ]
            await asyncio.sleep(0.5)
            assert not any(e.done() for e in emits)
            async with asyncio.timeout(15):
                await stack.agent.aclose()
        assert [type(e.result()) for e in emits] == [BrokerError] * 5


async def _outcome(emit: Any) -> BaseException | None:
    try:
        await emit
    except BrokerError as exc:
        return exc
    return None


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
                if not isinstance(batch, Resumed):
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
            last = emitter.returned - 1
            await eventually(
                lambda: last in reader.numbers[-1:] or reader.error is not None, timeout=30
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


async def _cut_off(
    broker: Broker, cut_s: float, key_mode: KeyMode = "session", **proxy: Any
) -> tuple[Numbered, Reader, Any, int]:
    """A consumer whose connection is cut for ``cut_s`` while rows flow; the envelopes the
    proxy replayed from the store."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(), **proxy) as stack,
        Splice(url) as splice,
        Client(
            dataclasses.replace(stack.config(), nats_url=splice.url, key_mode=key_mode),
            trust=stack.trust(),
        ) as client,
        client.subscribe(stack.cluster, ["records"], resume=True) as sub,
        streaming(stack.agent, sub) as (emitter, reader),
    ):
        splice.sever()
        await asyncio.sleep(cut_s)  # the outage itself
        await splice.mend()
        mended = emitter.returned  # rows emitted since then arrive too (a new session's)
        await eventually(lambda: reader.numbers[-1] > mended + 50, timeout=60)
    return emitter, reader, sub, stack.proxy.replayed


async def test_a_consumer_cut_off_for_5_s_loses_nothing(broker: Broker) -> None:
    emitter, reader, sub, replayed = await _cut_off(broker, 5.0)
    check_lossless(emitter, reader, sub)
    assert replayed > 0  # what the cut missed came from the store


async def test_a_cut_longer_than_three_keepalives_keeps_a_store_session(broker: Broker) -> None:
    """With a store the proxy keeps a session past 3 missed keepalives (its grace): a consumer
    back after 6 s, its keepalive 1 s, finds its session and loses nothing; without the grace
    the proxy expired it and the consumer resumed with a new session."""
    emitter, reader, sub, replayed = await _cut_off(broker, 6.0, keepalive_s=1.0)
    check_lossless(emitter, reader, sub)
    assert replayed > 0


async def test_a_group_member_cut_off_longer_than_three_keepalives_loses_nothing(
    broker: Broker,
) -> None:
    """Group mode has the grace too, and its batches are replayed: back after 6 s (keepalive
    1 s), the member finds its session, keys and gseq line, holds the batches past the gap
    and asks the store for what its group sealed meanwhile: every row once, in order."""
    emitter, reader, sub, replayed = await _cut_off(broker, 6.0, key_mode="group", keepalive_s=1.0)
    check_lossless(emitter, reader, sub)
    assert replayed > 0


async def test_without_the_grace_a_long_cut_ends_the_session(broker: Broker) -> None:
    _, reader, sub, _ = await _cut_off(broker, 6.0, keepalive_s=1.0, store_grace_s=0.0)
    assert reader.error is None
    assert sub.stats().sessions == 2  # expired while cut off: resumed with a new one
    assert len(sub.resumes) == 1


async def test_an_ended_session_is_its_owners_to_read_and_close_only(broker: Broker) -> None:
    """A session the proxy expired is kept for its owner's last resume: replayed to its
    owner, refused to anyone else, not kept alive, its id not opened again; its owner's
    close forgets it at once (a second close finds nothing)."""
    url = broker.start()
    key = gen_key("x25519")
    async with (
        make_stack(url, store=Store(), keepalive_s=1.0, store_grace_s=0.0) as stack,
        stack.client() as other,
    ):
        registry = stack.proxy._core.registry
        async with (
            Splice(url) as splice,
            Client(
                dataclasses.replace(stack.config(), nats_url=splice.url), trust=stack.trust()
            ) as client,
            client.subscribe(stack.cluster, ["records"], key=key) as sub,
        ):
            for i in range(2):
                await stack.agent.emit("records", [{"i": i}])
            await collect_rows(sub, 2)
            session = sub.session_id
            splice.sever()  # no keepalive: the proxy expires the session
            await eventually(lambda: registry.get(session) is None, timeout=10)
        assert registry.ended(session, now=stack.proxy._core.clock()) is not None
        ref = {"v": 1, "token": stack.token(), "session": session}
        subjects = stack.subjects
        ask = {**ref, "after": 0}
        assert await other.request(subjects.api_resume, ask, Replayed) == Replayed(2, first=1)
        mallory = {"token": stack.token(sub="mallory")}
        for subject, body in (
            (subjects.api_resume, {**ask, **mallory}),
            (subjects.api_close, {**ref, **mallory}),
        ):
            with pytest.raises(SessionError) as refused:
                await other.request(subject, body, Ok)
            assert refused.value.code == "forbidden"
        with pytest.raises(SessionError) as refused:
            await other.request(subjects.api_keepalive, ref, KeptAlive)
        assert refused.value.code == "bad_request"
        with pytest.raises(SessionError, match="use a new key"):
            async with other.subscribe(stack.cluster, ["records"], key=key):
                pass
        assert await other.request(subjects.api_close, ref, Ok) == Ok()
        assert registry.ended(session, now=stack.proxy._core.clock()) is None
        with pytest.raises(SessionError) as refused:
            await other.request(subjects.api_close, ref, Ok)
        assert refused.value.code == "bad_request"


async def _cut_past_the_end(splice: Splice, emitter: Numbered, reader: Reader, sub: Any) -> int:
    """Cut the consumer off for 6 s (past 3 keepalives of 1 s: its session expires), then
    wait for its next session's rows; the number of the first row emitted during the cut."""
    cut_at = emitter.returned
    splice.sever()
    await asyncio.sleep(6.0)  # the outage itself
    await splice.mend()
    await eventually(lambda: bool(sub.resumes), timeout=30)
    before = len(reader.numbers)  # and rows of the new session too
    await eventually(lambda: len(reader.numbers) > before + 50, timeout=30)
    return cut_at


async def test_an_ended_sessions_stored_envelopes_are_read_before_the_next_session(
    broker: Broker,
) -> None:
    """A consumer cut off past its session's end (keepalive 1 s, no grace): back, it is told
    the session is gone, reads what the store keeps of it past its last accepted ``seq``
    (the proxy keeps an ended session for its owner's last resume), and only then opens a
    new session: every row sealed for the old session arrives, once, in order, nothing
    counted lost; the rows emitted while it had no session were sealed for no one."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(), keepalive_s=1.0, store_grace_s=0.0) as stack,
        Splice(url) as splice,
        Client(
            dataclasses.replace(stack.config(), nats_url=splice.url), trust=stack.trust()
        ) as client,
        client.subscribe(stack.cluster, ["records"], resume=True) as sub,
        streaming(stack.agent, sub) as (emitter, reader),
    ):
        cut_at = await _cut_past_the_end(splice, emitter, reader, sub)
    assert reader.error is None
    numbers = reader.numbers
    assert numbers == sorted(set(numbers))  # no duplicate, nothing out of order
    stats = sub.stats()
    assert (stats.sessions, stats.lost, stats.rejected) == (2, 0, {})
    (resumed,) = sub.resumes
    assert resumed.drained > 0
    assert not resumed.carried
    # then it closed the ended session: the proxy forgot it
    assert stack.proxy._core.registry.ended(resumed.previous, now=time.monotonic()) is None
    # the rows sealed for the old session while it was cut off (the proxy let it go 2 to 3 s
    # in) came from the store before the new session
    assert {cut_at, cut_at + 10} <= set(numbers)


async def test_a_members_next_session_reads_the_gap_and_counts_what_it_lost_exactly(
    broker: Broker,
) -> None:
    """A group member cut off past its session's end (keepalive 1 s, no grace) while another
    member keeps the group's batches flowing: its next session goes on with the group's line
    and kept keys, reads from the store the batches sealed under those keys while it was cut
    off, and counts exactly the batches sealed after the producer let it go (1 row each):
    every row once, in order, the missing ones exactly ``lost``."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(), keepalive_s=1.0, store_grace_s=0.0) as stack,
        stack.client(key_mode="group") as other,
        other.subscribe(stack.cluster, ["records"]) as witness,
        Splice(url) as splice,
        Client(
            dataclasses.replace(stack.config(), nats_url=splice.url, key_mode="group"),
            trust=stack.trust(),
        ) as client,
        client.subscribe(stack.cluster, ["records"], resume=True) as sub,
    ):
        witnessed = Reader(witness)
        async with asyncio.TaskGroup() as tg:
            watching = tg.create_task(witnessed.run())
            async with streaming(stack.agent, sub) as (emitter, reader):
                cut_at = await _cut_past_the_end(splice, emitter, reader, sub)
            await eventually(lambda: len(witnessed.numbers) == emitter.returned, timeout=30)
            watching.cancel()
        # the other member got every row: the group's batches went on all along
        assert witnessed.numbers == list(range(emitter.returned))
    assert reader.error is None
    numbers = reader.numbers
    assert numbers == sorted(set(numbers))  # no duplicate, nothing out of order
    stats = sub.stats()
    assert (stats.sessions, [r.carried for r in sub.resumes]) == (2, [True])
    assert stats.lost == emitter.returned - len(numbers) > 0  # exactly what it did not get
    assert (stats.gaps, stats.rejected) == (1, {})
    # the rows sealed under the key it kept (the producer let the session go 2 to 3 s into
    # the cut) came from the store
    assert {cut_at, cut_at + 10} <= set(numbers)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_consumer_cut_off_for_60_s_loses_nothing(broker: Broker) -> None:
    """The defaults (keepalive 10 s, a store session's grace 120 s): a minute away, then
    every row once, in order, in the same session, the gap read from the store."""
    emitter, reader, sub, replayed = await _cut_off(broker, 60.0)
    check_lossless(emitter, reader, sub)
    assert replayed > 0


@pytest.mark.parametrize("key_mode", ["session", "group"])
async def test_one_proxy_of_two_killed_loses_nothing(
    nats_url: str, tmp_path: Path, key_mode: KeyMode
) -> None:
    """Two proxies share the session's envelopes one by one (out of order at the inbox): the
    consumer holds and orders them; one is killed mid-stream, what it held is replayed. The
    same in group mode, by gseq (a batch ahead of its key is covered by the hold's unit
    tests and the page's client test: this run does not force that order)."""
    prefix = f"ll{os.getpid()}"
    a, b = (ProxyProcess(nats_url, prefix, tmp_path, name) for name in "ab")
    identity = ClusterIdentity.generate()
    config = ProducerConfig(
        cluster="c1",
        nats_url=nats_url,
        prefix=prefix,
        batching=FAST_BATCHING,
        trust_relay_authorization=True,  # about proxies, not authorization
        store=Store(max_age_s=60),
    )
    client_config = ClientConfig(
        nats_url=nats_url,
        prefix=prefix,
        token=mint_token(sub="u", clusters=["c1"], secret=SECRET),
        key_kind="x25519",
        key_mode=key_mode,
        policy="fail",  # a replay or a forgery would raise
    )
    try:
        await asyncio.gather(a.start(), b.start())
        async with (
            Agent(config, identity=identity, streams=["records"]) as agent,
            Client(client_config, trust=TrustStore({"c1": [identity.public_jwk]})) as client,
            client.subscribe("c1", ["records"]) as sub,
            streaming(agent, sub) as (emitter, reader),
        ):
            await a.kill()
            before = len(reader.numbers)
            await eventually(lambda: len(reader.numbers) > before + 100, timeout=30)
        check_lossless(emitter, reader, sub)
    finally:
        await a.stop()
        await b.stop()


_PRODUCER = """
import asyncio, sys
from pathlib import Path
from producers import Agent, ProducerConfig
from sealstream.crypto import ClusterIdentity
from sealstream.store import Store

async def main(url: str, prefix: str, key_file: str) -> None:
    config = ProducerConfig(
        cluster="c2", nats_url=url, prefix=prefix, trust_relay_authorization=True,
        store=Store(max_age_s=60),
    )
    identity = ClusterIdentity.load_or_create(Path(key_file))
    async with Agent(config, identity=identity, streams=["records"]) as agent:
        while not agent.sessions:
            await asyncio.sleep(0.01)
        n = 0
        while True:
            await agent.emit("records", [{"n": n}])
            print("returned", n, flush=True)
            n += 1

asyncio.run(main(*sys.argv[1:]))
"""


def _returned(line: bytes) -> list[int]:
    """The number of an emit that returned, from the producer's line (its log aside)."""
    word, _, number = line.decode().strip().partition(" ")
    return [int(number)] if word == "returned" else []


async def test_every_emit_that_returned_survives_a_sigkill(broker: Broker, tmp_path: Path) -> None:
    url = broker.start()
    key_file = tmp_path / "c2.jwk"
    identity = ClusterIdentity.load_or_create(key_file)
    # a store grace of 3 s: the killed producer's sessions end 3 s into its silence
    async with make_stack(url, store=Store(), keepalive_s=1.0, store_grace_s=3.0) as stack:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _PRODUCER,
            url,
            stack.prefix,
            str(key_file),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        returned: list[int] = []
        try:
            trust = TrustStore({"c2": [identity.public_jwk]})
            async with (
                stack.client(trust=trust, token=stack.token(clusters=["c2"])) as client,
                client.subscribe("c2", ["records"]) as sub,
            ):
                reader = Reader(sub)
                async with asyncio.TaskGroup() as tg:
                    reading = tg.create_task(reader.run())
                    while len(returned) < 200:
                        returned.extend(_returned(await proc.stdout.readline()))
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    # a line the kill cut short is not counted (its number may be cut too)
                    for line in (await proc.stdout.read()).splitlines(keepends=True):
                        returned.extend(_returned(line) if line.endswith(b"\n") else [])
                    # the proxy ends the session (its grace) after what was stored
                    await reading
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert isinstance(reader.error, SessionError)
    assert reader.error.code == "ended"
    assert reader.numbers[: len(returned)] == returned  # every emit that returned, in order
    assert sub.stats().rejected == {}


async def test_only_the_sessions_owner_gets_a_replay_of_the_original_bytes(
    broker: Broker,
) -> None:
    """The resume request is checked like a keepalive; its replay is the stored bytes, on the
    session's inbox, then the answer; without a store it is refused as such."""
    url = broker.start()
    async with (
        make_stack(url, store=Store()) as stack,
        Tap(url, stack.subjects.inbox("*")) as tap,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        await stack.agent.emit("records", [{"i": 0}])
        await stack.agent.emit("records", [{"i": 1}])
        await collect_rows(sub, 2)
        await tap.flush()
        inbox = stack.subjects.inbox(sub.session_id)
        live = [m.data for m in tap.on(inbox)]
        assert len(live) == 3  # key, row 0, row 1
        resume = stack.subjects.api_resume
        ask = {"v": 1, "token": stack.token(), "session": sub.session_id, "after": 0}
        assert await client.request(resume, ask, Replayed) == Replayed(2, first=1)
        assert stack.proxy.replayed == 2
        await tap.flush()
        assert [m.data for m in tap.on(inbox)] == live + live[1:]  # byte for byte, in order
        # a page at a time: at most ``limit``, then from where the answer said to read next
        first = await client.request(resume, {**ask, "limit": 1}, Replayed)
        assert (first.replayed, first.more, first.first) == (1, True, 1)
        assert first.cursor is not None
        page = {**ask, "after": 1, "limit": 1, "cursor": first.cursor}
        second = await client.request(resume, page, Replayed)
        assert (second.replayed, second.more, second.first) == (1, False, 2)
        await tap.flush()
        assert [m.data for m in tap.on(inbox)][-2:] == live[1:]
        for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": True}, {"cursor": 0}):
            with pytest.raises(SessionError) as refused:
                await client.request(resume, {**ask, **bad}, Replayed)
            assert refused.value.code == "bad_request", bad
        assert stack.proxy.replayed == 4
        with pytest.raises(SessionError) as refused:
            await client.request(resume, {**ask, "token": stack.token(sub="mallory")}, Replayed)
        assert refused.value.code == "forbidden"
        with pytest.raises(SessionError) as refused:
            await client.request(resume, {**ask, "session": "-" + "A" * 42}, Replayed)
        assert refused.value.code == "bad_request"  # unknown session
        with pytest.raises(SessionError) as refused:
            await client.request(resume, {**ask, "after": 0.0}, Replayed)
        assert refused.value.code == "bad_request"
        with pytest.raises(SessionError, match="not a member") as refused:
            await client.request(resume, {**ask, "group": "records"}, Replayed)
        assert refused.value.code == "bad_request"  # a session-mode session has no group
        assert len(tap.on(inbox)) == 7  # nothing replayed for a refused request
    async with (
        make_stack(url) as stack,  # a cluster without a store, on the same server
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        ask = {"v": 1, "token": stack.token(), "session": sub.session_id, "after": -1}
        with pytest.raises(SessionError, match="no store") as refused:
            await client.request(stack.subjects.api_resume, ask, Replayed)
        assert refused.value.code == "bad_request"
        assert sub._live is not None
        assert sub._live.store is False  # told at its open: it holds nothing, asks nothing


async def test_a_group_member_gets_its_groups_stored_batches_and_only_those(
    broker: Broker,
) -> None:
    """A group resume replays the group subject's stored batches past ``after`` (a gseq),
    byte for byte, on the member's inbox; a group the session is not a member of is
    refused and replays nothing."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(), streams=("records", "other")) as stack,
        Tap(url, stack.subjects.inbox("*")) as tap,
        stack.client(key_mode="group") as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        for i in range(3):
            await stack.agent.emit("records", [{"i": i}])
        await collect_rows(sub, 3)
        await tap.flush()
        inbox = stack.subjects.inbox(sub.session_id)
        batches = [m.data for m in tap.on(inbox) if env_map(m.data)["kind"] == "group"]
        assert [env_map(b)["gseq"] for b in batches] == [0, 1, 2]
        resume = stack.subjects.api_resume
        ask = {"v": 1, "token": stack.token(), "session": sub.session_id, "after": 0}
        answer = await client.request(resume, {**ask, "group": "records"}, Replayed)
        assert answer == Replayed(2, first=1)
        await tap.flush()
        assert [m.data for m in tap.on(inbox)][-2:] == batches[1:]  # the stored bytes
        count = len(tap.on(inbox))
        for group in ("other", "nope"):
            with pytest.raises(SessionError, match="not a member") as refused:
                await client.request(resume, {**ask, "group": group}, Replayed)
            assert refused.value.code == "bad_request"
        await tap.flush()
        assert len(tap.on(inbox)) == count


async def test_past_retention_the_exact_count_is_lost(broker: Broker) -> None:
    """A consumer away longer than the store keeps envelopes: what retention dropped is a gap,
    counted exactly (one envelope per emit here), and everything else arrives once, in order."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(max_age_s=1.0)) as stack,
        Splice(url) as splice,
        Client(
            dataclasses.replace(stack.config(), nats_url=splice.url), trust=stack.trust()
        ) as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
        streaming(stack.agent, sub) as (emitter, reader),
    ):
        splice.sever()
        await asyncio.sleep(4.0)  # the outage, longer than the retention
        await splice.mend()
        before = len(reader.numbers)
        await eventually(lambda: len(reader.numbers) > before + 50, timeout=30)
    assert reader.error is None
    numbers = reader.numbers
    assert numbers == sorted(set(numbers))  # no duplicate, nothing out of order
    stats = sub.stats()
    assert stats.lost == emitter.returned - len(numbers) > 0
    assert (stats.gaps, stats.rejected) == (1, {})


async def _read_slowly(sub: Any, numbers: list[int], count: int, pause_s: float) -> None:
    async for batch in sub:
        numbers.extend(row["n"] for row in batch.rows)
        if len(numbers) >= count:
            return
        await asyncio.sleep(pause_s)  # a consumer slower than its stream


async def test_a_consumer_slower_than_its_stream_reads_the_store_at_its_own_pace(
    broker: Broker,
) -> None:
    """A consumer 10x slower than the stream, its queue 8 envelopes: it falls behind, reads
    what follows its last accepted seq from the store a page at a time, loses nothing and
    duplicates nothing, and is back on the live stream once a page reached the store's end."""
    url = broker.start()
    async with (
        make_stack(url, store=Store(max_age_s=60)) as stack,
        Client(dataclasses.replace(stack.config(), queue_size=8), trust=stack.trust()) as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        numbers: list[int] = []
        async with asyncio.TaskGroup() as tg:
            reading = tg.create_task(_read_slowly(sub, numbers, 300, 0.01))
            for n in range(300):  # one envelope each, faster than it is read
                await stack.agent.emit("records", [{"n": n, "secret": MARKER}])
            await asyncio.wait_for(reading, timeout=60)
        assert numbers == list(range(300))
        stats = sub.stats()
        assert stats.deferred > 0  # it was behind: let go live, read again from the store
        assert (stats.lost, stats.dropped, stats.rejected, stats.sessions) == (0, 0, {}, 1)
        # caught up: the live stream again
        await stack.agent.emit("records", [{"n": 300, "secret": MARKER}])
        got, _ = await collect_rows(sub, 1)
        assert got == [{"n": 300, "secret": MARKER}]
        assert sub._live is not None
        assert not sub._live.behind
        assert sub.stats().lost == 0


async def test_behind_past_retention_the_exact_count_is_lost(broker: Broker) -> None:
    """A consumer that reads nothing while the store's byte bound pushes out its oldest
    envelopes: the page past the gap is taken, the gap counted exactly, the rest in order."""
    url = broker.start()
    pad = "x" * 10_000  # ~100 envelopes fill the 1 MiB store
    async with (
        make_stack(url, store=Store(max_bytes=1024 * 1024)) as stack,
        Client(dataclasses.replace(stack.config(), queue_size=8), trust=stack.trust()) as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        for n in range(300):  # nobody reads: 8 queued, the rest let go and stored
            await stack.agent.emit("records", [{"n": n, "pad": pad}])
        numbers: list[int] = []

        async def until_last() -> None:
            async for batch in sub:
                numbers.extend(row["n"] for row in batch.rows)
                if numbers[-1] == 299:
                    return

        await asyncio.wait_for(until_last(), timeout=30)
    assert numbers == sorted(set(numbers))  # no duplicate, nothing out of order
    assert numbers[0] == 0  # what the queue held before it fell behind
    stats = sub.stats()
    assert stats.lost == 300 - len(numbers) > 0  # what retention dropped, exactly
    assert (stats.gaps, stats.rejected, stats.dropped) == (1, {}, 0)
    assert stats.deferred > 0


def test_a_producer_is_given_a_store_by_its_environment() -> None:
    assert ProducerConfig.from_env({"SEALSTREAM_CLUSTER": "c1"}).store is None
    config = ProducerConfig.from_env(
        {"SEALSTREAM_CLUSTER": "c1", "SEALSTREAM_STORE": "1", "SEALSTREAM_STORE_REPLICAS": "3"}
    )
    assert config.store == Store(replicas=3)
    with pytest.raises(ValueError, match="SEALSTREAM_STORE"):
        ProducerConfig.from_env({"SEALSTREAM_CLUSTER": "c1", "SEALSTREAM_STORE": "yes"})


async def _jetstream_ready(url: str) -> None:
    """Wait until the cluster's JetStream has a meta leader and places an R3 stream."""
    nc = await connect(url, name="test-js-ready")
    try:
        js = nc.jetstream(timeout=2)
        async with asyncio.timeout(30):
            while True:
                try:
                    await ensure_stream(js, Store(replicas=3), prefix="probe", cluster="c1")
                    await js.delete_stream(stream_name("probe", "c1"))
                    return
                except BrokerError:
                    await asyncio.sleep(0.2)  # a leader is being elected: ask again
    finally:
        await nc.close()


async def test_a_node_of_a_three_node_cluster_killed_loses_nothing(tmp_path: Path) -> None:
    """The store replicated on 3 nodes (R3): the producer's node is killed (SIGKILL); every
    role moves to another node and the session loses nothing."""
    nodes = cluster_nodes(tmp_path)
    ports = [node.port for node in nodes]
    try:
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
        urls = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        await _jetstream_ready(urls)
        async with (
            make_stack(urls, store=Store(replicas=3), shared_registry=False) as stack,
            stack.client() as client,
            client.subscribe(stack.cluster, ["records"]) as sub,
            streaming(stack.agent, sub) as (emitter, reader),
        ):
            victim = nodes[ports.index(int(str(stack.agent._nc.connected_url.port)))]
            victim.kill()
            before = len(reader.numbers)
            await eventually(lambda: len(reader.numbers) > before + 100, timeout=60)
        check_lossless(emitter, reader, sub)
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)


class RogueSite:
    """A site's store in its own JetStream domain (``site-<cluster>``) as a hostile site
    could answer it: the store's info and a subject's last are passed on to the real store;
    its batched reads too, unless ``mode`` names a way of answering them malformed."""

    def __init__(self, nc: Any, cluster: str) -> None:
        self.nc = nc
        self.api = f"$JS.site-{cluster}.API."
        self.mode = "honest"

    async def start(self) -> None:
        await self.nc.subscribe(self.api + ">", cb=self._answer)
        await self.nc.flush()

    async def _answer(self, msg: Any) -> None:
        api = "$JS.API." + msg.subject.removeprefix(self.api)
        if not api.startswith("$JS.API.DIRECT.GET.") or self.mode == "honest":
            await self._pass_on(api, msg)
            return
        at = json.loads(msg.data)["seq"]
        headers = {"Nats-Sequence": str(at), "Nats-Num-Pending": "5"}
        if self.mode == "no headers":
            await self.nc.publish(msg.reply, b"not an envelope")
        elif self.mode == "backwards":  # the first position whatever is asked: would loop
            for _ in range(3):
                await self.nc.publish(msg.reply, b"x", headers={**headers, "Nats-Sequence": "1"})
            await self.nc.publish(msg.reply, b"", headers={"Status": "204"})
        else:  # "pending not a number"
            await self.nc.publish(msg.reply, b"x", headers={**headers, "Nats-Num-Pending": "a"})

    async def _pass_on(self, api: str, msg: Any) -> None:
        """Every reply of the real store, passed on (a batch's several, then its end)."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(api, msg.data, reply=inbox)
            while True:
                reply = await sub.next_msg(timeout=2)
                await self.nc.publish(msg.reply, reply.data, headers=reply.headers)
                if reply.headers is not None and "Status" in reply.headers:
                    return  # a batch's end, or an error
                if not api.startswith("$JS.API.DIRECT.GET."):
                    return  # one reply
        except TimeoutError:
            return
        finally:
            await sub.unsubscribe()


async def test_a_sites_store_answering_malformed_is_out_of_reach_not_a_crash(
    broker: Broker,
) -> None:
    """The proxy reads a site's store (another JetStream domain, a hostile site's leaf node)
    without trusting its answers: replies without headers, a stream position that does not
    move on (it would loop a replay), a pending count that is not a number are each
    ``cluster_unavailable`` (passing), and the proxy serves on: the next resume, answered
    well, replays the session's stored bytes."""
    url = broker.start()
    async with make_stack(url, store=Store(), store_domain="site-{cluster}") as stack:
        site_nc = await connect(url, name="test-rogue-site")
        try:
            site = RogueSite(site_nc, stack.cluster)
            await site.start()
            async with (
                stack.client() as client,
                client.subscribe(stack.cluster, ["records"]) as sub,
            ):
                await stack.agent.emit("records", [{"i": 0}])
                await stack.agent.emit("records", [{"i": 1}])
                await collect_rows(sub, 2)
                resume = stack.subjects.api_resume
                ask = {"v": 1, "token": stack.token(), "session": sub.session_id, "after": 0}
                for mode in ("no headers", "backwards", "pending not a number"):
                    site.mode = mode
                    with pytest.raises(SessionError) as refused:
                        await client.request(resume, ask, Replayed)
                    assert (refused.value.code, refused.value.retry) == (
                        "cluster_unavailable",
                        True,
                    ), mode
                site.mode = "honest"
                assert await client.request(resume, ask, Replayed) == Replayed(2, first=1)
        finally:
            await site_nc.close()


async def test_a_restarted_producers_groups_go_on_from_its_store(broker: Broker) -> None:
    """A producer that restarts reads each group's last stored batch and goes on past its
    ``gseq`` and epoch: a ``gseq`` names one batch of the store, so a member's group resume
    after the restart replays the new batches, never the earlier run's (a replay publishes
    one envelope a ``gseq``)."""
    url = broker.start()
    async with (
        make_stack(url, store=Store()) as stack,
        Tap(url, stack.subjects.group(stack.cluster, "records")) as tap,
    ):
        async with (
            stack.client(key_mode="group") as client,
            client.subscribe(stack.cluster, ["records"]) as sub,
        ):
            for i in range(3):
                await stack.agent.emit("records", [{"i": i}])
            await collect_rows(sub, 3)
        await stack.agent.aclose()
        config = stack.agent.config
        async with (
            Agent(config, identity=stack.identity, streams=["records"]) as agent,
            stack.client(key_mode="group") as client,
            client.subscribe(stack.cluster, ["records"]) as sub,
        ):
            for i in range(3, 5):
                await agent.emit("records", [{"i": i}])
            rows, _ = await collect_rows(sub, 2)
            assert [r["i"] for r in rows] == [3, 4]
            await tap.flush()
            sealed = [
                env_map(m.data) for m in tap.on(stack.subjects.group(stack.cluster, "records"))
            ]
            assert [e["gseq"] for e in sealed] == [0, 1, 2, 3, 4]
            assert sealed[3]["epoch"] > sealed[2]["epoch"]
            ask = {"v": 1, "token": stack.token(), "session": sub.session_id, "after": 2}
            answer = await client.request(
                stack.subjects.api_resume, {**ask, "group": "records"}, Replayed
            )
            assert answer == Replayed(2, first=3)
            assert sub.stats().rejected == {}
