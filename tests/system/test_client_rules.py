"""The consumer library's rules against a hostile relay and a slow reader (issue 19): a key
envelope signed by an unpinned key is counted and ignored, never fatal; the end of a session
reaches an iterator whose queue is full; a session keeps going whatever a relay raced ahead."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from consumers import Batch, Client, Resumed
from sealstream import SessionError, TrustError
from sealstream.crypto import ClusterIdentity, ProducerSession, TrustStore
from sealstream.nats import connect, settle
from sealstream.store import Store
from sealstream.wire import VERSION, encode_map
from tests.support.pipeline import Tap, collect_rows, eventually, fresh_key, make_stack


async def test_a_forged_key_envelope_raced_ahead_of_the_genuine_one_is_only_counted(
    nats_url: str,
) -> None:
    """The relay sees every open before the cluster answers it: a key envelope signed by its
    own key, sealed to the open's key and delivered first, is refused as ``untrusted_key``
    and the session goes on with the cluster's key (policy ``fail``, the library default)."""
    key = fresh_key()
    async with (
        make_stack(nats_url) as st,
        Tap(nats_url, st.subjects.inbox(key.session_id)) as tap,
    ):
        forger = ProducerSession(
            ClusterIdentity.generate(),
            cluster=st.cluster,
            session=key.session_id,
            consumer_jwk=key.public_jwk,
        )
        # a fresh seq: had it come second, it would be refused as untrusted, not as a replay
        forger.seq = 10**9
        forged = forger.start()  # the key envelope alone (under "fail" any junk data ends it)
        relay = await connect(nats_url, name="hostile-relay")
        raced: list[bytes] = []

        async def race(msg: Any) -> None:
            for payload in forged:
                await relay.publish(st.subjects.inbox(key.session_id), payload)
            await relay.flush()
            raced.extend(forged)

        try:
            await relay.subscribe(st.subjects.api_open, cb=race)
            await settle(relay)
            async with (
                st.client() as client,
                client.subscribe(st.cluster, ["records"], key=key) as sub,
            ):
                assert client.config.policy == "fail"
                await st.agent.emit("records", [{"path": "/genuine", "i": i} for i in range(3)])
                rows, _ = await collect_rows(sub, 3)
                await tap.flush()
                seen = [m.data for m in tap.messages]
                # the race was won: the forged key envelope reached the inbox first
                assert raced
                assert seen[0] == forged[0]
                assert [r["path"] for r in rows] == ["/genuine"] * 3
                assert sub.stats().rejected == {"untrusted_key": 1}
                assert sub.session is not None
                assert sub.session.keyed
        finally:
            await relay.close()


async def test_a_slow_consumer_whose_session_ends_sees_the_iterator_end(nats_url: str) -> None:
    """The inbox queue full (a reader slower than the stream), the session lost at the proxy:
    the marker that says so is not dropped but kept for after the queued messages, so the
    iterator ends instead of waiting forever."""
    async with make_stack(nats_url, keepalive_s=1.0) as st:
        config = dataclasses.replace(st.config(), queue_size=4)
        async with (
            Client(config, trust=st.trust()) as client,
            client.subscribe(st.cluster, ["records"]) as sub,
        ):
            live = sub._live
            assert live is not None
            async with asyncio.timeout(10):
                i = 0
                while live.dropped == 0:  # more batches than the queue holds
                    await st.agent.emit("records", [{"i": i}])
                    i += 1
                    await asyncio.sleep(0.01)
            # the session is closed at the proxy behind the reader's back (as a proxy restart
            # that lost its registry would): its next keepalive is refused, and the marker
            # that says so meets a full queue
            body = {"v": VERSION, "token": st.token(), "session": sub.session_id}
            await client.nc.request(st.subjects.api_close, encode_map(body), timeout=5)
            await eventually(lambda: live.ending is not None, timeout=10)
            assert live.queue.full()
            got: list[Batch] = []
            with pytest.raises(SessionError) as err:
                async with asyncio.timeout(10):
                    async for batch in sub:
                        got.append(batch)
                        await asyncio.sleep(0.05)  # slower than the stream
            assert err.value.code == "ended"
            assert 0 < len(got) <= 4
            assert sub.stats().dropped > 0


async def test_an_ended_session_met_with_a_full_queue_is_drained_then_resumed(
    nats_url: str,
) -> None:
    """With a store and ``resume``: the queue full (the session fell behind), the session
    gone at the proxy: the marker that says so waits after the queued messages, is taken
    once, and the session drains what it can (here nothing: it was closed, not ended, so the
    proxy answers its resumes "unknown") and resumes on a new session instead of spinning."""
    async with make_stack(nats_url, keepalive_s=1.0, store=Store()) as st:
        config = dataclasses.replace(st.config(), queue_size=8)
        async with (
            Client(config, trust=st.trust()) as client,
            client.subscribe(st.cluster, ["records"], resume=True) as sub,
        ):
            live = sub._live
            assert live is not None
            async with asyncio.timeout(10):
                i = 0
                while not live.behind:  # more batches than the queue holds: behind
                    await st.agent.emit("records", [{"i": i}])
                    i += 1
            body = {"v": VERSION, "token": st.token(), "session": sub.session_id}
            await client.nc.request(st.subjects.api_close, encode_map(body), timeout=5)
            await eventually(lambda: live.ending is not None, timeout=10)
            assert live.queue.full()
            resumed = None
            async with asyncio.timeout(30):
                async for item in sub:
                    if isinstance(item, Resumed):
                        resumed = item
                        break
            assert resumed is not None
            assert (resumed.drained, sub.stats().sessions) == (0, 2)
            await st.agent.emit("records", [{"i": -1}])
            async with asyncio.timeout(10):
                async for item in sub:
                    assert isinstance(item, Batch)
                    assert item.rows == [{"i": -1}]  # the new session's
                    break


async def test_no_genuine_key_by_the_deadline_is_a_trust_error_that_offers_no_key(
    nats_url: str,
) -> None:
    """Policy ``discard``, a trust store without the cluster's key: the key envelope is
    refused, the data after it too, and at the key deadline (the request timeout after the
    open) the subscription ends with a trust error that says how to check the key out of band
    and never names the refused one."""
    async with (
        make_stack(nats_url) as st,
        st.client(trust=TrustStore(), policy="discard") as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        live = sub._live
        assert live is not None
        await st.agent.emit("records", [{"i": 1}])
        loop = asyncio.get_running_loop()
        with pytest.raises(TrustError) as err:
            await collect_rows(sub, 1, timeout=20)
        assert loop.time() >= live.key_deadline
        said = str(err.value)
        assert "no key envelope signed by a key pinned for cluster" in said
        assert "1 refused" in said
        assert "sealstream-producer key" in said
        assert st.identity.kid not in said
        assert sub.stats().rows == 0
        assert sub.stats().rejected["untrusted_key"] == 1


async def test_a_forged_key_flood_ends_at_the_key_deadline_with_the_trust_error(
    nats_url: str,
) -> None:
    """A relay that streams forged key envelopes keeps the inbox queue from ever running
    empty (each one costs a public-key decryption): past the key deadline, only the items
    queued at that moment are still taken, then the trust error."""
    async with make_stack(nats_url) as st:
        config = dataclasses.replace(st.config(policy="discard"), queue_size=8)
        key = fresh_key()
        async with (
            Client(config, trust=TrustStore()) as client,
            client.subscribe(st.cluster, ["records"], key=key) as sub,
        ):
            live = sub._live
            assert live is not None
            mallory = ClusterIdentity.generate()
            forged: list[bytes] = []
            for i in range(200):
                forger = ProducerSession(
                    mallory, cluster=st.cluster, session=key.session_id, consumer_jwk=key.public_jwk
                )
                forger.seq = 10**9 + i  # fresh: refused as untrusted, not as replays
                forged.extend(forger.start())
            queued = 3
            for payload in forged[:queued]:
                live.push(payload)
            live.key_deadline = asyncio.get_running_loop().time() - 1  # it has passed
            done = asyncio.Event()

            async def flood() -> None:
                """Never lets the queue run empty while the subscription reads it."""
                for payload in forged[queued:]:
                    while live.queue.qsize() >= 2 and not done.is_set():
                        await asyncio.sleep(0)
                    if done.is_set():
                        return
                    live.push(payload)

            async with asyncio.TaskGroup() as tg:
                tg.create_task(flood())
                with pytest.raises(TrustError):
                    async for _ in sub:
                        pass
                done.set()
            refused = sub.stats().rejected["untrusted_key"]
            # the first refusal arms the deadline; then at most what was queued at that moment
            assert 1 <= refused <= queued + 2, refused


async def test_a_token_function_that_fails_ends_the_iteration_not_the_task(
    nats_url: str,
) -> None:
    """The keepalive runs in a task group entered by the task that opened the subscription: a
    token function raising what the library does not expect (not OSError or ValueError) ends
    the subscription through its iterator, and the reading task is not cancelled."""
    broken = False

    async with make_stack(nats_url, keepalive_s=1.0) as st:
        token = st.token()

        def read_token() -> str:
            if broken:
                raise RuntimeError("the vault is sealed")
            return token

        config = dataclasses.replace(st.config(), token=read_token)
        async with Client(config, trust=st.trust()) as client:
            async with client.subscribe(st.cluster, ["records"]) as sub:
                broken = True  # the next keepalive reads it
                with pytest.raises(RuntimeError, match="the vault is sealed"):
                    await anext(sub)
                with pytest.raises(StopAsyncIteration):  # raised once: the iteration is over
                    await anext(sub)
                broken = False  # the close reads it too
            task = asyncio.current_task()
            assert task is not None
            assert not task.cancelling()  # nothing cancelled the reading task


async def test_an_open_answered_for_another_session_is_not_retried(nats_url: str) -> None:
    """A relay that answers an open with another session id tampers: the open fails at once
    (not retried as a passing failure for the retry budget)."""
    async with make_stack(nats_url) as st:
        relay = await connect(nats_url, name="hostile-relay")
        opens: list[bytes] = []
        other = fresh_key("x25519").session_id

        async def answer(msg: Any) -> None:
            opens.append(msg.data)
            reply = {"ok": True, "session": other, "inbox": "x", "keepalive_s": 10}
            await msg.respond(encode_map(reply))

        try:
            await relay.subscribe(f"{st.prefix}h.api.session.open", cb=answer)
            await settle(relay)
            config = dataclasses.replace(st.config(), prefix=f"{st.prefix}h")
            async with Client(config, trust=st.trust()) as client:
                with pytest.raises(SessionError) as err:
                    async with client.subscribe(st.cluster, ["records"], retry_s=10):
                        pass
            assert "another session" in err.value.detail
            assert not err.value.retriable
            assert len(opens) == 1
        finally:
            await relay.close()


async def test_after_a_failed_resume_the_iteration_is_over(nats_url: str) -> None:
    """A resume that fails raises its error once; the next step ends the iteration (not a
    misleading "use the subscription inside 'async with'")."""
    async with make_stack(nats_url, keepalive_s=1.0) as st, st.client() as client:
        sub = client.subscribe(st.cluster, ["records"], resume=True, resume_timeout_s=0)
        async with sub:
            session = sub.session_id
            # the proxy forgets the session (as one that lost its registry would), and the
            # cluster is gone: the next keepalive is refused, and the resume finds no cluster
            body = {"v": VERSION, "token": st.token(), "session": session}
            await client.nc.request(st.subjects.api_close, encode_map(body), timeout=5)
            await eventually(lambda: session not in st.agent.sessions, timeout=10)
            await st.agent.aclose()
            with pytest.raises(SessionError) as err:
                await anext(sub)
            assert err.value.code == "cluster_unavailable"
            with pytest.raises(StopAsyncIteration):
                await anext(sub)
