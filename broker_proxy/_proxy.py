"""The blind relay: session control in, ciphertext through, by subject and header only.

It never imports the decrypting code (an import-linter contract and a subprocess test hold
that), never parses an envelope ``body``, and forwards relayed payloads byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import nats.errors
import structlog

from broker_proxy._callout import AuthResponder
from broker_proxy._config import ProxyConfig
from broker_proxy._registry import SessionEntry, SessionRegistry
from broker_proxy._shared import SharedRegistry, bucket_name
from sealstream import (
    BrokerError,
    SessionError,
    Subjects,
    TokenVerifier,
    WireError,
    check_public_jwk,
    thumbprint,
)
from sealstream.groupwire import decode_group_envelope
from sealstream.metrics import Histogram, MetricsServer, Sample, collector_registry
from sealstream.nats import connect, redact_url, release, settle
from sealstream.resource import AsyncResource
from sealstream.wire import (
    VERSION,
    decode_envelope,
    decode_map,
    decode_open,
    decode_session_ref,
    encode_map,
    error_reply,
    notice,
)

__all__ = ["Proxy"]

log = structlog.get_logger(__name__)

#: the reply subject of a session request: a client's request inbox (``_INBOX.`` then
#: tokens of a restricted alphabet; no wildcard, no other subject space)
_REPLY_INBOX: Final = re.compile(r"_INBOX(\.[A-Za-z0-9_-]{1,64}){1,4}")

#: after the proxy reconnects, how long before it pings the clusters (see _ping_soon)
_RECONNECT_SETTLE_S = 2.0
#: a producer's refusals the consumer hears as they are (a tuple: an unhashable code, a list or
#: a map, must not raise TypeError in a set lookup)
_PASSED_ON = ("bad_request", "forbidden", "limit_exceeded")


class Proxy(AsyncResource):
    """``async with Proxy(config):`` serves until the block exits.

    Counters: ``relayed`` envelopes and ``relayed_bytes``; ``rejected`` envelopes by reason;
    ``refused`` control requests by error code.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        verifier: TokenVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._verifier = verifier or config.verifier()
        self._clock = clock
        self._subjects = Subjects(config.prefix)
        self.registry = SessionRegistry(
            ttl_s=3 * config.keepalive_s, burst=config.limits.session_burst
        )
        self.relayed = 0
        self.relayed_bytes = 0
        #: group mode: group envelopes received, and inbox deliveries made of them
        self.group_envelopes = 0
        self.group_deliveries = 0
        self.rejected: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._nc: Any = None
        self._tg: asyncio.TaskGroup | None = None
        super().__init__()
        self._stop = asyncio.Event()
        self._pending = asyncio.Semaphore(config.limits.pending_requests)
        self.relay_latency = Histogram()
        self._ping_failures: Counter[str] = Counter()
        #: after a reconnect of our own connection, silence is not the clusters' fault until
        #: this (clock) time
        self._grace_until = float("-inf")
        self._ping_now = asyncio.Event()
        self._in_flight = 0
        #: the most session requests served at once (bounded by ``limits.pending_requests``)
        self.pending_peak = 0
        self._shared: SharedRegistry | None = None
        self.metrics: MetricsServer | None = None
        self.callout: AuthResponder | None = None
        if config.callout is not None:
            self.callout = AuthResponder(config.callout, self._verifier, prefix=config.prefix)

    async def _start(self) -> None:
        auth = self.config.nats_auth
        self._nc = await connect(
            self.config.nats_url,
            name="sealstream-proxy",
            user=auth.user,
            password=auth.password,
            reconnected_cb=self._on_reconnected,
        )
        self._stack.push_async_callback(release, self._nc)
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self._stopping)  # runs first: lets the expiry loop end
        if self.config.shared_registry:
            # load every live session before serving: a restarted instance loses none
            self._shared = SharedRegistry(
                self.registry,
                bucket=bucket_name(self.config.prefix),
                replicas=self.config.registry_replicas,
                clock=self._clock,
            )
            await self._shared.open(self._nc)
            watch = self._tg.create_task(self._shared.watch())
            self._stack.callback(watch.cancel)
            async with asyncio.timeout(10):
                await self._shared.ready.wait()
        group = self.config.queue_group
        await self._nc.subscribe(self._subjects.api_all, queue=group, cb=self._on_api)
        # data and group subjects on one subscription: a member's key envelope and the group
        # batch sealed after it are relayed in the order they came
        await self._nc.subscribe(self._subjects.relay_all, queue=group, cb=self._on_data)
        if self.callout is not None:
            await self.callout.subscribe(self._nc)
        self._tg.create_task(self._expiry_loop())
        await settle(self._nc)
        if self.config.metrics_port is not None:
            registry = collector_registry(
                self.samples,
                {
                    "sealstream_proxy_relay_seconds": (
                        "time to relay one envelope",
                        self.relay_latency,
                    )
                },
            )
            self.metrics = MetricsServer(
                registry,
                lambda: bool(self._nc is not None and self._nc.is_connected),
                host=self.config.metrics_host,
                port=self.config.metrics_port,
            )
            await self._stack.enter_async_context(self.metrics)
        log.info("proxy.started", url=redact_url(self.config.nats_url), prefix=self.config.prefix)

    def _stopping(self) -> None:
        self._stop.set()
        self._ping_now.set()  # wakes the expiry loop

    async def aclose(self) -> None:
        """Stop serving; idempotent."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()
        if self._tg is not None:
            self._tg = None
            log.info(
                "proxy.stopped",
                relayed=self.relayed,
                rejected=sum(self.rejected.values()),
                rejected_by_reason=dict(self.rejected),
            )

    def samples(self) -> list[Sample]:
        """The proxy's metrics, read at scrape time."""
        return [
            Sample("sealstream_proxy_sessions", "open sessions", "gauge", len(self.registry)),
            Sample(
                "sealstream_proxy_envelopes_relayed", "envelopes relayed", "counter", self.relayed
            ),
            Sample(
                "sealstream_proxy_relayed_bytes", "bytes relayed", "counter", self.relayed_bytes
            ),
            Sample(
                "sealstream_proxy_group_envelopes",
                "group envelopes received (group mode)",
                "counter",
                self.group_envelopes,
            ),
            Sample(
                "sealstream_proxy_group_deliveries",
                "inbox deliveries of group envelopes",
                "counter",
                self.group_deliveries,
            ),
            Sample(
                "sealstream_proxy_envelopes_rejected",
                "envelopes dropped, by reason",
                "counter",
                self.rejected,
            ),
            Sample(
                "sealstream_proxy_requests_refused",
                "session requests refused, by code",
                "counter",
                self.refused,
                label="code",
            ),
            *(self.callout.samples() if self.callout is not None else []),
        ]

    # --- data path (hot) --------------------------------------------------------------------

    def _reject(self, reason: str, subject: str) -> None:
        self.rejected[reason] += 1
        log.debug("envelope.rejected", reason=reason, subject=subject)

    async def _on_data(self, msg: Any) -> None:
        started = time.perf_counter()
        data: bytes = msg.data
        subject: str = msg.subject
        if len(data) > self.config.limits.envelope_bytes:
            self._reject("oversize", subject)
            return
        route = self._subjects.parse_data(subject)
        if route is None:
            group = self._subjects.parse_group(subject)
            if group is None:
                self._reject("bad_subject", subject)
                return
            await self._on_group(data, subject, *group, started)
            return
        try:
            env = decode_envelope(data, max_size=self.config.limits.envelope_bytes)
        except WireError as exc:
            self._reject(f"malformed.{exc.reason}", subject)
            return
        cluster, session = route
        if env.cluster != cluster or env.session != session:
            self._reject("subject_mismatch", subject)
            return
        entry = self.registry.get(session)
        if entry is None and self._shared is not None:
            entry = await self._shared.lookup(session)  # opened an instant ago elsewhere
        if entry is None:
            self._reject("unknown_session", subject)
            return
        if entry.cluster != cluster:
            self._reject("wrong_cluster", subject)
            return
        limits = self.config.limits
        now = self._clock()
        if not entry.take(now, rate=limits.session_rate, burst=limits.session_burst):
            self._reject("rate_limited", subject)
            if now - entry.limited_notice_at >= 1.0:  # tell the consumer, once a second
                entry.limited_notice_at = now
                await self._notify(session, "limit_exceeded", "relay rate limit: envelopes dropped")
            return
        try:
            await self._nc.publish(self._subjects.inbox(session), data)
        except nats.errors.Error:  # lost the server a moment ago, and its buffer is full
            self._reject("broker_unavailable", subject)
            return
        self.relayed += 1
        self.relayed_bytes += len(data)
        self.relay_latency.observe(time.perf_counter() - started)

    async def _on_group(
        self, data: bytes, subject: str, cluster: str, stream: str, started: float
    ) -> None:
        """One group envelope (group mode), byte for byte to the inbox of every group-mode
        session of that cluster and stream in the registry (never from the body)."""
        try:
            env = decode_group_envelope(data, max_size=self.config.limits.envelope_bytes)
        except WireError as exc:
            self._reject(f"malformed.{exc.reason}", subject)
            return
        if env.cluster != cluster or env.stream != stream:
            self._reject("subject_mismatch", subject)
            return
        members = self.registry.group_members(cluster, stream)
        if not members:
            self._reject("no_members", subject)
            return
        self.group_envelopes += 1
        limits = self.config.limits
        now = self._clock()
        for entry in members:
            if not entry.take(now, rate=limits.session_rate, burst=limits.session_burst):
                self._reject("rate_limited", subject)
                if now - entry.limited_notice_at >= 1.0:
                    entry.limited_notice_at = now
                    await self._notify(
                        entry.session, "limit_exceeded", "relay rate limit: envelopes dropped"
                    )
                continue
            try:
                await self._nc.publish(self._subjects.inbox(entry.session), data)
            except nats.errors.Error:
                self._reject("broker_unavailable", subject)
                continue
            self.relayed += 1
            self.relayed_bytes += len(data)
            self.group_deliveries += 1
        self.relay_latency.observe(time.perf_counter() - started)

    # --- session control --------------------------------------------------------------------

    async def _on_api(self, msg: Any) -> None:
        # The answer goes where the requester says, with the proxy's own permissions (which
        # include the session registry's $KV and $JS subjects and the clusters' control
        # subjects): only a request inbox is accepted, and the answer is a plain publish
        # (msg.respond would copy the request's headers, KV operations among them). A request
        # with no reply subject (a page's close as it goes away) is served unanswered.
        if msg.reply and not _REPLY_INBOX.fullmatch(msg.reply):
            self.refused["bad_reply_subject"] += 1
            log.info("session.bad_reply_subject", subject=msg.subject, reply=msg.reply[:80])
            return
        if self._tg is None or self._pending.locked():
            self.refused["limit_exceeded"] += 1
            busy = error_reply("limit_exceeded", "too many pending requests", retry=True)
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(msg.reply, busy)
            return
        await self._pending.acquire()
        self._in_flight += 1
        self.pending_peak = max(self.pending_peak, self._in_flight)
        self._tg.create_task(self._serve(msg))

    async def _serve(self, msg: Any) -> None:
        try:
            op = msg.subject.rsplit(".", 1)[-1]
            try:
                reply = await self._handle(op, msg.data)
            except SessionError as exc:
                self.refused[exc.code] += 1
                log.info("session.refused", op=op, code=exc.code, reason=exc.detail)
                reply = error_reply(exc.code, exc.detail)
            except BrokerError as exc:  # the shared registry is out of reach: retry later
                self.refused["cluster_unavailable"] += 1
                log.warning("session.registry_unavailable", op=op, error=str(exc))
                reply = error_reply(
                    "cluster_unavailable", "session registry unavailable, retry", retry=True
                )
            if msg.reply:
                try:
                    await self._nc.publish(msg.reply, reply)
                except nats.errors.Error as exc:
                    log.info("session.reply_lost", op=op, error=repr(exc))
        finally:
            self._in_flight -= 1
            self._pending.release()

    async def _handle(self, op: str, payload: bytes) -> bytes:
        try:
            m = decode_map(payload)
        except WireError as exc:
            raise SessionError("bad_request", str(exc)) from None
        if op == "open":
            return await self._open(m)
        if op in ("close", "keepalive"):
            try:
                ref = decode_session_ref(m)
            except WireError as exc:
                raise SessionError("bad_request", str(exc)) from None
            claims = self._verifier.verify(ref.token)
            entry = self.registry.get(ref.session)
            if entry is None:
                raise SessionError("bad_request", "unknown or expired session")
            if entry.user != claims.sub:
                raise SessionError("forbidden", "session belongs to another user")
            if op == "keepalive":
                # a renewed token may have lost the cluster: the session does not outlive that
                # (closing stays allowed)
                if not claims.allows(entry.cluster):
                    raise SessionError(
                        "forbidden", f"token no longer allows cluster {entry.cluster!r}"
                    )
                self.registry.touch(ref.session, now=self._clock())
                if self._shared is not None:
                    await self._shared.touch(entry)
                return encode_map({"ok": True, "keepalive_s": self.config.keepalive_s})
            await self._forget(ref.session)
            log.info(
                "session.closed", session=ref.session, cluster=entry.cluster, reason="consumer"
            )
            await self._tell_cluster_closed(entry, "closed by consumer")
            return encode_map({"ok": True})
        raise SessionError("bad_request", f"unknown operation {op!r:.40}")

    async def _open(self, m: dict[str, Any]) -> bytes:
        try:
            req = decode_open(m)
            jwk = check_public_jwk(req.jwk)
        except WireError as exc:
            raise SessionError("bad_request", str(exc)) from None
        claims = self._verifier.verify(req.token)
        if not claims.allows(req.cluster):
            raise SessionError("forbidden", f"token does not allow cluster {req.cluster!r}")
        limits = self.config.limits
        if len(req.streams) > limits.streams_per_session:
            raise SessionError("limit_exceeded", f"at most {limits.streams_per_session} streams")
        if self.registry.sessions_of(claims.sub) >= limits.sessions_per_user:
            raise SessionError("limit_exceeded", f"at most {limits.sessions_per_user} sessions")
        session = thumbprint(jwk)
        if session in self.registry:
            raise SessionError("bad_request", "a session with this key exists: use a new key")
        # Register before the cluster hears of it: its first envelope may beat its reply.
        entry = self.registry.add(
            session,
            cluster=req.cluster,
            user=claims.sub,
            streams=req.streams,
            now=self._clock(),
            key_mode=req.key_mode,
        )
        if self._shared is not None and not await self._shared.create(entry):
            self.registry.remove(session)
            raise SessionError("bad_request", "a session with this key exists: use a new key")
        control = {
            "v": VERSION,
            "op": "open",
            "session": session,
            "streams": list(req.streams),
            "jwk": jwk,
            "key_mode": req.key_mode,
            "zip": req.zip,
            "user": claims.sub,
            **req.forwarded(),  # the cluster's business, untouched
        }
        try:
            answer = await self._control(req.cluster, control)
        except SessionError:
            await self._forget(session)
            raise
        if answer.get("ok") is not True:
            await self._forget(session)
            error = answer.get("error")
            code, message = "cluster_unavailable", "cluster refused the session"
            if isinstance(error, dict) and error.get("code") in _PASSED_ON:
                code, message = error["code"], str(error.get("message", ""))[:200]
            raise SessionError(code, message)
        log.info(
            "session.opened",
            session=session,
            cluster=entry.cluster,
            user=claims.sub,
            streams=list(req.streams),
            key_mode=req.key_mode,
        )
        return encode_map(
            {
                "ok": True,
                "session": session,
                "inbox": self._subjects.inbox(session),
                "keepalive_s": self.config.keepalive_s,
            }
        )

    async def _control(self, cluster: str, body: dict[str, Any]) -> dict[str, Any]:
        subject = self._subjects.control(cluster)
        try:
            msg = await self._nc.request(
                subject, encode_map(body), timeout=self.config.control_timeout_s
            )
        except nats.errors.NoRespondersError:
            raise SessionError(
                "cluster_unavailable", f"no producer serves cluster {cluster!r}"
            ) from None
        except nats.errors.TimeoutError:
            raise SessionError(
                "cluster_unavailable", f"cluster {cluster!r} did not answer"
            ) from None
        except nats.errors.Error as exc:  # connection closed or reconnecting
            raise SessionError(
                "cluster_unavailable", f"cannot reach the cluster: {exc!r}"
            ) from None
        try:
            return decode_map(msg.data)
        except WireError:
            raise SessionError("cluster_unavailable", "cluster sent a malformed answer") from None

    async def _tell_cluster_closed(self, entry: SessionEntry, reason: str) -> None:
        body = {"v": VERSION, "op": "close", "session": entry.session, "reason": reason}
        try:
            await self._control(entry.cluster, body)
        except SessionError as exc:
            log.info("session.close_not_delivered", session=entry.session, reason=exc.detail)

    async def _on_reconnected(self) -> None:
        """Our own connection is back: nobody could keep a session alive, and no cluster could
        answer a ping, while it was down. Expiry restarts from now, silence counts again
        after a grace period, and the clusters are pinged a moment later (a producer holds
        what it buffered until it hears from a proxy)."""
        now = self._clock()
        self._grace_until = now + self._grace_s()
        self._ping_failures.clear()
        self.registry.extend(now=now)
        log.info("proxy.reconnected", sessions=len(self.registry))
        if self._tg is not None:
            self._tg.create_task(self._ping_soon())

    async def _ping_soon(self) -> None:
        # Clients retry every 0.5 s: a moment after our reconnect (2 s: room for a busy
        # machine), the consumers are back on their inboxes too. The ping then releases what
        # the producers held; sent at once, it could make them publish before a consumer
        # resubscribed.
        await asyncio.sleep(_RECONNECT_SETTLE_S)
        self._ping_now.set()

    def _grace_s(self) -> float:
        return 2 * self.config.keepalive_s + self.config.control_timeout_s

    async def _expiry_loop(self) -> None:
        """Expire sessions without keepalive (every half interval) and check, once an
        interval, that each cluster with sessions is alive and still knows them. Nothing of
        this runs while our own connection is down."""
        interval = max(self.config.keepalive_s / 2, 0.05)
        ticks = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ping_now.wait(), timeout=interval)
            if self._stop.is_set() or self._tg is None:
                return
            ping_now = self._ping_now.is_set()
            self._ping_now.clear()
            if not self._nc.is_connected:
                continue
            if not ping_now:
                for entry in self.registry.expire(now=self._clock()):
                    await self._expire(entry)
                ticks += 1
            if ping_now or ticks % 2 == 0:
                self._ping_all()

    async def _expire(self, entry: SessionEntry) -> None:
        try:
            if not await self._claim(entry.session):
                return  # another instance expires it, or it was kept alive there
        except BrokerError as exc:
            log.warning("session.expiry_deferred", session=entry.session, error=str(exc))
            return
        log.info("session.expired", session=entry.session, cluster=entry.cluster)
        await self._notify(entry.session, "expired", "no keepalive: session closed")
        assert self._tg is not None
        self._tg.create_task(self._tell_cluster_closed(entry, "keepalive expired"))

    def _ping_all(self) -> None:
        # A session is registered before its cluster hears of the open: one younger than the
        # open's timeout may be unknown to the cluster only because the open is still on its
        # way. Asking about it then would end a session that is about to work (and the
        # cluster would serve it with every envelope dropped here).
        settled = self._clock() - self.config.control_timeout_s
        clusters: dict[str, list[str]] = {}
        for entry in self.registry.entries():
            if entry.added_at <= settled:
                clusters.setdefault(entry.cluster, []).append(entry.session)
        assert self._tg is not None
        for cluster, sessions in clusters.items():
            self._tg.create_task(self._ping(cluster, sessions))

    async def _notify(self, session: str, code: str, message: str) -> None:
        try:
            await self._nc.publish(self._subjects.inbox(session), notice(session, code, message))
        except nats.errors.Error as exc:  # a hint only: the consumer's keepalive tells it too
            log.info("notice.lost", session=session, code=code, error=repr(exc))

    async def _end(self, session: str, message: str) -> None:
        if self.registry.remove(session) is None:
            return
        try:
            claimed = await self._claim(session)
        except BrokerError as exc:
            log.warning("session.end_deferred", session=session, error=str(exc))
            return
        if claimed:
            log.info("session.ended", session=session, reason=message)
            await self._notify(session, "ended", message)

    async def _forget(self, session: str) -> None:
        self.registry.remove(session)
        if self._shared is not None:
            await self._shared.delete(session)

    async def _claim(self, session: str) -> bool:
        """True if this instance is the one to announce the end of a (locally removed)
        session: always alone, or when it wins the shared registry's optimistic delete."""
        if self._shared is None:
            return True
        if await self._shared.claim(session):
            return True
        await self._shared.lookup(session)  # kept alive elsewhere: back into the cache
        return False

    async def _ping(self, cluster: str, sessions: list[str]) -> None:
        """A producer that is gone (twice unanswered) or that no longer knows a session (it
        restarted) ends those sessions: the consumers are told with an ``ended`` notice."""
        try:
            answer = await self._control(
                cluster, {"v": VERSION, "op": "ping", "sessions": sessions}
            )
        except SessionError as exc:
            if not self._nc.is_connected or self._clock() < self._grace_until:
                # our own outage, or the cluster's reconnect after it: not its silence
                log.info("cluster.ping_failed", cluster=cluster, counted=False, error=exc.detail)
                return
            self._ping_failures[cluster] += 1
            log.info("cluster.ping_failed", cluster=cluster, counted=True, error=exc.detail)
            if self._ping_failures[cluster] >= 2:
                for session in sessions:
                    await self._end(session, f"cluster {cluster!r} is unavailable")
            return
        self._ping_failures.pop(cluster, None)
        unknown = answer.get("unknown")
        if isinstance(unknown, list):
            for session in set(sessions) & {s for s in unknown if isinstance(s, str)}:
                await self._end(session, f"cluster {cluster!r} no longer serves this session")
