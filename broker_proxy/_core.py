"""What the proxy's three jobs (relay, session API, liveness) share: its connection, the
session registry (local, and shared between instances), and the acts more than one of them
does: ask a cluster, tell an inbox, forget a session, claim the end of one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import nats.errors
import structlog

from broker_proxy._config import ProxyConfig
from broker_proxy._registry import SessionEntry, SessionRegistry
from broker_proxy._shared import SharedRegistry
from sealstream import SessionError, Subjects, WireError
from sealstream.control import (
    Control,
    ControlClose,
    Granted,
    Ok,
    Pong,
    Refusal,
    decode_reply,
    encode,
)
from sealstream.wire import notice

__all__ = ["ProxyCore"]

log = structlog.get_logger(__name__)

_A = TypeVar("_A", Ok, Pong, Granted)


class ProxyCore:
    """The proxy's shared state; its jobs hold one. ``nc`` and ``tg`` are set while it runs
    (``tg`` None: stopping, or not started)."""

    def __init__(self, config: ProxyConfig, *, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.subjects = Subjects(config.prefix)
        self.registry = SessionRegistry(
            ttl_s=3 * config.keepalive_s,
            burst=config.limits.session_burst,
            max_grace_s=config.store_grace_s,
            ended_keep_s=config.ended_keep_s,
        )
        self.nc: Any = None
        self.tg: asyncio.TaskGroup | None = None
        self.shared: SharedRegistry | None = None

    async def ask(self, cluster: str, request: Control, answer: type[_A]) -> _A | Refusal:
        """A control request to a cluster: its answer, or its refusal; SessionError
        ``cluster_unavailable`` when no producer answers, or one answers malformed."""
        subject = self.subjects.control(cluster)
        try:
            msg = await self.nc.request(
                subject, encode(request), timeout=self.config.control_timeout_s
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
            return decode_reply(msg.data, answer)
        except WireError:
            raise SessionError("cluster_unavailable", "cluster sent a malformed answer") from None

    async def tell_cluster_closed(self, entry: SessionEntry, reason: str) -> None:
        try:
            await self.ask(entry.cluster, ControlClose(entry.session, reason), Ok)
        except SessionError as exc:
            log.info("session.close_not_delivered", session=entry.session, reason=exc.detail)

    async def notify(self, session: str, code: str, message: str) -> None:
        try:
            await self.nc.publish(self.subjects.inbox(session), notice(session, code, message))
        except nats.errors.Error as exc:  # a hint only: the consumer's keepalive tells it too
            log.info("notice.lost", session=session, code=code, error=repr(exc))

    async def forget(self, session: str) -> None:
        """A session closed by its consumer: gone at once (an ended one too)."""
        self.registry.remove(session)
        self.registry.drop_ended(session)
        if self.shared is not None:
            await self.shared.delete(session)

    async def claim(self, session: str, ended: SessionEntry | None = None) -> bool:
        """True if this instance is the one to announce the end of a (locally removed)
        session: always alone, or when it wins the shared registry's optimistic delete (with
        ``ended``: its mark as ended, kept for its owner's last resume)."""
        if self.shared is None:
            return True
        if await self.shared.claim(session, ended):
            return True
        await self.shared.lookup(session)  # kept alive elsewhere: back into the cache
        return False
