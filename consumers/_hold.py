"""The reorder hold (docs/protocol.md, "Lossless delivery"): envelopes that arrived ahead of
a gap wait here, by ``seq``, until the missing ones come (a replay, another proxy's relay) or
the hold's time runs out; then they go to the session's strict ``seq`` check in order
(pure: no I/O, time is a parameter)."""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Callable

from sealstream import Envelope
from sealstream.groupwire import GroupEnvelope

__all__ = ["GroupHolds", "Hold"]


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

    def next(
        self, last: int, *, now: float, ready: Callable[[Envelope], bool] | None = None
    ) -> Envelope | None:
        """The envelope to open now after ``last`` (the last accepted seq), or None; with
        ``ready``, the lowest that follows ``last`` waits too until ``ready`` says it may go
        (a group batch whose key is on its way)."""
        if not self._seqs:
            return None
        seq = self._seqs[0]
        due = self.deadline
        waits = seq > last + 1 or (ready is not None and not ready(self._by_seq[seq][0]))
        if (
            waits
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
    is a copy only if all of it is; a group batch's epoch and signature too)."""
    fields = repr((env.kind, env.cluster, env.session, env.stream, env.seq, env.ts))
    signed = repr(env.epoch).encode() + b"\0" + env.sig if isinstance(env, GroupEnvelope) else b""
    return hashlib.blake2b(
        fields.encode() + b"\0" + signed + b"\0" + env.body, digest_size=16
    ).digest()


class GroupHolds:
    """A group member's holds, one per group, by ``gseq`` (docs/protocol.md, "Lossless
    delivery", group mode): a batch past a gap of its group waits, and so does the next one
    while its epoch's key is not installed yet. ``line(group)`` is the member's ``(last gseq,
    newest epoch)`` of a group, None before its first key (its batches are then skipped by
    the checks, never held)."""

    def __init__(self, line: Callable[[str], tuple[int, int] | None]) -> None:
        self._line = line
        self.holds: dict[str, Hold] = {}
        #: a group's held batches wait for nothing: the deployment keeps no store
        self.no_store = False

    @property
    def duplicates(self) -> int:
        return sum(hold.duplicates for hold in self.holds.values())

    def take(self, env: GroupEnvelope, *, now: float) -> str:
        """What to do with a batch that just arrived: ``open`` it now, it is ``held`` (past
        a gap: ask its group's resume), ``waiting`` for its key, or a ``duplicate``."""
        line = self._line(env.stream)
        if line is None:
            return "open"
        last, epoch = line
        hold = self._hold(env.stream)
        if env.seq <= last:
            return "duplicate" if hold.duplicate(env) else "open"
        if env.seq > last + 1:
            hold.add(env, now=now)
            return "held"
        if env.epoch > epoch:
            hold.add(env, now=now)
            return "waiting"
        return "open"

    def _hold(self, group: str) -> Hold:
        hold = self.holds.get(group)
        if hold is None:
            hold = self.holds[group] = Hold(hold_s=0.0 if self.no_store else 2.0)
        return hold

    def accepted(self, env: GroupEnvelope) -> None:
        self._hold(env.stream).accepted(env)

    def extend(self, group: str, *, now: float) -> None:
        if group in self.holds:
            self.holds[group].extend(now=now)

    def stop_holding(self) -> None:
        """No store: nothing will fill a gap, release at once."""
        self.no_store = True
        for hold in self.holds.values():
            hold.hold_s = 0.0

    def deadline(self, waiting: Callable[[str], bool]) -> float | None:
        """The earliest time a held batch goes to the checks whatever came."""
        due: float | None = None
        for group, hold in self.holds.items():
            hold.waiting = waiting(group)
            at = hold.deadline
            if at is not None and (due is None or at < due):
                due = at
        return due

    def next(self, waiting: Callable[[str], bool], *, now: float) -> Envelope | None:
        """A held batch to open now, if any."""
        for group, hold in self.holds.items():
            line = self._line(group)
            if not hold or line is None:
                continue
            last, epoch = line
            hold.waiting = waiting(group)
            env = hold.next(last, now=now, ready=functools.partial(_keyed, epoch))
            if env is not None:
                return env
        return None


def _keyed(newest: int, env: Envelope) -> bool:
    """Whether the key of ``env``'s epoch is installed (``newest``: the group's newest)."""
    return not isinstance(env, GroupEnvelope) or env.epoch <= newest
