"""Worker processes of ``sealstream bench``: ``python -m sealops._worker ROLE``.

- ``producer``: serves the cluster's control subject as a real producer does (one
  :class:`ProducerSession` per consumer session) and publishes exactly one envelope per
  message per session, sealed by the product's codecs, at the maximum rate a bounded in-flight
  window allows, or paced. ``plain-relay`` envelopes carry the plain msgpack rows (this mode
  exists only here); ``raw`` payloads go straight to a subject, no proxy.
- ``consumer``: opens real sessions through the proxy (a minted token per session, each on a
  NATS connection of its own, logged in as its session id with its token, as
  ``consumers.Client`` does without NATS credentials), or subscribes raw subjects; parses,
  verifies, decrypts, counts and times every message and acknowledges progress to the
  producer on a bench subject.
- ``first-row``: times ``consumers.Client.subscribe`` from key generation to the first
  decrypted row.
- ``logins``: many consumers at once log in to NATS through the auth callout (user = session
  id, password = token, ``docs/protocol.md``) and open their session; times connect and
  connect + open of each.

Protocol with the orchestrator (:mod:`sealops._procs`, driven by :mod:`sealops._scenarios`):
JSON lines. The first stdin line is the config (it carries tokens, so not on the command
line), then commands on stdin, events on stdout; logs go to stderr. End of stdin ends the
worker, so none outlives the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import msgpack
import nats.errors
import structlog

from sealops._api import ROLES, run_role
from sealops._otlproles import ROLES as OTLP_ROLES
from sealops._report import Histogram, make_rows
from sealstream.control import (
    ControlClose,
    ControlOpen,
    KeptAlive,
    Ok,
    Opened,
    OpenRequest,
    Ping,
    Pong,
    Refusal,
    Reply,
    decode_control,
    decode_reply,
    encode,
)
from sealstream.crypto import (
    Batch,
    ClusterIdentity,
    ConsumerKey,
    ConsumerSession,
    End,
    ProducerSession,
    TrustStore,
    encode_rows,
)
from sealstream.errors import SealstreamError, WireError
from sealstream.ids import Subjects
from sealstream.log import configure_logging
from sealstream.nats import connect, settle
from sealstream.run import run
from sealstream.wire import (
    Envelope,
    KeyMode,
    Notice,
    decode_inbox,
    encode_envelope,
    encode_map,
)

__all__ = ["main"]

log = structlog.get_logger(__name__)

STREAM: Final = "bench"
#: the session id written in raw payloads (raw mode has no session)
_RAW_SESSION: Final = "r" * 43
_REQUEST_TIMEOUT: Final = 30.0
_Answer = TypeVar("_Answer", Ok, Opened, KeptAlive)


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.strip():
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError("a command must be a JSON object")
            yield value


async def _request(
    nc: Any,
    subject: str,
    body: dict[str, Any],
    reply: type[_Answer],
    *,
    timeout_s: float = _REQUEST_TIMEOUT,
) -> _Answer:
    """A session API request and its ``reply`` as the client decodes it (a refusal raises
    :class:`SessionError`, a malformed answer :class:`WireError`)."""
    try:
        msg = await nc.request(subject, encode_map(body), timeout=timeout_s)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
        raise SealstreamError(f"no answer on {subject}: {exc!r}") from None
    answer = decode_reply(msg.data, reply)
    if isinstance(answer, Refusal):
        raise answer.error()
    return answer


# --- producer -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Out:
    """One destination: a consumer session (or a raw subject)."""

    id: str
    subject: str
    crypto: ProducerSession | None
    seq: int = 0  # the next seq, when the bench (not a ProducerSession) numbers envelopes
    sent: int = 0  # messages of the phase
    envelopes: int = 0  # envelopes of the phase: its messages and any key envelope

    @property
    def last_seq(self) -> int:
        return (self.crypto.seq if self.crypto is not None else self.seq) - 1


class _Producer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.mode: str = cfg["mode"]
        self.cluster: str = cfg["cluster"]
        self.subjects = Subjects(cfg["prefix"])
        self.identity = ClusterIdentity.load(Path(cfg["identity_file"]))
        self.ack_subject: str = cfg["ack_subject"]
        self.url: str = cfg["nats_url"]
        self.outs: dict[str, _Out] = {}
        self.phase = -1
        self.acked: dict[int, int] = {}
        self.ack_event = asyncio.Event()
        self.published = 0
        self._lock = asyncio.Lock()  # one sender at a time: seq order per session
        self.nc: Any = None

    async def main(self, commands: AsyncIterator[dict[str, Any]]) -> None:
        self.nc = await connect(self.url, name="bench-producer")
        try:
            if self.mode != "raw":
                await self.nc.subscribe(self.subjects.control(self.cluster), cb=self._on_control)
            await self.nc.subscribe(self.ack_subject, cb=self._on_ack)
            await settle(self.nc)
            _emit("ready")
            stop_stream = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                async for cmd in commands:
                    op = cmd.get("cmd")
                    if op == "quit":
                        break
                    if op == "targets":  # raw mode: subjects the consumers listen on
                        for subject in cmd["subjects"]:
                            self.outs[subject] = _Out(subject, subject, None)
                        _emit("ok")
                    elif op == "sessions":
                        _emit("sessions", ids=sorted(self.outs))
                    elif op == "run":
                        await self._run(cmd)
                    elif op == "stream":
                        stop_stream.clear()
                        tg.create_task(self._stream(cmd, stop_stream))
                        _emit("ok")
                    elif op == "stop_stream":
                        stop_stream.set()
                    else:
                        raise ValueError(f"unknown command {op!r}")
                stop_stream.set()
            _emit("bye", published=self.published)
        finally:
            if not self.nc.is_closed:
                await self.nc.drain()

    # control, as producers.Agent serves it
    async def _on_control(self, msg: Any) -> None:
        start: _Out | None = None
        reply: Reply
        try:
            request = decode_control(msg.data)
        except WireError as exc:
            request, reply = None, Refusal("bad_request", str(exc))
        if isinstance(request, Ping):  # the proxy checks that the cluster still serves them
            reply = Pong(tuple(s for s in request.sessions if s not in self.outs))
        elif isinstance(request, ControlClose):
            self.outs.pop(request.session, None)
            reply = Ok()
        elif isinstance(request, ControlOpen):
            session = request.session
            crypto = None
            if self.mode in ("session", "per-message"):
                crypto = ProducerSession(
                    self.identity,
                    cluster=self.cluster,
                    session=session,
                    consumer_jwk=request.jwk,
                    key_mode=request.key_mode,
                    compress=request.zip,
                )
            start = _Out(session, self.subjects.data(self.cluster, session), crypto)
            self.outs[session] = start
            reply = Ok()
        if msg.reply:
            await msg.respond(encode(reply))
        if start is not None and start.crypto is not None:
            async with self._lock:
                for env in start.crypto.start():
                    await self.nc.publish(start.subject, env)
                    self.published += 1

    async def _on_ack(self, msg: Any) -> None:
        worker, phase, n = msgpack.unpackb(msg.data)
        if phase == self.phase and n > self.acked.get(worker, 0):
            self.acked[worker] = n
            self.ack_event.set()

    def _min_acked(self, workers: int) -> int:
        if len(self.acked) < workers:
            return 0
        return min(self.acked.values())

    def _envelopes(self, out: _Out, plaintext: bytes) -> list[bytes]:
        if out.crypto is not None:
            return out.crypto.seal(STREAM, plaintext)
        seq = out.seq
        out.seq += 1
        session = out.id if self.mode == "plain-relay" else _RAW_SESSION
        env = Envelope("data", self.cluster, session, STREAM, seq, time.time_ns(), plaintext)
        return [encode_envelope(env)]

    async def _run(self, cmd: dict[str, Any]) -> None:
        """One phase: the same message to every session, ``count`` times at most, for at most
        ``duration`` seconds, never more than ``window`` messages ahead of the slowest
        consumer's acknowledgements; paced at ``rate`` messages/s when given."""
        self.phase = int(cmd["phase"])
        self.acked = {}
        limit: int = cmd["count"]
        window: int = cmd["window"]
        workers: int = cmd["workers"]
        rate: float | None = cmd.get("rate")
        stall_s: float = cmd.get("stall_s", 10.0)
        tick_s: float = cmd.get("tick_s", 0.0)
        rows = make_rows(int(cmd["body"]), self.phase)
        outs = list(self.outs.values())
        for out in outs:
            out.sent = out.envelopes = 0
        nc = self.nc
        envelopes = self._envelopes
        started = time.monotonic()
        deadline = started + float(cmd["duration"])
        interval = 1.0 / rate if rate else 0.0
        count = published = 0
        stalled = False
        async with self._lock:
            while count < limit:
                now = time.monotonic()
                if now >= deadline:
                    break
                if count - self._min_acked(workers) >= window:
                    self.ack_event.clear()
                    if count - self._min_acked(workers) >= window:
                        try:
                            await asyncio.wait_for(self.ack_event.wait(), stall_s)
                        except TimeoutError:
                            stalled = True
                            break
                    continue
                if interval:
                    due = started + count * interval
                    if due > now:
                        # wake at most once per tick, then send every message due: a producer
                        # flushes what it has, it does not sleep between messages
                        await asyncio.sleep(max(due - now, tick_s))
                        continue
                plaintext = encode_rows(rows)
                for out in outs:
                    for env in envelopes(out, plaintext):  # a key envelope too, at rotation
                        await nc.publish(out.subject, env)
                        published += 1
                        out.envelopes += 1
                    out.sent += 1
                count += 1
                if not count & 31:
                    await asyncio.sleep(0)
            self.published += published
            await nc.flush(timeout=60)
        _emit(
            "sent",
            phase=self.phase,
            count=count,
            stalled=stalled,
            seconds=time.monotonic() - started,
            per_target={o.id: [o.sent, o.last_seq, o.envelopes] for o in outs},
        )

    async def _stream(self, cmd: dict[str, Any], stop: asyncio.Event) -> None:
        """Send one message per ``1/rate`` s to every open session until ``stop``."""
        rows = make_rows(int(cmd["body"]), 0)
        interval = 1.0 / float(cmd["rate"])
        while not stop.is_set():
            plaintext = encode_rows(rows)
            async with self._lock:
                for out in list(self.outs.values()):
                    for env in self._envelopes(out, plaintext):
                        await self.nc.publish(out.subject, env)
                        self.published += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


# --- consumer -------------------------------------------------------------------------------


@dataclass(slots=True)
class _In:
    """One consumer session (or raw subject) and its counters for the current phase."""

    id: str
    subject: str
    token: str = field(repr=False)
    crypto: ConsumerSession | None
    keyed: asyncio.Event = field(default_factory=asyncio.Event)
    last_seq: int = -1  # plain-relay and raw: the bench checks seq itself
    own_rejected: int = 0
    seq_base: int = -1  # seq before the phase: progress is acknowledged by seq, gaps included
    reported: int = 0
    delivered: int = 0
    rows: int = 0
    stale: int = 0
    wire_bytes: int = 0
    rejected_base: int = 0
    #: envelopes of the phase that reached this process, whatever became of them: what never
    #: arrived is lost (counted from arrivals, not as a remainder of what was delivered)
    arrived: int = 0
    keys: int = 0  # key envelopes of the phase (they are not messages)
    nc: Any = None  # the session's own connection (None: raw subjects, on the shared one)

    @property
    def seq(self) -> int:
        return self.crypto.last_seq if self.crypto is not None else self.last_seq

    @property
    def rejected_total(self) -> int:
        if self.crypto is not None:
            return sum(self.crypto.rejected.values())
        return self.own_rejected


class _Consumer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.mode: str = cfg["mode"]
        self.worker: int = cfg["worker"]
        self.cluster: str = cfg["cluster"]
        self.subjects = Subjects(cfg["prefix"])
        self.trust = TrustStore({self.cluster: [cfg["trust_jwk"]]})
        self.ack_subject: str = cfg["ack_subject"]
        self.targets: list[_In] = []
        self.phase = -1
        self.armed = False
        self.ack_every = 1
        self.acked = 0
        self.hist = Histogram()
        self.t_first = 0
        self.t_last = 0
        self.slow = 0
        self.events = 0
        self.busy = 0  # envelopes being opened in a thread
        self.keepalive_s = 10.0
        self.nc: Any = None

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow += 1

    async def main(self, commands: AsyncIterator[dict[str, Any]]) -> None:
        self.nc = await connect(
            self.cfg["nats_url"], name=f"bench-consumer-{self.worker}", error_cb=self._on_error
        )
        stop = asyncio.Event()
        try:
            await self._open_all()
            _emit("ready", targets=[t.id for t in self.targets])
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._progress(stop))
                if self.mode != "raw":
                    tg.create_task(self._keepalive(stop))
                try:
                    async for cmd in commands:
                        op = cmd.get("cmd")
                        if op == "quit":
                            break
                        if op == "arm":
                            self._arm(cmd)
                        elif op == "finish":
                            await self._finish(cmd)
                        else:
                            raise ValueError(f"unknown command {op!r}")
                finally:
                    stop.set()
            await self._close_all()
        finally:
            for nc in [t.nc for t in self.targets if t.nc is not None] + [self.nc]:
                if not nc.is_closed:
                    await nc.drain()

    # sessions
    async def _open_all(self) -> None:
        tokens: list[str] = self.cfg["tokens"]
        if self.mode == "raw":
            for i in range(len(tokens)):
                subject = f"{self.cfg['raw_prefix']}.{self.worker}.{i}"
                t = _In(subject, subject, "", None)
                await self.nc.subscribe(subject, cb=self._callback(t))
                self.targets.append(t)
            await settle(self.nc)
            return
        gate = asyncio.Semaphore(4)

        async def one(token: str) -> _In:
            async with gate:
                return await self._open(token)

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(token)) for token in tokens]
        self.targets = [task.result() for task in tasks]

    async def _open(self, token: str) -> _In:
        kind = self.cfg["key_kind"]
        key = await ConsumerKey.agenerate(kind)
        key_mode: KeyMode = "per-message" if self.mode == "per-message" else "session"
        crypto = None
        if self.mode in ("session", "per-message"):
            crypto = ConsumerSession(
                key, cluster=self.cluster, trust=self.trust, key_mode=key_mode, policy="discard"
            )
        t = _In(key.session_id, self.subjects.inbox(key.session_id), token, crypto)
        # one connection per session, user = session id and password = token (docs/protocol.md)
        t.nc = await connect(
            self.cfg["nats_url"],
            name=f"bench-consumer-{self.worker}",
            user=key.session_id,
            password=token,
            inbox_prefix=f"_INBOX.{key.session_id}",
            fail_fast=True,
            error_cb=self._on_error,
        )
        await t.nc.subscribe(t.subject, cb=self._callback(t))
        await settle(t.nc)
        req = OpenRequest(
            cluster=self.cluster,
            streams=(STREAM,),
            jwk=key.public_jwk,
            key_mode=key_mode,
            token=token,
        )
        opened = await _request(t.nc, self.subjects.api_open, req.to_map(), Opened)
        if opened.keepalive_s is not None:  # within the protocol's bounds, as for the client
            self.keepalive_s = min(self.keepalive_s, opened.keepalive_s / 2)
        if self.mode == "session":
            await asyncio.wait_for(t.keyed.wait(), _REQUEST_TIMEOUT)
        return t

    async def _close_all(self) -> None:
        if self.mode == "raw":
            return

        async def close(t: _In) -> None:
            body = {"v": 1, "token": t.token, "session": t.id}
            if t.nc is None or t.nc.is_closed:
                return
            with contextlib.suppress(SealstreamError):
                await _request(t.nc, self.subjects.api_close, body, Ok)

        async with asyncio.TaskGroup() as tg:
            for t in self.targets:
                tg.create_task(close(t))

    async def _keepalive(self, stop: asyncio.Event) -> None:
        """Every session's keepalive at once, each bounded: a slow answer for one session
        must not let the others expire."""

        async def one(t: _In) -> None:
            body = {"v": 1, "token": t.token, "session": t.id}
            try:
                await _request(t.nc, self.subjects.api_keepalive, body, KeptAlive, timeout_s=5.0)
            except SealstreamError as exc:
                log.warning("bench.keepalive_failed", session=t.id, error=str(exc))

        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.keepalive_s)
            if stop.is_set():
                return
            async with asyncio.TaskGroup() as tg:
                for t in self.targets:
                    tg.create_task(one(t))

    # data path
    def _callback(self, t: _In) -> Callable[[Any], Awaitable[None]]:
        crypto = t.crypto
        if self.mode == "raw":

            async def on_raw(msg: Any) -> None:
                data: bytes = msg.data
                t.wire_bytes += len(data)
                t.arrived += 1
                try:
                    m = msgpack.unpackb(data)
                    seq, ts = m["seq"], m["ts"]
                    rows = msgpack.unpackb(m["body"])["rows"]
                except (ValueError, TypeError, KeyError, msgpack.UnpackException):
                    t.own_rejected += 1
                    await self._processed(t)
                    return
                await self._plain(t, seq, ts, rows)

            return on_raw
        if crypto is None:

            async def on_plain(msg: Any) -> None:
                data: bytes = msg.data
                t.wire_bytes += len(data)
                t.arrived += 1
                try:
                    item = decode_inbox(data)
                    if not isinstance(item, Envelope) or item.session != t.id:
                        raise WireError("wrong_route", "not an envelope of this session")
                    rows = msgpack.unpackb(item.body)["rows"]
                except (WireError, ValueError, TypeError, KeyError, msgpack.UnpackException):
                    t.own_rejected += 1
                    await self._processed(t)
                    return
                await self._plain(t, item.seq, item.ts, rows)

            return on_plain
        per_message = crypto.key_mode == "per-message"

        async def on_sealed(msg: Any) -> None:
            data: bytes = msg.data
            t.wire_bytes += len(data)
            item = crypto.parse(data)
            result = None
            if not isinstance(item, Notice):  # an envelope, or one rejected unparsed (None)
                t.arrived += 1
            if type(item) is Envelope:
                if item.kind == "key":
                    # public-key decryption stays off the event loop, as in consumers.Client
                    refused = sum(crypto.rejected.values())
                    await self._off_loop(crypto.open, item)
                    if sum(crypto.rejected.values()) == refused:
                        t.keys += 1
                    if crypto.keyed:
                        t.keyed.set()
                    return  # a key envelope is not a message of the phase
                if per_message:
                    result = await self._off_loop(crypto.open, item)
                else:
                    result = crypto.open(item)
            elif isinstance(item, Notice):
                log.warning("bench.notice", session=t.id, code=item.code)
                return
            if type(result) is Batch:
                self._deliver(t, result.rows, result.ts)
            await self._processed(t)

        return on_sealed

    async def _off_loop(
        self, fn: Callable[[Envelope], Batch | End | None], item: Envelope
    ) -> Batch | End | None:
        """``fn(item)`` in a thread; a run is not finished while one is under way (its
        session's seq moves in the thread, before the result is counted here)."""
        self.busy += 1
        try:
            return await asyncio.to_thread(fn, item)
        finally:
            self.busy -= 1

    async def _plain(self, t: _In, seq: int, ts: int, rows: list[dict[str, Any]]) -> None:
        if seq <= t.last_seq:
            t.own_rejected += 1
        else:
            t.last_seq = seq
            self._deliver(t, rows, ts)
        await self._processed(t)

    def _deliver(self, t: _In, rows: list[dict[str, Any]], ts: int) -> None:
        now = time.time_ns()
        if self.armed and rows and rows[0].get("p") == self.phase:
            t.delivered += 1
            t.rows += len(rows)
            self.hist.add_ns(now - ts)
            if not self.t_first:
                self.t_first = now
            self.t_last = now
        else:
            t.stale += 1

    async def _processed(self, t: _In) -> None:
        """Acknowledge progress to the producer's window: by seq, so that a lost envelope
        does not hold the window; one acknowledgement per ``ack_every`` envelopes."""
        self.events += 1
        if not self.armed:
            return
        done = t.seq - t.seq_base
        if done - t.reported < self.ack_every:
            return
        t.reported = done
        low = min(x.seq - x.seq_base for x in self.targets)
        if low > self.acked:
            self.acked = low
            await self.nc.publish(self.ack_subject, msgpack.packb([self.worker, self.phase, low]))

    # phases
    def _arm(self, cmd: dict[str, Any]) -> None:
        self.phase = int(cmd["phase"])
        self.ack_every = max(1, int(cmd["ack_every"]))
        self.acked = 0
        self.hist = Histogram()
        self.t_first = self.t_last = 0
        for t in self.targets:
            t.delivered = t.rows = t.stale = t.wire_bytes = t.reported = 0
            t.arrived = t.keys = 0
            t.seq_base = t.seq
            t.rejected_base = t.rejected_total
        self.armed = True
        _emit("armed", phase=self.phase)

    async def _finish(self, cmd: dict[str, Any]) -> None:
        """Wait until every session has seen its last envelope of the phase (or nothing came
        for ``idle_s``), then report what became of every message sent."""
        expect: dict[str, list[int]] = cmd["expect"]
        idle_s = float(cmd["idle_s"])
        last_total = -1
        quiet_since = time.monotonic()
        while True:
            if not self.busy and all(t.seq >= expect[t.id][1] for t in self.targets):
                break
            total = self.events
            now = time.monotonic()
            if total != last_total:
                last_total, quiet_since = total, now
            elif now - quiet_since > idle_s:
                break
            await asyncio.sleep(0.01)
        self.armed = False
        per_target = []
        for t in self.targets:
            sent, _, envelopes = expect[t.id]
            per_target.append(
                {
                    "id": t.id,
                    "sent": sent,
                    "envelopes": envelopes,
                    "arrived": t.arrived,
                    "keys": t.keys,
                    "delivered": t.delivered,
                    "rejected": t.rejected_total - t.rejected_base,
                    "lost": max(0, envelopes - t.arrived),
                    "stale": t.stale,
                    "rows": t.rows,
                    "wire_bytes": t.wire_bytes,
                }
            )
        _emit(
            "done",
            phase=self.phase,
            per_target=per_target,
            hist=self.hist.to_json(),
            t_first=self.t_first,
            t_last=self.t_last,
            slow_consumer=self.slow,
        )

    async def _progress(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if self.armed:
                _emit("progress", n=sum(t.delivered for t in self.targets))


# --- first row ------------------------------------------------------------------------------


async def _first_row(cfg: dict[str, Any]) -> None:
    # the consumer library itself: what a user's first subscribe costs
    from consumers import Client, ClientConfig

    trust = TrustStore({cfg["cluster"]: [cfg["trust_jwk"]]})
    config = ClientConfig(
        nats_url=cfg["nats_url"],
        prefix=cfg["prefix"],
        token=cfg["token"],
        trust_store=Path("/nonexistent/bench-trust.json"),
        policy="discard",
    )
    async with Client(config, trust=trust) as client:
        _emit("ready")
        for kind in cfg["samples"]:
            t0 = time.perf_counter()
            key = await ConsumerKey.agenerate(kind)
            t1 = time.perf_counter()
            async with client.subscribe(cfg["cluster"], [STREAM], key=key) as sub:
                async for _batch in sub:
                    t2 = time.perf_counter()
                    break
                else:
                    raise SealstreamError("the session ended before a row arrived")
            _emit("sample", kind=kind, total_s=t2 - t0, keygen_s=t1 - t0)
    _emit("done")


# --- logins through the auth callout -------------------------------------------------------


async def _logins(cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]]) -> None:
    subjects = Subjects(cfg["prefix"])
    tokens: list[str] = cfg["tokens"]
    keys = [await ConsumerKey.agenerate("x25519") for _ in tokens]
    conns: list[Any] = []
    _emit("ready")
    async for cmd in commands:
        if cmd.get("cmd") == "go":
            break
    else:
        return
    go = asyncio.Event()

    async def one(key: ConsumerKey, token: str) -> tuple[float, float] | str:
        await go.wait()
        sid = key.session_id
        t0 = time.perf_counter()
        try:
            nc = await connect(
                cfg["nats_url"],
                name="bench-login",
                user=sid,
                password=token,
                inbox_prefix=f"_INBOX.{sid}",
                fail_fast=True,
                connect_timeout=30.0,
            )
        except SealstreamError as exc:
            return f"connect: {exc}"
        conns.append(nc)
        t1 = time.perf_counter()
        await nc.subscribe(subjects.inbox(sid))
        await settle(nc)
        req = OpenRequest(
            cluster=cfg["cluster"],
            streams=(STREAM,),
            jwk=key.public_jwk,
            key_mode="session",
            token=token,
        )
        try:
            await _request(nc, subjects.api_open, req.to_map(), Opened)
        except SealstreamError as exc:
            return f"open: {exc}"
        return t1 - t0, time.perf_counter() - t0

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(k, t)) for k, t in zip(keys, tokens, strict=True)]
        started = time.perf_counter()
        go.set()
    wall = time.perf_counter() - started
    results = [t.result() for t in tasks]
    times = [r for r in results if isinstance(r, tuple)]
    errors = [r for r in results if isinstance(r, str)]
    for nc in conns:
        with contextlib.suppress(nats.errors.Error):
            await nc.close()
    _emit(
        "done",
        connect_s=[c for c, _ in times],
        open_s=[o for _, o in times],
        errors=errors[:5],
        refused=len(errors),
        wall_s=wall,
    )


# --- entry point ----------------------------------------------------------------------------


async def _main(role: str) -> int:
    commands = _stdin_lines()
    try:
        cfg = await anext(commands)
    except StopAsyncIteration:
        return 2
    try:
        if role == "producer":
            await _Producer(cfg).main(commands)
        elif role == "consumer":
            await _Consumer(cfg).main(commands)
        elif role == "first-row":
            await _first_row(cfg)
        elif role == "logins":
            await _logins(cfg, commands)
        elif role in ROLES:
            await run_role(role, cfg, commands, _emit)
        elif role in OTLP_ROLES:
            await OTLP_ROLES[role](cfg, commands, _emit)
        else:
            raise ValueError(f"unknown role {role!r}")
    except (SealstreamError, ValueError, OSError) as exc:
        _emit("error", message=f"{type(exc).__name__}: {exc}")
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sealops._worker ROLE", file=sys.stderr)
        return 2
    configure_logging(level="warning")
    return run(lambda: _main(args[0]))


if __name__ == "__main__":
    sys.exit(main())
