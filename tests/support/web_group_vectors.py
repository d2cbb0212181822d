"""Cross-language vectors of group mode for the browser member (``consumers/web/src/group.js``):
group keys and batches sealed by the real :class:`GroupSealer` and :class:`MemberSession`, and
the group tamper matrix. The Python :class:`GroupMember` is the oracle, as in
``tests/support/web_vectors.py`` (which writes these cases under ``group_cases``)."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.crypto import (
    Batch,
    ClusterIdentity,
    ConsumerKey,
    End,
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
from tests.support.helpers import CLUSTER, env_map, gen_key, repack

__all__ = ["build_group_cases"]

STREAM = "s"
TS_BIG = 1_790_000_000_123_456_789
ROWS: list[dict[str, Any]] = [{"path": "/secret", "n": 1, "big": 2**60 + 1, "f": 1.5}]


def _plain(value: Any) -> Any:
    from tests.support.web_vectors import _plain as plain

    return plain(value)


class World:
    """A cluster's group of stream ``s`` and its members (the producer side)."""

    def __init__(self) -> None:
        self.identity = ClusterIdentity.generate()
        self.now = TS_BIG
        self.sealer = GroupSealer(self.identity, cluster=CLUSTER, stream=STREAM, clock=self.clock)
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


class GroupCase:
    """One member fed a list of payloads; each step records the oracle's verdict."""

    def __init__(
        self,
        name: str,
        world: World,
        key: ConsumerKey,
        streams: tuple[str, ...] = (STREAM,),
        policy: Policy = "discard",
    ) -> None:
        self.name = name
        self.world = world
        self.key = key
        self.streams = streams
        self.member = GroupMember(
            key,
            cluster=CLUSTER,
            streams=list(streams),
            trust=TrustStore({CLUSTER: [world.identity.public_jwk]}),
            policy=policy,
        )
        self.steps: list[dict[str, Any]] = []

    def feed(self, payloads: list[bytes]) -> GroupCase:
        m = self.member
        for payload in payloads:
            before, skipped = m.rejected.copy(), m.skipped
            result = m.accept(payload)
            step: dict[str, Any] = {"payload": base64.b64encode(payload).decode()}
            delta = m.rejected - before
            if delta:
                (reason,) = delta
                step.update(expect="reject", reason=reason)
            elif isinstance(result, Batch):
                step.update(
                    expect="batch",
                    stream=result.stream,
                    seq=str(result.seq),
                    ts=str(result.ts),
                    rows=_plain(result.rows),
                    lost_before=str(result.lost_before),
                )
            elif isinstance(result, End):
                step.update(expect="end", reason=result.reason)
            elif m.skipped > skipped:
                step.update(expect="skip")
            else:
                step.update(expect="key", epochs={g: str(s.epoch) for g, s in m.groups.items()})
            self.steps.append(step)
        return self

    def to_json(self) -> dict[str, Any]:
        m = self.member
        return {
            "name": self.name,
            "cluster": CLUSTER,
            "streams": list(self.streams),
            "key": {
                "kind": self.key.kind,
                "public_jwk": self.key.public_jwk,
                "private_jwk": self.key._key.export_private(as_dict=True),
                "session_id": self.key.session_id,
            },
            "trust": {CLUSTER: [self.world.identity.public_jwk]},
            "policy": m.policy,
            "steps": self.steps,
            "final": {
                "accepted": m.accepted,
                "gaps": m.gaps,
                "lost": str(m.lost),
                "skipped": m.skipped,
                "ended": m.ended,
                "rejected": dict(m.rejected),
            },
        }


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


def build_group_cases() -> list[dict[str, Any]]:
    cases: list[GroupCase] = []
    for kind in ("x25519", "p256", "rsa"):
        w = World()
        key = gen_key(kind)
        s = w.join(key)
        k0, e0 = w.seal()
        _, e1 = w.seal([{"i": 1}])
        cases.append(GroupCase(f"group genuine {kind}", w, key).feed([k0[s], e0, e1]))

    key = gen_key("x25519")
    w = World()
    s = w.join(key)
    k0, e0 = w.seal()
    envs = [w.seal([{"i": i}])[1] for i in range(4)]
    cases.append(
        GroupCase("group gap, replay and reorder", w, key).feed(
            [k0[s], e0, envs[1], envs[0], envs[1], envs[3], envs[2]]
        )
    )

    # tampering with one batch: every part of the JWE, the signature, the clear fields
    w = World()
    s = w.join(key)
    k0, e0 = w.seal()
    _, e1 = w.seal()
    body = env_map(e1)["body"]
    tampered = []
    for part in (0, 2, 3, 4):
        parts = body.split(b".")
        parts[part] = _flip(parts[part], len(parts[part]) // 2)
        tampered.append(repack(e1, body=b".".join(parts)))
    sig = bytearray(env_map(e1)["sig"])
    sig[7] ^= 1
    tampered += [
        repack(e1, sig=bytes(sig)),
        repack(e1, cluster="other"),
        repack(e1, stream="t"),
        repack(e1, gseq=9),
        repack(e1, ts=env_map(e1)["ts"] + 1),
        repack(e1, epoch=4),
        repack(e1, kind="data"),
        repack(e1, sig=b"\x00" * 63),
        repack(e1, gseq=1.0),
        repack(e1, session=key.session_id),
    ]
    cases.append(GroupCase("group tamper matrix", w, key).feed([k0[s], e0, *tampered, e1]))

    # a member forging for the others with the group key it holds; the header ts off by one
    # above 2**53 (signed by the cluster: only the header check refuses it)
    w = World()
    mallory = gen_key("x25519")
    sm = w.join(mallory)
    s = w.join(key)
    k0, e0 = w.seal()
    _, e1 = w.seal([{"i": 1}])
    gk = w.group_key(sm, k0[sm])
    forged = [
        _forge(e1, gk),
        _forge(e1, gk, signer=ClusterIdentity.generate()),
        _forge(e1, gk, signer=w.identity, ts=env_map(e1)["ts"] + 1),
    ]
    cases.append(GroupCase("group member forging", w, key).feed([k0[s], e0, *forged, e1]))

    # joining late: batches from before are skipped; a leaver's old epoch and a later one
    w = World()
    early = gen_key("x25519")
    se = w.join(early)
    k0, e0 = w.seal()
    w.advance(1.0)
    s = w.join(key)
    k1, e1 = w.seal()
    del w.members[se]
    k2, e2 = w.seal()
    cases.append(
        GroupCase("group joiner skips what came before", w, key).feed(
            [e0, k1[s], e0, e1, k2[s], e2]
        )
    )
    cases.append(
        GroupCase("group leaver refuses the next epoch", w, early).feed(
            [k0[se], e0, k1[se], e1, e2]
        )
    )

    # no downgrade; keys that are not group keys; the end
    w = World()
    s = w.join(key)
    k0, e0 = w.seal()
    session_mode = ProducerSession(
        w.identity, cluster=CLUSTER, session=key.session_id, consumer_jwk=key.public_jwk
    )
    session_mode.seq = 1
    skey, sdata = session_mode.seal(STREAM, encode_rows(ROWS))
    rogue = MemberSession(
        ClusterIdentity.generate(),
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
        GroupCase("group no downgrade, forged key, end", w, key).feed(
            [k0[s], e0, sdata, skey, forged_key, end, e1]
        )
    )

    # a member of another stream
    w = World()
    s = w.join(key)
    k0, e0 = w.seal()
    other = gen_key("x25519")
    cases.append(GroupCase("group envelope to a non-member", w, other, ("t",)).feed([e0]))

    garbage = [b"\xc1", msgpack.packb({"v": 1, "kind": "group"}), e0[:-3]]
    cases.append(GroupCase("group malformed payloads", w, key).feed([k0[s], *garbage, e0]))

    # a relay's group key raced ahead of the cluster's: counted and ignored under "fail" too
    w = World()
    s = w.join(key)
    k0, e0 = w.seal()
    rogue = MemberSession(
        ClusterIdentity.generate(),
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
        key_mode="group",
    )
    rogue.seq = 10**9  # refused as untrusted, not as a replay, wherever it lands
    raced = rogue.group_key(group=STREAM, epoch=0, kid="rogue", secret=b"k" * 32, gseq=0, now=1)
    name = "group forged key raced ahead of the genuine one, policy fail"
    cases.append(GroupCase(name, w, key, policy="fail").feed([raced, k0[s], e0]))
    return [c.to_json() for c in cases]
