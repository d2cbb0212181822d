"""The relay: envelopes from the clusters' data and group subjects to the consumers' inboxes,
byte for byte, routed by subject and header only (never by the ``body``)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import nats.errors
import structlog

from broker_proxy._core import ProxyCore
from broker_proxy._registry import SessionEntry
from sealstream import WireError
from sealstream.groupwire import decode_group_envelope
from sealstream.metrics import Histogram
from sealstream.wire import decode_envelope

__all__ = ["Relay"]

log = structlog.get_logger(__name__)


class Relay:
    """Counters: ``relayed`` envelopes and ``relayed_bytes`` (inbox deliveries); group mode's
    ``group_envelopes`` received and their ``group_deliveries``; ``rejected`` by reason."""

    def __init__(self, core: ProxyCore) -> None:
        self._core = core
        self.relayed = 0
        self.relayed_bytes = 0
        self.group_envelopes = 0
        self.group_deliveries = 0
        self.rejected: Counter[str] = Counter()
        self.latency = Histogram()

    def _reject(self, reason: str, subject: str) -> None:
        self.rejected[reason] += 1
        log.debug("envelope.rejected", reason=reason, subject=subject)

    async def on_message(self, msg: Any) -> None:
        """One message on a data or a group subject (the hot path)."""
        started = time.perf_counter()
        data: bytes = msg.data
        subject: str = msg.subject
        core = self._core
        max_size = core.config.limits.envelope_bytes
        if len(data) > max_size:
            self._reject("oversize", subject)
            return
        route = core.subjects.parse_data(subject)
        if route is None:
            group = core.subjects.parse_group(subject)
            if group is None:
                self._reject("bad_subject", subject)
                return
            await self._on_group(data, subject, *group, started)
            return
        try:
            env = decode_envelope(data, max_size=max_size)
        except WireError as exc:
            self._reject(f"malformed.{exc.reason}", subject)
            return
        cluster, session = route
        if env.cluster != cluster or env.session != session:
            self._reject("subject_mismatch", subject)
            return
        entry = core.registry.get(session)
        if entry is None and core.shared is not None:
            entry = await core.shared.lookup(session)  # opened an instant ago elsewhere
        if entry is None:
            self._reject("unknown_session", subject)
            return
        if entry.cluster != cluster:
            self._reject("wrong_cluster", subject)
            return
        if await self._deliver(entry, data, subject, core.clock()):
            self.latency.observe(time.perf_counter() - started)

    async def _on_group(
        self, data: bytes, subject: str, cluster: str, stream: str, started: float
    ) -> None:
        """One group envelope (group mode), byte for byte to the inbox of every group-mode
        session of that cluster and stream in the registry (never from the body)."""
        try:
            env = decode_group_envelope(data, max_size=self._core.config.limits.envelope_bytes)
        except WireError as exc:
            self._reject(f"malformed.{exc.reason}", subject)
            return
        if env.cluster != cluster or env.stream != stream:
            self._reject("subject_mismatch", subject)
            return
        members = self._core.registry.group_members(cluster, stream)
        if not members:
            self._reject("no_members", subject)
            return
        self.group_envelopes += 1
        now = self._core.clock()
        for entry in members:
            if await self._deliver(entry, data, subject, now):
                self.group_deliveries += 1
        self.latency.observe(time.perf_counter() - started)

    async def _deliver(self, entry: SessionEntry, data: bytes, subject: str, now: float) -> bool:
        """One envelope to one session's inbox, within the session's rate limit (the consumer
        is told, once a second, when envelopes are dropped for it); counted either way."""
        core = self._core
        limits = core.config.limits
        if not entry.take(now, rate=limits.session_rate, burst=limits.session_burst):
            self._reject("rate_limited", subject)
            if now - entry.limited_notice_at >= 1.0:
                entry.limited_notice_at = now
                await core.notify(
                    entry.session, "limit_exceeded", "relay rate limit: envelopes dropped"
                )
            return False
        try:
            await core.nc.publish(core.subjects.inbox(entry.session), data)
        except nats.errors.Error:  # lost the server a moment ago, and its buffer is full
            self._reject("broker_unavailable", subject)
            return False
        self.relayed += 1
        self.relayed_bytes += len(data)
        return True
