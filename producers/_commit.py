"""Group commit: with a store, the rows of concurrent ``emit`` calls share batches.

``emit`` returns once its rows are stored, so a lone caller pays a seal and a store round
trip per call. Calls that arrive while a stream's last commit is being stored wait together,
and the next commit seals all their rows at once: fewer and fuller batches, one wait for
them all. A caller is never delayed when nothing is being stored (its rows are sealed at
once); a stream's commits are sealed one after the other, so rows keep the order in which
the calls were made.

The commit task seals, then waits for the store (or the agent's stop) before it seals the
next commit; each caller waits for its own rows to be stored in its own task, so a stopping
agent's task group never waits on the broker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sealstream import BrokerError, SealstreamError

__all__ = ["GroupCommit"]

Row = Mapping[str, Any]


@dataclass(slots=True)
class _Commit:
    rows: list[Row] = field(default_factory=list)
    #: the outbox ticket of its last envelope, once sealed
    sealed: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _retrieved(future: asyncio.Future[int]) -> None:
    # every caller of a commit may have been cancelled: its outcome is then nobody's
    if not future.cancelled():
        future.exception()


class GroupCommit:
    """``ticket = await commit.add(stream, rows, tg)`` returns once ``seal(stream, rows)``
    sealed rows that include them (its ticket: the caller then waits for the store); each
    stream's commits run in one task of ``tg`` at a time, which waits for
    ``settled(ticket)`` before it seals the next. A commit takes no more calls once it holds
    ``max_rows`` rows (a batch's worth): the outbox's backpressure is checked per commit."""

    def __init__(
        self,
        seal: Callable[[str, Sequence[Row]], Awaitable[int]],
        settled: Callable[[int], Awaitable[None]],
        *,
        max_rows: int,
    ) -> None:
        self._seal = seal
        self._settled = settled
        self._max_rows = max_rows
        self._gathering: dict[str, deque[_Commit]] = {}
        self._running: set[str] = set()
        #: commits sealed, and the calls they carried: their ratio is the sharing
        self.commits = 0
        self.calls = 0

    async def add(self, stream: str, rows: Sequence[Row], tg: asyncio.TaskGroup) -> int:
        """Join the stream's next commit (starting its task when none runs) and wait until
        it is sealed. A caller cancelled meanwhile leaves its rows in it: they may be stored."""
        queue = self._gathering.setdefault(stream, deque())
        if not queue or len(queue[-1].rows) >= self._max_rows:
            queue.append(_Commit())
            queue[-1].sealed.add_done_callback(_retrieved)
        commit = queue[-1]
        if stream not in self._running:
            self._running.add(stream)
            tg.create_task(self._run(stream))
        commit.rows.extend(rows)
        self.calls += 1
        return await asyncio.shield(commit.sealed)

    async def _run(self, stream: str) -> None:
        queue = self._gathering.setdefault(stream, deque())
        try:
            while queue:
                commit = queue.popleft()
                self.commits += 1
                try:
                    ticket = await self._seal(stream, commit.rows)
                except SealstreamError as exc:  # each of its callers raises it
                    commit.sealed.set_exception(exc)
                    continue
                except BaseException:
                    commit.sealed.set_exception(BrokerError("the producer stopped committing"))
                    raise
                commit.sealed.set_result(ticket)
                await self._settled(ticket)  # meanwhile, the next commit gathers
        finally:
            self._running.discard(stream)
            while queue:  # gathered while the task was stopped
                queue.popleft().sealed.set_exception(BrokerError("the producer stopped committing"))
