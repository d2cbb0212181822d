"""One live session of a subscription: its key pair, its connection (its own, logged in as
the session, or the client's), its inbox subscription, the open, its keepalives, and a bounded
queue of what arrives on its inbox."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import nats.errors
import structlog

from sealstream import BrokerError, SessionError, WireError
from sealstream.control import (
    KeptAlive,
    Opened,
    OpenRequest,
    Replayed,
    ResumeRequest,
    SessionRef,
)
from sealstream.crypto import (
    ConsumerKey,
    ConsumerSession,
    GroupMember,
)
from sealstream.nats import connect, release, settle
from sealstream.resource import AsyncResource
from sealstream.wire import decode_envelope

if TYPE_CHECKING:
    from consumers._endpoint import Endpoint

__all__ = ["LiveSession", "Login", "Lost", "ReplayDone", "session_connection"]

log = structlog.get_logger(__name__)

_MAX_TOKEN = 8192  # docs/protocol.md: the proxy's token size cap
#: a page that failed (the store or the proxy out of reach) is asked again after this long
_PAGE_RETRY_S = 0.5
#: the most envelopes a resume asks for (docs/protocol.md): a page of 5,000 took a loaded
#: proxy 9 s to replay, past the request's time, and its gap was counted as lost
RESUME_PAGE: Final = 1000
#: a resume's answer comes after its page was replayed: this many request timeouts
_RESUME_TIMEOUT_FACTOR: Final = 3


@dataclass(frozen=True, slots=True)
class Lost:
    """A session is over without an authenticated end; ``resumable`` if a new one may
    replace it (not when the token was refused, or the client closed)."""

    reason: str
    resumable: bool


@dataclass(frozen=True, slots=True)
class ReplayDone:
    """A resume request was answered (``replayed`` envelopes published on the inbox before
    the answer), or failed (0); None: the deployment keeps no store (at most once). ``page``:
    it asked for a page (the session is behind), ``more`` stored envelopes follow it, and
    ``first`` is the ``seq`` of the first one replayed."""

    replayed: int | None
    page: bool = False
    more: bool = False
    first: int | None = None
    #: the request's ``after`` (an answer to an earlier page is told from the current one's)
    after: int | None = None
    #: where the store is read next, once this page is accepted
    cursor: int | None = None
    #: a group resume's group (``after`` and ``first`` are then ``gseq``s)
    group: str | None = None


class LiveSession(AsyncResource):
    """One live session: key pair, inbox subscription, the open, keepalives, and a bounded
    queue of what arrives on the inbox."""

    def __init__(
        self, client: Endpoint, cluster: str, streams: list[str], key: ConsumerKey | None
    ) -> None:
        super().__init__()
        self._client = client
        self.cluster = cluster
        self.streams = streams
        self._key = key
        self.crypto: ConsumerSession | None = None
        cfg = client.config
        self.queue: asyncio.Queue[bytes | Lost | ReplayDone | BaseException] = asyncio.Queue(
            cfg.queue_size
        )
        self._sub: Any = None
        self._stop = asyncio.Event()
        self.received = 0
        self.dropped = 0
        #: bytes of the envelopes in the queue, and their bound
        self.queued = 0
        self._max_queued = cfg.queue_bytes
        self._received_bytes = 0
        #: behind: the queue overflowed on a session whose cluster keeps a store, so the
        #: session reads what follows its last accepted seq from the store, page by page, at
        #: its own pace, and lets the live envelopes ahead of it go (``deferred``) until a
        #: page reaches the end of the store (docs/protocol.md, "Slow consumers")
        self.behind = False
        self.deferred = 0
        #: the store position the next page is read from, and the one the last page asked
        self.cursor: int | None = None
        self._page_cursor: int | None = None
        #: the last accepted seq the last page asked after
        self.page_after: int | None = None
        #: the first seq a page brought past a gap that retention made: accepted as next
        self.floor: int | None = None
        #: pages in a row that brought nothing acceptable
        self.stalls = 0
        #: the page asked for: seqs above ``_page_lo``, at most ``_page_limit`` of them
        self._page_lo = -1
        self._page_limit = 0
        self._last_drop_log = 0.0
        self.keepalive_s = 10.0
        #: (event loop time) a key envelope signed by a pinned key is due by then
        self.key_deadline = float("inf")
        #: past the key deadline, how many of the items queued then may still be taken
        self.key_grace: int | None = None
        self._closed = False
        #: a control item that met a full queue
        self.ending: Lost | BaseException | None = None
        self._own_nc: Any = None  # the session's own connection (auth callout)
        self._login: Login | None = None
        #: the cluster keeps a store (the open's answer said so; a resume answered "no store"
        #: says otherwise): envelopes past a gap are held, and a replay asked for
        self.store = False
        self._resuming = False
        #: (event loop time) when the last resume was answered, and each group's: the holds'
        #: time runs from there (what the replay brought may still be queued behind it)
        self.answered_at: float | None = None
        self.group_answered_at: dict[str, float] = {}
        #: the last accepted seq the last resume asked after: one request per gap
        self._asked_after: int | None = None
        #: (a group member) the groups whose resume is in flight, and the last accepted
        #: gseq each group's last resume asked after
        self._group_resuming: set[str] = set()
        self._group_asked: dict[str, int | None] = {}
        #: groups whose last resume said ``more`` (asked again once the line moves), and the
        #: store position a group's next resume reads from (its last page accepted whole)
        self.group_more: set[str] = set()
        self.group_cursor: dict[str, int] = {}
        self._reconnects = 0
        self._tg: asyncio.TaskGroup | None = None
        self._pageable = False
        #: why the session ended, while what the store keeps of it is read (:meth:`drain`)
        self.draining: str | None = None

    async def _start(self) -> None:
        cfg = self._client.config
        key = self._key or await ConsumerKey.agenerate(cfg.key_kind)
        self.crypto = (
            GroupMember(
                key,
                cluster=self.cluster,
                streams=self.streams,
                trust=self._client.trust,
                policy=cfg.policy,
            )
            if cfg.key_mode == "group"
            else ConsumerSession(
                key,
                cluster=self.cluster,
                trust=self._client.trust,
                key_mode=cfg.key_mode,
                allow_zip=cfg.allow_zip,
                policy=cfg.policy,
            )
        )
        subjects = self._client.subjects
        own = await session_connection(
            self._client,
            key.session_id,
            on_closed=self._on_closed,
            on_reconnected=self._on_reconnected,
        )
        if own is not None:
            self._own_nc, self._login = own
        self._stack.push_async_callback(release, self._own_nc)
        nc = self._conn
        # the inbox first: the producer's key envelope may arrive before the open reply
        self._sub = await nc.subscribe(subjects.inbox(key.session_id), cb=self._on_msg)
        self._stack.push_async_callback(self._unsubscribe)
        await settle(nc)
        req = OpenRequest(
            cluster=self.cluster,
            streams=tuple(self.streams),
            jwk=key.public_jwk,
            key_mode=cfg.key_mode,
            token=self._client.token(),
            zip=cfg.allow_zip,
            # the cluster's own check of who reads (the relay forwards it untouched)
            proof=cfg.identity.prove(
                cluster=self.cluster,
                session=key.session_id,
                streams=self.streams,
                key_mode=cfg.key_mode,
                zip=cfg.allow_zip,
            )
            if cfg.identity is not None
            else None,
            authz=cfg.authz,
        )
        opened = await self._client.request(subjects.api_open, req, Opened, nc=nc)
        if opened.session != key.session_id:
            # a relay that tampers, not a passing failure: never retried
            raise SessionError(
                "bad_request", "the proxy answered for another session", retriable=False
            )
        self._stack.push_async_callback(self.close)
        if opened.keepalive_s is not None:
            self.keepalive_s = float(opened.keepalive_s)
        self.store = opened.store
        # falling behind reads the session's own subject a page at a time: in group mode its
        # groups' batches are replayed as gaps instead (a full queue drops, the hold resumes)
        self._pageable = self.store and cfg.key_mode != "group"
        self.key_deadline = asyncio.get_running_loop().time() + cfg.request_timeout_s
        self._tg = tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self._stop.set)
        self._reconnects = self._conn.stats["reconnects"]
        tg.create_task(self._keepalive())
        log.info(
            "session.opened",
            cluster=self.cluster,
            session=key.session_id,
            streams=self.streams,
            key=key.kind,
            key_mode=cfg.key_mode,
        )

    @property
    def _conn(self) -> Any:
        """The session's connection: its own (auth callout) or the client's (None: closed)."""
        return self._own_nc if self._own_nc is not None else self._client._nc

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and self._conn is not None and not self._conn.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Tell the proxy the session is over (once; best effort: it expires it anyway)."""
        self._stop.set()  # no keepalive after this
        if self._closed or self.crypto is None or self._conn is None or self._conn.is_closed:
            return
        self._closed = True
        try:
            ref = SessionRef(self.crypto.session, self._client.token())
            # short: on shutdown the proxy may be going away too; it expires the session anyway
            await self._client.request(
                self._client.subjects.api_close, ref, timeout_s=2.0, nc=self._conn
            )
        except (BrokerError, SessionError) as exc:
            log.info("session.close_failed", session=self.crypto.session, error=str(exc))

    async def _keepalive(self) -> None:
        """Keep the session alive. It runs in a task group entered by whichever task opened
        the subscription: a failure it did not foresee (a token function's own exception)
        must end the subscription through its iterator, not cancel that task."""
        try:
            await self._keep_alive()
        except Exception as exc:  # noqa: BLE001 - handed to the iterator, which raises it
            log.warning("session.keepalive_stopped", error=type(exc).__name__)
            self.push(exc)

    async def _keep_alive(self) -> None:
        assert self.crypto is not None
        session = self.crypto.session
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.keepalive_s)
            if self._stop.is_set() or self.draining is not None:  # no keepalive once ended
                return
            if self._conn is None or self._client.closed:  # closed under the subscription
                self.push(Lost("the client is closed", resumable=False))
                return
            try:
                # read each time: a TokenFile renewed on disk keeps the session going
                token = self._client.token()
            except SessionError as exc:
                # a file caught mid-rewrite reads empty: try again at the next interval (the
                # proxy's expiry bounds how long)
                log.warning("session.token_unreadable", session=session, error=exc.detail)
                continue
            if self._login is not None and self._login.renew_due(token):
                # renewed: log in again with it (the broker ends the old login after its exp)
                await self._own_nc.force_reconnect()
            try:
                ref = SessionRef(session, token)
                subject = self._client.subjects.api_keepalive
                await self._client.request(subject, ref, KeptAlive, nc=self._conn)
                if self._conn.stats["reconnects"] != self._reconnects:  # a shared connection
                    self._reconnects = self._conn.stats["reconnects"]
                    self._ask_all()
            except SessionError as exc:
                if exc.retriable or exc.code == "limit_exceeded":  # busy: the session stays
                    log.warning("session.keepalive_refused", session=session, code=exc.code)
                    continue
                # the proxy no longer knows it (resumable), or refuses our token (not)
                resumable = exc.code == "bad_request"
                self.push(Lost(f"session lost: {exc.detail}", resumable=resumable))
                return
            except BrokerError as exc:
                nc = self._conn
                if nc is None or nc.is_closed:  # no connection will come back: say so
                    self.push(Lost("the NATS connection is closed", resumable=self._resumable()))
                    return
                log.warning("session.keepalive_failed", session=session, error=str(exc))

    @property
    def resuming(self) -> bool:
        """A resume request is in flight (its answer not yet queued)."""
        return self._resuming

    def ask_resume(self, *, again: bool = False) -> None:
        """Ask the proxy for what follows the last accepted ``seq`` (docs/protocol.md,
        "Lossless delivery"); the answer comes through the queue as a :class:`ReplayDone`.
        One at a time, once per last accepted ``seq`` unless ``again`` (a reconnect), and
        never once the deployment said it keeps no store. A session that can page asks for
        at most a page: a longer gap makes it fall behind (:meth:`fall_behind`)."""
        if self.behind:
            self.ask_page(again=again)
            return
        if self._resuming or not self.store or self._tg is None or self._stop.is_set():
            return
        assert self.crypto is not None
        if self.crypto.last_seq == self._asked_after and not again:
            return  # asked already: what the store had of this gap came, or never will
        self._asked_after = after = self.crypto.last_seq
        self._resuming = True
        limit = self._page_room() if self._pageable else None
        self._tg.create_task(self._resume(after, limit=limit))

    def group_resuming(self, group: str) -> bool:
        """A resume of ``group``'s batches is in flight."""
        return group in self._group_resuming

    def ask_group_resume(self, group: str, *, again: bool = False, gap: bool = False) -> None:
        """(A group member) ask the proxy for the batches of ``group`` that follow the last
        ``gseq`` accepted of it, at most a page; the answer comes through the queue as a
        :class:`ReplayDone` naming the group. One at a time per group, once per last
        accepted ``gseq`` unless ``again``. For a ``gap`` (a batch held past it) the store is
        read from the start: a page read from a cursor may have passed what is missing."""
        crypto = self.crypto
        if not isinstance(crypto, GroupMember) or not self.store or self._tg is None:
            return
        line = crypto.line(group)
        if line is None or group in self._group_resuming or self._stop.is_set():
            return
        if gap and self.group_cursor.pop(group, None) is not None:
            again = True
        after = line[0]
        if self._group_asked.get(group) == after and not again:
            return
        self._group_asked[group] = after
        self._group_resuming.add(group)
        self.group_more.discard(group)
        cursor = self.group_cursor.get(group)
        self._tg.create_task(
            self._resume(after, limit=self._page_room(), group=group, cursor=cursor)
        )

    def _ask_all(self) -> None:
        """After a reconnect: what the session and each of its groups missed meanwhile."""
        self.ask_resume(again=True)
        if isinstance(self.crypto, GroupMember):
            for group in self.crypto.groups:
                self.ask_group_resume(group, again=True)

    def fall_behind(self) -> None:
        """Read what follows the last accepted ``seq`` from the store, page by page, from
        now on (a fresh episode: nothing of an earlier one carries over)."""
        if self.behind or not self._pageable:
            return
        assert self.crypto is not None
        self.behind = True
        self.stalls = 0
        self.page_after = self.floor = self.cursor = self._page_cursor = None
        self._page_lo, self._page_limit = -1, 0
        log.warning("session.behind", session=self.crypto.session, after=self.crypto.last_seq)

    def drain(self, reason: str) -> bool:
        """The proxy ended the session (``reason``): read what its store keeps of it past the
        last accepted ``seq``, page by page, before a new session replaces it (docs/protocol.md,
        "Draining an ended session"); no keepalive any more. False when there is nothing to
        read it from (no store, or group mode, whose next session reads its groups instead);
        True while it drains (a second end changes nothing)."""
        if self.draining is not None:
            return True
        if not self._pageable or not self.store or self._stop.is_set():
            return False
        self.draining = reason
        assert self.crypto is not None
        log.info("session.draining", session=self.crypto.session, after=self.crypto.last_seq)
        if self.behind:  # paging already: it goes on to the end of the store
            return True
        self.fall_behind()
        return True

    @property
    def drained(self) -> bool:
        """(Draining) a page reached the end of the store, or paging gave up."""
        return self.draining is not None and not self.behind

    def _page_room(self) -> int:
        """Half the queue, in envelopes and in bytes (at the mean size received so far), and
        at most a page a loaded proxy replays well within the request's time."""
        mean = self._received_bytes // max(self.received, 1) or 1
        room = min(self.queue.maxsize // 2, self._max_queued // 2 // mean)
        return max(1, min(room, RESUME_PAGE))

    def ask_page(self, *, again: bool = False, from_start: bool = False) -> None:
        """(Behind) ask the proxy for the next page of what follows the last accepted
        ``seq``; once per last accepted ``seq`` unless ``again`` (the page asked last is
        read again, from where that one was read, or ``from_start`` of the store)."""
        if self._resuming or not self.store or self._tg is None or self._stop.is_set():
            return
        assert self.crypto is not None
        if self.crypto.last_seq == self.page_after and not again:
            return
        self.page_after = after = self.crypto.last_seq
        if again:
            self.cursor = None if from_start else self._page_cursor
        self._page_cursor = self.cursor
        self._page_limit = self._page_room()
        # the seqs the page brings: what follows the last accepted, or what follows a gap
        # that retention made (the first seq a page brought past it)
        self._page_lo = after if self.floor is None else self.floor - 1
        self._resuming = True
        self._tg.create_task(self._resume(after, limit=self._page_limit, page=True))

    async def _resume(
        self,
        after: int,
        *,
        limit: int | None = None,
        page: bool = False,
        group: str | None = None,
        cursor: int | None = None,
    ) -> None:
        assert self.crypto is not None
        session = self.crypto.session
        done = ReplayDone(0, page=page, more=page, after=after, group=group)
        failed = True
        try:
            cursor = self.cursor if page else cursor
            req = ResumeRequest(session, self._client.token(), after, limit, cursor, group)
            subject = self._client.subjects.api_resume
            # the proxy answers once it has published the page: give it the time of a page
            timeout_s = _RESUME_TIMEOUT_FACTOR * self._client.config.request_timeout_s
            answer = await self._client.request(
                subject, req, Replayed, nc=self._conn, timeout_s=timeout_s
            )
            self.store = True
            failed = False
            done = ReplayDone(
                answer.replayed, page, answer.more, answer.first, after, answer.cursor, group
            )
            log.info(
                "session.resume_answered",
                session=session,
                group=group,
                after=after,
                replayed=done.replayed,
                limit=limit,
                more=answer.more,
            )
        except SessionError as exc:
            if exc.code == "bad_request" and exc.detail.startswith("no store"):
                self.store = self._pageable = self.behind = False
                done = ReplayDone(None, page, after=after, group=group)
            elif exc.retriable:  # the store or the proxy out of reach a moment: ask again
                self._forget_asked(group)
            log.info(
                "session.resume_refused",
                session=session,
                group=group,
                code=exc.code,
                error=exc.detail,
            )
        except BrokerError as exc:
            self._forget_asked(group)
            log.info("session.resume_failed", session=session, group=group, error=str(exc))
        finally:
            if page and failed:  # asked again by the iterator (a stall): not at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=_PAGE_RETRY_S)
            now = asyncio.get_running_loop().time()
            if group is None:
                self._resuming, self.answered_at = False, now
            else:
                self._group_resuming.discard(group)
                self.group_answered_at[group] = now
            self.push(done)

    def _forget_asked(self, group: str | None) -> None:
        """A resume failed for a passing reason: the same gap may be asked again."""
        if group is None:
            self._asked_after = None
        else:
            self._group_asked[group] = None

    async def _on_reconnected(self) -> None:
        self._reconnects = self._conn.stats["reconnects"]
        self._ask_all()

    def _resumable(self) -> bool:
        """A session whose own connection closed (the broker ended its login) may be
        replaced by one on a new connection; not when the client itself was closed."""
        return self._own_nc is not None and not self._client.closed

    async def _on_closed(self) -> None:
        if not self._stop.is_set():  # not our own close: the broker ended the connection
            self.push(Lost("the NATS connection was closed", resumable=self._resumable()))

    def push(self, item: bytes | Lost | ReplayDone | BaseException) -> None:
        """Queue an inbox message. An envelope past the queue's bounds (in envelopes or in
        bytes) is let go: read again from the store later (the session falls behind) when the
        cluster keeps one, else dropped and counted. A control item (the session is over) is
        never dropped: on a full queue it waits in ``ending``, which the iterator takes once
        it has drained the queue."""
        if isinstance(item, bytes):
            if self.behind and not self._in_page(item):
                self.deferred += 1  # live, ahead of the page: the store has it
                return
            if self.queue.full() or (self.queued and self.queued + len(item) > self._max_queued):
                self._overflow()
                return
            self.queued += len(item)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if isinstance(item, ReplayDone):  # a hint: the hold's time runs out anyway, and
                self.page_after = None  # a page is asked again with the next envelope
                return
            assert not isinstance(item, bytes)  # checked above: the queue had room
            self.ending = self.ending or item

    def _overflow(self) -> None:
        now = time.monotonic()
        if self._pageable:
            self.deferred += 1
            self.fall_behind()
            return
        self.dropped += 1
        if now - self._last_drop_log >= 1.0:
            self._last_drop_log = now
            log.warning("inbox.overflow", dropped=self.dropped, queue=self.queue.maxsize)

    def _in_page(self, payload: bytes) -> bool:
        """(Behind) whether an inbox message may take room in the queue: the envelopes of
        the page asked for (``seq`` in the page's range) and anything that is not an
        envelope (a notice, or what the session's checks then count as malformed)."""
        try:
            seq = decode_envelope(payload, max_size=len(payload)).seq
        except WireError:
            return True
        return self._page_lo < seq <= self._page_lo + self._page_limit

    def get_nowait(self) -> bytes | Lost | ReplayDone | BaseException:
        return self._took(self.queue.get_nowait())

    async def get(self) -> bytes | Lost | ReplayDone | BaseException:
        return self._took(await self.queue.get())

    def _took(
        self, item: bytes | Lost | ReplayDone | BaseException
    ) -> bytes | Lost | ReplayDone | BaseException:
        if isinstance(item, bytes):
            self.queued -= len(item)
        return item

    async def _on_msg(self, msg: Any) -> None:
        self.received += 1
        self._received_bytes += len(msg.data)
        self.push(msg.data)


class Login:
    """The NATS password of a session connection: the client's token, read again for every
    (re)connect (the last good one when it cannot be read at that instant). ``sent`` is the
    token the connection last logged in with: once the token is renewed, a reconnect presents
    it before the broker ends the login that the old one bounds."""

    def __init__(self, client: Endpoint) -> None:
        self._client = client
        self.sent = client.token()  # no token at all: fail now, with the token's error

    def __call__(self) -> str:
        with contextlib.suppress(SessionError):
            self.sent = self._client.token()
        return self.sent

    def renew_due(self, token: str, *, margin_s: float = 60.0) -> bool:
        """True when ``token`` differs from the login's and the login's token expires within
        ``margin_s`` (read from its claims, unverified: only to time the new login; a token
        function that mints a fresh token per call must not reconnect every keepalive)."""
        if token == self.sent:
            return False
        exp = _unverified_exp(self.sent)
        return exp is None or exp - time.time() < margin_s


def _unverified_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWS compact token, without verifying it; None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


async def session_connection(
    client: Endpoint,
    session_id: str,
    *,
    on_closed: Callable[[], Awaitable[None]],
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Any, Login] | None:
    """A connection logged in as ``session_id`` with the token (``docs/protocol.md``, consumer
    connections), or None when the client's shared connection serves (NATS credentials).
    ``on_closed`` runs when the connection is closed, by us or by the broker."""
    if not client.callout:
        return None
    password = Login(client)
    callbacks: dict[str, Any] = {}
    if on_reconnected is not None:
        callbacks["reconnected_cb"] = on_reconnected
    if len(password.sent) > _MAX_TOKEN:  # the proxy would refuse it; NATS may just drop the line
        raise SessionError("unauthorized", f"the access token is too large (over {_MAX_TOKEN} B)")
    try:
        nc = await connect(
            client.config.nats_url,
            name="sealstream-consumer",
            user=session_id,
            password=password,
            inbox_prefix=f"_INBOX.{session_id}",
            fail_fast=True,  # a refused login is final: say so now
            closed_cb=on_closed,
            **callbacks,
        )
    except BrokerError as exc:
        said = str(exc).lower()
        if "control line" in said:  # the CONNECT line is capped (4 KiB by default)
            raise SessionError("unauthorized", "the access token is too large for NATS") from None
        if exc.retriable:
            raise
        exp = _unverified_exp(password.sent)
        if exp is not None and exp < time.time() - 30:  # the proxy's leeway
            raise SessionError(
                "unauthorized", "NATS refused the connection: token expired"
            ) from None
        refused = SessionError(
            "unauthorized",
            "NATS refused the connection: the broker's authorization service refused the "
            "token (not yet valid, invalid, or for no cluster; see the proxy log) or is not "
            "running",
        )
        refused.retriable = True  # the service may be starting: worth another try
        raise refused from None
    return nc, password
