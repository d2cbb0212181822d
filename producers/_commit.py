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

import structlog

from producers._batcher import array_header, array_header_size
from sealstream import BrokerError, SealstreamError

__all__ = ["GroupCommit"]

Row = Mapping[str, Any]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Commit:
    rows: list[Row] = field(default_factory=list)
    calls: int = 0
    #: the rows packed back to back, while every call brought them packed (None after one
    #: that did not): sealed without packing them again
    items: list[bytes] | None = field(default_factory=list)
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
    ``settled(ticket)`` before it seals the next. A commit takes no call that would make it
    hold more than ``max_rows`` rows (a batch's worth; a first call takes what it brings):
    the outbox's backpressure is checked per commit. ``seal`` is also given the commit's rows
    as one msgpack array when every call brought its rows packed (``packed``)."""

    def __init__(
        self,
        seal: Callable[[str, Sequence[Row], bytes | None], Awaitable[int]],
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

    async def add(
        self, stream: str, rows: Sequence[Row], packed: bytes | None, tg: asyncio.TaskGroup
    ) -> int:
        """Join the stream's next commit (starting its task when none runs) and wait until
        it is sealed. A caller cancelled meanwhile leaves its rows in it: they may be stored."""
        queue = self._gathering.setdefault(stream, deque())
        if not queue or (queue[-1].rows and len(queue[-1].rows) + len(rows) > self._max_rows):
            queue.append(_Commit())
            queue[-1].sealed.add_done_callback(_retrieved)
        commit = queue[-1]
        if stream not in self._running:
            run = self._run(stream)
            try:
                tg.create_task(run)
            except RuntimeError:  # the agent's task group is ending: nothing will seal
                run.close()
                self.fail_all(BrokerError("the producer is stopping"))
                raise BrokerError("the producer is stopping") from None
            self._running.add(stream)
        commit.rows.extend(rows)
        commit.calls += 1
        if commit.items is not None and packed is not None:
            commit.items.append(packed[array_header_size(len(rows)) :])
        else:
            commit.items = None
        self.calls += 1
        return await asyncio.shield(commit.sealed)

    def fail_all(self, exc: SealstreamError) -> None:
        """Fail every commit not sealed yet (the agent stops: no task will seal them)."""
        for queue in self._gathering.values():
            while queue:
                queue.popleft().sealed.set_exception(exc)

    async def _run(self, stream: str) -> None:
        queue = self._gathering.setdefault(stream, deque())
        try:
            while queue:
                commit = queue.popleft()
                self.commits += 1
                try:
                    packed = None
                    if commit.items is not None:
                        packed = array_header(len(commit.rows)) + b"".join(commit.items)
                    ticket = await self._seal(stream, commit.rows, packed)
                except (SealstreamError, ValueError, TypeError) as exc:
                    # each of its callers raises it (rows it cannot pack: a misuse), and the
                    # stream's next commit goes on
                    log.warning(
                        "commit.failed",
                        stream=stream,
                        calls=commit.calls,
                        error_type=type(exc).__name__,
                    )
                    commit.sealed.set_exception(exc)
                    continue
                except BaseException:  # cancelled: the agent stops
                    commit.sealed.set_exception(BrokerError("the producer stopped committing"))
                    raise
                commit.sealed.set_result(ticket)
                await self._settled(ticket)  # meanwhile, the next commit gathers
        finally:
            self._running.discard(stream)
            while queue:  # gathered while the task was stopped
                queue.popleft().sealed.set_exception(BrokerError("the producer stopped committing"))
