"""Group mode, both ends (docs/protocol.md, "Group mode"; pure logic: time and randomness are
parameters).

Producer: :class:`GroupSealer` seals each batch of a stream once, under the stream's group key,
and signs it with the cluster key; it rotates the key before a batch when a member left
(always), when members joined (coalesced) or when the key is worn. :class:`MemberSession` is a
group-mode session's own channel: the signed group key envelopes and the signed end.

Consumer: :class:`GroupMember` installs the group keys its session receives and verifies,
checks and decrypts the group batches relayed to its inbox.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import msgpack
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.crypto._jose import (
    ENC,
    ClusterIdentity,
    Compact,
    ConsumerKey,
    Rejected,
    aead,
    open_dir,
    parse_compact,
    seal_protected,
)
from sealstream.crypto._session import (
    DEFAULT_MAX_PLAINTEXT,
    Batch,
    ConsumerSession,
    End,
    Policy,
    Rotation,
    SessionChannel,
)
from sealstream.crypto._trust import TrustStore
from sealstream.errors import WireError
from sealstream.groupwire import (
    GROUP_KIND,
    GroupEnvelope,
    decode_group_envelope,
    decode_member_inbox,
    encode_group_envelope,
)
from sealstream.ids import check_stream
from sealstream.jwk import b64u_decode, b64u_encode, b64u_encode_bytes
from sealstream.wire import DEFAULT_MAX_ENVELOPE, Envelope, Notice

__all__ = [
    "GROUP_COALESCE_S",
    "GROUP_SIG_CONTEXT",
    "GroupMember",
    "GroupSeal",
    "GroupSealer",
    "MemberSession",
]

log = structlog.get_logger(__name__)

#: signed before the body: no JWS signing input (base64url and ".") contains a NUL
GROUP_SIG_CONTEXT: Final = b"sealstream-group-v1\x00"
#: joins within this many seconds of a group's last rotation wait for the next one
GROUP_COALESCE_S: Final = 0.25
_ROTATION: Final = Rotation()
_KEY_CLAIMS: Final = frozenset({"cluster", "session", "group", "epoch", "kid", "k", "gseq", "iat"})
_END_CLAIMS: Final = frozenset({"cluster", "session", "reason", "iat"})


# --- producer -------------------------------------------------------------------------------


class MemberSession(SessionChannel):
    """A group-mode session on the producer: its channel carries only signed key envelopes
    (one per group per rotation) and the signed end, each a JWE to the member's own key. The
    group batches themselves are :class:`GroupSealer`'s: a member has no ``seal``."""

    def __init__(
        self,
        identity: ClusterIdentity,
        *,
        cluster: str,
        session: str,
        consumer_jwk: Mapping[str, Any],
        key_mode: Literal["group"] = "group",
        clock: Callable[[], int] = time.time_ns,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if key_mode != "group":
            raise ValueError(f"a group member's key mode is 'group', not {key_mode!r}")
        super().__init__(
            identity,
            cluster=cluster,
            session=session,
            consumer_jwk=consumer_jwk,
            clock=clock,
            random=random,
        )
        self.key_mode: Literal["group"] = key_mode

    def group_key(
        self, *, group: str, epoch: int, kid: str, secret: bytes, gseq: int, now: int
    ) -> bytes:
        """The key envelope giving this member a group's key of one epoch."""
        if self.ended:
            raise ValueError("session has ended")
        claims = {
            "cluster": self.cluster,
            "session": self.session,
            "group": group,
            "epoch": epoch,
            "kid": kid,
            "k": b64u_encode(secret),
            "gseq": gseq,
            "iat": now // 1_000_000_000,
        }
        return self._signed("key", claims, now)

    def start(self) -> list[bytes]:
        return []  # the group keys come with the groups' rotations

    def end(self, reason: str) -> list[bytes]:
        if self.ended:
            raise ValueError("session has ended")
        now = self._clock()
        claims = {
            "cluster": self.cluster,
            "session": self.session,
            "reason": reason[:200],
            "iat": now // 1_000_000_000,
        }
        out = [self._signed("end", claims, now)]
        self.ended = True
        return out


@dataclass(frozen=True, slots=True)
class GroupSeal:
    """What one sealed batch of a group sends: ``keys`` (member session, key envelope) first,
    when the key rotated, then ``envelope`` (None: the group has no member). ``members``
    hold the key it was sealed under; ``failed`` are members no key could be sealed to (the
    caller drops their sessions)."""

    keys: list[tuple[str, bytes]]
    envelope: bytes | None
    epoch: int
    gseq: int
    members: frozenset[str]
    failed: list[str]


class GroupSealer:
    """One stream's group on the producer: its key, epoch, ``gseq`` and who holds the key."""

    def __init__(
        self,
        identity: ClusterIdentity,
        *,
        cluster: str,
        stream: str,
        rotation: Rotation = _ROTATION,
        coalesce_s: float = GROUP_COALESCE_S,
        clock: Callable[[], int] = time.time_ns,
        random: Callable[[int], bytes] = os.urandom,
        after: bytes | None = None,
    ) -> None:
        """``after``: the group's last envelope that the store keeps (an earlier run of this
        producer sealed it): the group goes on past its epoch and ``gseq``, so that a
        ``gseq`` names one batch of the store and epochs only grow. It is taken only when it
        is this cluster's, for this stream, signed by ``identity`` (the store is writable by
        others than the producer); otherwise the group starts at 0, said once."""
        self.cluster = cluster
        self.stream = check_stream(stream)
        self._signer = identity._key.get_op_key("sign")
        self._rotation = rotation
        self._coalesce_ns = int(coalesce_s * 1e9)
        self._clock = clock
        self._random = random
        line = None if after is None else self._ours(after)
        self.epoch = -1 if line is None else line[0]
        self.gseq = 0 if line is None else line[1] + 1
        self.rotations = 0
        self._kid = ""
        self._aead: AESGCM | None = None
        self._holders: frozenset[str] = frozenset()
        self._rotated_at = 0
        self._key_uses = 0
        self._head = ""

    def _ours(self, payload: bytes) -> tuple[int, int] | None:
        """(epoch, gseq) of a group envelope this sealer's cluster key signed for its stream."""
        try:
            env = decode_group_envelope(payload, max_size=len(payload))
            header = parse_compact(env.body).header
            if (env.cluster, env.stream) != (self.cluster, self.stream):
                raise Rejected("wrong_route")
            if (header.get("epoch"), header.get("gseq")) != (env.epoch, env.seq):
                raise Rejected("header_mismatch")
            self._signer.public_key().verify(env.sig, GROUP_SIG_CONTEXT + env.body)
        except (WireError, Rejected, InvalidSignature) as exc:
            reason = getattr(exc, "reason", "bad_signature")
            log.warning("group.stored_not_ours", stream=self.stream, reason=reason)
            return None
        return env.epoch, env.seq

    @property
    def members(self) -> frozenset[str]:
        """The sessions holding the current key."""
        return self._holders

    def _rotate_due(self, members: frozenset[str], now: int) -> bool:
        if self._aead is None or not self._holders <= members:  # none yet, or someone left
            return True
        if (
            self._key_uses >= self._rotation.max_envelopes
            or now - self._rotated_at >= self._rotation.max_age_s * 1e9
        ):
            return True
        return bool(members - self._holders) and now - self._rotated_at >= self._coalesce_ns

    def seal(self, plaintext: bytes, members: Mapping[str, MemberSession]) -> GroupSeal:
        """Seal one batch for the group whose members are now ``members`` (the live
        group-mode sessions of this stream), rotating first when due."""
        now = self._clock()
        current = frozenset(s for s, m in members.items() if not m.ended)
        if not current:
            if self._holders:  # the last ones left: nobody may use this key again
                self._aead, self._holders = None, frozenset()
            return GroupSeal([], None, self.epoch, self.gseq, frozenset(), [])
        keys: list[tuple[str, bytes]] = []
        failed: list[str] = []
        if self._rotate_due(current, now):
            epoch = self.epoch + 1
            secret = self._random(32)
            kid = b64u_encode(self._random(12))
            for session in sorted(current):
                try:
                    envelope = members[session].group_key(
                        group=self.stream,
                        epoch=epoch,
                        kid=kid,
                        secret=secret,
                        gseq=self.gseq,
                        now=now,
                    )
                except ValueError:  # this member only: it gets no key, the others go on
                    failed.append(session)
                    continue
                keys.append((session, envelope))
            self.epoch, self._kid, self._aead = epoch, kid, aead(secret)
            self.rotations += 1
            self._holders = current.difference(failed)
            self._rotated_at = now
            self._key_uses = 0
            self._head = (
                f'{{"alg":"dir","enc":"{ENC}","kid":"{kid}","cluster":"{self.cluster}",'
                f'"stream":"{self.stream}","kind":"{GROUP_KIND}","epoch":{epoch},"gseq":'
            )
            log.debug("group.key_rotated", stream=self.stream, epoch=epoch, members=len(keys))
        assert self._aead is not None
        gseq = self.gseq
        self.gseq += 1
        self._key_uses += 1
        protected = b64u_encode_bytes(f'{self._head}{gseq},"ts":{now}}}'.encode("ascii"))
        body = seal_protected(self._aead, protected, plaintext)
        sig = self._signer.sign(GROUP_SIG_CONTEXT + body)
        envelope = encode_group_envelope(
            cluster=self.cluster,
            stream=self.stream,
            epoch=self.epoch,
            gseq=gseq,
            ts=now,
            body=body,
            sig=sig,
        )
        return GroupSeal(keys, envelope, self.epoch, gseq, self._holders, failed)


# --- consumer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _GroupKey:
    cipher: AESGCM
    epoch: int
    signer: Ed25519PublicKey


@dataclass(slots=True)
class _Group:
    first_epoch: int
    last_gseq: int
    epoch: int
    keys: dict[str, _GroupKey]
    current: str


#: a member keeps, per group, the current key and up to 7 previous ones (docs/protocol.md)
KEYS_KEPT: Final = 8


class GroupMember(ConsumerSession):
    """A group-mode session on the consumer: :meth:`accept` as :class:`ConsumerSession`'s,
    plus group batches (a :class:`Batch` whose ``seq`` is the group's ``gseq``). ``skipped``
    counts batches sealed before this member joined (not errors: see the contract)."""

    def __init__(
        self,
        key: ConsumerKey,
        *,
        cluster: str,
        streams: list[str] | tuple[str, ...],
        trust: TrustStore,
        policy: Policy = "fail",
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        max_envelope: int = DEFAULT_MAX_ENVELOPE,
    ) -> None:
        super().__init__(
            key,
            cluster=cluster,
            trust=trust,
            key_mode="group",
            allow_zip=False,
            policy=policy,
            max_plaintext=max_plaintext,
            max_envelope=max_envelope,
        )
        self.streams = frozenset(check_stream(s) for s in streams)
        self.groups: dict[str, _Group] = {}
        self.skipped = 0
        #: groups carried from an earlier session whose first key of this one is still due
        self._carried: set[str] = set()
        #: a carried group's first ``gseq`` under a key of this session: the batches before it
        #: that no kept key opens were sealed while the subscription had no session
        self._rejoined: dict[str, int] = {}

    @property
    def keyed(self) -> bool:
        """A key of THIS session was installed (carried keys do not count)."""
        return bool(self.groups.keys() - self._carried)

    def carry(self, previous: GroupMember) -> None:
        """Go on with ``previous``'s group lines and keys (the same subscription's session
        that ended), before this session's first envelope: what its groups sealed meanwhile
        is opened with the keys kept when a store replays it, and the rest is an exact gap
        (docs/protocol.md, "A member's next session")."""
        if previous.cluster != self.cluster or self.groups:
            raise ValueError("carry a session of the same cluster into a new session only")
        for group, state in previous.groups.items():
            if group in self.streams:
                self.groups[group] = replace(state, keys=dict(state.keys))
                self._carried.add(group)

    def line(self, group: str) -> tuple[int, int] | None:
        """The group's last accepted ``gseq`` and the newest epoch installed; None before
        its first key."""
        state = self.groups.get(group)
        return None if state is None else (state.last_gseq, state.epoch)

    def _parse(self, payload: bytes) -> Envelope | Notice:
        try:
            item = decode_member_inbox(payload, max_size=self._max_envelope)
        except WireError as exc:
            raise Rejected("malformed") from exc
        if not isinstance(item, GroupEnvelope) and item.session != self.session:
            raise Rejected("wrong_route")
        return item

    def _accept(self, env: Envelope) -> Batch | End | None:
        if isinstance(env, GroupEnvelope):
            return self._accept_group(env)
        if env.kind == "data":
            if self.ended:
                raise Rejected("after_end")
            raise Rejected("wrong_mode")  # session data: no downgrade
        return super()._accept(env)

    # the session channel: signed key and end claims, in a JWE to our key

    def _install_key(self, header: dict[str, Any], body: bytes) -> None:
        claims, signer = self._signed_claims(header, body)
        group, epoch, kid = claims.get("group"), claims.get("epoch"), claims.get("kid")
        k, gseq = claims.get("k"), claims.get("gseq")
        if (
            set(claims) != _KEY_CLAIMS
            or group not in self.streams
            or type(epoch) is not int
            or epoch < 0
            or not isinstance(kid, str)
            or not 0 < len(kid) <= 64
            or not isinstance(k, str)
            or type(gseq) is not int
            or gseq < 0
            or type(claims.get("iat")) is not int
        ):
            raise Rejected("bad_claims")
        assert isinstance(group, str)
        try:
            secret = b64u_decode(k)
            verifier = Ed25519PublicKey.from_public_bytes(b64u_decode(signer["x"]))
        except (ValueError, KeyError) as exc:
            raise Rejected("bad_claims") from exc
        if len(secret) != 32:
            raise Rejected("bad_claims")
        state = self.groups.get(group)
        carried = state is not None and group in self._carried
        if state is not None and carried and (epoch <= state.epoch or gseq <= state.last_gseq):
            # the producer's group started again (its store had nothing of it): the line
            # cannot go on, and what was sealed meanwhile cannot be counted
            log.warning("group.line_restarted", session=self.session, group=group)
            state = None
        if state is not None and epoch <= state.epoch:
            raise Rejected("stale_epoch")
        if state is not None and kid in state.keys:
            raise Rejected("reused_kid")
        new = _GroupKey(aead(secret), epoch, verifier)
        if carried:  # this session's first key of a carried group: it is settled now
            self._carried.discard(group)
            if state is not None:
                self._rejoined[group] = gseq
        if state is None:
            self.groups[group] = _Group(epoch, gseq - 1, epoch, {kid: new}, kid)
        else:  # keep the previous keys, for batches in flight or replayed from a store
            state.keys[kid] = new  # a dict keeps the order installed: the oldest first
            while len(state.keys) > KEYS_KEPT:
                del state.keys[next(iter(state.keys))]
            state.current, state.epoch = kid, epoch
        log.debug("group.key_accepted", session=self.session, group=group, epoch=epoch)

    def _open(self, jwe: Compact, body: bytes) -> bytes:
        # only an end reaches here (key envelopes are installed, data is refused above)
        claims, _ = self._signed_claims(jwe.header, body)
        reason = claims.get("reason")
        if (
            set(claims) != _END_CLAIMS
            or not isinstance(reason, str)
            or type(claims.get("iat")) is not int
        ):
            raise Rejected("bad_claims")
        return msgpack.packb({"reason": reason})

    # group batches

    def _accept_group(self, env: GroupEnvelope) -> Batch | None:
        if self.ended:
            raise Rejected("after_end")
        if env.cluster != self.cluster:
            raise Rejected("wrong_route")
        if env.stream not in self.streams:
            raise Rejected("not_member")
        state = self.groups.get(env.stream)
        if state is None or env.epoch < state.first_epoch:
            # sealed before we joined (by the header's word: a relay may as well drop it)
            self.skipped += 1
            log.debug("group.skipped", session=self.session, group=env.stream, epoch=env.epoch)
            return None
        if env.seq <= state.last_gseq:
            raise Rejected("replay")
        jwe = parse_compact(env.body)
        header = jwe.header
        gseq, ts, epoch = header.get("gseq"), header.get("ts"), header.get("epoch")
        if (
            type(gseq) is not int
            or type(ts) is not int
            or type(epoch) is not int
            or gseq != env.seq
            or ts != env.ts
            or epoch != env.epoch
            or header.get("cluster") != env.cluster
            or header.get("stream") != env.stream
            or header.get("kind") != GROUP_KIND
        ):
            raise Rejected("header_mismatch")
        if header.get("alg") != "dir":
            raise Rejected("bad_alg")
        if "zip" in header:
            raise Rejected("zip_not_allowed")
        kid = header.get("kid")
        key = state.keys.get(kid) if isinstance(kid, str) else None
        if key is None and (
            env.stream in self._carried or env.seq < self._rejoined.get(env.stream, 0)
        ):
            # sealed while the subscription had no session (or before this session's first
            # key came), under a key it was not given: a gap, counted in lost when the line
            # moves past it, not an error
            self.skipped += 1
            return None
        if key is None:
            raise Rejected("unknown_kid")
        if key.epoch != epoch:
            raise Rejected("epoch_mismatch")
        try:
            key.signer.verify(env.sig, GROUP_SIG_CONTEXT + env.body)
        except InvalidSignature as exc:
            raise Rejected("bad_signature") from exc
        plaintext = open_dir(key.cipher, jwe, max_plaintext=self._max_plaintext)
        result = self._decode(env, plaintext)
        assert isinstance(result, Batch)
        lost = env.seq - state.last_gseq - 1
        if lost:
            self.gaps += 1
            self.lost += lost
            log.warning("group.gap", session=self.session, group=env.stream, lost=lost)
            result = Batch(result.stream, result.seq, result.ts, result.rows, lost)
        state.last_gseq = env.seq
        self.accepted += 1
        return result
