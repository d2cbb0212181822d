"""The session registry of the proxy (pure: time is a parameter)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

__all__ = ["SessionEntry", "SessionRegistry"]


@dataclass(slots=True)
class SessionEntry:
    session: str
    cluster: str
    user: str
    streams: tuple[str, ...]
    expires_at: float
    tokens: float = 0.0
    refilled_at: float = 0.0
    limited_notice_at: float = float("-inf")
    #: when this instance learnt of the session (its open, or the shared registry)
    added_at: float = 0.0
    #: the open's key mode; ``group`` sessions receive their streams' group envelopes
    key_mode: str = "session"
    #: (a cluster with a store) how long the session outlives its last keepalive, if that is
    #: longer than the registry's ``ttl_s``
    grace_s: float = 0.0

    def take(self, now: float, *, rate: float, burst: float) -> bool:
        """Token bucket of the session's relay rate: True if one envelope may pass."""
        self.tokens = min(burst, self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


#: the most ended sessions kept for their last replay (the oldest go first)
MAX_ENDED = 100_000


class SessionRegistry:
    """session id -> entry; a session not kept alive past ``expires_at`` is expired. A session
    the proxy ended (expiry, its cluster's word) is kept for ``ended_keep_s`` more, for its
    owner's last resume only (docs/protocol.md, "Draining an ended session")."""

    def __init__(
        self,
        *,
        ttl_s: float,
        burst: float = 1.0,
        max_grace_s: float = 0.0,
        ended_keep_s: float = 0.0,
    ) -> None:
        self.ttl_s = ttl_s
        #: the longest any session lives without a keepalive
        self.max_ttl_s = max(ttl_s, max_grace_s)
        self.burst = burst
        self.ended_keep_s = ended_keep_s
        #: ended sessions -> their entry and until when they are kept
        self._ended: dict[str, tuple[SessionEntry, float]] = {}
        self._entries: dict[str, SessionEntry] = {}
        self._per_user: Counter[str] = Counter()
        #: (cluster, stream) -> the group-mode sessions of that group
        self._groups: dict[tuple[str, str], dict[str, SessionEntry]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session: str) -> bool:
        return session in self._entries

    def get(self, session: str) -> SessionEntry | None:
        return self._entries.get(session)

    def sessions_of(self, user: str) -> int:
        return self._per_user[user]

    def add(
        self,
        session: str,
        *,
        cluster: str,
        user: str,
        streams: tuple[str, ...],
        now: float,
        key_mode: str = "session",
        grace_s: float = 0.0,
    ) -> SessionEntry:
        if session in self._entries:
            raise KeyError(session)
        self._ended.pop(session, None)
        entry = SessionEntry(
            session,
            cluster,
            user,
            streams,
            now + max(self.ttl_s, grace_s),
            self.burst,
            now,
            added_at=now,
            key_mode=key_mode,
            grace_s=grace_s,
        )
        self._entries[session] = entry
        self._per_user[user] += 1
        if key_mode == "group":
            for stream in streams:
                self._groups.setdefault((cluster, stream), {})[session] = entry
        return entry

    def group_members(self, cluster: str, stream: str) -> list[SessionEntry]:
        """The group-mode sessions of ``cluster`` whose streams include ``stream``."""
        members = self._groups.get((cluster, stream))
        return list(members.values()) if members else []

    def touch(self, session: str, *, now: float) -> SessionEntry | None:
        entry = self._entries.get(session)
        if entry is not None:
            entry.expires_at = now + self.ttl_of(entry)
        return entry

    def ttl_of(self, entry: SessionEntry) -> float:
        """How long ``entry`` lives without a keepalive."""
        return max(self.ttl_s, entry.grace_s)

    def extend(self, *, now: float) -> None:
        """Give every session a full ``ttl_s`` from ``now`` (none of them could be kept alive
        while the broker was away)."""
        for entry in self._entries.values():
            entry.expires_at = max(entry.expires_at, now + self.ttl_of(entry))

    def remove(self, session: str) -> SessionEntry | None:
        entry = self._entries.pop(session, None)
        if entry is not None:
            if entry.key_mode == "group":
                for stream in entry.streams:
                    members = self._groups.get((entry.cluster, stream))
                    if members is not None:
                        members.pop(session, None)
                        if not members:
                            del self._groups[(entry.cluster, stream)]
            self._per_user[entry.user] -= 1
            if self._per_user[entry.user] <= 0:
                del self._per_user[entry.user]
        return entry

    def expire(self, *, now: float) -> list[SessionEntry]:
        """Remove (as ended) and return every session past its expiry."""
        gone = [e for e in self._entries.values() if e.expires_at <= now]
        for entry in gone:
            self.end(entry.session, now=now)
        return gone

    def end(self, session: str, *, now: float) -> SessionEntry | None:
        """Remove a session the proxy ended, kept for ``ended_keep_s`` for its owner's last
        resume (:meth:`ended`: what a store keeps of it is read before a new session)."""
        entry = self.remove(session)
        if entry is not None:
            self.keep_ended(entry, until=now + self.ended_keep_s)
        return entry

    def keep_ended(self, entry: SessionEntry, *, until: float) -> None:
        """Keep an ended session's entry (learnt here or from the shared registry)."""
        if self.ended_keep_s <= 0 or entry.session in self._entries:
            return
        self._ended.pop(entry.session, None)
        self._ended[entry.session] = (entry, until)
        while len(self._ended) > MAX_ENDED:
            del self._ended[next(iter(self._ended))]

    def ended(self, session: str, *, now: float) -> SessionEntry | None:
        """A session the proxy ended within ``ended_keep_s``; None otherwise."""
        kept = self._ended.get(session)
        if kept is None or kept[1] <= now:
            return None
        return kept[0]

    def drop_ended(self, session: str) -> None:
        self._ended.pop(session, None)

    def prune_ended(self, *, now: float) -> None:
        for session in [s for s, (_, until) in self._ended.items() if until <= now]:
            del self._ended[session]

    def entries(self) -> list[SessionEntry]:
        return list(self._entries.values())
