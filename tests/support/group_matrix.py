"""The group-mode matrix, for the browser member (``consumers/web/src/group.js``): group keys
and batches sealed by the real :class:`GroupSealer` and :class:`MemberSession`, genuine and
tampered. The Python :class:`GroupMember` is the oracle: ``tests/support/vectors.py`` records
its verdict at every step into ``consumers/web/test/vectors/groups.json``. Keys, identities,
clocks and randomness are fixed, as in ``tests/support/matrix.py``.

Each payload is declared accepted or rejected with its reason; ``tests/unit/test_tamper.py``
holds the Python member to it. To add a case: build it in :func:`group_cases`, then run
``python -m tests.support.vectors``."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.crypto import (
    ClusterIdentity,
    ConsumerKey,
    GroupMember,
    GroupSealer,
    MemberSession,
    Policy,
    ProducerSession,
    TrustStore,
    encode_rows,
)
from sealstream.crypto._group import GROUP_SIG_CONTEXT
from sealstream.crypto._jose import open_with_key, seal_protected
from sealstream.groupwire import encode_group_envelope
from sealstream.jwk import b64u_decode
from tests.support.helpers import CLUSTER, env_map, repack
from tests.support.matrix import ROWS, TS_BIG, Step, keys, seeded

__all__ = ["GroupCase", "group_cases"]

STREAM = "s"


class World:
    """A cluster's group of stream ``s`` and its members (the producer side)."""

    def __init__(self, seed: int) -> None:
        self.identity = keys().identity["cluster"]
        self.now = TS_BIG
        self.sealer = GroupSealer(
            self.identity, cluster=CLUSTER, stream=STREAM, clock=self.clock, random=seeded(seed)
        )
        self.members: dict[str, MemberSession] = {}
        self.keys: dict[str, ConsumerKey] = {}

    def clock(self) -> int:
        self.now += 1_000_001
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)

    def join(self, key: ConsumerKey) -> str:
        self.members[key.session_id] = MemberSession(
            self.identity,
            cluster=CLUSTER,
            session=key.session_id,
            consumer_jwk=key.public_jwk,
            key_mode="group",
            clock=self.clock,
        )
        self.keys[key.session_id] = key
        return key.session_id

    def seal(self, rows: list[dict[str, Any]] = ROWS) -> tuple[dict[str, bytes], bytes]:
        sealed = self.sealer.seal(encode_rows(rows), self.members)
        assert sealed.envelope is not None
        return dict(sealed.keys), sealed.envelope

    def group_key(self, session: str, key_env: bytes) -> bytes:
        """The group key inside a member's key envelope (read with its private key)."""
        jws = open_with_key(
            self.keys[session], env_map(key_env)["body"], max_plaintext=16384, allow_zip=False
        )
        payload = jws.split(b".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        return b64u_decode(claims["k"])


@dataclass
class GroupCase:
    """One member of a world, and the payloads it is fed, each with its verdict (a batch
    from before the member joined is accepted and skipped)."""

    name: str
    world: World
    key: ConsumerKey
    streams: tuple[str, ...] = (STREAM,)
    #: the policy the browser member's vectors run it under (the Python test: ``fail``)
    policy: Policy = "discard"
    steps: list[Step] = field(default_factory=list)
    #: the same subscription's session that ended (its steps all accepted), carried into this
    #: one before its first step (``GroupMember.carry``)
    previous: GroupCase | None = None

    def ok(self, *payloads: bytes) -> GroupCase:
        self.steps += [Step(p) for p in payloads]
        return self

    def bad(self, reason: str, *payloads: bytes) -> GroupCase:
        self.steps += [Step(p, reason) for p in payloads]
        return self

    def member(self, policy: Policy) -> GroupMember:
        """A fresh member for this case (carrying its previous session's groups)."""
        member = GroupMember(
            self.key,
            cluster=CLUSTER,
            streams=list(self.streams),
            trust=TrustStore({CLUSTER: [self.world.identity.public_jwk]}),
            policy=policy,
        )
        if self.previous is not None:
            ended = self.previous.member(policy)
            for step in self.previous.steps:
                ended.accept(step.payload)
            assert not ended.rejected, "a previous session's steps are all accepted"
            member.carry(ended)
        return member


def _forge(
    envelope: bytes,
    group_key: bytes,
    *,
    signer: ClusterIdentity | None = None,
    **header_changes: Any,
) -> bytes:
    """A batch made with the group key; signed by ``signer``, else carrying the original
    envelope's signature. ``header_changes`` change the protected header only."""
    m = env_map(envelope)
    parts = m["body"].split(b".")
    header = json.loads(b64u_decode(parts[0]))
    header.update(header_changes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    protected = base64.urlsafe_b64encode(raw).rstrip(b"=")
    body = seal_protected(AESGCM(group_key), protected, encode_rows([{"evil": 1}]))
    sig = m["sig"]
    if signer is not None:
        sig = signer._key.get_op_key("sign").sign(GROUP_SIG_CONTEXT + body)
    return encode_group_envelope(
        cluster=m["cluster"],
        stream=m["stream"],
        epoch=m["epoch"],
        gseq=m["gseq"],
        ts=m["ts"],
        body=body,
        sig=sig,
    )


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] = ord("B") if b[index] != ord("B") else ord("C")
    return bytes(b)


def group_cases() -> list[GroupCase]:
    k = keys()
    cases: list[GroupCase] = []
    for kind in ("x25519", "p256", "rsa"):
        w = World(1)
        key = k.consumer[kind]
        s = w.join(key)
        k0, e0 = w.seal()
        _, e1 = w.seal([{"i": 1}])
        cases.append(GroupCase(f"group genuine {kind}", w, key).ok(k0[s], e0, e1))

    key = k.consumer["x25519"]
    w = World(2)
    s = w.join(key)
    k0, e0 = w.seal()
    envs = [w.seal([{"i": i}])[1] for i in range(4)]
    cases.append(
        GroupCase("group gap, replay and reorder", w, key)
        .ok(k0[s], e0, envs[1])
        .bad("replay", envs[0], envs[1])
        .ok(envs[3])
        .bad("replay", envs[2])
    )

    # tampering with one batch: every part of the JWE, the signature, the clear fields
    w = World(3)
    s = w.join(key)
    k0, e0 = w.seal()
    _, e1 = w.seal()
    body = env_map(e1)["body"]
    case = GroupCase("group tamper matrix", w, key).ok(k0[s], e0)
    for part, reason in ((0, "bad_header"), (2, "bad_signature"), (3, "bad_signature")):
        parts = body.split(b".")
        parts[part] = _flip(parts[part], len(parts[part]) // 2)
        case.bad(reason, repack(e1, body=b".".join(parts)))
    parts = body.split(b".")
    parts[4] = _flip(parts[4], len(parts[4]) // 2)
    sig = bytearray(env_map(e1)["sig"])
    sig[7] ^= 1
    case.bad("bad_signature", repack(e1, body=b".".join(parts)), repack(e1, sig=bytes(sig)))
    case.bad("wrong_route", repack(e1, cluster="other"))
    case.bad("not_member", repack(e1, stream="t"))
    case.bad(
        "header_mismatch",
        repack(e1, gseq=9),
        repack(e1, ts=env_map(e1)["ts"] + 1),
        repack(e1, epoch=4),
    )
    case.bad(
        "malformed",
        repack(e1, kind="data"),
        repack(e1, sig=b"\x00" * 63),
        repack(e1, gseq=1.0),
        repack(e1, session=key.session_id),
    )
    cases.append(case.ok(e1))

    # a member forging for the others with the group key it holds; the header ts off by one
    # above 2**53 (signed by the cluster: only the header check refuses it)
    w = World(4)
    mallory = k.consumer["mallory"]
    sm = w.join(mallory)
    s = w.join(key)
    k0, e0 = w.seal()
    _, e1 = w.seal([{"i": 1}])
    gk = w.group_key(sm, k0[sm])
    cases.append(
        GroupCase("group member forging", w, key)
        .ok(k0[s], e0)
        .bad("bad_signature", _forge(e1, gk), _forge(e1, gk, signer=k.identity["forger"]))
        .bad("header_mismatch", _forge(e1, gk, signer=w.identity, ts=env_map(e1)["ts"] + 1))
        .ok(e1)
    )

    # one batch's protected header on another's ciphertext (the signature covers both)
    w = World(8)
    s = w.join(key)
    k0, e0 = w.seal()
    _, a = w.seal([{"i": 1}])
    _, b = w.seal([{"i": 2}])
    pa, pb = env_map(a)["body"].split(b"."), env_map(b)["body"].split(b".")
    swapped = repack(b, body=b".".join([pb[0], *pa[1:]]))
    cases.append(
        GroupCase("group header swap between batches", w, key)
        .ok(k0[s], e0)
        .bad("bad_signature", swapped)
        .ok(a, b)
    )

    # another member's key envelope, readdressed
    w = World(9)
    sm = w.join(mallory)
    s = w.join(key)
    k0, e0 = w.seal()
    cases.append(
        GroupCase("group key of another member", w, key)
        .bad("header_mismatch", repack(k0[sm], session=key.session_id))
        .ok(k0[s], e0)
    )

    # batches replayed after several rotations' keys: 8 keys kept a group, the ninth let go
    w = World(12)
    s = w.join(key)
    sealed = []
    for _ in range(9):
        sealed.append(w.seal())
        w.advance(601.0)  # the key is too old by the next seal: a rotation
    rotations = GroupCase("group keys kept for batches replayed after rotations", w, key)
    cases.append(
        rotations.ok(*(k[s] for k, _ in sealed))
        .bad("unknown_kid", sealed[0][1])
        .ok(*(e for _, e in sealed[1:]))
    )

    # joining late: batches from before are skipped; a leaver's old epoch and a later one
    w = World(5)
    early = k.consumer["early"]
    se = w.join(early)
    k0, e0 = w.seal()
    w.advance(1.0)
    s = w.join(key)
    k1, e1 = w.seal()
    del w.members[se]
    k2, e2 = w.seal()
    cases.append(
        GroupCase("group joiner skips what came before", w, key).ok(e0, k1[s], e0, e1, k2[s], e2)
    )
    cases.append(
        GroupCase("group leaver refuses the next epoch", w, early)
        .ok(k0[se], e0, k1[se], e1)
        .bad("unknown_kid", e2)
    )

    # no downgrade; keys that are not group keys; the end
    w = World(6)
    s = w.join(key)
    k0, e0 = w.seal()
    session_mode = ProducerSession(
        w.identity,
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
        random=seeded(8),
    )
    session_mode.seq = 1
    skey, sdata = session_mode.seal(STREAM, encode_rows(ROWS))
    rogue = MemberSession(
        k.identity["rogue"],
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
        key_mode="group",
    )
    rogue.seq = 1
    forged_key = rogue.group_key(
        group=STREAM, epoch=7, kid="rogue", secret=b"k" * 32, gseq=1, now=TS_BIG
    )
    _, e1 = w.seal()
    (end,) = w.members[s].end("producer stopping")
    cases.append(
        GroupCase("group no downgrade, forged key, end", w, key)
        .ok(k0[s], e0)
        .bad("wrong_mode", sdata)
        .bad("bad_claims", skey)
        .bad("untrusted_key", forged_key)
        .ok(end)
        .bad("after_end", e1)
    )

    # a member of another stream
    w = World(7)
    s = w.join(key)
    k0, e0 = w.seal()
    other = k.consumer["other"]
    cases.append(
        GroupCase("group envelope to a non-member", w, other, ("t",)).bad("not_member", e0)
    )

    garbage = [b"\xc1", msgpack.packb({"v": 1, "kind": "group"}), e0[:-3]]
    cases.append(
        GroupCase("group malformed payloads", w, key).ok(k0[s]).bad("malformed", *garbage).ok(e0)
    )

    # a relay's group key raced ahead of the cluster's: counted and ignored under "fail" too
    w = World(10)
    s = w.join(key)
    k0, e0 = w.seal()
    racer = MemberSession(
        k.identity["rogue"],
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
        key_mode="group",
    )
    racer.seq = 10**9  # refused as untrusted, not as a replay, wherever it lands
    raced = racer.group_key(group=STREAM, epoch=0, kid="rogue", secret=b"k" * 32, gseq=0, now=1)
    name = "group forged key raced ahead of the genuine one"
    cases.append(GroupCase(name, w, key, policy="fail").bad("untrusted_key", raced).ok(k0[s], e0))

    # a member's next session: it goes on with the group's line and the keys it kept
    first, then, witness = k.consumer["x25519"], k.consumer["p256"], k.consumer["other"]
    w = World(12)
    w.join(witness)  # keeps the group's batches flowing while the member is away
    gone = w.join(first)
    k0, e0 = w.seal()
    _, missed = w.seal([{"i": 1}])  # under the key it kept: a store replays it
    del w.members[gone]  # the producer lets the session go: the key rotates
    _, away = w.seal([{"i": 2}])
    joined = w.join(then)
    w.advance(1)  # past the coalescing: the next batch gives the new session its key
    k3, back = w.seal([{"i": 3}])
    ended = GroupCase("group previous session", w, first).ok(k0[gone], e0)
    cases.append(
        GroupCase("group next session goes on", w, then, previous=ended)
        .ok(k3[joined], missed, away, back)
        .bad("replay", away)
    )
    # a producer restarted without a store: its group starts again, and so does the line
    w2 = World(13)
    joined = w2.join(then)
    k0, e0 = w2.seal()
    cases.append(
        GroupCase("group next session starts afresh", w2, then, previous=ended).ok(k0[joined], e0)
    )
    return cases
