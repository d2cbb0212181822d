"""Fan-out cost of the producer, group mode against session mode (``sealstream bench-fanout``).

Measures, in this process with the real recipes (no broker: the seal path only), the
producer's CPU seconds per batch at fan-out 1, 10 and 50: session mode seals each batch once
per session, group mode once for the group (an AES-GCM seal and one Ed25519 signature). Also
the cost of one group rotation at each fan-out (a public-key operation and a signature per
member), and the consumer's CPU per batch in both modes (the price of the signature check).
Publishing is not included: session mode also publishes n envelopes per batch where group
mode publishes one (the relay then fans it out).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from sealstream import configure_logging
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
    encode_rows,
)

__all__ = ["fanout_main", "measure"]

_CLUSTER = "bench"
_STREAM = "s"


def _plaintext(size: int) -> bytes:
    rows: list[dict[str, Any]] = []
    while len(encode_rows(rows)) < size:
        rows.append({"path": "/api/v1/items", "status": 200, "n": len(rows), "pad": "x" * 40})
    return encode_rows(rows)


def _cpu(fn: Callable[[], object], repeat: int) -> float:
    """CPU seconds (this process) per call of ``fn``."""
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


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
    return "\n".join(lines) + "\n"


def fanout_main(args: argparse.Namespace) -> int:
    configure_logging(level="warning")
    report = measure(batches=args.batches)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = _markdown(report)
    (out / "fanout.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0
