"""Group mode end to end on a real nats-server: proxy, agent and consumers in this process,
real keys and signatures. One batch is sealed once per stream and relayed to every member;
members come and go and get exactly the batches sealed while they were members."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from broker_proxy import Limits
from consumers import Batch, Client, Subscription
from sealstream import IntegrityError, KeyMode, SessionError
from sealstream.crypto import GroupMember
from sealstream.nats import connect
from tests.support.pipeline import Stack, Tap, collect_rows, eventually, make_stack

STREAM = "records"


@contextlib.asynccontextmanager
async def group_stack(nats_url: str, **options: Any) -> AsyncIterator[Stack]:
    async with make_stack(
        nats_url,
        streams=(STREAM, "other"),
        limits=Limits(sessions_per_user=200),
        **options,
    ) as st:
        yield st


async def emit_until(st: Stack, sub: Subscription[Batch], marker: str) -> list[Batch]:
    """Emit a row until ``sub`` receives it (the group key may wait for the coalescing
    interval); the batches received."""
    got: list[Batch] = []

    async def pump() -> None:
        i = 0
        while True:
            await st.agent.emit(STREAM, [{"m": marker, "i": i}])
            i += 1
            await asyncio.sleep(0.02)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(pump())
        try:
            async with asyncio.timeout(10):
                async for batch in sub:
                    got.append(batch)
                    if any(r.get("m") == marker for r in batch.rows):
                        break
        finally:
            task.cancel()
    return got


def member(sub: Subscription[Any]) -> GroupMember:
    assert isinstance(sub.session, GroupMember)
    return sub.session


async def test_round_trip_sealed_once_for_every_member(nats_url: str) -> None:
    async with (
        group_stack(nats_url) as st,
        Tap(nats_url, f"{st.prefix}.cluster.*.*.*") as tap,
        st.client(key_mode="group") as client,
        client.subscribe(st.cluster, [STREAM]) as a,
        client.subscribe(st.cluster, [STREAM]) as b,
        client.subscribe(st.cluster, [STREAM]) as c,
    ):
        await emit_until(st, a, "warm")
        for sub in (b, c):
            await emit_until(st, sub, "warm")
        await st.agent.emit(STREAM, [{"n": n} for n in range(5)])
        for sub in (a, b, c):
            rows, _ = await collect_rows(sub, 5)
            assert [r["n"] for r in rows if "n" in r] == list(range(5))
        await tap.flush()
        group_subject = st.subjects.group(st.cluster, STREAM)
        sealed = tap.on(group_subject)
        # one envelope per batch, whatever the number of members, and no session data
        assert len(sealed) == st.agent.groups[STREAM].gseq
        for m in tap.messages:
            kind = msgpack.unpackb(m.data, raw=False)["kind"]
            assert kind in ("key", "group"), kind
        group = st.agent.groups[STREAM]
        assert group.members == {a.session_id, b.session_id, c.session_id}
        for sub in (a, b, c):
            assert not member(sub).rejected
            assert member(sub).lost == 0
        assert st.proxy.group_envelopes == len(sealed)
        assert st.proxy.group_deliveries == 3 * len(sealed)


async def test_the_relay_routes_group_envelopes_to_members_only(nats_url: str) -> None:
    """A session-mode reader of the stream and a group member of another stream get none of
    this group's envelopes; the relay counts a group envelope with no member."""
    async with (
        group_stack(nats_url) as st,
        st.client(key_mode="group") as gclient,
        st.client(key_mode="session") as sclient,
        gclient.subscribe(st.cluster, [STREAM]) as member_sub,
        gclient.subscribe(st.cluster, ["other"]) as other_group,
        sclient.subscribe(st.cluster, [STREAM]) as session_sub,
        Tap(nats_url, f"{st.prefix}.inbox.*") as inboxes,
    ):
        await emit_until(st, member_sub, "one")
        rows, _ = await collect_rows(session_sub, 1)
        assert rows
        await inboxes.flush()

        def kinds(sub: Subscription[Any]) -> set[str]:
            on = inboxes.on(st.subjects.inbox(sub.session_id))
            return {msgpack.unpackb(m.data, raw=False).get("kind") for m in on}

        assert "group" in kinds(member_sub)
        assert "group" not in kinds(session_sub)
        assert "group" not in kinds(other_group)
        assert st.proxy.rejected["no_members"] == 0
        # a group envelope for a stream without members is dropped and counted
        nc = await connect(nats_url, name="test-producer")
        try:
            group_envs = [
                m.data
                for m in inboxes.on(st.subjects.inbox(member_sub.session_id))
                if msgpack.unpackb(m.data, raw=False).get("kind") == "group"
            ]
            fake = msgpack.unpackb(group_envs[0], raw=False)
            fake["stream"] = "nobody"
            await nc.publish(
                st.subjects.group(st.cluster, "nobody"), msgpack.packb(fake, use_bin_type=True)
            )
            await nc.flush()
        finally:
            await nc.close()
        await eventually(lambda: st.proxy.rejected["no_members"] == 1)


async def test_a_relay_sending_group_envelopes_to_non_members_is_refused(nats_url: str) -> None:
    """A hostile relay publishes a genuine group envelope to the inbox of a session-mode
    reader and of a group member of another stream: both refuse it."""
    async with (
        group_stack(nats_url) as st,
        Tap(nats_url, f"{st.prefix}.cluster.*.group.*") as tap,
        st.client(key_mode="group") as gclient,
        st.client(key_mode="session", policy="discard") as sclient,
        gclient.subscribe(st.cluster, [STREAM]) as member_sub,
        sclient.subscribe(st.cluster, [STREAM]) as session_sub,
    ):
        await emit_until(st, member_sub, "one")
        await collect_rows(session_sub, 1)
        await tap.flush()
        genuine = tap.messages[-1].data
        async with st.client(key_mode="group", policy="discard") as other:
            async with other.subscribe(st.cluster, ["other"]) as other_sub:
                nc = await connect(nats_url, name="hostile-relay")
                try:
                    for sub in (session_sub, other_sub):
                        await nc.publish(st.subjects.inbox(sub.session_id), genuine)
                    await nc.flush()
                finally:
                    await nc.close()
                await st.agent.emit("other", [{"o": 1}])
                rows, _ = await collect_rows(other_sub, 1)
                assert rows == [{"o": 1}]
                assert other_sub.stats().rejected == {"not_member": 1}
        await st.agent.emit(STREAM, [{"after": 1}])
        async with asyncio.timeout(5):
            async for batch in session_sub:
                if {"after": 1} in batch.rows:
                    break
        assert session_sub.stats().rejected == {"malformed": 1}


async def test_no_downgrade_through_the_relay(nats_url: str) -> None:
    """The relay forwards a session-mode data envelope (of another session on the stream,
    re-addressed) to a group member: refused, under the fail policy as the opaque error."""
    async with (
        group_stack(nats_url) as st,
        Tap(nats_url, f"{st.prefix}.cluster.*.data.*") as tap,
        st.client(key_mode="group") as gclient,
        st.client(key_mode="session") as sclient,
        gclient.subscribe(st.cluster, [STREAM]) as member_sub,
        sclient.subscribe(st.cluster, [STREAM]) as session_sub,
    ):
        await emit_until(st, member_sub, "one")
        await collect_rows(session_sub, 1)
        await tap.flush()
        data = [
            m.data for m in tap.messages if msgpack.unpackb(m.data, raw=False)["kind"] == "data"
        ]
        env = msgpack.unpackb(data[-1], raw=False)
        env["session"] = member_sub.session_id
        nc = await connect(nats_url, name="hostile-relay")
        try:
            await nc.publish(
                st.subjects.inbox(member_sub.session_id), msgpack.packb(env, use_bin_type=True)
            )
            await nc.flush()
        finally:
            await nc.close()
        with pytest.raises(IntegrityError):
            async with asyncio.timeout(5):
                async for _ in member_sub:
                    pass
        assert member(member_sub).rejected == {"wrong_mode": 1}


async def test_zip_is_refused_in_group_mode(nats_url: str) -> None:
    from consumers import ClientConfig

    async with group_stack(nats_url) as st:
        with pytest.raises(ValueError, match="group mode"):
            ClientConfig(key_mode="group", allow_zip=True)
        # at the producer too, for a client that asks anyway
        from sealstream.control import OpenRequest
        from sealstream.crypto import ConsumerKey

        key = ConsumerKey.generate("x25519")
        req = OpenRequest(
            cluster=st.cluster,
            streams=(STREAM,),
            jwk=key.public_jwk,
            key_mode="group",
            token=st.token(),
            zip=True,
            proof=st.proof(key.public_jwk, [STREAM], key_mode="group", zip=True),
        )
        async with Client(st.config(key_mode="group"), trust=st.trust()) as client:
            with pytest.raises(SessionError) as err:
                await client.request(st.subjects.api_open, req.to_map())
        assert err.value.code == "bad_request"
        assert "group mode" in err.value.detail


async def test_fan_out_50_with_members_joining_and_leaving(nats_url: str) -> None:
    """50 members over the run, 20 of them joining and 10 leaving while batches flow: every
    member receives every batch sealed while it held the group key (until it stopped), and
    none other; the producer sealed each batch once."""
    async with group_stack(nats_url) as st, st.client(key_mode="group") as client:
        st.agent.group_trace = []
        received: dict[str, list[int]] = {}
        stop_emit = asyncio.Event()

        async def read(sub: Subscription[Batch], done: asyncio.Event) -> None:
            got = received.setdefault(sub.session_id, [])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    async for batch in sub:
                        assert batch.stream == STREAM
                        got.append(batch.seq)
                        if done.is_set() and batch.rows[-1].get("last"):
                            return

        async def emit() -> None:
            i = 0
            while not stop_emit.is_set():
                await st.agent.emit(STREAM, [{"i": i}])
                i += 1
                await asyncio.sleep(0.01)

        leavers: list[str] = []
        finished = asyncio.Event()
        async with contextlib.AsyncExitStack() as subs, asyncio.TaskGroup() as tg:
            live: list[
                tuple[Subscription[Batch], asyncio.Task[None], contextlib.AsyncExitStack]
            ] = []

            async def join() -> None:
                stack = contextlib.AsyncExitStack()
                sub = await stack.enter_async_context(client.subscribe(st.cluster, [STREAM]))
                live.append((sub, tg.create_task(read(sub, finished)), stack))

            for _ in range(30):
                await join()
            tg.create_task(emit())
            for round_ in range(10):
                await asyncio.sleep(0.15)
                await join()
                await join()
                sub, task, stack = live.pop(round_)  # leave: close the session
                task.cancel()
                leavers.append(sub.session_id)
                await stack.aclose()
            await asyncio.sleep(0.5)
            stop_emit.set()
            # the last batch, marked: every live member reads until it has it
            await asyncio.sleep(0.05)
            finished.set()
            await st.agent.emit(STREAM, [{"last": True}])
            await asyncio.gather(*(task for _, task, _ in live))
            for _, _, stack in live:
                subs.push_async_callback(stack.aclose)

        trace = [seal for stream, seal in st.agent.group_trace if stream == STREAM]
        assert len(received) == 50
        assert len({s.gseq for s in trace}) == len(trace)  # one seal per batch
        assert st.agent.groups[STREAM].rotations >= 11  # the initial key, a leave per round
        sealed_for: dict[str, set[int]] = {}
        for seal in trace:
            for session in seal.members:
                sealed_for.setdefault(session, set()).add(seal.gseq)
        for session, got in received.items():
            mine = sealed_for.get(session, set())
            assert set(got) <= mine, "a batch sealed while it was no member"
            assert len(got) == len(set(got))
            if session in leavers:
                # until it left: everything sealed for it up to the last it read
                upto = max(got) if got else -1
                assert {g for g in mine if g <= upto} == set(got)
            else:
                assert set(got) == mine, (len(mine - set(got)), len(mine))
                assert mine  # it was a member for some batches


async def test_a_relay_cannot_switch_the_key_mode(nats_url: str) -> None:
    """The proof binds ``key_mode``: an open whose mode was changed on the way (session to
    group, group to session) is forbidden by the cluster."""
    from sealstream.control import OpenRequest
    from sealstream.crypto import ConsumerKey

    async with group_stack(nats_url) as st, st.client(key_mode="group") as client:
        modes: list[tuple[KeyMode, KeyMode]] = [("group", "session"), ("session", "group")]
        for asked, proved in modes:
            key = ConsumerKey.generate("x25519")
            req = OpenRequest(
                cluster=st.cluster,
                streams=(STREAM,),
                jwk=key.public_jwk,
                key_mode=asked,
                token=st.token(),
                proof=st.proof(key.public_jwk, [STREAM], key_mode=proved),
            )
            with pytest.raises(SessionError) as err:
                await client.request(st.subjects.api_open, req.to_map())
            assert err.value.code == "forbidden"
            assert err.value.detail == "proof is for another key mode"
        assert not st.agent.sessions


async def test_a_second_proxy_learns_group_members_from_the_shared_registry(
    nats_url: str,
) -> None:
    """Two proxy instances in one queue group: the one that did not serve the open still
    knows the session is a group member (the registry bucket carries ``key_mode``) and
    relays its share of the group envelopes to it."""
    from broker_proxy import Proxy, ProxyConfig

    async with group_stack(nats_url) as st:
        other = ProxyConfig(
            nats_url=nats_url,
            prefix=st.prefix,
            token_secret=st.secret,
            control_timeout_s=2.0,
            limits=Limits(sessions_per_user=200),
        )
        async with (
            Proxy(other) as second,
            st.client(key_mode="group", policy="discard") as client,
            client.subscribe(st.cluster, [STREAM]) as sub,
        ):
            session = sub.session_id

            def members_at(proxy: Proxy) -> list[str]:
                return [e.session for e in proxy.registry.group_members(st.cluster, STREAM)]

            await eventually(lambda: members_at(st.proxy) == members_at(second) == [session])
            await emit_until(st, sub, "warm")
            for i in range(40):
                await st.agent.emit(STREAM, [{"n": i}])
                await asyncio.sleep(0.005)
            got: list[int] = []
            async with asyncio.timeout(10):
                async for batch in sub:
                    got += [r["n"] for r in batch.rows if "n" in r]
                    if 39 in got:
                        break
            assert st.proxy.group_deliveries > 0
            assert second.group_deliveries > 0
            assert (
                st.proxy.group_deliveries + second.group_deliveries == st.agent.groups[STREAM].gseq
            )
