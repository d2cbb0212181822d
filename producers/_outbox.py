"""Sealed envelopes waiting for the broker, per session, bounded in bytes (pure: no I/O).

While the broker is unreachable (or slower than the agent), envelopes wait here instead of in
nats-py's own buffer, which raises once full. Each session's queue keeps its envelopes in
``seq`` order and holds at most ``max_bytes`` (and all queues together ``max_total_bytes``,
taken from the largest queue first); beyond that the OLDEST data envelopes are dropped, so
the consumer sees a gap (``seq`` moves on) and then the newest telemetry. Key envelopes are
kept while any data envelope can be dropped instead: data sealed under a key whose envelope
was dropped could not be opened at all.

Every envelope put gets a ticket (increasing over all sessions): everything put up to a
ticket has left the outbox (taken, or dropped) once :meth:`Outbox.oldest` is past it. That is
how a producer with a store tells when the rows it sealed are stored. Such an outbox is made
with ``drops=False``: it never drops (what it holds is promised to callers); the producer's
backpressure keeps it under half its bounds plus one batch's envelopes (``Agent._room``).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

__all__ = ["Outbox"]


@dataclass(slots=True)
class _Queue:
    #: (payload, is_key, ticket) in seq order
    items: deque[tuple[bytes, bool, int]] = field(default_factory=deque)
    size: int = 0


class Outbox:
    """``put`` envelopes, ``peek``/``pop`` them in order once the broker takes them.

    ``dropped`` counts envelopes given up, by reason: ``buffer_full`` (the oldest data of a
    session over its budget) and ``session_gone`` (what a session that ended still held).
    """

    def __init__(
        self, *, max_bytes: int, max_total_bytes: int | None = None, drops: bool = True
    ) -> None:
        if max_bytes < 1 or (max_total_bytes is not None and max_total_bytes < max_bytes):
            raise ValueError("max_bytes must be positive, and max_total_bytes at least that")
        self.max_bytes = max_bytes
        #: all sessions together: beyond it the largest queue loses its oldest data first
        self.max_total_bytes = max_total_bytes
        self.drops = drops
        self._queues: dict[str, _Queue] = {}
        self.size = 0
        self.dropped: Counter[str] = Counter()
        #: the ticket of the last envelope put
        self.ticket = 0

    def __len__(self) -> int:
        """Envelopes waiting, all sessions."""
        return sum(len(q.items) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)

    def largest(self) -> int:
        """Bytes of the fullest session's queue."""
        return max((q.size for q in self._queues.values()), default=0)

    def pending(self, session: str) -> bool:
        return session in self._queues

    def sessions(self) -> list[str]:
        return list(self._queues)

    def put(self, session: str, payload: bytes, *, key: bool = False) -> int:
        """Queue one envelope; return how many older ones were dropped to make room."""
        queue = self._queues.get(session)
        if queue is None:
            queue = self._queues[session] = _Queue()
        self.ticket += 1
        queue.items.append((payload, key, self.ticket))
        queue.size += len(payload)
        self.size += len(payload)
        if not self.drops:
            return 0
        dropped = 0
        while queue.size > self.max_bytes and len(queue.items) > 1:
            self._drop_oldest(queue)
            dropped += 1
        total = self.max_total_bytes
        while total is not None and self.size > total:
            largest = max(self._queues, key=lambda s: self._queues[s].size)
            self._drop_oldest(self._queues[largest])
            if not self._queues[largest].items:
                del self._queues[largest]
            dropped += 1
        if dropped:
            self.dropped["buffer_full"] += dropped
        return dropped

    def _drop_oldest(self, queue: _Queue) -> None:
        items = queue.items
        # the oldest data envelope, else (keys only) the oldest key; never the newest item
        index = next((i for i, (_, key, _) in enumerate(items) if not key), 0)
        if index == len(items) - 1:
            index = 0
        payload = items[index][0]
        del items[index]
        queue.size -= len(payload)
        self.size -= len(payload)

    def peek(self, session: str) -> bytes | None:
        queue = self._queues.get(session)
        return queue.items[0][0] if queue is not None else None

    def head(self, session: str, count: int) -> list[bytes]:
        """The first ``count`` envelopes of a session's queue, oldest first (not removed)."""
        queue = self._queues.get(session)
        if queue is None:
            return []
        return [item[0] for item in itertools.islice(queue.items, count)]

    def oldest(self) -> int | None:
        """The lowest ticket still waiting (None: nothing waits)."""
        return min((q.items[0][2] for q in self._queues.values()), default=None)

    def pop(self, session: str) -> None:
        """Remove the envelope :meth:`peek` returned (the broker took it); nothing if the
        session was discarded meanwhile."""
        queue = self._queues.get(session)
        if queue is None:
            return
        payload = queue.items.popleft()[0]
        queue.size -= len(payload)
        self.size -= len(payload)
        if not queue.items:
            del self._queues[session]

    def discard(self, session: str) -> int:
        """Forget a session's queue (it ended); return how many envelopes it held."""
        queue = self._queues.pop(session, None)
        if queue is None:
            return 0
        self.size -= queue.size
        self.dropped["session_gone"] += len(queue.items)
        return len(queue.items)
