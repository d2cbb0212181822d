"""Shared builders for the core tests (real crypto, no mocks)."""

from __future__ import annotations

from dataclasses import dataclass
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
