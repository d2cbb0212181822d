"""The session API: consumers' open, keepalive, close, resume and grants requests
(``P.api.session.<op>``), served within the proxy's limits; an open is forwarded to its
cluster as a control ``open``, a resume replayed from the cluster's store, a grants request
forwarded as a control ``grants`` (no session)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from typing import Any, Final, TypeVar

import nats.errors
import structlog

from broker_proxy._core import ProxyCore
from broker_proxy._registry import SessionEntry
from broker_proxy._replay import has_store, replay
from sealstream import BrokerError, SessionError, TokenVerifier, WireError
from sealstream.control import (
    Granted,
    GrantsRequest,
    KeptAlive,
    Ok,
    Opened,
    OpenRequest,
    Refusal,
    Reply,
    ResumeRequest,
    SessionRef,
    decode_request,
    encode,
)

__all__ = ["SessionApi"]

log = structlog.get_logger(__name__)

#: the reply subject of a session request: a client's request inbox (``_INBOX.`` then
#: tokens of a restricted alphabet; no wildcard, no other subject space)
_REPLY_INBOX: Final = re.compile(r"_INBOX(\.[A-Za-z0-9_-]{1,64}){1,4}")
#: a producer's refusals the consumer hears as they are (a tuple, as the codes are compared
#: to decoded values)
_PASSED_ON = ("bad_request", "forbidden", "limit_exceeded")
_BUSY: Final = encode(Refusal("limit_exceeded", "too many pending requests", retry=True))
#: how long the proxy trusts what it learnt of a cluster's store
_STORE_TTL_S: Final = 10.0
_REGISTRY_DOWN: Final = encode(
    Refusal("cluster_unavailable", "session registry unavailable, retry", retry=True)
)


class SessionApi:
    """``refused`` counts the requests answered with an error, by code; ``replayed`` the
    envelopes published again from the store; ``pending_peak`` is the most served at once
    (bounded by ``limits.pending_requests``)."""

    def __init__(self, core: ProxyCore, verifier: TokenVerifier) -> None:
        self._core = core
        self._verifier = verifier
        self.refused: Counter[str] = Counter()
        #: envelopes published again from the store
        self.replayed = 0
        #: cluster -> (until, keeps a store): asked of JetStream at most once in _STORE_TTL_S
        self._stores: dict[str, tuple[float, bool]] = {}
        self._pending = asyncio.Semaphore(core.config.limits.pending_requests)
        self._in_flight = 0
        self.pending_peak = 0

    async def on_request(self, msg: Any) -> None:
        # The answer goes where the requester says, with the proxy's own permissions (which
        # include the session registry's $KV and $JS subjects and the clusters' control
        # subjects): only a request inbox is accepted, and the answer is a plain publish
        # (msg.respond would copy the request's headers, KV operations among them). A request
        # with no reply subject (a page's close as it goes away) is served unanswered.
        if msg.reply and not _REPLY_INBOX.fullmatch(msg.reply):
            self.refused["bad_reply_subject"] += 1
            log.info("session.bad_reply_subject", subject=msg.subject, reply=msg.reply[:80])
            return
        tg = self._core.tg
        if tg is None or self._pending.locked():
            self.refused["limit_exceeded"] += 1
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await self._core.nc.publish(msg.reply, _BUSY)
            return
        await self._pending.acquire()
        self._in_flight += 1
        self.pending_peak = max(self.pending_peak, self._in_flight)
        tg.create_task(self._serve(msg))

    async def _serve(self, msg: Any) -> None:
        try:
            op = msg.subject.rsplit(".", 1)[-1]
            try:
                reply = encode(await self._handle(op, msg.data))
            except SessionError as exc:
                self.refused[exc.code] += 1
                log.info("session.refused", op=op, code=exc.code, reason=exc.detail)
                reply = encode(Refusal.of(exc))
            except BrokerError as exc:  # the shared registry is out of reach: retry later
                self.refused["cluster_unavailable"] += 1
                log.warning("session.registry_unavailable", op=op, error=str(exc))
                reply = _REGISTRY_DOWN
            if msg.reply:
                try:
                    await self._core.nc.publish(msg.reply, reply)
                except nats.errors.Error as exc:
                    log.info("session.reply_lost", op=op, error=repr(exc))
        finally:
            self._in_flight -= 1
            self._pending.release()

    async def _handle(self, op: str, payload: bytes) -> Reply:
        try:
            request = decode_request(op, payload)
        except WireError as exc:
            raise SessionError("bad_request", str(exc)) from None
        if isinstance(request, OpenRequest):
            return await self._open(request)
        if isinstance(request, ResumeRequest):
            entry = self._owned(op, request)
            answer = await replay(
                self._core,
                entry,
                request.after,
                limit=request.limit,
                cursor=request.cursor,
                group=request.group,
            )
            self.replayed += answer.replayed
            return answer
        if isinstance(request, GrantsRequest):
            return await self._grants(request)
        return await self._session_op(op, request)

    async def _grants(self, req: GrantsRequest) -> Granted:
        """What the cluster grants the identity that signed the proof: asked of the cluster,
        whose signed answer goes back unchanged; nothing is registered."""
        claims = self._verifier.verify(req.token)
        if not claims.allows(req.cluster):
            raise SessionError("forbidden", f"token does not allow cluster {req.cluster!r}")
        answer = _passed_on(
            await self._core.ask(req.cluster, req.control(user=claims.sub), Granted)
        )
        log.info("grants.answered", cluster=req.cluster, user=claims.sub)
        return answer

    def _owned(self, op: str, ref: SessionRef | ResumeRequest) -> SessionEntry:
        """The session a request names, if its token is its owner's (the user who opened
        it): the one check of keepalive, close and resume. A renewed token may have lost the
        cluster: the session does not outlive that (closing stays allowed)."""
        claims = self._verifier.verify(ref.token)
        registry = self._core.registry
        entry = registry.get(ref.session)
        if entry is None and op in ("resume", "close"):  # ended, kept for its owner's drain
            entry = registry.ended(ref.session, now=self._core.clock())
        if entry is None:
            raise SessionError("bad_request", "unknown or expired session")
        if entry.user != claims.sub:
            raise SessionError("forbidden", "session belongs to another user")
        if op != "close" and not claims.allows(entry.cluster):
            raise SessionError("forbidden", f"token no longer allows cluster {entry.cluster!r}")
        return entry

    async def _session_op(self, op: str, ref: SessionRef) -> Reply:
        """A keepalive or a close, from the user who opened the session only."""
        core = self._core
        entry = self._owned(op, ref)
        if op == "keepalive":
            core.registry.touch(ref.session, now=core.clock())
            if core.shared is not None:
                await core.shared.touch(entry)
            return KeptAlive(core.config.keepalive_s)
        ended = ref.session not in core.registry  # its owner is done draining it
        await core.forget(ref.session)
        reason = "ended" if ended else "consumer"
        log.info("session.closed", session=ref.session, cluster=entry.cluster, reason=reason)
        if not ended:  # the cluster already let an ended one go
            await core.tell_cluster_closed(entry, "closed by consumer")
        return Ok()

    async def _open(self, req: OpenRequest) -> Opened:
        core = self._core
        claims = self._verifier.verify(req.token)
        if not claims.allows(req.cluster):
            raise SessionError("forbidden", f"token does not allow cluster {req.cluster!r}")
        # asked before the checks: nothing may wait between them and the registration
        store = await self._has_store(req.cluster)
        limits = core.config.limits
        if len(req.streams) > limits.streams_per_session:
            raise SessionError("limit_exceeded", f"at most {limits.streams_per_session} streams")
        if core.registry.sessions_of(claims.sub) >= limits.sessions_per_user:
            raise SessionError("limit_exceeded", f"at most {limits.sessions_per_user} sessions")
        control = req.control(user=claims.sub)  # the session id: the key's thumbprint
        session = control.session
        if session in core.registry or core.registry.ended(session, now=core.clock()):
            raise SessionError("bad_request", "a session with this key exists: use a new key")
        # Register before the cluster hears of it: its first envelope may beat its reply.
        entry = core.registry.add(
            session,
            cluster=req.cluster,
            user=claims.sub,
            streams=req.streams,
            now=core.clock(),
            key_mode=req.key_mode,
            # what it misses while cut off is kept: it may come back later than 3 keepalives
            # (in group mode to its keys and gseq line: what it missed is a counted gap)
            grace_s=core.config.store_grace_s if store else 0.0,
        )
        if core.shared is not None and not await core.shared.create(entry):
            core.registry.remove(session)
            raise SessionError("bad_request", "a session with this key exists: use a new key")
        try:
            answer = await core.ask(req.cluster, control, Ok)
        except SessionError:
            await core.forget(session)
            raise
        if isinstance(answer, Refusal):
            await core.forget(session)
            _passed_on(answer)
        log.info(
            "session.opened",
            session=session,
            cluster=entry.cluster,
            user=claims.sub,
            streams=list(req.streams),
            key_mode=req.key_mode,
        )
        return Opened(session, core.subjects.inbox(session), core.config.keepalive_s, store=store)

    async def _has_store(self, cluster: str) -> bool:
        """Whether the cluster keeps a store, known for a while (a storm of opens asks
        JetStream once)."""
        now = self._core.clock()
        known = self._stores.get(cluster)
        if known is None or known[0] <= now:
            known = (now + _STORE_TTL_S, await has_store(self._core, cluster))
            self._stores[cluster] = known
        return known[1]


_A = TypeVar("_A")


def _passed_on(answer: _A | Refusal) -> _A:
    """The cluster's answer; its refusal as the consumer hears it (SessionError)."""
    if not isinstance(answer, Refusal):
        return answer
    if answer.code in _PASSED_ON:
        raise SessionError(answer.code, answer.message[:200])
    raise SessionError("cluster_unavailable", "cluster refused the request")
