"""A subscription: the async iterator of a live session's batches; with ``resume``, a chain
of sessions (a new one, with a fresh key, when one ends for an infrastructure reason),
opened with backoff and jitter."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Self, TypeVar

import structlog

from consumers._hold import GroupHolds, Hold
from consumers._session import LiveSession, Lost, ReplayDone
from sealstream import BrokerError, Envelope, IntegrityError, Notice, SessionError, TrustError
from sealstream.crypto import (
    Batch,
    ConsumerKey,
    ConsumerSession,
    End,
    GroupMember,
)
from sealstream.groupwire import GroupEnvelope
from sealstream.resource import AsyncResource

if TYPE_CHECKING:
    from consumers._endpoint import Endpoint

__all__ = ["DEFAULT_RETRY_S", "Resumed", "Stats", "Subscription"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Stats:
    """What a subscription received and what became of it."""

    received: int
    batches: int
    rows: int
    rejected: dict[str, int]
    dropped: int
    gaps: int
    lost: int
    #: sessions used (more than 1 after a resume)
    sessions: int = 1
    #: byte-identical copies dropped (a store's replay overlapping the live stream)
    duplicates: int = 0
    #: times an envelope was let go while the consumer was behind, to be read again from the
    #: store (one envelope may be let go more than once)
    deferred: int = 0


@dataclass(frozen=True, slots=True)
class Resumed:
    """Yielded by a ``resume=True`` subscription when a new session replaced one that ended.
    Group mode: the new session goes on with the groups' lines and kept keys, so what a store
    holds of the time between is read and opened, and the batches lost between are counted
    exactly (the next batch's ``lost_before``, and ``lost``). Session mode: with a store, what
    was sealed for the ended session is read first (``drained``); each session has a ``seq``
    line of its own, and rows emitted while there was none are lost and NOT counted."""

    previous: str
    session: str
    reason: str
    #: open attempts it took (busy or unavailable refusals are retried with backoff)
    attempts: int
    #: (group mode) the new session went on with the groups' lines: nothing is lost uncounted
    carried: bool = False
    #: (session mode, with a store) batches of the ended session read from the store before
    #: the new one was opened
    drained: int = 0


_T = TypeVar("_T", "Batch", "Batch | Resumed")
#: backoff between open attempts: exponential from 0.2 s to 5 s, each wait drawn from the upper
#: half (uniform over [d/2, d])
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0
#: how long a first open retries busy or unavailable refusals by default (0: fail at once)
DEFAULT_RETRY_S = 30.0
#: a page read again this many times without an envelope accepted ends the paging
_PAGE_STALLS = 3


class Subscription(AsyncResource, Generic[_T]):
    """A live subscription: an async iterator of :class:`Batch` (and, with ``resume``,
    :class:`Resumed` markers) until the producer ends it."""

    def __init__(
        self,
        client: Endpoint,
        cluster: str,
        streams: list[str],
        key: ConsumerKey | None,
        *,
        resume: bool = False,
        retry_s: float = DEFAULT_RETRY_S,
        resume_timeout_s: float = 120.0,
    ) -> None:
        super().__init__()
        self._client = client
        self.cluster = cluster
        self.streams = streams
        self._key = key
        self._resume = resume
        self._retry_s = retry_s
        self._resume_timeout_s = resume_timeout_s
        self._live: LiveSession | None = None
        #: the current session's envelopes that arrived ahead of a gap, and (group mode)
        #: its groups' batches
        self._hold = Hold()
        self._group_holds = self._holds_for(None)
        self.end_reason: str | None = None
        #: an error ended the iteration (raised once: a failed resume, a stopped keepalive)
        self._failed = False
        #: every resume so far, oldest first
        self.resumes: list[Resumed] = []
        self._batches = 0
        self._rows = 0
        #: batches the current session's drain brought (docs/protocol.md, "Draining")
        self._drained = 0
        self._past = Stats(0, 0, 0, {}, 0, 0, 0, 0)  # what ended sessions received

    @property
    def session(self) -> ConsumerSession | None:
        """The current session's verification state (None before the start)."""
        return self._live.crypto if self._live is not None else None

    @property
    def session_id(self) -> str:
        if self.session is None:
            raise RuntimeError("subscription not started")
        return self.session.session

    @property
    def keepalive_s(self) -> float:
        return self._live.keepalive_s if self._live is not None else 10.0

    def stats(self) -> Stats:
        """Counters over every session of this subscription."""
        live, past = self._live, self._past
        s = live.crypto if live is not None else None
        rejected: Counter[str] = Counter(past.rejected)
        rejected.update(s.rejected if s else {})
        return Stats(
            received=past.received + (live.received if live else 0),
            batches=self._batches,
            rows=self._rows,
            rejected=dict(rejected),
            dropped=past.dropped + (live.dropped if live else 0),
            gaps=past.gaps + (s.gaps if s else 0),
            lost=past.lost + (s.lost if s else 0),
            sessions=past.sessions + (1 if live else 0),
            duplicates=self._hold.duplicates + self._group_holds.duplicates,
            deferred=past.deferred + (live.deferred if live else 0),
        )

    async def _start(self) -> None:
        self._live, _ = await self._open(self._key, self._retry_s)
        self._group_holds = self._holds_for(self._live.crypto)
        self._stack.push_async_callback(self._close_live)

    async def _close_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            self._past = self._stats_with(live)
            await live.aclose()

    def _stats_with(self, live: LiveSession) -> Stats:
        """``_past`` with an ending session's counters added."""
        past, s = self._past, live.crypto
        rejected: Counter[str] = Counter(past.rejected)
        rejected.update(s.rejected if s else {})
        return Stats(
            received=past.received + live.received,
            batches=0,
            rows=0,
            rejected=dict(rejected),
            dropped=past.dropped + live.dropped,
            gaps=past.gaps + (s.gaps if s else 0),
            lost=past.lost + (s.lost if s else 0),
            sessions=past.sessions + 1,
            deferred=past.deferred + live.deferred,
        )

    async def _open(self, key: ConsumerKey | None, budget_s: float) -> tuple[LiveSession, int]:
        """Open a session, retrying passing refusals with backoff and jitter for
        ``budget_s`` seconds; the session and the attempts it took."""
        deadline = time.monotonic() + budget_s
        delay = _BACKOFF_FIRST
        attempts = 0
        while True:
            attempts += 1
            live = LiveSession(self._client, self.cluster, self.streams, key)
            try:
                await live.__aenter__()
            except (BrokerError, SessionError) as exc:
                if not self._passing(exc):
                    raise
                wait = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not a secret
                if time.monotonic() + wait > deadline:
                    raise
                log.info(
                    "session.open_retry",
                    cluster=self.cluster,
                    attempt=attempts,
                    error=str(exc),
                    wait_s=round(wait, 3),
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, _BACKOFF_MAX)
                key = None  # a key is single-use: the proxy may have registered it
                continue
            return live, attempts

    def _passing(self, exc: BrokerError | SessionError) -> bool:
        """A refusal the same open may get past later: the proxy busy or restarting, the
        cluster unavailable (a producer restarting); not one about the request itself."""
        if self._client.closed:
            return False
        if isinstance(exc, SessionError):
            return exc.code == "cluster_unavailable" or exc.retriable
        return exc.retriable

    async def _resume_after(self, reason: str) -> Resumed:
        """Replace the current session by a new one (fresh key)."""
        previous, ended = self.session_id, self.session
        # a group's line goes on only where the producer's groups go on across its restarts:
        # with a store (without one, a restarted producer's group starts again at 0)
        stored = self._live is not None and self._live.store
        log.warning("session.resuming", cluster=self.cluster, session=previous, reason=reason)
        await self._close_live()
        hold, self._hold = self._hold, Hold()  # the new session's seq line starts afresh
        self._hold.duplicates = hold.duplicates + self._group_holds.duplicates
        self._group_holds = self._holds_for(None)  # counted above, whatever comes next
        try:
            self._live, attempts = await self._open(None, self._resume_timeout_s)
            member, carried = self._live.crypto, False
            if stored and isinstance(member, GroupMember) and isinstance(ended, GroupMember):
                member.carry(ended)  # its groups' lines go on: the gap between is read or counted
                carried = True
            self._group_holds = self._holds_for(member)
        except BaseException:
            # raised to this call; the iteration ends there (not "use it inside 'async with'")
            self._failed = True
            raise
        marker = Resumed(previous, self.session_id, reason, attempts, carried, self._drained)
        self._drained = 0
        self.resumes.append(marker)
        log.info(
            "session.resumed",
            cluster=self.cluster,
            previous=previous,
            session=marker.session,
            attempts=attempts,
        )
        return marker

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _T:
        while True:
            if self.end_reason is not None or self._failed:
                raise StopAsyncIteration
            live = self._live
            if live is None or live.crypto is None:
                raise RuntimeError("use the subscription inside 'async with'")
            session = live.crypto
            loop = asyncio.get_running_loop()
            if live.drained and live.queue.empty():  # what the store kept of it is read
                return await self._resume_after(live.draining or "")  # type: ignore[return-value]
            if live.behind:  # what is held is read again from the store, in order
                live.deferred += self._hold.clear()
                if live.queue.empty():
                    live.ask_page()
            # a hold's time runs from its resume's answer (what the replay brought may still
            # be queued behind it), and not at all while one is in flight
            self._hold.waiting = live.resuming
            if live.answered_at is not None:
                self._hold.extend(now=live.answered_at)
            for group, at in live.group_answered_at.items():
                self._group_holds.extend(group, now=at)
            held = self._hold.next(session.last_seq, now=loop.time())
            if held is None:
                held = self._group_holds.next(live.group_resuming, now=loop.time())
            item = held if held is not None else await self._next_item(live)
            if isinstance(item, BaseException):  # the session's keepalive stopped with it
                self._failed = True
                raise item
            if isinstance(item, Lost):
                if self._resume and item.resumable:
                    if live.drain(item.reason):  # its stored envelopes first
                        continue
                    return await self._resume_after(item.reason)  # type: ignore[return-value]
                self._failed = True  # raised once: the iteration ends there
                raise SessionError("ended", item.reason)
            if isinstance(item, ReplayDone) and item.group is not None:
                self._group_replayed(live, item)
                continue
            if isinstance(item, ReplayDone) and item.page:
                self._paged(live, session, item)
                continue
            if isinstance(item, ReplayDone):
                if item.more:  # a longer gap than a page: read the rest a page at a time
                    live.fall_behind()
                if item.replayed is None:  # no store: nothing will fill a gap, don't wait
                    self._hold.hold_s = 0.0
                continue  # (its hold's time runs from the answer: live.answered_at, above)
            if item is None:  # the hold's time ran out: its lowest goes on next turn
                continue
            try:
                parsed = session.parse(item) if isinstance(item, bytes) else item
                if isinstance(parsed, GroupEnvelope):  # (an Envelope too) held by gseq
                    if live.store and held is None:
                        taken = self._group_holds.take(parsed, now=loop.time())
                        if taken == "held":
                            live.ask_group_resume(parsed.stream, gap=True)
                        if taken != "open":
                            continue
                elif isinstance(parsed, Envelope) and live.store:
                    if parsed.seq <= session.last_seq and self._hold.duplicate(parsed):
                        continue  # a replay's copy of what the live stream brought: once only
                    if live.behind and session.last_seq + 1 < parsed.seq != live.floor:
                        live.deferred += 1  # ahead of the page being read: the store has it
                        live.ask_page()
                        continue
                    if held is None and not live.behind and parsed.seq > session.last_seq + 1:
                        self._hold.add(parsed, now=loop.time())
                        live.ask_resume()
                        self._hold.waiting = live.resuming
                        continue
                result = await self._open_one(session, parsed)
            except IntegrityError:  # policy "fail": the session ends here
                if not session.keyed and session.rejected["untrusted_key"]:
                    raise self._untrusted(session) from None  # it says more
                raise
            if isinstance(parsed, GroupEnvelope):
                if live.store and isinstance(result, Batch):
                    self._group_holds.accepted(parsed)
                    if parsed.stream in live.group_more:  # the store has more of it
                        live.ask_group_resume(parsed.stream)
            elif live.store and isinstance(parsed, Envelope) and session.last_seq == parsed.seq:
                self._hold.accepted(parsed)
                if live.floor is not None and parsed.seq >= live.floor:
                    live.floor = None
            if isinstance(result, Batch):
                self._batches += 1
                self._rows += len(result.rows)
                if live.draining is not None:
                    self._drained += 1
                return result
            if isinstance(result, End):
                self.end_reason = result.reason
                log.info("session.ended", session=session.session, reason=result.reason)
                # the proxy cannot tell a genuine end from a forged one: the consumer, which
                # verified it, stops its keepalives and lets the proxy's session go now
                await live.close()
                raise StopAsyncIteration
            if isinstance(result, Notice):
                log.info("session.notice", session=session.session, code=result.code)
                if result.code in ("expired", "ended"):
                    # unauthenticated, but a relay able to send it could drop everything anyway
                    reason = f"the proxy ended this session: {result.message}"
                    if self._resume and live.drain(reason):  # its stored envelopes first
                        continue
                    if self._resume:
                        return await self._resume_after(reason)  # type: ignore[return-value]
                    self._failed = True
                    raise SessionError("ended", reason)

    @staticmethod
    def _holds_for(session: ConsumerSession | None) -> GroupHolds:
        """The group holds of a session (none held for a session that is not a member)."""
        if isinstance(session, GroupMember):
            return GroupHolds(session.line)
        return GroupHolds(lambda _group: None)

    def _group_replayed(self, live: LiveSession, done: ReplayDone) -> None:
        """A group resume's answer (its hold's time runs from it: ``live.group_answered_at``):
        the next page when the store said there is more and this one moved the group's line."""
        group = done.group
        assert group is not None
        if done.replayed is None:  # no store: nothing will fill a gap, don't wait
            self._group_holds.stop_holding()
            return
        # the replayed batches normally come before the answer: if every one was accepted, the
        # next page reads on from where this one stopped (else from the start again)
        line = live.crypto.line(group) if isinstance(live.crypto, GroupMember) else None
        end = None if done.first is None else done.first + done.replayed - 1
        if line is not None and end is not None and done.cursor is not None and line[0] >= end:
            live.group_cursor[group] = done.cursor
        elif done.replayed:
            live.group_cursor.pop(group, None)
        if done.more:
            live.group_more.add(group)
            live.ask_group_resume(group)  # once per last gseq: again when the line moves

    def _paged(self, live: LiveSession, session: ConsumerSession, done: ReplayDone) -> None:
        """A page's answer (the session is behind): ask the next one, or read the same one
        again when nothing of it was accepted (failed, let go on a full queue, or past a gap
        that retention made: its first ``seq`` is then taken as the next, the gap counted),
        or go back to the live stream once a page reached the end of the store."""
        if done.replayed is None or not live.behind or done.after != live.page_after:
            return  # no store after all, or an answer to an earlier page
        last = session.last_seq
        if last == done.after and (done.replayed or done.more):
            live.stalls += 1
            if live.stalls <= _PAGE_STALLS:
                gap = done.first is not None and done.first > last + 1
                if gap:  # retention, or a cursor past what was accepted: read from the
                    live.floor = done.first  # start to tell; the first seq past it is next
                live.ask_page(again=True, from_start=gap)
                return
            # pages that bring nothing acceptable (refused as they come): the hold's way
            log.warning("session.pages_stalled", session=session.session, seq=last)
            live.behind = False
            return
        live.stalls = 0
        if done.first is not None and last >= done.first + done.replayed - 1:
            live.cursor = done.cursor  # all of it accepted: the next page starts after it
        if not done.more:
            live.behind = False
            log.info("session.caught_up", session=session.session, seq=last)
            return
        live.ask_page()

    async def _open_one(
        self, session: ConsumerSession, item: Envelope | Notice | None
    ) -> Batch | End | Notice | None:
        if isinstance(item, Envelope):
            if item.kind == "key" or session.key_mode == "per-message":
                # public-key decryption (RSA: milliseconds) stays off the event loop
                return await asyncio.to_thread(session.open, item)
            return session.open(item)
        return item

    async def _next_item(
        self, live: LiveSession
    ) -> bytes | Lost | ReplayDone | BaseException | None:
        """The next inbox item (the session's end after those queued), or None when the
        hold's time ran out first. A key envelope whose signer is not pinned is counted and
        ignored (a relay can forge one): while no key is installed and some were refused,
        the session's key deadline (the request timeout after the open) ends the waiting with
        the trust error; past it, only the items already queued then are still taken (a relay
        streaming forged key envelopes never lets the queue run empty)."""
        session = live.crypto
        assert session is not None
        watched = not session.keyed and session.rejected["untrusted_key"] > 0
        if watched and asyncio.get_running_loop().time() >= live.key_deadline:
            if live.key_grace is None:
                live.key_grace = live.queue.qsize()
            if live.key_grace <= 0:
                raise self._untrusted(session)
            live.key_grace -= 1
            return live.get_nowait()
        if not live.queue.empty():
            return live.get_nowait()
        if live.ending is not None:  # taken once: a drain goes on past it
            item, live.ending = live.ending, None
            return item
        held = min(
            (
                at
                for at in (self._hold.deadline, self._group_holds.deadline(live.group_resuming))
                if at is not None
            ),
            default=None,
        )
        deadline = min(
            live.key_deadline if watched else float("inf"),
            held if held is not None else float("inf"),
        )
        if deadline == float("inf"):
            return await live.get()
        try:
            async with asyncio.timeout_at(deadline):
                return await live.get()
        except TimeoutError:
            if held is not None and held <= deadline:
                return None
            raise self._untrusted(session) from None

    def _untrusted(self, session: ConsumerSession) -> TrustError:
        store = self._client.trust.path or "(in memory)"
        return TrustError(
            f"no key envelope signed by a key pinned for cluster {self.cluster!r} arrived; "
            f"{session.rejected['untrusted_key']} refused, "
            f"signed by keys the trust store {store} does not pin (a relay can forge those: "
            "never pin a key a session offers). Check the cluster's key out of band: its "
            "operator's 'sealstream-producer key' prints it; 'sealstream-consume trust list' "
            "shows the fingerprints this store pins"
        )
