"""The reorder hold (docs/protocol.md, "Lossless delivery"): envelopes that arrived ahead of
a gap wait here, by ``seq``, until the missing ones come (a replay, another proxy's relay) or
the hold's time runs out; then they go to the session's strict ``seq`` check in order
(pure: no I/O, time is a parameter)."""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict

from sealstream import Envelope

__all__ = ["Hold"]


class Hold:
    """``add`` envelopes whose ``seq`` is past a gap; ``next`` gives the one to open now, if
    any: the lowest held, once it follows the last accepted ``seq``, or once the hold is past
    its time (``hold_s`` from the first held envelope, or from the last :meth:`extend`) or
    over its bounds. Two different envelopes for one ``seq`` are both kept, in order of
    arrival (a forged one cannot displace the genuine one); a byte-identical copy of one held,
    or of one of the last ``remember`` accepted (:meth:`accepted`, :meth:`duplicate`: a
    store's replay overlaps the live stream), is dropped and counted in ``duplicates``."""

    def __init__(
        self,
        *,
        hold_s: float = 2.0,
        max_count: int = 1024,
        max_bytes: int = 16 * 1024 * 1024,
        remember: int = 4096,
    ) -> None:
        self.hold_s = hold_s
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._by_seq: dict[int, list[Envelope]] = {}
        self._seqs: list[int] = []  # a heap of the held seqs
        self.count = 0
        self.size = 0
        self.duplicates = 0
        self._since: float | None = None
        #: a replay was asked for and not answered yet: the hold's time does not run out
        self.waiting = False
        self.remember = remember
        self._accepted: OrderedDict[int, bytes] = OrderedDict()  # seq -> digest

    def __len__(self) -> int:
        return self.count

    def add(self, env: Envelope, *, now: float) -> None:
        held = self._by_seq.setdefault(env.seq, [])
        if env in held:
            self.duplicates += 1
            return
        if not held:
            heapq.heappush(self._seqs, env.seq)
        held.append(env)
        self.count += 1
        self.size += len(env.body)
        if self._since is None:
            self._since = now

    def clear(self) -> int:
        """Let every held envelope go (the store keeps them); how many."""
        count = self.count
        self._by_seq.clear()
        self._seqs.clear()
        self.count = self.size = 0
        self._since = None
        return count

    def accepted(self, env: Envelope) -> None:
        """``env`` passed the session's checks: a later copy of it is a duplicate."""
        self._accepted[env.seq] = _digest(env)
        while len(self._accepted) > self.remember:
            self._accepted.popitem(last=False)

    def duplicate(self, env: Envelope) -> bool:
        """True (and counted) if ``env`` is byte for byte one accepted lately."""
        if self._accepted.get(env.seq) == _digest(env):
            self.duplicates += 1
            return True
        return False

    def extend(self, *, now: float) -> None:
        """A replay was answered: what it brought may still be on its way, give it time."""
        if self._since is not None:
            self._since = max(self._since, now)

    @property
    def deadline(self) -> float | None:
        """When the lowest held envelope goes to the check whatever came (None: empty, or
        waiting for a replay's answer)."""
        if self._since is None or self.waiting:
            return None
        return self._since + self.hold_s

    def next(self, last: int, *, now: float) -> Envelope | None:
        """The envelope to open now after ``last`` (the last accepted seq), or None."""
        if not self._seqs:
            return None
        seq = self._seqs[0]
        due = self.deadline
        if (
            seq > last + 1
            and self.count <= self.max_count
            and self.size <= self.max_bytes
            and (due is None or now < due)
        ):
            return None
        held = self._by_seq[seq]
        env = held.pop(0)
        if not held:
            del self._by_seq[seq]
            heapq.heappop(self._seqs)
        self.count -= 1
        self.size -= len(env.body)
        if not self.count:
            self._since = None
        return env


def _digest(env: Envelope) -> bytes:
    """The envelope's every field (the body's protected header binds them, but an envelope
    is a copy only if all of it is)."""
    fields = repr((env.kind, env.cluster, env.session, env.stream, env.seq, env.ts))
    return hashlib.blake2b(fields.encode() + b"\0" + env.body, digest_size=16).digest()
