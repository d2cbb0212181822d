"""Fan-out cost of the producer, group mode against session mode (``sealstream bench-fanout``).

Measures, in this process with the real recipes (no broker: the seal path only), the
producer's CPU seconds per batch at fan-out 1, 10 and 50: session mode seals each batch once
per session, group mode once for the group (an AES-GCM seal and one Ed25519 signature). Also
the cost of one group rotation at each fan-out (a public-key operation and a signature per
member), and the consumer's CPU per batch in both modes (the price of the signature check).
Publishing is not included: session mode also publishes n envelopes per batch where group
mode publishes one (the relay then fans it out). Then, on a real nats-server with a proxy and
an agent in this process, a busy group's join and leave latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from broker_proxy import Limits, Proxy, ProxyConfig
from consumers import Client, ClientConfig, Subscription
from producers import Agent, AuthzPolicy, Batching, ProducerConfig
from sealstream import configure_logging, mint_token
from sealstream.crypto import (
    Batch,
    ClusterIdentity,
    ConsumerKey,
    ConsumerSession,
    GroupMember,
    GroupSealer,
    MemberSession,
    ProducerSession,
    TrustStore,
    UserIdentity,
    encode_rows,
)
from sealstream.nats import NatsAuth
from sealstream.server import EmbeddedServer, ServerOptions

__all__ = ["fanout_main", "measure", "measure_churn"]

_CLUSTER = "bench"
_STREAM = "s"


def _plaintext(size: int) -> bytes:
    rows: list[dict[str, Any]] = []
    while len(encode_rows(rows)) < size:
        rows.append({"path": "/api/v1/items", "status": 200, "n": len(rows), "pad": "x" * 40})
    return encode_rows(rows)


def _cpu(fn: Callable[[], object], repeat: int, *, runs: int = 3) -> float:
    """CPU seconds (this process) per call of ``fn``: the least of ``runs`` runs (the machine
    is shared; interference only adds)."""
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        for _ in range(repeat):
            fn()
        best = min(best, (time.process_time() - start) / repeat)
    return best


def _cpu_each(fn: Callable[[bytes], object], items: list[bytes]) -> float:
    """CPU seconds per ``fn(item)``."""
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items)


def _seal_sessions(sessions: list[ProducerSession], plaintext: bytes) -> None:
    for s in sessions:
        s.seal(_STREAM, plaintext)


def _keys(n: int) -> list[ConsumerKey]:
    return [ConsumerKey.generate("x25519") for _ in range(n)]


def measure(
    *,
    fanouts: tuple[int, ...] = (1, 10, 50),
    sizes: tuple[int, ...] = (1024, 16384),
    batches: int = 200,
) -> dict[str, Any]:
    identity = ClusterIdentity.generate()
    trust = TrustStore({_CLUSTER: [identity.public_jwk]})
    keys = _keys(max(fanouts))
    rows: list[dict[str, Any]] = []
    for size in sizes:
        plaintext = _plaintext(size)
        for n in fanouts:
            sessions = [
                ProducerSession(
                    identity,
                    cluster=_CLUSTER,
                    session=k.session_id,
                    consumer_jwk=k.public_jwk,
                )
                for k in keys[:n]
            ]
            for s in sessions:
                s.start()

            members = {
                k.session_id: MemberSession(
                    identity,
                    cluster=_CLUSTER,
                    session=k.session_id,
                    consumer_jwk=k.public_jwk,
                    key_mode="group",
                )
                for k in keys[:n]
            }
            group = GroupSealer(identity, cluster=_CLUSTER, stream=_STREAM)
            group.seal(plaintext, members)  # the first key

            session_cpu = _cpu(partial(_seal_sessions, sessions, plaintext), max(batches // n, 5))
            group_cpu = _cpu(partial(group.seal, plaintext, members), batches)
            # one rotation at this fan-out: a member leaves, the others get a new key
            leaver = next(iter(members))
            rest = {s: m for s, m in members.items() if s != leaver}
            rotation: float | None = None
            if rest:
                start = time.process_time()
                group.seal(plaintext, rest)
                rotation = time.process_time() - start
            rows.append(
                {
                    "size": size,
                    "fanout": n,
                    "session_cpu_per_batch_s": session_cpu,
                    "group_cpu_per_batch_s": group_cpu,
                    "group_rotation_cpu_s": rotation,
                }
            )
    consumer: list[dict[str, Any]] = []
    for size in sizes:
        plaintext = _plaintext(size)
        key = keys[0]
        producer = ProducerSession(
            identity, cluster=_CLUSTER, session=key.session_id, consumer_jwk=key.public_jwk
        )
        session = ConsumerSession(key, cluster=_CLUSTER, trust=trust)
        first = producer.seal(_STREAM, plaintext)
        for env in first:
            session.accept(env)
        envs = [producer.seal(_STREAM, plaintext)[-1] for _ in range(batches)]
        session_open = _cpu_each(session.accept, envs)
        gkey = keys[1]
        member = MemberSession(
            identity,
            cluster=_CLUSTER,
            session=gkey.session_id,
            consumer_jwk=gkey.public_jwk,
            key_mode="group",
        )
        reader = GroupMember(gkey, cluster=_CLUSTER, streams=[_STREAM], trust=trust)
        group = GroupSealer(identity, cluster=_CLUSTER, stream=_STREAM)
        sealed = group.seal(plaintext, {gkey.session_id: member})
        for _, env in sealed.keys:
            reader.accept(env)
        assert sealed.envelope is not None
        assert isinstance(reader.accept(sealed.envelope), Batch)
        genvs = [group.seal(plaintext, {gkey.session_id: member}).envelope for _ in range(batches)]
        group_open = _cpu_each(reader.accept, [e for e in genvs if e is not None])
        consumer.append(
            {
                "size": size,
                "session_cpu_per_batch_s": session_open,
                "group_cpu_per_batch_s": group_open,
            }
        )
    return {"producer": rows, "consumer": consumer, "batches": batches}


async def measure_churn(
    *, members: int = 10, rounds: int = 5, interval_s: float = 0.01
) -> dict[str, Any]:
    """On a real nats-server with a proxy and an agent (this process): a group of ``members``
    readers of a stream fed a row every ``interval_s``; then, ``rounds`` times, a new member
    joins, then a second one right after (it waits for the coalescing interval), and one
    leaves (time from the start of its close to the rotation that cuts it off). A joiner's
    time is from the start of its open (key generation included) to its first row."""
    secret = os.urandom(32)
    cluster = "bench"
    user = UserIdentity.generate()
    with (
        tempfile.TemporaryDirectory(prefix="sealstream-fanout-") as tmp,
        EmbeddedServer(ServerOptions()) as server,
    ):
        policy_file = Path(tmp) / "authorized.json"
        AuthzPolicy().with_key(user.public_jwk, [_STREAM], name="bench")[0].save(policy_file)
        identity = ClusterIdentity.generate()
        proxy_config = ProxyConfig(
            nats_url=server.url,
            token_secret=secret,
            shared_registry=False,
            limits=Limits(sessions_per_user=members + 2 * rounds + 1),
        )
        agent_config = ProducerConfig(
            cluster=cluster,
            nats_url=server.url,
            batching=Batching(max_delay_s=0.02),
            policy_file=policy_file,
        )
        client_config = ClientConfig(
            nats_url=server.url,
            nats_auth=NatsAuth("bench", "unused"),
            token=mint_token(sub="bench", clusters=[cluster], secret=secret),
            identity=user,
            key_kind="x25519",
            key_mode="group",
            request_timeout_s=5.0,
        )
        trust = TrustStore({cluster: [identity.public_jwk]})
        joins: list[float] = []
        coalesced: list[float] = []
        leaves: list[float] = []
        async with (
            Proxy(proxy_config),
            Agent(agent_config, identity=identity, streams=[_STREAM]) as agent,
            Client(client_config, trust=trust) as client,
            contextlib.AsyncExitStack() as stack,
            asyncio.TaskGroup() as tg,
        ):
            stop = asyncio.Event()

            async def feed() -> None:
                i = 0
                while not stop.is_set():
                    await agent.emit(_STREAM, [{"i": i}])
                    i += 1
                    await asyncio.sleep(interval_s)

            async def drain(sub: Subscription[Batch], first: asyncio.Event) -> None:
                async for _ in sub:
                    first.set()

            tg.create_task(feed())
            live: list[tuple[Subscription[Batch], asyncio.Task[None]]] = []

            async def join() -> float:
                started = time.perf_counter()
                sub = await stack.enter_async_context(client.subscribe(cluster, [_STREAM]))
                first = asyncio.Event()
                live.append((sub, tg.create_task(drain(sub, first))))
                async with asyncio.timeout(10):
                    await first.wait()
                return time.perf_counter() - started

            for _ in range(members):
                await join()
            for _ in range(rounds):
                await asyncio.sleep(0.3)
                joins.append(await join())
                # a second joiner right after the first's rotation waits for the next one
                coalesced.append(await join())
                sub, task = live.pop(0)
                session = sub.session_id
                group = agent.groups[_STREAM]
                started = time.perf_counter()
                task.cancel()
                await sub.aclose()
                async with asyncio.timeout(10):
                    while session in group.members:  # noqa: ASYNC110 - polled from outside
                        await asyncio.sleep(0.001)
                leaves.append(time.perf_counter() - started)
            stop.set()
            for _, task in live:
                task.cancel()
    return {
        "members": members,
        "row_interval_s": interval_s,
        "batch_delay_s": 0.02,
        "join_to_first_row_s": joins,
        "second_join_to_first_row_s": coalesced,
        "close_to_rotation_s": leaves,
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "| body | fan-out | session mode, producer CPU/batch | group mode, producer CPU/batch "
        "| group / session | group rotation (one leave) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["producer"]:
        rot = r["group_rotation_cpu_s"]
        lines.append(
            f"| {r['size'] // 1024} KiB | {r['fanout']} "
            f"| {r['session_cpu_per_batch_s'] * 1e6:,.0f} us "
            f"| {r['group_cpu_per_batch_s'] * 1e6:,.0f} us "
            f"| {r['group_cpu_per_batch_s'] / r['session_cpu_per_batch_s']:.2f} "
            f"| {'-' if rot is None else f'{rot * 1e3:,.1f} ms'} |"
        )
    lines += [
        "",
        "| body | consumer CPU/batch, session mode | group mode (+ Ed25519 verify) |",
        "|---|---|---|",
    ]
    for c in report["consumer"]:
        lines.append(
            f"| {c['size'] // 1024} KiB | {c['session_cpu_per_batch_s'] * 1e6:,.0f} us "
            f"| {c['group_cpu_per_batch_s'] * 1e6:,.0f} us |"
        )
    churn = report.get("churn")
    if churn:
        j, c = churn["join_to_first_row_s"], churn["close_to_rotation_s"]
        j2 = churn["second_join_to_first_row_s"]
        lines += [
            "",
            f"Busy group of {churn['members']} members, a row every {churn['row_interval_s']} s, "
            f"batches every {churn['batch_delay_s']} s at most:",
            "",
            "| | min | median | max |",
            "|---|---|---|---|",
            f"| open to first row (joiner) | {min(j) * 1e3:.0f} ms "
            f"| {statistics.median(j) * 1e3:.0f} ms | {max(j) * 1e3:.0f} ms |",
            f"| open to first row (a second joiner right after) | {min(j2) * 1e3:.0f} ms "
            f"| {statistics.median(j2) * 1e3:.0f} ms | {max(j2) * 1e3:.0f} ms |",
            f"| close to the rotation that cuts it off | {min(c) * 1e3:.0f} ms "
            f"| {statistics.median(c) * 1e3:.0f} ms | {max(c) * 1e3:.0f} ms |",
        ]
    return "\n".join(lines) + "\n"


def fanout_main(args: argparse.Namespace) -> int:
    configure_logging(level="warning")
    report = measure(batches=args.batches)
    report["churn"] = asyncio.run(measure_churn())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = _markdown(report)
    (out / "fanout.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0
