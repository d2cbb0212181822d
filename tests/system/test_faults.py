"""Faults on loopback, bounded in time: a producer killed or restarted, nats-server restarted
mid-stream, a node of a three-node NATS cluster killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from structlog.testing import capture_logs

from producers import Agent, AuthzPolicy, HttpEvents
from sealstream import SessionError
from sealstream.crypto import ClusterIdentity, TrustStore
from sealstream.nats import connect, release, settle
from sealstream.server import EmbeddedServer, ServerOptions, free_port
from tests.support.broker import cluster_nodes
from tests.support.pipeline import collect_rows, eventually, make_stack


async def test_killed_producer_process_consumer_is_told(nats_url: str, tmp_path: Path) -> None:
    """SIGKILL leaves no end envelope: the proxy's liveness check ends the session."""
    async with make_stack(nats_url, keepalive_s=1.0) as stack:
        key_file = tmp_path / "c2.jwk"
        identity = ClusterIdentity.load_or_create(key_file)
        # the stack's user may read it (the policy file beside the key)
        policy, _ = AuthzPolicy().with_key(stack.user.public_jwk, ["http_events"])
        policy.save(tmp_path / "authorized.json")
        env = {**os.environ, "NATS_URL": nats_url, "SEALSTREAM_PREFIX": stack.prefix}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "producers",
            "--cluster",
            "c2",
            "--key-file",
            str(key_file),
            "--source",
            "http_events",
            "--rate",
            "200",
            "--log-level",
            "warning",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            trust = TrustStore({"c2": [identity.public_jwk]})
            async with stack.client(trust=trust, token=stack.token(clusters=["c2"])) as client:
                # the producer process is starting: by default the open is retried while the
                # cluster is unavailable
                sub = await client.subscribe("c2", ["http_events"]).__aenter__()
                try:
                    rows, _ = await collect_rows(sub, 5)
                    assert rows[0]["req_method"] in {"GET", "POST", "PUT", "DELETE"}
                    proc.send_signal(signal.SIGKILL)
                    loop = asyncio.get_running_loop()
                    killed_at = loop.time()
                    with pytest.raises(SessionError) as err:
                        async with asyncio.timeout(10):
                            async for _ in sub:
                                pass
                    assert err.value.code == "ended"
                    assert "unavailable" in str(err.value)
                    assert loop.time() - killed_at < 5  # 2 pings at 0.3 s, plus slack
                finally:
                    await sub.aclose()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_restarted_producer_ends_sessions_it_does_not_know(nats_url: str) -> None:
    async with make_stack(nats_url, keepalive_s=1.0) as stack:
        async with stack.client() as client, client.subscribe(stack.cluster, ["records"]) as sub:
            await stack.agent.emit("records", [{"i": 1}])
            await collect_rows(sub, 1)
            await stack.agent._nc.close()  # crash: no end envelope
            async with Agent(stack.agent.config, identity=stack.identity, streams=["records"]):
                with pytest.raises(SessionError) as err:
                    async with asyncio.timeout(10):
                        async for _ in sub:
                            pass
                assert "no longer serves" in str(err.value)
                async with client.subscribe(stack.cluster, ["records"]) as again:
                    assert again.session_id != sub.session_id


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[tuple[ServerOptions, list[EmbeddedServer]]]:
    options = ServerOptions(port=free_port(), store_dir=tmp_path / "js")
    servers: list[EmbeddedServer] = []
    yield options, servers
    for server in servers:
        server.stop()


async def test_nats_server_restart_mid_stream(
    restartable: tuple[ServerOptions, list[EmbeddedServer]],
) -> None:
    """All roles reconnect and the session resumes; what was in flight is counted as lost,
    nothing is replayed."""
    options, servers = restartable
    first = EmbeddedServer(options)
    servers.append(first)
    url = await asyncio.to_thread(first.start)
    async with make_stack(url, sources=[HttpEvents(rate=200, seed=1)], streams=()) as stack:
        async with (
            stack.client(policy="discard") as client,
            client.subscribe(stack.cluster, ["http_events"]) as sub,
        ):
            await collect_rows(sub, 10)
            await asyncio.to_thread(first.stop)
            await asyncio.sleep(0.5)
            second = EmbeddedServer(options)
            servers.append(second)
            await asyncio.to_thread(second.start)
            restarted = asyncio.get_running_loop().time()
            received = sub.stats().received
            await eventually(lambda: sub.stats().received > received + 20, timeout=15)
            rows, _ = await collect_rows(sub, 20)
            assert len(rows) >= 20
            assert asyncio.get_running_loop().time() - restarted < 15
            stats = sub.stats()
            assert stats.rejected == {}  # no replay, no forgery
            assert stack.agent.sessions  # the session survived on the producer


async def test_every_role_stops_cleanly_while_the_server_is_down(
    restartable: tuple[ServerOptions, list[EmbeddedServer]],
) -> None:
    """Stopping while the connection is reconnecting: nats-py refuses to drain then, and the
    proxy and the producer used to exit on that error with a traceback."""
    options, servers = restartable
    first = EmbeddedServer(options)
    servers.append(first)
    url = await asyncio.to_thread(first.start)
    async with make_stack(url, sources=[HttpEvents(rate=200, seed=1)], streams=()) as stack:
        async with stack.client(policy="discard") as client:
            async with client.subscribe(stack.cluster, ["http_events"]) as sub:
                await collect_rows(sub, 5)
                await asyncio.to_thread(first.stop)
                conns = [client.nc, stack.proxy._nc, stack.agent._nc]
                await eventually(lambda: all(nc.is_reconnecting for nc in conns), timeout=10)
        # every exit above ran while the server was down, and raised nothing
        assert client._nc is None
    assert all(nc.is_closed for nc in conns)


async def test_release_waits_for_a_restarting_server_and_drains(
    restartable: tuple[ServerOptions, list[EmbeddedServer]],
) -> None:
    """What a client publishes while its server restarts is delivered when it is released
    during the restart, not dropped; with no server coming back, it is dropped, counted."""
    options, servers = restartable
    first = EmbeddedServer(options)
    servers.append(first)
    url = await asyncio.to_thread(first.start)
    nc = await connect(url, name="test-release")
    got: list[bytes] = []

    async def keep(msg: Any) -> None:
        got.append(msg.data)

    await nc.subscribe("test.release", cb=keep)
    await settle(nc)
    await asyncio.to_thread(first.stop)
    await eventually(lambda: nc.is_reconnecting, timeout=10)
    await nc.publish("test.release", b"sent during the outage")
    with capture_logs() as logs:
        releasing = asyncio.create_task(release(nc, reconnect_wait_s=10))
        second = EmbeddedServer(options)
        servers.append(second)
        await asyncio.to_thread(second.start)
        async with asyncio.timeout(15):
            await releasing
    assert nc.is_closed
    assert got == [b"sent during the outage"]
    assert not [e for e in logs if e["event"] in ("nats.unsent_dropped", "nats.drain_failed")]

    lonely = await connect(url, name="test-release-alone")
    await asyncio.to_thread(second.stop)
    await eventually(lambda: lonely.is_reconnecting, timeout=10)
    await lonely.publish("test.release", b"x" * 100)
    with capture_logs() as logs:
        await release(lonely, reconnect_wait_s=0.5)
    assert lonely.is_closed
    dropped = [e["bytes"] for e in logs if e["event"] == "nats.unsent_dropped"]
    assert len(dropped) == 1
    assert dropped[0] > 100  # the PUB line and its 100-byte payload


async def _routes_formed(urls: list[str]) -> None:
    """Wait until a message published on any node reaches a subscriber on every other one
    (a fixed sleep for the routes was not always enough on a loaded machine)."""
    conns = [await nats.connect(u, allow_reconnect=False) for u in urls]
    try:
        subs = [await nc.subscribe(f"_mesh.{i}") for i, nc in enumerate(conns)]
        for nc in conns:
            await nc.flush()
        async with asyncio.timeout(10):
            for i, sub in enumerate(subs):
                for j, nc in enumerate(conns):
                    if i == j:
                        continue
                    while True:  # interest may not have crossed the route yet: send again
                        await nc.publish(f"_mesh.{i}", str(j).encode())
                        with contextlib.suppress(TimeoutError):
                            if (await sub.next_msg(timeout=0.1)).data == str(j).encode():
                                break
    finally:
        for nc in conns:
            await nc.close()


async def test_three_node_cluster_survives_a_node_kill(tmp_path: Path) -> None:
    nodes = cluster_nodes(tmp_path, jetstream=False)
    ports = [node.port for node in nodes]
    try:
        for node in nodes:
            await asyncio.to_thread(node.start)
        urls = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        await _routes_formed([f"nats://127.0.0.1:{p}" for p in ports])
        # no JetStream on these nodes: one proxy with its registry in memory
        async with make_stack(
            urls, sources=[HttpEvents(rate=200, seed=2)], streams=(), shared_registry=False
        ) as stack:
            async with (
                stack.client(policy="discard") as client,
                client.subscribe(stack.cluster, ["http_events"]) as sub,
            ):
                await collect_rows(sub, 10)
                producer_port = int(str(stack.agent._nc.connected_url.port))
                victim = nodes[ports.index(producer_port)]
                await asyncio.to_thread(victim.stop)
                received = sub.stats().received
                await eventually(lambda: sub.stats().received > received + 20, timeout=15)
                rows, _ = await collect_rows(sub, 10)
                assert len(rows) >= 10
                assert sub.stats().rejected == {}
                assert int(str(stack.agent._nc.connected_url.port)) != producer_port
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)
