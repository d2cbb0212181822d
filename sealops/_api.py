"""The ``api`` scenario of ``sealstream bench``: rows/s through the public API, as a user runs
it, against a plain pipeline doing the same work without encryption.

- sealstream: ``producers.Agent.emit`` (default batching: 1,000 rows or 0.1 s) -> the real
  proxy -> ``consumers.Client.subscribe``, with the cluster's policy and the user's proof.
- plain: a nats-py producer packing the same rows in batches of 1,000 into a msgpack envelope
  -> a nats-py relay that routes by the envelope's ``session`` field -> a nats-py consumer
  unpacking envelope and rows.

Each pipeline runs in three processes with the same rows and the same bounded in-flight window
(the consumer acknowledges what it received; the producer keeps at most ``window`` rows
unacknowledged), its producer handing over 100 rows a call from 4 concurrent callers (as a
source read by several tasks, or concurrent OTLP requests), and the rounds alternate the
pipelines with fresh processes; the report gives each round's rows/s (first row to last at
the consumer) and the median ratios. With the store, a lone caller is measured too: each of
its calls waits for its own store round trip.

Worker roles (``python -m sealops._worker ROLE``): ``api-producer``, ``api-consumer``,
``plain-producer``, ``plain-relay``, ``plain-consumer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import msgpack

from consumers import Batch, Client, ClientConfig
from producers import Agent, AuthzPolicy, ProducerConfig
from sealstream.crypto import TrustStore, UserIdentity
from sealstream.nats import connect, settle
from sealstream.store import Store, stream_name

__all__ = ["CALLERS", "ROLES", "STORED", "STORED_ALONE", "api_rounds", "run_role"]

STREAM: Final = "api"
#: the sealstream pipeline with the cluster's store (``emit`` returns once stored)
STORED: Final = "sealstream-store"
#: the same with one caller (each call waits for its own store round trip)
STORED_ALONE: Final = "sealstream-store-1"
BATCH_ROWS: Final = 1000
#: emit() is called with this many rows at a time, as a source hands over what it read
_CHUNK: Final = 100
#: by this many concurrent callers (unless the settings say otherwise)
CALLERS: Final = 4
_PLAIN_SESSION: Final = "p" * 43


def rows() -> list[dict[str, Any]]:
    """1,000 distinct rows shaped like Pixie's ``http_events`` (about 200 B each packed)."""
    methods = ("GET", "POST", "PUT", "DELETE")
    return [
        {
            "time_": 1_767_000_000_000_000_000 + i * 1_000_000,
            "upid": f"1:{1000 + i % 97}:{10_000_000 + i}",
            "remote_addr": f"10.0.{i % 256}.{(i * 7) % 254 + 1}",
            "remote_port": 30000 + i % 30000,
            "req_method": methods[i % 4],
            "req_path": f"/api/v1/products/{i * 31 % 100_000}",
            "resp_status": 200 if i % 17 else 503,
            "resp_body_size": (i * 131) % 65536,
            "latency_ns": 100_000 + (i * 7919) % 5_000_000,
        }
        for i in range(BATCH_ROWS)
    ]


class _Window:
    """The producer's side of the in-flight window: rows acknowledged by the slowest of
    ``consumers`` consumer processes (each acknowledges ``<id>:<rows>``, the rows its slowest
    session has)."""

    def __init__(self, size: int, consumers: int = 1) -> None:
        self.size = size
        self.consumers = consumers
        self._by: dict[str, int] = {}
        self.acked = 0
        self._moved = asyncio.Event()

    async def on_ack(self, msg: Any) -> None:
        who, _, rows = msg.data.decode().partition(":")
        self._by[who] = max(self._by.get(who, 0), int(rows))
        if len(self._by) >= self.consumers:
            self.acked = min(self._by.values())
        self._moved.set()

    async def wait_room(self, sent: Callable[[], int]) -> None:
        """Until the rows handed over so far (read anew each time: concurrent callers add
        to it) leave room in the window."""
        while sent() - self.acked >= self.size:
            self._moved.clear()
            await self._moved.wait()


async def _window(cfg: dict[str, Any], stack: contextlib.AsyncExitStack) -> _Window:
    nc = await connect(cfg["nats_url"], name="bench-acks")
    stack.push_async_callback(nc.close)
    window = _Window(int(cfg["window"]), int(cfg.get("consumers", 1)))
    await nc.subscribe(cfg["ack_subject"], cb=window.on_ack)
    await settle(nc)
    return window


async def _produce(
    total: int,
    commands: AsyncIterator[dict[str, Any]],
    emit: Callable[[list[dict[str, Any]]], Any],
    emit_event: Callable[..., None],
    window: _Window,
    figures: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    *,
    callers: int = CALLERS,
) -> None:
    emit_event("ready")
    await anext(commands)  # go: the consumer is subscribed
    data = rows()
    sent = 0

    def handed() -> int:
        return sent

    async def caller() -> None:
        nonlocal sent
        while sent < total:
            await window.wait_room(handed)
            if sent >= total:
                return
            start = sent % BATCH_ROWS
            chunk = data[start : start + min(_CHUNK, total - sent)]
            sent += len(chunk)  # taken before the call: the other callers go on from here
            await emit(chunk)

    async with asyncio.TaskGroup() as tg:
        for _ in range(callers):
            tg.create_task(caller())
    emit_event("sent", rows=sent, **(await figures() if figures is not None else {}))
    await anext(commands, None)  # until told to stop (or stdin closes)


def worker_client(cfg: dict[str, Any]) -> Client:
    """A worker's client (X25519, its user's proof), from the settings the bench hands it,
    trusting the bench cluster's key."""
    config = ClientConfig(
        nats_url=cfg["nats_url"],
        prefix=cfg["prefix"],
        token=cfg["token"],
        identity=UserIdentity.load(Path(cfg["user_file"])),
        key_kind="x25519",
        key_mode=cfg.get("key_mode", "session"),
    )
    return Client(config, trust=TrustStore({cfg["cluster"]: [cfg["trust_jwk"]]}))


def producer_config(cfg: dict[str, Any]) -> ProducerConfig:
    """A worker's producer configuration, from the settings the bench hands its workers."""
    return ProducerConfig(
        cluster=cfg["cluster"],
        nats_url=cfg["nats_url"],
        prefix=cfg["prefix"],
        key_file=Path(cfg["identity_file"]),
        policy_file=Path(cfg["policy_file"]),
    )


async def api_producer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    config = producer_config(cfg)
    if cfg.get("store"):
        config = dataclasses.replace(config, store=Store())
    async with contextlib.AsyncExitStack() as stack:
        window = await _window(cfg, stack)
        agent = await stack.enter_async_context(Agent(config, streams=[STREAM]))

        async def emit(chunk: list[dict[str, Any]]) -> None:
            await agent.emit(STREAM, chunk)

        name = stream_name(config.prefix, config.cluster)

        async def stored() -> dict[str, Any]:
            """What the store holds once every emit returned (none without a store)."""
            if config.store is None:
                return {}
            nc = await connect(cfg["nats_url"], name="bench-store-info")
            try:
                state = (await nc.jetstream().stream_info(name)).state
            finally:
                await nc.close()
            return {"stored_bytes": state.bytes, "stored_messages": state.messages}

        if config.store is not None:
            # this run's envelopes only: the rounds before kept theirs in the same stream (up
            # to its byte bound, which would make every later figure that bound over the rows)
            nc = await connect(cfg["nats_url"], name="bench-store-purge")
            try:
                await nc.jetstream().purge_stream(name)
            finally:
                await nc.close()

        callers = int(cfg.get("callers", CALLERS))
        await _produce(
            int(cfg["rows"]), commands, emit, emit_event, window, stored, callers=callers
        )


async def plain_producer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        window = await _window(cfg, stack)
        nc = await connect(cfg["nats_url"], name="bench-plain-producer")
        stack.push_async_callback(nc.drain)
        subject = f"{cfg['prefix']}.plain.data.{_PLAIN_SESSION}"
        pending: list[dict[str, Any]] = []
        seq = 0

        async def publish() -> None:
            nonlocal pending, seq
            batch, pending = pending, []  # the other callers fill the next one meanwhile
            body = msgpack.packb({"rows": batch})
            env = {"session": _PLAIN_SESSION, "stream": STREAM, "seq": seq, "body": body}
            seq += 1
            await nc.publish(subject, msgpack.packb(env))

        async def emit(chunk: list[dict[str, Any]]) -> None:
            pending.extend(chunk)
            if len(pending) >= BATCH_ROWS:
                await publish()

        await _produce(int(cfg["rows"]), commands, emit, emit_event, window)
        if pending:
            await publish()


async def plain_relay(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    nc = await connect(cfg["nats_url"], name="bench-plain-relay")
    inbox = f"{cfg['prefix']}.plain.inbox."

    async def relay(msg: Any) -> None:
        env = msgpack.unpackb(msg.data)
        await nc.publish(inbox + env["session"], msg.data)

    await nc.subscribe(f"{cfg['prefix']}.plain.data.*", cb=relay)
    await settle(nc)
    emit_event("ready")
    await anext(commands, None)
    await nc.drain()


class _Counter:
    """The consumer's side: counts rows per session, acknowledges what its slowest session
    has, says when every session has ``total``. Times are ``time.monotonic()``, one clock for
    every process of the machine."""

    def __init__(self, total: int, ack: Callable[[int], Any], sessions: int = 1) -> None:
        self.total = total
        self.counts = [0] * sessions  # rows received, and rows lost (gaps), per session
        self.lost = 0
        self.first = 0.0
        self.last = 0.0
        self._acked = 0
        self._ack = ack

    @property
    def rows(self) -> int:
        return sum(self.counts) - self.lost

    async def add(self, n: int, session: int = 0, lost: int = 0) -> bool:
        """Count ``n`` rows of one session, and ``lost`` rows it will never get (a gap);
        True once that session has them all accounted for."""
        now = time.monotonic()
        if not self.first:
            self.first = now
        self.counts[session] += n + lost
        self.lost += lost
        self.last = now
        low = min(self.counts)
        if low > self._acked:
            self._acked = low
            await self._ack(low)
        return self.counts[session] >= self.total


async def _acker(cfg: dict[str, Any], stack: contextlib.AsyncExitStack) -> Callable[[int], Any]:
    nc = await connect(cfg["nats_url"], name="bench-acks")
    stack.push_async_callback(nc.close)

    async def ack(n: int) -> None:
        await nc.publish(cfg["ack_subject"], f"{cfg.get('consumer_id', 0)}:{n}".encode())

    return ack


async def api_consumer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    sessions = int(cfg.get("sessions", 1))
    async with contextlib.AsyncExitStack() as stack:
        counter = _Counter(int(cfg["rows"]), await _acker(cfg, stack), sessions)
        client = await stack.enter_async_context(worker_client(cfg))
        subs = [
            await stack.enter_async_context(client.subscribe(cfg["cluster"], [STREAM]))
            for _ in range(sessions)
        ]
        emit_event("ready")

        async def read(i: int, sub: Any) -> None:
            batch: Batch
            async for batch in sub:
                # the batcher makes batches of BATCH_ROWS rows: a gap of n envelopes is
                # n * BATCH_ROWS rows this reader will never get (counted, not waited for)
                lost = batch.lost_before * BATCH_ROWS
                if await counter.add(len(batch.rows), i, lost):
                    return

        async with asyncio.TaskGroup() as tg:
            for i, sub in enumerate(subs):
                tg.create_task(read(i, sub))
        emit_event(
            "done",
            rows=counter.rows,
            lost_rows=counter.lost,
            seconds=counter.last - counter.first,
            first=counter.first,
            last=counter.last,
        )
        await anext(commands, None)


async def plain_consumer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        counter = _Counter(int(cfg["rows"]), await _acker(cfg, stack))
        nc = await connect(cfg["nats_url"], name="bench-plain-consumer")
        stack.push_async_callback(nc.drain)
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            queue.put_nowait(msg.data)

        await nc.subscribe(f"{cfg['prefix']}.plain.inbox.{_PLAIN_SESSION}", cb=on_msg)
        await settle(nc)
        emit_event("ready")
        while True:  # as the library does: a queue, then decode envelope and rows
            env = msgpack.unpackb(await queue.get())
            if await counter.add(len(msgpack.unpackb(env["body"])["rows"])):
                break
        emit_event("done", rows=counter.rows, seconds=counter.last - counter.first)
        await anext(commands, None)


ROLES: Final = {
    "api-producer": api_producer,
    "api-consumer": api_consumer,
    "plain-producer": plain_producer,
    "plain-relay": plain_relay,
    "plain-consumer": plain_consumer,
}


async def run_role(
    role: str,
    cfg: dict[str, Any],
    commands: AsyncIterator[dict[str, Any]],
    emit_event: Callable[..., None],
) -> None:
    await ROLES[role](cfg, commands, emit_event)


# --- orchestration ----------------------------------------------------------------------------


def authorize(state: Path, streams: list[str]) -> tuple[Path, Path]:
    """A user identity and the cluster's policy authorizing it: (user key file, policy)."""
    user_file = state / "api-user.jwk"
    user = UserIdentity.load_or_create(user_file)
    policy_file = state / "api-authorized.json"
    policy = AuthzPolicy.load_or_empty(policy_file)
    policy.with_key(user.public_jwk, streams, name="bench user")[0].save(policy_file)
    return user_file, policy_file


def api_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round: rows/s of each pipeline and their ratio; the median ratio."""
    table: list[dict[str, Any]] = []
    ratios: list[float] = []
    store_ratios: list[float] = []
    alone_ratios: list[float] = []

    def ratio(a: float | None, b: float | None, into: list[float]) -> float | None:
        if a is None or not b:
            return None
        into.append(a / b)
        return round(a / b, 3)

    for n in sorted({int(r["round"]) for r in results}):
        by = {r["pipeline"]: float(r["rows_per_s"]) for r in results if r["round"] == n}
        seal, plain = by.get("sealstream"), by.get("plain")
        kept, alone = by.get(STORED), by.get(STORED_ALONE)
        table.append(
            {
                "round": n,
                "sealstream_rows_per_s": seal,
                "plain_rows_per_s": plain,
                "ratio": ratio(seal, plain, ratios),
                "store_rows_per_s": kept,
                "store_ratio": ratio(kept, seal, store_ratios),
                "store_alone_rows_per_s": alone,
                "store_alone_ratio": ratio(alone, seal, alone_ratios),
            }
        )

    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    return {
        "rounds": table,
        "median_ratio": median(ratios),
        "median_store_ratio": median(store_ratios),
        "median_store_alone_ratio": median(alone_ratios),
        "callers": CALLERS,
    }
