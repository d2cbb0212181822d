"""Liveness: sessions without keepalive expire, and each cluster with sessions is pinged
once a keepalive interval (a cluster gone, or one that no longer serves a session, ends it).
Nothing of this runs while the proxy's own connection is down."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Final

import structlog

from broker_proxy._core import ProxyCore
from broker_proxy._registry import SessionEntry
from sealstream import BrokerError, SessionError
from sealstream.control import MAX_PING, Ping, Pong, Refusal

__all__ = ["Liveness"]

log = structlog.get_logger(__name__)

#: after the proxy reconnects, how long before it pings the clusters (see _ping_soon)
_RECONNECT_SETTLE_S: Final = 2.0


class Liveness:
    """``run()`` is the expiry loop (a task of the proxy's task group); ``stop()`` ends it."""

    def __init__(self, core: ProxyCore) -> None:
        self._core = core
        self._stop = asyncio.Event()
        self._ping_now = asyncio.Event()
        self._ping_failures: Counter[str] = Counter()
        #: cluster -> (clock) time of its first counted unanswered ping, while it is silent
        self._silent_since: dict[str, float] = {}
        #: after a reconnect of our own connection, silence is not the clusters' fault until
        #: this (clock) time
        self._grace_until = float("-inf")
        #: our connection as the callbacks saw it: nats-py says connected again before its
        #: reconnected callback ran (it resubscribes and flushes in between), and expiry must
        #: not run on the outage's silence before ``on_reconnected`` extended the sessions
        self._up = True

    def stop(self) -> None:
        self._stop.set()
        self._ping_now.set()  # wakes the loop

    async def on_disconnected(self) -> None:
        self._up = False

    async def on_reconnected(self) -> None:
        """Our own connection is back: nobody could keep a session alive, and no cluster could
        answer a ping, while it was down. Expiry restarts from now, silence counts again
        after a grace period, and the clusters are pinged a moment later (a producer holds
        what it buffered until it hears from a proxy)."""
        core = self._core
        now = core.clock()
        self._grace_until = now + 2 * core.config.keepalive_s + core.config.control_timeout_s
        self._ping_failures.clear()
        self._silent_since.clear()
        core.registry.extend(now=now)
        self._up = True
        log.info("proxy.reconnected", sessions=len(core.registry))
        if core.tg is not None:
            core.tg.create_task(self._ping_soon())

    async def _ping_soon(self) -> None:
        # Clients retry every 0.5 s: a moment after our reconnect (2 s: room for a busy
        # machine), the consumers are back on their inboxes too. The ping then releases what
        # the producers held; sent at once, it could make them publish before a consumer
        # resubscribed.
        await asyncio.sleep(_RECONNECT_SETTLE_S)
        self._ping_now.set()

    async def run(self) -> None:
        """Expire sessions without keepalive (every half interval) and check, once an
        interval, that each cluster with sessions is alive and still knows them."""
        core = self._core
        interval = max(core.config.keepalive_s / 2, 0.05)
        ticks = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ping_now.wait(), timeout=interval)
            if self._stop.is_set() or core.tg is None:
                return
            ping_now = self._ping_now.is_set()
            self._ping_now.clear()
            if not self._connected():
                continue
            if not ping_now:
                for entry in core.registry.expire(now=core.clock()):
                    await self._expire(entry)
                core.registry.prune_ended(now=core.clock())
                ticks += 1
            if ping_now or ticks % 2 == 0:
                self._ping_all()

    def _connected(self) -> bool:
        return self._up and bool(self._core.nc.is_connected)

    async def _expire(self, entry: SessionEntry) -> None:
        core = self._core
        try:
            if not await core.claim(entry.session, entry):
                return  # another instance expires it, or it was kept alive there
        except BrokerError as exc:
            log.warning("session.expiry_deferred", session=entry.session, error=str(exc))
            return
        log.info("session.expired", session=entry.session, cluster=entry.cluster)
        await core.notify(entry.session, "expired", "no keepalive: session closed")
        assert core.tg is not None
        core.tg.create_task(core.tell_cluster_closed(entry, "keepalive expired"))

    def _ping_all(self) -> None:
        # A session is registered before its cluster hears of the open: one younger than the
        # open's timeout may be unknown to the cluster only because the open is still on its
        # way. Asking about it then would end a session that is about to work (and the
        # cluster would serve it with every envelope dropped here).
        core = self._core
        settled = core.clock() - core.config.control_timeout_s
        clusters: dict[str, list[str]] = {}
        for entry in core.registry.entries():
            if entry.added_at <= settled:
                clusters.setdefault(entry.cluster, []).append(entry.session)
        # what was counted of a cluster no longer pinged (its sessions ended) is forgotten:
        # a session opened there later gets its own silence and grace
        for cluster in set(self._ping_failures) - clusters.keys():
            del self._ping_failures[cluster]
        for cluster in set(self._silent_since) - clusters.keys():
            del self._silent_since[cluster]
        assert core.tg is not None
        for cluster, sessions in clusters.items():
            core.tg.create_task(self._ping(cluster, sessions))

    async def _end(self, session: str, message: str) -> None:
        core = self._core
        entry = core.registry.end(session, now=core.clock())
        if entry is None:
            return
        try:
            claimed = await core.claim(session, entry)
        except BrokerError as exc:
            log.warning("session.end_deferred", session=session, error=str(exc))
            return
        if claimed:
            log.info("session.ended", session=session, reason=message)
            await core.notify(session, "ended", message)

    async def _ping(self, cluster: str, sessions: list[str]) -> None:
        """A producer that is gone (twice unanswered; with a store, for longer than the
        session's grace) or that no longer knows a session (it restarted) ends those
        sessions: the consumers are told with an ``ended`` notice. The sessions go in pings of
        at most MAX_PING ids (a ping must fit a control request); the first unanswered one
        counts once for the cluster."""
        core = self._core
        answers: list[Pong] = []
        for start in range(0, len(sessions), MAX_PING):
            chunk = tuple(sessions[start : start + MAX_PING])
            try:
                answer = await core.ask(cluster, Ping(chunk), Pong)
            except SessionError as exc:
                await self._unanswered(cluster, sessions, exc)
                return
            if isinstance(answer, Refusal):
                log.info("cluster.ping_refused", cluster=cluster, code=answer.code)
            else:
                answers.append(answer)
        self._ping_failures.pop(cluster, None)  # it answered: it is alive
        self._silent_since.pop(cluster, None)
        asked = set(sessions)
        for answer in answers:
            for session in asked.intersection(answer.unknown):
                await self._end(session, f"cluster {cluster!r} no longer serves this session")

    async def _unanswered(self, cluster: str, sessions: list[str], exc: SessionError) -> None:
        core = self._core
        if not self._connected() or core.clock() < self._grace_until:
            # our own outage, or the cluster's reconnect after it: not its silence
            log.info("cluster.ping_failed", cluster=cluster, counted=False, error=exc.detail)
            return
        now = core.clock()
        self._ping_failures[cluster] += 1
        silent_for = now - self._silent_since.setdefault(cluster, now)
        log.info("cluster.ping_failed", cluster=cluster, counted=True, error=exc.detail)
        if self._ping_failures[cluster] < 2:
            return
        for session in sessions:
            # a session of a cluster with a store waits out its grace: the producer keeps
            # what it seals meanwhile in the store (a site whose link is down), and the
            # consumer reads it from there once the cluster answers again
            entry = core.registry.get(session)
            if entry is None or silent_for >= entry.grace_s:
                await self._end(session, f"cluster {cluster!r} is unavailable")
