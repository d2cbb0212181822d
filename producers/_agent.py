"""The cluster agent: serves session control, batches rows, seals them per session, publishes.

One :class:`ProducerSession` (encryption state) per consumer session; the rows of a stream are
batched and packed once, then sealed once per session-mode session subscribed to that stream,
and once for all the group-mode sessions of that stream (one :class:`GroupSealer` per stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import structlog

from producers._authz import Authorized, Authorizer, unverified_jti
from producers._batcher import Batcher, plaintext_budget
from producers._commit import GroupCommit
from producers._config import ProducerConfig
from producers._outbox import Outbox
from producers.sources import Source, check_rows
from sealstream import BrokerError, KeyMode, SealstreamError, SessionError, Subjects, WireError
from sealstream.control import (
    ControlClose,
    ControlGrants,
    ControlOpen,
    Granted,
    Ok,
    Pong,
    Refusal,
    Reply,
    decode_control,
    encode,
)
from sealstream.crypto import (
    ClusterIdentity,
    GroupSeal,
    GroupSealer,
    MemberSession,
    ProducerSession,
)
from sealstream.ids import check_stream
from sealstream.metrics import MetricsServer, Sample, collector_registry
from sealstream.nats import connect, release, settle
from sealstream.resource import AsyncResource
from sealstream.store import ensure_stream, last_group_envelopes

__all__ = ["Agent"]

log = structlog.get_logger(__name__)

#: the outbox queue of a stream's group envelopes (a session id never starts with it)
_GROUP_QUEUE = "group."
#: with a store: envelopes published before their acknowledgements are awaited
_ACK_WINDOW = 256
#: with a store: the pause before publishing again what the store did not acknowledge
_STORE_RETRY_S = 0.1


@dataclass(slots=True)
class _Served:
    crypto: ProducerSession | MemberSession
    streams: frozenset[str]
    user: str
    #: who the open's proof showed (None: the relay's word, --trust-relay-authorization)
    reader: Authorized | None = None


class Agent(AsyncResource):
    """``async with Agent(config, sources=[...]) as agent:`` runs a cluster's producer.

    ``await agent.emit(stream, rows)`` is the Python API for one's own records; ``streams``
    declares the streams it may carry besides those of ``sources``. ``refused`` counts the
    control requests it answered with an error, by code. ``clock`` (Unix seconds) is what
    proofs and authorizations are checked against.
    """

    def __init__(
        self,
        config: ProducerConfig,
        *,
        identity: ClusterIdentity | None = None,
        sources: Sequence[Source] = (),
        streams: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        self._authz = (
            None
            if config.trust_relay_authorization
            else Authorizer(config.authz_file, cluster=config.cluster)
        )
        self._identity = identity
        self._sources = list(sources)
        self.streams = frozenset(check_stream(s) for s in [*streams, *(s.stream for s in sources)])
        if not self.streams:
            raise ValueError("an agent needs at least one stream or source")
        self._subjects = Subjects(config.prefix)
        self.sessions: dict[str, _Served] = {}
        self._batchers: dict[str, Batcher] = {}
        #: group mode: one group per stream
        self.groups: dict[str, GroupSealer] = {}
        #: when a list, every group batch sealed is appended as (stream, seal): instrumentation
        self.group_trace: list[tuple[str, GroupSeal]] | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        super().__init__()
        self._tg: asyncio.TaskGroup | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._nc: Any = None
        self._js: Any = None  # with a store: its JetStream context
        self._store_name = ""
        #: with a store: each group's last envelope it keeps from before (a restart)
        self._group_after: dict[str, bytes] = {}
        #: replaced (and the old one set) whenever envelopes leave the outbox
        self._progress = asyncio.Event()
        self._commit = GroupCommit(
            self._seal_stored,
            functools.partial(self._stored, until_stop=True),
            max_rows=config.batching.max_rows,
        )
        self.published = 0
        self.published_bytes = 0
        self.metrics: MetricsServer | None = None
        self.rows_in = 0
        self.rejected_rows: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        # with a store the outbox never drops (its envelopes are promised to the callers,
        # who wait while it is half full instead)
        self.outbox = Outbox(
            max_bytes=config.buffer_bytes,
            max_total_bytes=config.buffer_total_bytes,
            drops=config.store is None,
        )
        self._wake = asyncio.Event()  # the sender has something to try
        self._connected = asyncio.Event()
        #: after a reconnect, hold buffered envelopes until a proxy shows it is back (a
        #: control request) or this deadline (monotonic) passes: published before the proxy
        #: resubscribed, they would be lost
        self._hold_until: float | None = None
        self._last_drop_log = float("-inf")
        self._drops_unlogged = 0
        self._budget = 0
        #: more metrics read at scrape time (the OTLP receiver's)
        self.more_samples: list[Callable[[], list[Sample]]] = []

    @property
    def identity(self) -> ClusterIdentity:
        if self._identity is None:
            self._identity = ClusterIdentity.load_or_create(self.config.key_file)
        return self._identity

    async def _start(self) -> None:
        identity = self.identity
        if self._authz is None:
            log.warning(
                "producer.trusting_relay",
                cluster=self.config.cluster,
                message="no authorization policy: whoever runs the relay can read this cluster",
            )
        elif not self._authz.path.exists():
            raise ValueError(
                f"no authorization policy at {self._authz.path}: authorize readers with "
                f"'sealstream-producer authorize add --policy-file {self._authz.path} --jwk-file "
                "FILE --stream STREAM', or run with --trust-relay-authorization "
                "(the relay then decides who reads)"
            )
        else:
            self._authz.refresh()
        auth = self.config.nats_auth
        self._nc = await connect(
            self.config.nats_url,
            name=f"sealstream-producer.{self.config.cluster}",
            user=auth.user,
            password=auth.password,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            # its own replies (the store's acknowledgements) on subjects only it may read
            inbox_prefix=Subjects.producer_inbox(self.config.cluster),
        )
        self._connected.set()
        self._stack.push_async_callback(self._shutdown)
        store = self.config.store
        if store is not None:
            self._js = self._nc.jetstream(timeout=store.ack_timeout_s)
            self._store_name = await ensure_stream(
                self._js, store, prefix=self.config.prefix, cluster=self.config.cluster
            )
            self._group_after = await last_group_envelopes(
                self._js,
                self._store_name,
                prefix=self.config.prefix,
                cluster=self.config.cluster,
                streams=self.streams,
            )
        self._budget = budget = plaintext_budget(int(self._nc.max_payload))
        self._batchers = {s: Batcher(self.config.batching, budget=budget) for s in self.streams}
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self._stopping)
        await self._nc.subscribe(self._subjects.control(self.config.cluster), cb=self._on_control)
        await settle(self._nc)
        for source in self._sources:
            self._pumps.append(self._tg.create_task(self._pump(source)))
        self._tg.create_task(self._flush_loop())
        self._tg.create_task(self._sender())
        if self._authz is not None:
            self._tg.create_task(self._authz_loop())
        if self.config.metrics_port is not None:
            self.metrics = MetricsServer(
                collector_registry(self.samples),
                lambda: bool(self._nc is not None and self._nc.is_connected),
                host=self.config.metrics_host,
                port=self.config.metrics_port,
            )
            await self._stack.enter_async_context(self.metrics)
        log.info(
            "producer.started",
            cluster=self.config.cluster,
            kid=identity.kid,
            streams=sorted(self.streams),
        )

    async def aclose(self) -> None:
        """Flush, end every session (authenticated ``end``), drain; idempotent."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()

    def _stopping(self) -> None:
        # sources may be endless (HttpEvents, HostMetrics): stop pumping them, or the task
        # group would wait for them forever
        self._stop.set()
        self._wake.set()  # the sender sees the stop
        self._progressed()  # and what waits for the outbox sees it too
        self._commit.fail_all(BrokerError("the producer is stopping"))
        for task in self._pumps:
            task.cancel()

    async def _shutdown(self) -> None:
        if self._nc is None or self._nc.is_closed:
            return
        with contextlib.suppress(SealstreamError):
            for stream, batcher in self._batchers.items():
                plaintext = batcher.flush()
                if plaintext is not None:
                    await self._publish(stream, plaintext)
            for session in list(self.sessions):
                await self.end_session(session, "producer stopping")
        self._hold_until = None
        # a restarting server gets 2 s (our callbacks, not nats-py's status, say connected)
        if self.outbox and not (self._connected.is_set() and self._nc.is_connected):
            if not self._nc.is_connected:
                self._connected.clear()  # its disconnected callback may still be on its way
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._connected.wait()
        async with self._lock:
            await self._drain()
        if self.outbox:
            log.warning(
                "producer.unsent_dropped", envelopes=len(self.outbox), bytes=self.outbox.size
            )
        await release(self._nc)
        self._progressed()  # emits still waiting for the store learn that it is over
        log.info(
            "producer.stopped",
            cluster=self.config.cluster,
            published=self.published,
            dropped=dict(self.outbox.dropped),
        )

    def samples(self) -> list[Sample]:
        """The agent's metrics, read at scrape time."""
        return [*self._samples(), *(s for more in self.more_samples for s in more())]

    def _samples(self) -> list[Sample]:
        return [
            Sample("sealstream_producer_sessions", "sessions served", "gauge", len(self.sessions)),
            Sample(
                "sealstream_producer_envelopes_published",
                "envelopes published",
                "counter",
                self.published,
            ),
            Sample(
                "sealstream_producer_published_bytes",
                "bytes published",
                "counter",
                self.published_bytes,
            ),
            Sample(
                "sealstream_producer_envelopes_dropped",
                "sealed envelopes given up before the broker took them, by reason",
                "counter",
                self.outbox.dropped,
            ),
            Sample(
                "sealstream_producer_buffered_bytes",
                "sealed envelopes waiting for the broker, bytes",
                "gauge",
                self.outbox.size,
            ),
            Sample(
                "sealstream_producer_group_rotations",
                "group keys replaced (group mode), all streams",
                "counter",
                sum(g.rotations for g in self.groups.values()),
            ),
            Sample("sealstream_producer_rows", "rows accepted", "counter", self.rows_in),
            Sample(
                "sealstream_producer_rows_rejected",
                "rows rejected, by reason",
                "counter",
                self.rejected_rows,
            ),
            Sample(
                "sealstream_producer_requests_refused",
                "control requests refused, by code",
                "counter",
                self.refused,
                label="code",
            ),
        ]

    # --- rows in ----------------------------------------------------------------------------

    async def emit(self, stream: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Queue rows for a declared stream; invalid rows are counted, logged and skipped.

        Down the layers, once each: the row rules check the rows, the stream's batcher takes
        them, and every batch they complete is sealed and queued. With a store, the rows are
        sealed at once (batches of their own) and ``emit`` returns once they are stored: while
        the broker is away, it waits. Calls made while a stream's rows are being stored share
        the next batches (group commit): call it from several tasks for throughput."""
        batcher = self._batchers.get(stream)
        if batcher is None:
            raise ValueError(f"stream {stream!r} is not declared by this agent")
        checked = check_rows(rows)
        for reason in checked.rejected:
            self.rejected_rows[reason] += 1
            log.warning("row.rejected", stream=stream, reason=reason)
        if self.config.store is not None:
            if self._stop.is_set() or self._tg is None:
                raise BrokerError("the producer is stopping")
            ticket = await self._commit.add(stream, checked.rows, checked.packed, self._tg)
            await self._stored(ticket)
            return
        self.rows_in += len(checked.rows)
        before = batcher.oversize_rows
        ready = batcher.add(checked.rows, packed=checked.packed, now=time.monotonic())
        if batcher.oversize_rows != before:
            self.rejected_rows["oversize"] += batcher.oversize_rows - before
            log.warning(
                "row.rejected",
                stream=stream,
                reason="oversize",
                count=batcher.oversize_rows - before,
            )
        for plaintext in ready:
            await self._publish(stream, plaintext)

    @property
    def max_row_bytes(self) -> int:
        """The largest packed row a batch takes (known once started)."""
        return min(self.config.batching.max_bytes, self._budget) - 16

    @property
    def buffer_bytes(self) -> int:
        """The outbox's bound for one session's queue."""
        return self.outbox.max_bytes

    def backlog(self, reserve: int = 0) -> float:
        """How full the outbox is: 0 empty, 1 at its bound (per session or in all), once
        ``reserve`` more bytes wait for every session (and group) there is."""
        outbox = self.outbox
        queues = len(self.sessions) + len(self.groups)
        extra = reserve if queues else 0
        total = outbox.max_total_bytes
        in_all = (outbox.size + extra * queues) / total if total else 0.0
        return max((outbox.largest() + extra) / outbox.max_bytes, in_all)

    async def seal_rows(self, stream: str, rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
        """Seal ``rows`` now, in batches of their own, into the outbox of every session
        reading ``stream``, and return once they are (a receiver acknowledges its sender
        then); with a store, once they are stored, waiting while the outbox is half full.
        The rows are the caller's own: no per-value check. Returns how many were too large
        for a batch (counted as ``oversize``, not sealed), and how many envelopes the outbox
        dropped meanwhile (over its bound: these rows may be among them)."""
        if stream not in self._batchers:
            raise ValueError(f"stream {stream!r} is not declared by this agent")
        dropped = self.outbox.dropped["buffer_full"]
        oversize = await self._seal(stream, rows)
        if self.config.store is not None:
            await self._stored(self.outbox.ticket)
        return oversize, self.outbox.dropped["buffer_full"] - dropped

    async def _seal(
        self, stream: str, rows: Sequence[Mapping[str, Any]], packed: bytes | None = None
    ) -> int:
        """Seal ``rows`` (``packed``: the same as one msgpack array, when the caller has it)
        in batches of their own (with a store, once the outbox is less than half full); how
        many were too large for a batch."""
        batcher = Batcher(self.config.batching, budget=self._budget)
        ready = batcher.add(rows, packed=packed, now=time.monotonic())
        last = batcher.flush()
        self.rows_in += len(rows) - batcher.oversize_rows
        if batcher.oversize_rows:
            self.rejected_rows["oversize"] += batcher.oversize_rows
        for plaintext in [*ready, *([last] if last is not None else [])]:
            if self.config.store is not None:  # backpressure, batch by batch: the caller
                await self._room(stream, len(plaintext))  # waits while the outbox is full
            await self._publish(stream, plaintext)
        return batcher.oversize_rows

    async def _room(self, stream: str, size: int) -> None:
        """Wait until a batch of ``size`` plaintext bytes, sealed for every session reading
        ``stream`` (and once for its group), keeps the outbox under half its bounds; an empty
        outbox takes it whatever its size. So a producer with a store holds at most half its
        bounds plus one batch's envelopes (it never drops)."""
        envelope = size * 4 // 3 + 2048  # base64url of the ciphertext, header, envelope
        readers = sum(
            1
            for served in self.sessions.values()
            if stream in served.streams and not isinstance(served.crypto, MemberSession)
        )
        readers += any(
            stream in served.streams and isinstance(served.crypto, MemberSession)
            for served in self.sessions.values()
        )
        outbox = self.outbox
        total = outbox.max_total_bytes
        while outbox and (
            (outbox.largest() + envelope) * 2 > outbox.max_bytes
            or (total is not None and (outbox.size + envelope * readers) * 2 > total)
        ):
            if self._stop.is_set():
                raise BrokerError("the producer is stopping")
            await self._progress.wait()

    async def _seal_stored(
        self, stream: str, rows: Sequence[Mapping[str, Any]], packed: bytes | None
    ) -> int:
        """A group commit's seal: the outbox ticket its rows are stored with."""
        await self._seal(stream, rows, packed)
        return self.outbox.ticket

    async def _stored(self, ticket: int, *, until_stop: bool = False) -> None:
        """Wait until every envelope put up to ``ticket`` has left the outbox (stored, or
        given up by a session that ended); BrokerError if the agent stopped first (its last
        drain is over), or, ``until_stop``, return as soon as it stops (the commit task: the
        callers wait on for their own rows)."""
        while (oldest := self.outbox.oldest()) is not None and oldest <= ticket:
            if self._stop.is_set() and until_stop:
                return
            if self._stop.is_set() and self._nc.is_closed:
                raise BrokerError("the producer stopped before the rows were stored")
            await self._progress.wait()

    def _progressed(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _pump(self, source: Source) -> None:
        try:
            async with contextlib.aclosing(source.rows()) as batches:
                async for rows in batches:
                    if rows:
                        await self.emit(source.stream, rows)
        except (SealstreamError, OSError, ValueError) as exc:
            log.error(
                "source.failed", stream=source.stream, error=type(exc).__name__, message=str(exc)
            )
        else:
            log.info("source.ended", stream=source.stream)

    async def _flush_loop(self) -> None:
        interval = self.config.batching.max_delay_s / 2
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            now = time.monotonic()
            for stream, batcher in self._batchers.items():
                plaintext = batcher.due(now=now)
                if plaintext is not None:
                    await self._publish(stream, plaintext)

    # --- envelopes out ----------------------------------------------------------------------

    async def _send(self, session: str, envelopes: list[bytes], *, keys: int = 0) -> None:
        """Queue a session's envelopes (the first ``keys`` of them key envelopes) and hand
        what the broker takes to it. Never raises a broker error: while NATS is away the
        envelopes wait in the bounded outbox. The caller holds ``_lock``. With a store the
        sender alone publishes, the acknowledgements awaited outside the lock: what several
        callers seal meanwhile goes out in one window."""
        for i, env in enumerate(envelopes):
            dropped = self.outbox.put(session, env, key=i < keys)
            if dropped:
                self._log_drops(session, "buffer_full", dropped)
        if self._can_send() and self._js is None:
            await self._drain_session(session)
        if self.outbox.pending(session):
            self._wake.set()

    def _can_send(self) -> bool:
        # our reconnected callback, not nats-py's status: that says connected before the
        # callback has set the hold (and the proxy may not have resubscribed yet)
        return self._hold_until is None and self._connected.is_set() and self._nc.is_connected

    async def _drain_session(self, session: str) -> bool:
        """Publish a session's (or a group's, ``group.<stream>``) queued envelopes in order;
        False if the broker stopped taking them (disconnected, or nats-py's own buffer is
        full: the server is slow)."""
        if session.startswith(_GROUP_QUEUE):
            subject = self._subjects.group(self.config.cluster, session[len(_GROUP_QUEUE) :])
        else:
            subject = self._subjects.data(self.config.cluster, session)
        if self._js is not None:
            return await self._store_session(session, subject)
        while (env := self.outbox.peek(session)) is not None:
            try:
                await self._nc.publish(subject, env)
            except nats.errors.OutboundBufferLimitError:
                return False
            except nats.errors.Error as exc:  # closed, draining, lost the server
                log.debug("envelope.publish_failed", session=session, error=repr(exc))
                return False
            self.outbox.pop(session)
            self.published += 1
            self.published_bytes += len(env)
        return True

    async def _store_session(self, session: str, subject: str) -> bool:
        """With a store: publish a session's queued envelopes, a window at a time, and take
        each out of the outbox only once the stream acknowledged it; False (it stays queued,
        to be published again) when an acknowledgement fails or does not come in time."""
        timeout = self.config.store.ack_timeout_s if self.config.store else 0.0
        while window := self.outbox.head(session, _ACK_WINDOW):
            futures: list[asyncio.Future[Any]] = []
            try:
                for env in window:
                    futures.append(await self._js.publish_async(subject, env))
                for env, future in zip(window, futures, strict=True):
                    ack = await asyncio.wait_for(future, timeout)
                    if ack.stream != self._store_name:
                        raise nats.js.errors.Error(f"stored in {ack.stream!r}")
                    if self.outbox.peek(session) is env:  # not dropped meanwhile
                        self.outbox.pop(session)
                    self.published += 1
                    self.published_bytes += len(env)
            except (TimeoutError, nats.errors.Error) as exc:
                log.debug("envelope.store_failed", session=session, error=repr(exc))
                return False
            finally:
                for future in futures:
                    future.cancel()  # those not acknowledged free their place
                self._progressed()
        return True

    async def _drain(self) -> bool:
        """Publish everything queued, session by session, the groups last (a member's key
        envelope before the batch it opens); False if the broker stopped."""
        for session in sorted(self.outbox.sessions(), key=lambda s: s.startswith(_GROUP_QUEUE)):
            if not self._can_send() or not await self._drain_session(session):
                return False
        return True

    async def _sender(self) -> None:
        """Publish what waits in the outbox whenever the broker can take it."""
        while not self._stop.is_set():
            timeout = None
            if self._hold_until is not None:
                timeout = max(self._hold_until - time.monotonic(), 0.0)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                if self._hold_until is not None:
                    log.info("producer.hold_released", reason="timeout")
                    self._hold_until = None
            self._wake.clear()
            if not self.outbox or not self._can_send():
                continue  # a reconnect, or the end of a hold, wakes us again
            if self._js is not None:
                done = await self._drain()  # the only publisher: sealing goes on meanwhile
            else:
                async with self._lock:
                    done = await self._drain()
            if not done and self._nc.is_connected:
                # nats-py's buffer is full, or the store did not acknowledge: let the flusher
                # catch up (and a refusing store breathe), then go on
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await self._nc.flush(timeout=5)
                if self._js is not None:
                    await asyncio.sleep(_STORE_RETRY_S)
                self._wake.set()

    async def _on_disconnected(self) -> None:
        self._connected.clear()

    async def _on_reconnected(self) -> None:
        # the proxy may not have resubscribed to the data subjects yet (not when stopping:
        # then the outbox gets its one chance to go out, see _shutdown)
        if not self._stop.is_set() and self.config.store is None:
            self._hold_until = time.monotonic() + self.config.resume_hold_s
        self._connected.set()
        self._wake.set()

    def _log_drops(self, session: str, reason: str, count: int) -> None:
        """Rate-limited: one line a second at most, with the count since the last one."""
        self._drops_unlogged += count
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:
            log.warning(
                "envelopes.dropped",
                session=session,
                reason=reason,
                count=self._drops_unlogged,
                total=dict(self.outbox.dropped),
                buffered_bytes=self.outbox.size,
            )
            self._last_drop_log = now
            self._drops_unlogged = 0

    def _forget(self, session: str) -> None:
        """Stop serving a session; what it still had queued is useless now."""
        self.sessions.pop(session, None)
        dropped = self.outbox.discard(session)
        if dropped:
            self._log_drops(session, "session_gone", dropped)
            self._progressed()

    async def _publish(self, stream: str, plaintext: bytes) -> None:
        # one lock: the envelopes of a session leave in seq order whatever task seals them
        async with self._lock:
            for session, served in list(self.sessions.items()):
                if stream not in served.streams or isinstance(served.crypto, MemberSession):
                    continue
                try:
                    envelopes = served.crypto.seal(stream, plaintext)
                except ValueError as exc:  # this session only; the others go on
                    self._forget(session)
                    log.error("session.dropped", session=session, error=str(exc))
                    continue
                # seal() puts a key envelope first when one is due
                await self._send(session, envelopes, keys=len(envelopes) - 1)
            await self._publish_group(stream, plaintext)

    async def _publish_group(self, stream: str, plaintext: bytes) -> None:
        """Seal once for the stream's group-mode sessions (the caller holds ``_lock``). The
        members are read from the live sessions now: one that is gone (closed, expired,
        ended, revoked) makes the group rotate before this batch."""
        members = {
            session: served.crypto
            for session, served in self.sessions.items()
            if isinstance(served.crypto, MemberSession) and stream in served.streams
        }
        group = self.groups.get(stream)
        if group is None:
            if not members:
                return
            group = self.groups[stream] = GroupSealer(
                self.identity,
                cluster=self.config.cluster,
                stream=stream,
                rotation=self.config.rotation,
                after=self._group_after.get(stream),
            )
        sealed = group.seal(plaintext, members)
        for session in sealed.failed:  # that session only; the group goes on without it
            self._forget(session)
            log.error("session.dropped", session=session, error="cannot seal a group key to it")
        for session, envelope in sealed.keys:
            await self._send(session, [envelope], keys=1)
        if sealed.envelope is not None:
            if sealed.keys:
                log.info(
                    "group.rotated", stream=stream, epoch=sealed.epoch, members=len(sealed.keys)
                )
            if self.group_trace is not None:
                self.group_trace.append((stream, sealed))
            queue = _GROUP_QUEUE + stream
            if any(self.outbox.pending(session) for session, _ in sealed.keys):
                # a key envelope still waits: the sender publishes the sessions' queues first
                dropped = self.outbox.put(queue, sealed.envelope)
                if dropped:
                    self._log_drops(queue, "buffer_full", dropped)
                self._wake.set()
            else:
                await self._send(queue, [sealed.envelope])

    def _session_crypto(
        self, session: str, jwk: Mapping[str, Any], key_mode: KeyMode, *, compress: bool
    ) -> ProducerSession | MemberSession:
        """A new session's encryption state: its own data channel, or a group member's."""
        if key_mode == "group":
            return MemberSession(
                self.identity, cluster=self.config.cluster, session=session, consumer_jwk=jwk
            )
        return ProducerSession(
            self.identity,
            cluster=self.config.cluster,
            session=session,
            consumer_jwk=jwk,
            key_mode=key_mode,
            compress=compress,
            rotation=self.config.rotation,
        )

    async def end_session(self, session: str, reason: str) -> None:
        """End a session: an authenticated ``end`` envelope, then forget it."""
        async with self._lock:
            served = self.sessions.pop(session, None)
            if served is not None and not served.crypto.ended:
                envelopes = served.crypto.end(reason)
                await self._send(session, envelopes, keys=len(envelopes) - 1)
                log.info("session.ended", session=session, reason=reason)

    # --- session control --------------------------------------------------------------------

    async def _on_control(self, msg: Any) -> None:
        if self._hold_until is not None:  # a proxy is subscribed again: send what waited
            log.info("producer.hold_released", reason="proxy")
            self._hold_until = None
            self._wake.set()
        if self._authz is not None:
            self._authz.refresh()  # a stat; the file is read again only if it changed
        reply, start = self._control(msg.data)
        if isinstance(reply, Refusal):
            start = None
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except nats.errors.Error as exc:  # the proxy times out and retries, or pings
                log.info("control.reply_lost", error=repr(exc))
        if start is not None:
            async with self._lock:
                served = self.sessions.get(start)
                if served is not None:
                    envelopes = served.crypto.start()
                    await self._send(start, envelopes, keys=len(envelopes))
        # at each control message too (the agent's own loop checks every authz_check_s)
        await self._end_unauthorized()

    async def _authz_loop(self) -> None:
        """Revocation and expiry do not depend on the relay: a relay that stopped pinging
        must not keep a revoked reader's session served."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.config.authz_check_s)
            if self._authz is not None and not self._stop.is_set():
                self._authz.refresh()
                await self._end_unauthorized()

    async def _end_unauthorized(self) -> None:
        if self._authz is None:
            return
        now = self._clock()
        for session, served in list(self.sessions.items()):
            reader = served.reader
            if reader is not None and not self._authz.allows(reader, served.streams, now):
                log.info("session.revoked", session=session, reader=reader.identity)
                await self.end_session(session, "revoked")

    def _refuse(self, exc: SessionError) -> Refusal:
        self.refused[exc.code] += 1
        log.debug("control.refused", code=exc.code, reason=exc.detail)
        return Refusal.of(exc)

    def _control(self, payload: bytes) -> tuple[Reply, str | None]:
        """The answer to a control request, and the session to start (after the answer)."""
        try:
            request = decode_control(payload)
            if isinstance(request, ControlOpen):
                return self._open(request), request.session
            if isinstance(request, ControlGrants):
                return self._grants(request), None
        except WireError as exc:
            return self._refuse(SessionError("bad_request", str(exc))), None
        except SessionError as exc:
            return self._refuse(exc), None
        if isinstance(request, ControlClose):
            if request.session in self.sessions:
                self._forget(request.session)
                log.info("session.closed", session=request.session, reason=request.reason[:100])
            return Ok(), None
        # a ping: the proxy checks we are alive and still serve its sessions (at most
        # MAX_PING of them, checked by the codec: so many unknown at most)
        unknown = tuple(s for s in request.sessions if s not in self.sessions)
        return Pong(unknown), None

    def _grants(self, request: ControlGrants) -> Granted:
        """What this cluster offers and its policy grants the identity that asks: answered
        from the policy, signed, with no session and no state (but the proof's ``jti``)."""
        now = self._clock()
        offered = sorted(self.streams)
        if self._authz is None:  # the relay's authorization is trusted: everything, no end
            identity, granted, until, jti = "", offered, None, unverified_jti(request.proof)
        else:
            try:
                who, jti = self._authz.grants(request, now=now)
            except SessionError as exc:
                log.info("grants.forbidden", reason=exc.detail)
                raise
            identity, until = who.identity, who.until
            granted = sorted(self.streams & who.streams)
        log.info("grants.answered", identity=identity, granted=granted)
        claims = {
            "cluster": self.config.cluster,
            "identity": identity,
            "jti": jti,
            "iat": int(now),
            "offered": offered,
            "granted": granted,
            "until": None if until is None else int(until),
        }
        return Granted(self.identity.sign_grants(claims))

    def _open(self, request: ControlOpen) -> Ok:
        """Serve a (well-formed) open, or refuse it (SessionError)."""
        session = request.session
        # who asks first (the form was checked when it was decoded): a refused open learns
        # nothing of this cluster
        reader: Authorized | None = None
        if self._authz is not None:
            try:
                reader = self._authz.check(request, now=self._clock())
            except SessionError as exc:
                log.warning("session.forbidden", session=session, reason=exc.detail)
                raise
        unknown = sorted(set(request.streams) - self.streams)
        if unknown:
            raise SessionError("bad_request", f"unknown streams {unknown}")
        if session in self.sessions:
            raise SessionError("bad_request", "session already open")
        if len(self.sessions) >= self.config.max_sessions:
            raise SessionError("limit_exceeded", "cluster serves too many sessions")
        if request.key_mode == "group" and request.zip:
            raise SessionError("bad_request", "zip is not available in group mode")
        crypto = self._session_crypto(session, request.jwk, request.key_mode, compress=request.zip)
        self.sessions[session] = _Served(crypto, frozenset(request.streams), request.user, reader)
        log.info(
            "session.opened",
            session=session,
            streams=list(request.streams),
            key_mode=request.key_mode,
            reader=None if reader is None else reader.identity,
        )
        return Ok()
