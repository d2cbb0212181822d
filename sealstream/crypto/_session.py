"""Session crypto of the wire contract, both ends (pure logic: no I/O, time and randomness
are parameters).

Producer side, per consumer session: a signed key envelope first (and at every rotation), then
``dir``/A256GCM data and end JWEs under the session key, every protected header carrying the
routing fields. Consumer side: verify the key envelope against the trust store and the
session binding, then decrypt, check the header against the envelope, enforce ``seq``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import msgpack
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.crypto._jose import (
    ENC,
    ClusterIdentity,
    Compact,
    ConsumerKey,
    Rejected,
    aead,
    inflate_if,
    jws_header,
    open_dir,
    open_with_key,
    parse_compact,
    seal_protected,
    seal_to_key,
    sign_claims,
    verify_claims,
)
from sealstream.crypto._trust import TrustStore
from sealstream.errors import IntegrityError, TrustError, WireError
from sealstream.ids import SESSION_STREAM, check_cluster_id, check_session_id, check_stream
from sealstream.jwk import (
    b64u_decode,
    b64u_encode,
    b64u_encode_bytes,
    check_public_jwk,
    thumbprint,
)
from sealstream.wire import (
    DEFAULT_MAX_ENVELOPE,
    Envelope,
    EnvelopeKind,
    KeyMode,
    Notice,
    decode_inbox,
    encode_envelope,
)

__all__ = [
    "DEFAULT_MAX_PLAINTEXT",
    "Batch",
    "ConsumerSession",
    "End",
    "Policy",
    "ProducerSession",
    "Rotation",
    "SessionChannel",
    "encode_rows",
]

log = structlog.get_logger(__name__)

#: Cap on a decrypted (and inflated) body.
DEFAULT_MAX_PLAINTEXT: Final = 16 * 1024 * 1024
_MAX_KEY_PLAINTEXT: Final = 16 * 1024
_DICT_ONLY: Final = frozenset({dict})
Policy = Literal["fail", "discard"]
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotation:
    """When a producer replaces a session key: after ``max_envelopes`` envelopes or
    ``max_age_s`` seconds under one key, whichever comes first. With random 96-bit GCM nonces
    the defaults stay many orders of magnitude under the 2**32 messages-per-key bound."""

    max_envelopes: int = 100_000
    max_age_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_envelopes < 1 or self.max_age_s <= 0:
            raise ValueError("rotation limits must be positive")


@dataclass(frozen=True, slots=True)
class Batch:
    """Decrypted rows of one data envelope. ``lost_before`` counts envelopes of the session
    that never arrived between the previous accepted one and this one."""

    stream: str
    seq: int
    ts: int
    rows: list[dict[str, Any]] = field(repr=False)
    lost_before: int = 0


@dataclass(frozen=True, slots=True)
class End:
    """The producer ended the session (authenticated)."""

    reason: str
    seq: int


def encode_rows(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The data plaintext of the contract: msgpack ``{"rows": [...]}``."""
    return msgpack.packb({"rows": rows}, use_bin_type=True)


# --- producer -------------------------------------------------------------------------------


class SessionChannel:
    """What every producer-side session has, in session and group mode alike: the consumer's
    key, bound to the session id, the session's ``seq``, and envelopes signed by the cluster
    and sealed to that key (key envelopes, group keys, the group-mode end)."""

    def __init__(
        self,
        identity: ClusterIdentity,
        *,
        cluster: str,
        session: str,
        consumer_jwk: Mapping[str, Any],
        clock: Callable[[], int] = time.time_ns,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.cluster = check_cluster_id(cluster)
        self.session = check_session_id(session)
        self._jwk = check_public_jwk(consumer_jwk)
        # The session id IS the key's thumbprint: a relay that swaps the key changes the id,
        # and the signed claims then name a session the consumer does not have.
        if thumbprint(self._jwk) != self.session:
            raise WireError("session_mismatch", "session id is not the key's thumbprint")
        # A key of the right shape may still be unusable (a low-order X25519 point, a P-256
        # point off the curve): refuse it now, not at the first seal of a live session.
        try:
            seal_to_key(self._jwk, {"kid": self.session}, b"\x00")
        except ValueError as exc:
            raise WireError("bad_jwk", "cannot encrypt to this key") from exc
        self._identity = identity
        self._clock = clock
        self._random = random
        self.seq = 0
        self.ended = False

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def _routing(self, kind: EnvelopeKind, stream: str, seq: int, ts: int) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "session": self.session,
            "stream": stream,
            "seq": seq,
            "kind": kind,
            "ts": ts,
        }

    def _envelope(self, kind: EnvelopeKind, stream: str, seq: int, ts: int, body: bytes) -> bytes:
        return encode_envelope(Envelope(kind, self.cluster, self.session, stream, seq, ts, body))

    def _signed(self, kind: EnvelopeKind, claims: Mapping[str, Any], now: int) -> bytes:
        """An envelope of the session's channel carrying ``claims`` signed by the cluster, as
        a JWE to the consumer's key."""
        jws = sign_claims(self._identity, claims)
        seq = self._next_seq()
        header = {
            "kid": self.session,
            "cty": "JWT",
            **self._routing(kind, SESSION_STREAM, seq, now),
        }
        return self._envelope(kind, SESSION_STREAM, seq, now, seal_to_key(self._jwk, header, jws))


class ProducerSession(SessionChannel):
    """One consumer session's encryption state, on the producer."""

    def __init__(
        self,
        identity: ClusterIdentity,
        *,
        cluster: str,
        session: str,
        consumer_jwk: Mapping[str, Any],
        key_mode: KeyMode = "session",
        compress: bool = False,
        rotation: Rotation = Rotation(),
        clock: Callable[[], int] = time.time_ns,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        super().__init__(
            identity,
            cluster=cluster,
            session=session,
            consumer_jwk=consumer_jwk,
            clock=clock,
            random=random,
        )
        self.key_mode: KeyMode = key_mode
        self._zip = compress
        self._rotation = rotation
        self.epoch = -1
        self._kid = ""
        self._aead: AESGCM | None = None
        self._header_head = ""
        self._header_tail = ',"zip":"DEF"}' if compress else "}"
        self._key_uses = 0
        self._key_born = 0

    def _key_due(self, now: int) -> bool:
        return (
            self._aead is None
            or self._key_uses >= self._rotation.max_envelopes
            or now - self._key_born >= self._rotation.max_age_s * 1e9
        )

    def _key_envelope(self, now: int) -> bytes:
        self.epoch += 1
        secret = self._random(32)
        self._kid = b64u_encode(self._random(12))
        claims = {
            "cluster": self.cluster,
            "session": self.session,
            "kid": self._kid,
            "k": b64u_encode(secret),
            "iat": now // 1_000_000_000,
            "epoch": self.epoch,
        }
        envelope = self._signed("key", claims, now)
        self._aead = aead(secret)
        self._header_head = (
            f'{{"alg":"dir","enc":"{ENC}","kid":"{self._kid}","cluster":"{self.cluster}",'
            f'"session":"{self.session}","stream":"'
        )
        self._key_uses = 0
        self._key_born = now
        log.debug("session.key_rotated", session=self.session, epoch=self.epoch)
        return envelope

    def _seal(self, kind: EnvelopeKind, stream: str, plaintext: bytes) -> list[bytes]:
        if self.ended:
            raise ValueError("session has ended")
        now = self._clock()
        out: list[bytes] = []
        if self.key_mode == "per-message":
            seq = self._next_seq()
            header = {"kid": self.session, **self._routing(kind, stream, seq, now)}
            if self._zip:
                header["zip"] = "DEF"
            out.append(
                self._envelope(kind, stream, seq, now, seal_to_key(self._jwk, header, plaintext))
            )
            return out
        if self._key_due(now):
            out.append(self._key_envelope(now))
        assert self._aead is not None
        seq = self._next_seq()
        # the protected header from the key's template: this runs per message. Every value
        # is an identifier of a restricted alphabet or an integer, so no JSON escaping.
        text = f'{self._header_head}{stream}","seq":{seq},"kind":"{kind}","ts":{now}'
        protected = b64u_encode_bytes((text + self._header_tail).encode("ascii"))
        self._key_uses += 1
        body = seal_protected(self._aead, protected, plaintext, deflate=self._zip)
        out.append(self._envelope(kind, stream, seq, now, body))
        return out

    def start(self) -> list[bytes]:
        """The key envelope to send as soon as the session opens (none in per-message mode),
        so the consumer is ready before the first batch."""
        if self.key_mode == "per-message" or self.ended:
            return []
        now = self._clock()
        return [self._key_envelope(now)] if self._key_due(now) else []

    def seal(self, stream: str, plaintext: bytes) -> list[bytes]:
        """Encoded envelopes carrying one data plaintext (msgpack ``{"rows": [...]}``, see
        :func:`encode_rows`), preceded by a key envelope when one is due."""
        return self._seal("data", check_stream(stream), plaintext)

    def end(self, reason: str) -> list[bytes]:
        """The authenticated end of the session; nothing can be sealed after it."""
        out = self._seal("end", SESSION_STREAM, msgpack.packb({"reason": reason[:200]}))
        self.ended = True
        return out


# --- consumer -------------------------------------------------------------------------------


class ConsumerSession:
    """One session's decryption and verification state, on the consumer.

    :meth:`accept` returns a :class:`Batch`, an :class:`End`, a proxy :class:`Notice`, or None
    (a key envelope was installed, or the envelope was discarded under ``policy="discard"``).
    Every failure is the one opaque :class:`IntegrityError`; the reason is counted in
    :attr:`rejected` and logged at DEBUG. A key envelope signed by a key the trust store does
    not pin (``untrusted_key``) is counted and ignored under either policy.
    """

    def __init__(
        self,
        key: ConsumerKey,
        *,
        cluster: str,
        trust: TrustStore,
        key_mode: KeyMode = "session",
        allow_zip: bool = False,
        policy: Policy = "fail",
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        max_envelope: int = DEFAULT_MAX_ENVELOPE,
    ) -> None:
        if policy not in ("fail", "discard"):
            raise ValueError(f"policy must be 'fail' or 'discard', not {policy!r}")
        self._key = key
        self.cluster = check_cluster_id(cluster)
        self.session = key.session_id
        self._trust = trust
        self.key_mode: KeyMode = key_mode
        self._allow_zip = allow_zip
        self.policy: Policy = policy
        self._max_plaintext = max_plaintext
        self._max_envelope = max_envelope
        self.last_seq = -1
        self.epoch = -1
        self.ended = False
        self._keys: dict[str, AESGCM] = {}
        self._current_kid = ""
        self.accepted = 0
        self.gaps = 0
        self.lost = 0
        self.rejected: Counter[str] = Counter()

    @property
    def keyed(self) -> bool:
        """True once a session key was accepted (always True in per-message mode)."""
        return self.key_mode == "per-message" or bool(self._keys)

    def accept(self, payload: bytes) -> Batch | End | Notice | None:
        """Parse and open one inbox payload (see :meth:`parse` and :meth:`open`)."""
        item = self.parse(payload)
        if item is None or isinstance(item, Notice):
            return item
        return self.open(item)

    def parse(self, payload: bytes) -> Envelope | Notice | None:
        """Decode an inbox payload; cheap, no crypto. A caller may then run :meth:`open` of
        a ``key`` envelope (or any in per-message mode) off the event loop."""
        return self._guard(self._parse, payload)

    def open(self, env: Envelope) -> Batch | End | None:
        """Verify and decrypt one envelope; returns None for an installed key."""
        return self._guard(self._accept, env)

    def _guard(self, fn: Callable[[_T], _R], arg: _T) -> _R | None:
        try:
            return fn(arg)
        except Rejected as exc:
            self.rejected[exc.reason] += 1
            log.debug("envelope.rejected", reason=exc.reason, session=self.session)
            # a key envelope signed by an unpinned key is anyone's (a relay can race one ahead
            # of the cluster's): ignored under both policies, the caller decides when to stop
            if self.policy == "discard" or exc.reason == "untrusted_key":
                return None
            raise IntegrityError() from None

    def _parse(self, payload: bytes) -> Envelope | Notice:
        try:
            item = decode_inbox(payload, max_size=self._max_envelope)
        except WireError as exc:
            raise Rejected("malformed") from exc
        if item.session != self.session:
            raise Rejected("wrong_route")
        return item

    def _accept(self, env: Envelope) -> Batch | End | None:
        if self.ended:
            raise Rejected("after_end")
        if env.cluster != self.cluster or env.session != self.session:
            raise Rejected("wrong_route")
        if env.seq <= self.last_seq:
            raise Rejected("replay")
        jwe = parse_compact(env.body)
        header = jwe.header
        # the routing fields, spelled out (this runs per message): JSON gives str or int, and
        # a bool or a float must not pass for an int
        seq, ts = header.get("seq"), header.get("ts")
        if (
            type(seq) is not int
            or type(ts) is not int
            or seq != env.seq
            or ts != env.ts
            or header.get("cluster") != env.cluster
            or header.get("session") != env.session
            or header.get("stream") != env.stream
            or header.get("kind") != env.kind
        ):
            raise Rejected("header_mismatch")
        result: Batch | End | None
        if env.kind == "key":
            self._install_key(header, env.body)
            result = None
        else:
            plaintext = self._open(jwe, env.body)
            result = self._decode(env, plaintext)
        lost = env.seq - self.last_seq - 1
        if lost:
            self.gaps += 1
            self.lost += lost
            log.warning("session.gap", session=self.session, lost=lost, seq=env.seq)
            if isinstance(result, Batch):
                result = Batch(result.stream, result.seq, result.ts, result.rows, lost)
        self.last_seq = env.seq
        self.accepted += 1
        if isinstance(result, End):
            self.ended = True
        return result

    def _open(self, jwe: Compact, body: bytes) -> bytes:
        header = jwe.header
        if header.get("zip") is not None and not self._allow_zip:
            raise Rejected("zip_not_allowed")
        if self.key_mode == "per-message":
            if header.get("alg") != self._key.alg or header.get("kid") != self.session:
                raise Rejected("bad_alg")
            return open_with_key(
                self._key, body, max_plaintext=self._max_plaintext, allow_zip=self._allow_zip
            )
        if header.get("alg") != "dir":
            raise Rejected("bad_alg")
        kid = header.get("kid")
        cipher = self._keys.get(kid) if isinstance(kid, str) else None
        if cipher is None:
            raise Rejected("unknown_kid")
        plaintext = open_dir(cipher, jwe, max_plaintext=self._max_plaintext)
        return inflate_if(header, plaintext, limit=self._max_plaintext, allow=self._allow_zip)

    def _signed_claims(
        self, header: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cluster's signed claims of a key (or group end) envelope: a JWE to our key
        holding a JWS by a pinned cluster key, naming this cluster and session; the claims
        and the signer's public JWK."""
        if (
            header.get("alg") != self._key.alg
            or header.get("kid") != self.session
            or header.get("cty") != "JWT"
            or "zip" in header
        ):
            raise Rejected("bad_key_header")
        jws = open_with_key(self._key, body, max_plaintext=_MAX_KEY_PLAINTEXT, allow_zip=False)
        signer = self._signer(jws_header(jws))
        claims = verify_claims(jws, signer)
        if claims.get("cluster") != self.cluster or claims.get("session") != self.session:
            raise Rejected("bad_claims")
        return claims, signer

    def _install_key(self, header: dict[str, Any], body: bytes) -> None:
        if self.key_mode != "session":
            raise Rejected("unexpected_key")
        claims, _ = self._signed_claims(header, body)
        k = claims.get("k")
        kid = claims.get("kid")
        epoch = claims.get("epoch")
        if (
            not isinstance(kid, str)
            or not 0 < len(kid) <= 64
            or not isinstance(k, str)
            or type(epoch) is not int
            or type(claims.get("iat")) is not int
            or "group" in claims  # a group key (group mode) is no session key
        ):
            raise Rejected("bad_claims")
        if epoch <= self.epoch:
            raise Rejected("stale_epoch")
        if kid in self._keys:  # a new key has a new name: data in flight names the old one
            raise Rejected("reused_kid")
        try:
            secret = b64u_decode(k)
        except ValueError as exc:
            raise Rejected("bad_claims") from exc
        if len(secret) != 32:
            raise Rejected("bad_claims")
        # keep at most the previous key, for data still in flight
        current = self._keys.get(self._current_kid)
        self._keys = {kid: aead(secret)}
        if current is not None:  # a different kid: a reused one was refused above
            self._keys[self._current_kid] = current
        self._current_kid = kid
        self.epoch = epoch
        log.debug("session.key_accepted", session=self.session, epoch=epoch)

    def _signer(self, header: dict[str, Any]) -> dict[str, Any]:
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Rejected("bad_jws")
        jwk = self._trust.get(self.cluster, kid)
        if jwk is not None:
            return jwk
        embedded = header.get("jwk")
        if self._trust.tofu and not self._trust.knows(self.cluster) and isinstance(embedded, dict):
            try:
                if thumbprint(embedded) == kid:
                    self._trust.add(self.cluster, embedded)
                    pinned = self._trust.get(self.cluster, kid)
                    if pinned is not None:
                        return pinned
            except (WireError, TrustError) as exc:
                raise Rejected("untrusted_key") from exc
        raise Rejected("untrusted_key")

    def _decode(self, env: Envelope, plaintext: bytes) -> Batch | End:
        try:
            value = msgpack.unpackb(plaintext, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise Rejected("bad_plaintext") from exc
        if not isinstance(value, dict):
            raise Rejected("bad_plaintext")
        if env.kind == "end":
            reason = value.get("reason")
            if not isinstance(reason, str):
                raise Rejected("bad_plaintext")
            return End(reason, env.seq)
        rows = value.get("rows")
        # msgpack yields exact dicts; set(map(type, ...)) checks a row list in C
        if type(rows) is not list or not set(map(type, rows)) <= _DICT_ONLY:
            raise Rejected("bad_plaintext")
        return Batch(env.stream, env.seq, env.ts, rows)
