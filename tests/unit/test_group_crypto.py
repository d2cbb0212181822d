"""Group mode, the crypto of both ends (real keys, real signatures, no broker): the tamper
matrix, members forging, leavers and joiners against the batches they must not open, relays
sending group envelopes where they do not belong, no downgrade."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream import IntegrityError, WireError
from sealstream.crypto import (
    Batch,
    ClusterIdentity,
    ConsumerKey,
    ConsumerSession,
    End,
    GroupMember,
    GroupSealer,
    MemberSession,
    ProducerSession,
    TrustStore,
    encode_rows,
)
from sealstream.crypto._group import GROUP_SIG_CONTEXT
from sealstream.crypto._jose import seal_protected
from sealstream.groupwire import encode_group_envelope
from sealstream.jwk import b64u_decode
from tests.support.helpers import CLUSTER, env_map, gen_key, repack

STREAM = "s"


class Clock:
    """Nanoseconds; tests move it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000 * 10**9

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


@dataclass
class Member:
    key: ConsumerKey
    producer: MemberSession
    consumer: GroupMember
    #: the group keys this member received (kid -> raw key), read from its own key envelopes
    keys: dict[str, bytes] = field(default_factory=dict)


class Group:
    """A cluster's group of one stream and its members, wired by hand (the relay's role)."""

    def __init__(self, *, streams: tuple[str, ...] = (STREAM,)) -> None:
        self.identity = ClusterIdentity.generate()
        self.clock = Clock()
        self.sealer = GroupSealer(self.identity, cluster=CLUSTER, stream=STREAM, clock=self.clock)
        self.members: dict[str, Member] = {}
        self.streams = streams

    def join(self, *, kind: Any = "x25519", policy: Any = "fail") -> Member:
        key = gen_key(kind)
        producer = MemberSession(
            self.identity,
            cluster=CLUSTER,
            session=key.session_id,
            consumer_jwk=key.public_jwk,
            key_mode="group",
            clock=self.clock,
        )
        consumer = GroupMember(
            key,
            cluster=CLUSTER,
            streams=list(self.streams),
            trust=TrustStore({CLUSTER: [self.identity.public_jwk]}),
            policy=policy,
        )
        member = Member(key, producer, consumer)
        self.members[key.session_id] = member
        return member

    def leave(self, member: Member) -> None:
        del self.members[member.key.session_id]

    def seal(self, i: int, *, deliver: bool = True) -> bytes:
        """Seal one batch for the current members; deliver their key envelopes (and, with
        ``deliver``, the batch to every member). Returns the group envelope."""
        sealed = self.sealer.seal(
            encode_rows([{"i": i}]), {s: m.producer for s, m in self.members.items()}
        )
        for session, envelope in sealed.keys:
            member = self.members[session]
            assert member.consumer.accept(envelope) is None
            claims = _claims_of(member.key, envelope)
            member.keys[claims["kid"]] = b64u_decode(claims["k"])
        assert sealed.envelope is not None
        if deliver:
            for member in self.members.values():
                batch = member.consumer.accept(sealed.envelope)
                assert isinstance(batch, Batch)
                assert batch.rows == [{"i": i}]
        return sealed.envelope


def _claims_of(key: ConsumerKey, envelope: bytes) -> dict[str, Any]:
    """The claims inside a key envelope, opened with the member's own private key (what a
    member holds, read as a test would)."""
    from sealstream.crypto._jose import open_with_key

    body = env_map(envelope)["body"]
    jws = open_with_key(key, body, max_plaintext=16384, allow_zip=False)
    payload = jws.split(b".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))
    )
    return claims


def rejected(member: Member, payload: bytes, reason: str) -> None:
    before = member.consumer.rejected.copy()
    if reason == "untrusted_key":  # anyone's signed envelope: counted and ignored, never fatal
        assert member.consumer.accept(payload) is None
    else:
        with pytest.raises(IntegrityError) as err:
            member.consumer.accept(payload)
        assert type(err.value) is IntegrityError
        assert str(err.value) == "envelope rejected"
    delta = member.consumer.rejected - before
    assert dict(delta) == {reason: 1}


def _jwe_parts(envelope: bytes) -> tuple[dict[str, Any], list[bytes]]:
    m = env_map(envelope)
    parts = m["body"].split(b".")
    header = json.loads(b64u_decode(parts[0]))
    return header, parts


def _header_b64(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def forge(
    envelope: bytes,
    group_key: bytes,
    *,
    rows: list[dict[str, Any]],
    signer: ClusterIdentity | None = None,
    sig: bytes | None = None,
    **header_changes: Any,
) -> bytes:
    """A batch made with the group key (what a member holds): a new JWE under that key, with
    the original envelope's signature (or one by ``signer``, or ``sig``)."""
    header, _ = _jwe_parts(envelope)
    header.update(header_changes)
    protected = _header_b64(header)
    body = seal_protected(AESGCM(group_key), protected, encode_rows(rows))
    m = env_map(envelope)
    if signer is not None:
        sig = signer._key.get_op_key("sign").sign(GROUP_SIG_CONTEXT + body)
    return encode_group_envelope(
        cluster=header.get("cluster", m["cluster"]),
        stream=m["stream"],
        epoch=header.get("epoch", m["epoch"]),
        gseq=header.get("gseq", m["gseq"]),
        ts=header.get("ts", m["ts"]),
        body=body,
        sig=m["sig"] if sig is None else sig,
    )


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_one_seal_for_every_member() -> None:
    g = Group()
    members = [g.join() for _ in range(3)]
    envelopes = [g.seal(i) for i in range(3)]
    assert g.sealer.epoch == 0
    assert g.sealer.rotations == 1
    assert len(set(envelopes)) == 3
    for m in members:
        assert m.consumer.accepted == 4  # one key envelope, three batches
        assert m.consumer.lost == 0
        assert not m.consumer.rejected
    assert env_map(envelopes[0]).keys() == {
        "v",
        "kind",
        "cluster",
        "stream",
        "epoch",
        "gseq",
        "ts",
        "body",
        "sig",
    }


def test_member_of_several_groups_keeps_them_apart() -> None:
    """A session of two streams is a member of both groups; a key of one never opens (or
    replays into) the other."""
    g = Group(streams=(STREAM, "t"))
    m = g.join()
    other = GroupSealer(g.identity, cluster=CLUSTER, stream="t", clock=g.clock)
    env_s = g.seal(0)
    sealed_t = other.seal(encode_rows([{"t": 1}]), {m.key.session_id: m.producer})
    for _, key_env in sealed_t.keys:
        assert m.consumer.accept(key_env) is None
    assert sealed_t.envelope is not None
    batch = m.consumer.accept(sealed_t.envelope)
    assert isinstance(batch, Batch)
    assert batch.stream == "t"
    assert batch.rows == [{"t": 1}]
    # the batch of s relabelled as t: the header says s, and t's keys do not have its kid
    rejected(m, repack(env_s, stream="t", gseq=5), "header_mismatch")


# --- the tamper matrix: tests/support/group_matrix.py (tests/unit/test_tamper.py) ---------------
# bit flips in every part and in the signature, clear fields bound, replay and reorder, a header
# swapped between batches, forged and readdressed key envelopes, session-mode data and keys


# --- no downgrade ----------------------------------------------------------------------------


def test_session_and_per_message_consumers_refuse_group_envelopes() -> None:
    g = Group()
    m = g.join()
    g.seal(0)
    env = g.seal(1, deliver=False)
    for mode in ("session", "per-message"):
        c = ConsumerSession(
            m.key,
            cluster=CLUSTER,
            trust=TrustStore({CLUSTER: [g.identity.public_jwk]}),
            key_mode=mode,
        )
        with pytest.raises(IntegrityError):
            c.accept(env)
        assert c.rejected == {"malformed": 1}


def test_session_consumer_refuses_a_group_key() -> None:
    """Even signed for its own session, a key envelope with a group is not a session key."""
    g = Group()
    m = g.join()
    sealed = g.sealer.seal(encode_rows([{"i": 0}]), {m.key.session_id: m.producer})
    c = ConsumerSession(
        m.key, cluster=CLUSTER, trust=TrustStore({CLUSTER: [g.identity.public_jwk]})
    )
    with pytest.raises(IntegrityError):
        c.accept(sealed.keys[0][1])
    assert c.rejected == {"bad_claims": 1}


# --- members cannot forge --------------------------------------------------------------------


def test_a_member_cannot_forge_a_batch_for_the_others() -> None:
    """A member holds the group key: it can make a JWE every member would decrypt, but not
    the cluster's signature over it."""
    g = Group()
    mallory, alice = g.join(), g.join()
    g.seal(0)
    genuine = g.seal(1, deliver=False)
    ((kid, group_key),) = mallory.keys.items()
    header, _ = _jwe_parts(genuine)
    assert header["kid"] == kid
    # the genuine signature on mallory's ciphertext; mallory's own key as signer; no sig
    rejected(alice, forge(genuine, group_key, rows=[{"evil": 1}]), "bad_signature")
    rejected(
        alice,
        forge(genuine, group_key, rows=[{"evil": 1}], signer=ClusterIdentity.generate()),
        "bad_signature",
    )
    # with the genuine signature, the genuine batch still passes: the checks moved nothing
    assert isinstance(alice.consumer.accept(genuine), Batch)
    # sanity: with the cluster key the forged batch WOULD pass (the signature is the check)
    ok = forge(genuine, group_key, rows=[{"i": 9}], signer=g.identity, gseq=2)
    assert isinstance(alice.consumer.accept(ok), Batch)


# --- leaving and joining ---------------------------------------------------------------------


def test_a_departed_member_cannot_open_batches_after_it_left() -> None:
    g = Group()
    stay, gone = g.join(), g.join()
    g.seal(0)
    g.seal(1)
    held = dict(gone.keys)
    g.leave(gone)
    after = [g.seal(i) for i in (2, 3)]  # rotated before sealing: a new epoch
    assert g.sealer.epoch == 1
    assert gone.key.session_id not in g.sealer.members
    for env in after:
        _, parts = _jwe_parts(env)
        header, _ = _jwe_parts(env)
        assert header["kid"] not in held
        for raw in held.values():  # every key it ever held, tried on every batch
            with pytest.raises(InvalidTag):
                AESGCM(raw).decrypt(
                    b64u_decode(parts[2]),
                    b64u_decode(parts[3]) + b64u_decode(parts[4]),
                    parts[0],
                )
        rejected(gone, env, "unknown_kid")
    assert len(stay.keys) == 2


def test_a_new_member_cannot_open_batches_from_before_it_joined() -> None:
    g = Group()
    old = g.join()
    before = [g.seal(i) for i in range(2)]
    g.clock.advance(1.0)
    new = g.join()
    g.seal(2)  # the join rotates (the last rotation is older than the coalescing interval)
    assert g.sealer.epoch == 1
    (raw,) = new.keys.values()
    for env in before:
        _, parts = _jwe_parts(env)
        with pytest.raises(InvalidTag):
            AESGCM(raw).decrypt(
                b64u_decode(parts[2]), b64u_decode(parts[3]) + b64u_decode(parts[4]), parts[0]
            )
        # delivered to it anyway: sealed before it joined, dropped and counted
        assert new.consumer.accept(env) is None
    assert new.consumer.skipped == 2
    assert len(old.keys) == 2


def test_a_member_keeps_eight_keys_so_batches_replayed_after_rotations_open() -> None:
    """Batches replayed from a store can come after the keys of several rotations: a member
    keeps the current key and 7 previous ones of a group (docs/protocol.md), no more."""
    g = Group()
    member = g.join()
    batches = []
    for i in range(9):
        batches.append(g.seal(i, deliver=False))  # its key envelopes were delivered first
        g.clock.advance(1.0)
        g.join()  # the next seal rotates
    assert g.sealer.epoch == 8
    rejected(member, batches[0], "unknown_kid")  # the ninth key back is let go
    for i, env in enumerate(batches[1:], start=1):
        batch = member.consumer.accept(env)
        assert isinstance(batch, Batch)
        assert batch.rows == [{"i": i}]


def test_joins_are_coalesced_and_leaves_are_not() -> None:
    g = Group()
    g.join()
    g.seal(0)
    assert g.sealer.rotations == 1
    joiners = [g.join() for _ in range(5)]
    g.clock.advance(0.1)
    env = g.seal(1, deliver=False)  # within the interval: no rotation, joiners wait
    assert g.sealer.rotations == 1
    for j in joiners:
        assert j.consumer.accept(env) is None  # not yet a member: skipped
    g.clock.advance(0.2)
    g.seal(2)  # 0.3 s after the last rotation: ONE rotation for the five
    assert g.sealer.rotations == 2
    g.leave(joiners[0])
    g.seal(3)  # a leave rotates at once, whatever the interval
    g.leave(joiners[1])
    g.seal(4)
    assert g.sealer.rotations == 4


# --- relays sending group envelopes where they do not belong ---------------------------------


def test_a_non_member_refuses_group_envelopes() -> None:
    g = Group()
    g.join()
    g.seal(0)
    env = g.seal(1, deliver=False)
    outsider = GroupMember(
        gen_key("x25519"),
        cluster=CLUSTER,
        streams=["t"],
        trust=TrustStore({CLUSTER: [g.identity.public_jwk]}),
    )
    with pytest.raises(IntegrityError):
        outsider.accept(env)
    assert outsider.rejected == {"not_member": 1}


def test_replay_into_another_members_inbox_with_another_epoch_is_refused() -> None:
    """A leaver's inbox had epoch 0 and 1; a member that joined at epoch 2 is fed them (and
    the leaver, batches of the epoch after it left)."""
    g = Group()
    leaver = g.join()
    e0 = g.seal(0)
    g.clock.advance(1.0)
    g.join()
    e1 = g.seal(1)
    g.leave(leaver)
    g.clock.advance(1.0)
    late = g.join()
    e2 = g.seal(2)
    assert env_map(e2)["epoch"] == 2
    for env in (e0, e1):
        assert late.consumer.accept(env) is None  # older than its first epoch: not for it
    assert late.consumer.skipped == 2
    assert late.consumer.accepted == 2
    rejected(leaver, e2, "unknown_kid")
    # an epoch it holds, replayed from another inbox: its own gseq refuses it
    rejected(late, e2, "replay")


def test_end_is_signed_and_ends_the_member() -> None:
    g = Group()
    m = g.join()
    g.join()
    g.seal(0)
    (end_env,) = m.producer.end("producer stopping")
    result = m.consumer.accept(end_env)
    assert isinstance(result, End)
    assert result.reason == "producer stopping"
    env = g.seal(1, deliver=False)  # an ended member is no member: the key rotated
    assert m.key.session_id not in g.sealer.members
    rejected(m, env, "after_end")


def test_end_forged_by_a_relay_is_refused() -> None:
    """A relay can encrypt to the member's public key, but not sign the end's claims."""
    g = Group()
    m = g.join()
    g.seal(0)
    rogue = MemberSession(
        ClusterIdentity.generate(),
        cluster=CLUSTER,
        session=m.key.session_id,
        consumer_jwk=m.key.public_jwk,
        key_mode="group",
    )
    rogue.seq = m.producer.seq
    (forged,) = rogue.end("bye")
    rejected(m, forged, "untrusted_key")
    assert not m.consumer.ended


def test_a_member_session_binds_its_key_and_carries_no_session_data() -> None:
    """A member is its own kind of producer session, not one with ``seal`` switched off: the
    same binding of session id to key as a session-mode session, and no data channel."""
    key, other = gen_key("x25519"), gen_key("x25519")
    identity = ClusterIdentity.generate()
    with pytest.raises(WireError) as info:
        MemberSession(
            identity, cluster=CLUSTER, session=other.session_id, consumer_jwk=key.public_jwk
        )
    assert info.value.reason == "session_mismatch"
    with pytest.raises(ValueError, match="'group'"):
        MemberSession(
            identity,
            cluster=CLUSTER,
            session=key.session_id,
            consumer_jwk=key.public_jwk,
            key_mode="session",  # type: ignore[arg-type]
        )
    member = MemberSession(
        identity, cluster=CLUSTER, session=key.session_id, consumer_jwk=key.public_jwk
    )
    assert member.start() == []
    assert not isinstance(member, ProducerSession)
    assert not hasattr(member, "seal")


def test_rsa_member() -> None:
    g = Group()
    m = g.join(kind="rsa")
    g.seal(0)
    assert m.consumer.accepted == 2


def test_envelope_keys_and_sizes_are_strict() -> None:
    g = Group()
    m = g.join()
    g.seal(0)
    env = g.seal(1, deliver=False)
    extra = env_map(env)
    extra["session"] = m.key.session_id
    with pytest.raises(IntegrityError):
        m.consumer.accept(msgpack.packb(extra, use_bin_type=True))
    assert m.consumer.rejected == {"malformed": 1}


def test_a_members_next_session_goes_on_with_its_groups_line_and_keys() -> None:
    """The subscription's next session carries the ended one's groups: a batch it missed
    under a key it kept opens (a store's replay), one sealed after the producer let it go is
    skipped (not an error), and the gap is counted exactly once the line moves past it."""
    g = Group()
    a, b = g.join(), g.join()
    g.seal(0)
    missed = g.seal(1, deliver=False)  # under the key a holds; b gets it, a does not
    assert isinstance(b.consumer.accept(missed), Batch)
    g.leave(a)
    away = g.seal(2)  # a new key: a was let go
    again = g.join()
    again.consumer.carry(a.consumer)
    assert not again.consumer.keyed  # carried keys are not this session's
    # relayed before this session's first key: a batch it was not given a key of, skipped
    assert again.consumer.accept(away) is None
    g.clock.advance(1)  # past the coalescing: the joiner gets the key
    back = g.seal(3, deliver=False)
    assert again.consumer.keyed
    replayed = again.consumer.accept(missed)
    assert isinstance(replayed, Batch)
    assert replayed.rows == [{"i": 1}]
    assert again.consumer.accept(away) is None  # below the rejoin point: skipped again
    assert again.consumer.skipped == 2
    batch = again.consumer.accept(back)
    assert isinstance(batch, Batch)
    assert (batch.seq, batch.lost_before) == (3, 1)
    assert (again.consumer.lost, again.consumer.rejected) == (1, {})
    rejected(again, away, "replay")  # behind the line now: a replay like any other


def test_a_line_that_cannot_go_on_starts_afresh() -> None:
    """A producer that restarted without a store starts its groups at epoch 0, gseq 0: the
    carried line cannot go on, the new session installs its key as a first one (no
    ``stale_epoch``) and counts nothing it cannot know."""
    g = Group()
    a = g.join()
    g.seal(0)
    g.seal(1)
    g.leave(a)
    g.sealer = GroupSealer(g.identity, cluster=CLUSTER, stream=STREAM, clock=g.clock)
    again = g.join()
    again.consumer.carry(a.consumer)
    g.seal(0)  # delivered and accepted: a fresh line
    assert (again.consumer.lost, again.consumer.rejected) == (0, {})
    with pytest.raises(ValueError, match="new session"):
        again.consumer.carry(a.consumer)  # only into a session that has no group yet


def test_a_restarted_sealer_goes_on_only_from_its_own_stored_envelope() -> None:
    """The store's last group envelope sets where a restarted producer's group goes on, once
    it is shown to be the cluster's own for that stream: a forged one (another key, another
    stream, a header that says otherwise, not an envelope) leaves the group at 0."""
    g = Group()
    g.join()
    g.seal(0)
    last = g.seal(1)
    again = GroupSealer(g.identity, cluster=CLUSTER, stream=STREAM, clock=g.clock, after=last)
    assert (again.epoch, again.gseq) == (0, 2)
    forger = ClusterIdentity.generate()
    signed_by_other = repack(
        last, sig=forger._key.get_op_key("sign").sign(GROUP_SIG_CONTEXT + env_map(last)["body"])
    )
    for forged in (
        signed_by_other,
        repack(last, gseq=2**62),  # the clear field, not what was signed
        repack(last, stream="t"),
        b"\x81\xa1v\x01",
    ):
        fresh = GroupSealer(g.identity, cluster=CLUSTER, stream=STREAM, clock=g.clock, after=forged)
        assert (fresh.epoch, fresh.gseq) == (-1, 0)
