"""Shared builders for the core tests (real crypto, no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from sealstream.crypto import (
    ClusterIdentity,
    ConsumerKey,
    ConsumerSession,
    KeyKind,
    ProducerSession,
    TrustStore,
)
from sealstream.crypto._session import Policy

CLUSTER = "demo-cluster"


@dataclass
class Pair:
    identity: ClusterIdentity
    key: ConsumerKey
    producer: ProducerSession
    consumer: ConsumerSession


def make_pair(
    key: ConsumerKey,
    *,
    identity: ClusterIdentity | None = None,
    key_mode: Any = "session",
    compress: bool = False,
    allow_zip: bool = False,
    policy: Policy = "fail",
    max_plaintext: int = 16 * 1024 * 1024,
    **producer_options: Any,
) -> Pair:
    identity = identity or ClusterIdentity.generate()
    producer = ProducerSession(
        identity,
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
        key_mode=key_mode,
        compress=compress,
        **producer_options,
    )
    consumer = ConsumerSession(
        key,
        cluster=CLUSTER,
        trust=TrustStore({CLUSTER: [identity.public_jwk]}),
        key_mode=key_mode,
        allow_zip=allow_zip,
        policy=policy,
        max_plaintext=max_plaintext,
    )
    return Pair(identity, key, producer, consumer)


def env_map(payload: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(payload, raw=False)
    assert isinstance(value, dict)
    return value


def repack(payload: bytes, **changes: Any) -> bytes:
    m = env_map(payload)
    m.update(changes)
    return msgpack.packb(m, use_bin_type=True)


def gen_key(kind: KeyKind) -> ConsumerKey:
    return ConsumerKey.generate(kind, rsa_bits=2048)


def run_chaos(out: Path, *words: str, timeout_s: float) -> dict[str, Any]:
    """``sealstream chaos WORDS --out OUT`` in a process of its own; its report (``OUT``),
    after checking that it wrote one and exited 0 (with its output in the failure)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "sealstream"), "chaos", *words, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert (out / "report.json").exists(), proc.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return report
