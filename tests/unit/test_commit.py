"""Group commit (producers/_commit.py): calls made while a commit is being stored share the
next one, in call order; a lone call is sealed at once; a failure reaches every call of its
commit and no other; a full commit takes no more calls."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import pytest

from producers._commit import GroupCommit
from sealstream import BrokerError


class Store:
    """Seals by recording the rows (the ticket: how many commits so far); a commit is
    "stored" when the test releases it."""

    def __init__(self) -> None:
        self.sealed: list[list[Any]] = []
        self.packed: list[bytes | None] = []
        self.released = asyncio.Event()
        self.fail_next: BrokerError | None = None

    async def seal(
        self, stream: str, rows: Sequence[Mapping[str, Any]], packed: bytes | None
    ) -> int:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.sealed.append([r["i"] for r in rows])
        self.packed.append(packed)
        return len(self.sealed)

    async def settled(self, ticket: int) -> None:
        await self.released.wait()


def rows(*numbers: int) -> tuple[list[dict[str, int]], bytes]:
    """Rows as a call brings them: the list, and the same packed as one msgpack array."""
    listed = [{"i": n} for n in numbers]
    return listed, msgpack.packb(listed)


async def test_calls_made_during_a_commit_share_the_next_one_in_call_order() -> None:
    store = Store()
    commit = GroupCommit(store.seal, store.settled, max_rows=1000)
    async with asyncio.TaskGroup() as tg:
        first = tg.create_task(commit.add("s", *rows(0), tg))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert store.sealed == [[0]]  # a lone call: sealed at once, not waiting for company
        later = [tg.create_task(commit.add("s", *rows(2 * n + 1, 2 * n + 2), tg)) for n in range(5)]
        await asyncio.sleep(0.01)
        assert store.sealed == [[0]]  # the first is being stored: the others gather
        store.released.set()
        tickets = [await first, *[await t for t in later]]
    assert store.sealed == [[0], list(range(1, 11))]
    # the calls' packed rows, joined into one array: not packed again
    assert store.packed[1] == msgpack.packb(rows(*range(1, 11))[0])
    assert tickets == [1, 2, 2, 2, 2, 2]
    assert (commit.commits, commit.calls) == (2, 6)


async def test_a_failure_reaches_every_call_of_its_commit_and_no_other() -> None:
    store = Store()
    store.released.set()
    commit = GroupCommit(store.seal, store.settled, max_rows=1000)
    async with asyncio.TaskGroup() as tg:
        store.fail_next = BrokerError("the store is away")
        results = await asyncio.gather(
            *(commit.add("s", *rows(n), tg) for n in range(3)), return_exceptions=True
        )
        assert [str(r) for r in results] == ["the store is away"] * 3
        assert all(isinstance(r, BrokerError) for r in results)
        assert await commit.add("s", *rows(9), tg) == 1
    assert store.sealed == [[9]]


async def test_a_commit_takes_no_call_that_would_pass_a_batchs_worth() -> None:
    store = Store()
    commit = GroupCommit(store.seal, store.settled, max_rows=5)
    async with asyncio.TaskGroup() as tg:
        sizes = [3, 2, 1, 7, 2]  # 3+2 fill one; 1 alone (7 would pass 5); 7 alone; 2
        calls, start = [], 0
        for size in sizes:
            calls.append(tg.create_task(commit.add("s", *rows(*range(start, start + size)), tg)))
            start += size
        await asyncio.sleep(0.01)
        store.released.set()
        await asyncio.gather(*calls)
    assert [len(c) for c in store.sealed] == [5, 1, 7, 2]
    assert [i for c in store.sealed for i in c] == list(range(15))  # in call order


async def test_streams_commit_apart_and_a_cancelled_caller_leaves_its_rows() -> None:
    store = Store()
    commit = GroupCommit(store.seal, store.settled, max_rows=1000)
    async with asyncio.TaskGroup() as tg:
        a = tg.create_task(commit.add("a", *rows(1), tg))
        b = tg.create_task(commit.add("b", *rows(2), tg))
        await asyncio.sleep(0.01)
        assert sorted(store.sealed) == [[1], [2]]  # neither waits for the other's store
        gone = tg.create_task(commit.add("a", *rows(3), tg))
        await asyncio.sleep(0)
        gone.cancel()
        store.released.set()
        await a
        await b
        with pytest.raises(asyncio.CancelledError):
            await gone
    assert sorted(store.sealed) == [[1], [2], [3]]  # its rows were sealed all the same


async def test_a_stopped_commit_task_fails_what_gathered() -> None:
    """The agent's task group stops (its commit task is cancelled while a commit is being
    stored): the calls gathered for the next commit get a BrokerError, not a hang."""
    store = Store()
    commit = GroupCommit(store.seal, store.settled, max_rows=1000)

    async def call(n: int, tg: asyncio.TaskGroup) -> int | BrokerError:
        try:
            return await commit.add("s", *rows(n), tg)
        except BrokerError as exc:
            return exc

    async with asyncio.TaskGroup() as callers:
        with pytest.raises(ExceptionGroup):
            async with asyncio.TaskGroup() as agent:
                first = callers.create_task(call(0, agent))
                await asyncio.sleep(0.01)
                waiting = callers.create_task(call(1, agent))
                await asyncio.sleep(0.01)
                raise RuntimeError("the agent stops")  # cancels its commit task
    assert first.result() == 1
    assert "stopped committing" in str(waiting.result())
    assert store.sealed == [[0]]


async def test_a_call_without_its_rows_packed_makes_the_commit_pack_them() -> None:
    store = Store()
    store.released.set()
    commit = GroupCommit(store.seal, store.settled, max_rows=1000)
    async with asyncio.TaskGroup() as tg:
        await asyncio.gather(
            commit.add("s", *rows(0, 1), tg),
            commit.add("s", rows(2)[0], None, tg),
            commit.add("s", *rows(3), tg),
        )
    assert store.sealed == [[0, 1, 2, 3]]
    assert store.packed == [None]


async def test_calls_after_the_agents_task_group_ended_fail_instead_of_waiting() -> None:
    """A task of the agent failed: its task group takes no new task. The call that finds no
    commit task raises BrokerError, and so does every later one (none waits forever)."""
    store = Store()
    commit = GroupCommit(store.seal, store.settled, max_rows=1000)
    ended: asyncio.TaskGroup | None = None
    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            ended = tg
            raise RuntimeError("a source failed")
    assert ended is not None
    for n in range(2):
        with pytest.raises(BrokerError, match="stopping"):
            async with asyncio.timeout(1):
                await commit.add("s", *rows(n), ended)
    assert store.sealed == []


async def test_fail_all_ends_the_commits_not_sealed_yet() -> None:
    store = Store()
    commit = GroupCommit(store.seal, store.settled, max_rows=2)
    async with asyncio.TaskGroup() as tg:
        first = tg.create_task(commit.add("s", *rows(0, 1), tg))
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(commit.add("s", *rows(n, n + 1), tg)) for n in (2, 4)]
        await asyncio.sleep(0.01)
        commit.fail_all(BrokerError("the producer is stopping"))
        outcomes = await asyncio.gather(*later, return_exceptions=True)
        store.released.set()
        assert await first == 1
    assert [type(o) for o in outcomes] == [BrokerError, BrokerError]
    assert store.sealed == [[0, 1]]
