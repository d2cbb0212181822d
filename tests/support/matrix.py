"""The tamper matrix of session and per-message mode, once: every case is a consumer session fed
a list of payloads, each declared accepted or rejected with its reason. The Python consumer is
held to it by ``tests/unit/test_tamper.py``; the browser consumer by the vectors written from it
(``tests/support/vectors.py``, ``consumers/web/test/vectors/``).

Keys, identities, clocks and the producers' randomness are fixed (``vector_keys.json``, seeded
generators), so that a case's verdicts never depend on a drawn key (a flipped character of a
thumbprint starting with a digit is not the same tamper as one starting with a letter). The
consumer key ``x25519`` has a session id starting with ``-`` on purpose.

To add a case: write a function ``(keys) -> Case`` (or a list of them) below and list it in
:data:`CASES`; then run ``python -m tests.support.vectors`` to update the committed vectors.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwe as jc_jwe
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws

from sealstream.crypto import (
    DEFAULT_MAX_PLAINTEXT,
    ClusterIdentity,
    ConsumerKey,
    ConsumerSession,
    Policy,
    ProducerSession,
    Rotation,
    TrustStore,
    encode_rows,
)
from sealstream.crypto._jose import seal_dir, seal_to_key, sign_claims
from sealstream.jwk import b64u_encode
from sealstream.wire import Envelope, decode_envelope, encode_envelope, notice
from tests.support.helpers import CLUSTER, Pair, env_map, make_pair, repack

__all__ = [
    "CASES",
    "ROWS",
    "TS_BIG",
    "Case",
    "Keys",
    "Step",
    "flip",
    "keys",
    "seeded",
    "session_cases",
]

TS_BIG: Final = 1_790_000_000_123_456_789  # above 2**53: JSON.parse would round it
ROWS: Final[list[dict[str, Any]]] = [{"path": "/secret", "n": 1, "big": 2**60 + 1, "f": 1.5}]
KEYS_FILE: Final = Path(__file__).with_name("vector_keys.json")


@dataclass(frozen=True)
class Keys:
    """The fixed keys of the vectors (test fixtures, never shipped): consumer keys by name
    (``x25519``, ``p256``, ``rsa``, and ``other``, ``relay``, ``mallory``, ``early``, all
    X25519) and cluster identities (``cluster``, ``forger``, ``rogue``)."""

    consumer: dict[str, ConsumerKey]
    identity: dict[str, ClusterIdentity]


@cache
def keys() -> Keys:
    raw = json.loads(KEYS_FILE.read_text(encoding="utf-8"))
    consumer = {
        name: ConsumerKey(jc_jwk.JWK(**k["jwk"]), k["kind"])
        for name, k in raw["consumer_keys"].items()
    }
    identity = {name: ClusterIdentity(jc_jwk.JWK(**k)) for name, k in raw["identities"].items()}
    return Keys(consumer, identity)


def seeded(seed: int) -> Callable[[int], bytes]:
    """Bytes from a seeded generator: a producer's session keys and key ids, the same on every
    run (for vectors only: never a source of keys in use)."""
    return random.Random(seed).randbytes


def clock(start: int = TS_BIG) -> Callable[[], int]:
    t = [start]

    def now() -> int:
        t[0] += 1_000_001
        return t[0]

    return now


@dataclass(frozen=True, slots=True)
class Step:
    """One payload and its verdict: accepted (``reason`` None) or rejected with ``reason``."""

    payload: bytes
    reason: str | None = None


@dataclass
class Case:
    """One consumer session of the matrix and the payloads it is fed, each with its verdict."""

    name: str
    pair: Pair
    allow_zip: bool = False
    max_plaintext: int = DEFAULT_MAX_PLAINTEXT
    #: the policy the browser consumer's vectors run it under (the Python test runs every case
    #: under ``fail``); ``fail`` where the case is about what must not end a session
    policy: Policy = "discard"
    steps: list[Step] = field(default_factory=list)

    def ok(self, *payloads: bytes) -> Case:
        self.steps += [Step(p) for p in payloads]
        return self

    def bad(self, reason: str, *payloads: bytes) -> Case:
        self.steps += [Step(p, reason) for p in payloads]
        return self

    def consumer(self, policy: Policy) -> ConsumerSession:
        """A fresh consumer session for this case, as the case's producer addresses it."""
        return ConsumerSession(
            self.pair.key,
            cluster=CLUSTER,
            trust=TrustStore({CLUSTER: [self.pair.identity.public_jwk]}),
            key_mode=self.pair.consumer.key_mode,
            allow_zip=self.allow_zip,
            policy=policy,
            max_plaintext=self.max_plaintext,
        )


def _pair(key: ConsumerKey, seed: int, **options: Any) -> Pair:
    options.setdefault("identity", keys().identity["cluster"])
    options.setdefault("clock", clock())
    options.setdefault("random", seeded(seed))
    return make_pair(key, policy="discard", **options)


def _sealed(pair: Pair, n: int = 2, stream: str = "s") -> list[bytes]:
    """[key, data, data, ...] envelopes of one session, ``n`` batches of :data:`ROWS`."""
    return [e for i in range(n) for e in pair.producer.seal(stream, encode_rows([*ROWS, {"i": i}]))]


def flip(body: bytes, part: int, offset: int = 0) -> bytes:
    """One character of one part of a compact JWE changed (``B``, or ``C`` where it was ``B``)."""
    parts = body.split(b".")
    p = bytearray(parts[part])
    if not p:
        parts[part] = b"A"
    else:
        i = offset % len(p)
        p[i] = ord("B") if p[i] != ord("B") else ord("C")
        parts[part] = bytes(p)
    return b".".join(parts)


def _header(body: bytes) -> dict[str, Any]:
    value = json.loads(base64.urlsafe_b64decode(body.split(b".")[0] + b"=="))
    assert isinstance(value, dict)
    return value


def _resealed(pair: Pair, data: bytes, header: dict[str, Any], plaintext: bytes) -> bytes:
    """``data`` with its body sealed again under the session's real key, with ``header``."""
    cipher = pair.producer._aead
    assert cipher is not None
    return repack(data, body=seal_dir(cipher, header, plaintext))


def _key_env(key: ConsumerKey, body: bytes) -> bytes:
    return encode_envelope(Envelope("key", CLUSTER, key.session_id, "_session", 0, 1, body))


def _key_header(key: ConsumerKey, **extra: Any) -> dict[str, Any]:
    return {
        "kid": key.session_id,
        "cty": "JWT",
        "cluster": CLUSTER,
        "session": key.session_id,
        "stream": "_session",
        "seq": 0,
        "kind": "key",
        "ts": 1,
        **extra,
    }


def _claims(key: ConsumerKey, **changes: Any) -> dict[str, Any]:
    return {
        "cluster": CLUSTER,
        "session": key.session_id,
        "kid": "x",
        "k": b64u_encode(os.urandom(32)),
        "iat": 1,
        "epoch": 0,
        **changes,
    }


_B64: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def non_canonical(part: bytes) -> bytes | None:
    """The same bytes with an unused trailing bit set: lenient decoders accept it."""
    if len(part) % 4 not in (2, 3):
        return None
    i = _B64.index(part[-1:])
    return part[:-1] + _B64[i ^ 1 : (i ^ 1) + 1]


# --- genuine sessions ---------------------------------------------------------------------------


def genuine(k: Keys) -> Iterable[Case]:
    for seed, kind in enumerate(("x25519", "p256", "rsa")):
        pair = _pair(k.consumer[kind], seed)
        envs = pair.producer.start() + _sealed(pair, 3) + pair.producer.end("stopping")
        yield Case(f"genuine {kind}", pair).ok(*envs)
    for seed, kind in enumerate(("x25519", "p256", "rsa")):
        pair = _pair(k.consumer[kind], seed, key_mode="per-message")
        yield Case(f"per-message {kind}", pair).ok(*_sealed(pair, 2), *pair.producer.end("bye"))
    key = k.consumer["x25519"]
    pair = _pair(key, 3, rotation=Rotation(max_envelopes=2))
    envs = _sealed(pair, 7)
    # data sealed under the previous key arrives after the rotation: still opened; the older
    # key envelope after the newer one is a replay
    yield (
        Case("rotation keeps the previous key", pair)
        .ok(envs[0], envs[1], envs[3])
        .bad("replay", envs[2])
        .ok(*envs[4:])
    )
    pair = _pair(key, 4, compress=True, allow_zip=True)
    yield Case("zip when asked", pair, allow_zip=True).ok(*_sealed(pair, 2))
    pair = _pair(key, 5)
    envs = _sealed(pair, 4)
    yield Case("gaps are counted", pair).ok(envs[0], envs[1], envs[4])
    pair = _pair(key, 6)
    envs = _sealed(pair, 1)
    yield (
        Case("notices", pair)
        .ok(envs[0], notice(key.session_id, "expired", "no keepalive"))
        .bad("wrong_route", notice(k.consumer["other"].session_id, "expired", "not yours"))
        .ok(envs[1])
    )
    pair = _pair(key, 7)
    envs = _sealed(pair, 1) + pair.producer.end("done")
    after = _sealed(_pair(key, 8), 1)
    yield Case("nothing after end", pair).ok(*envs).bad("after_end", *after)


# --- bit flips in every part of every JWE ------------------------------------------------------

#: the verdict of a flip at offsets 0, 7 and -1 of each part of a session's data JWE
DATA_FLIPS: Final = {
    0: ("bad_header", "bad_header", "bad_header"),
    1: ("bad_base64", "bad_base64", "bad_base64"),  # dir: the encrypted key must be empty
    2: ("bad_tag", "bad_tag", "bad_tag"),
    3: ("bad_tag", "bad_tag", "bad_base64"),
    4: ("bad_tag", "bad_tag", "bad_base64"),
}
#: the same at offsets 0, 11 and -1 of a key envelope's JWE (ECDH-ES to an X25519 key)
KEY_FLIPS: Final = {
    0: ("bad_header", "bad_key_header", "bad_header"),
    1: ("bad_decrypt", "bad_decrypt", "bad_base64"),
    2: ("bad_decrypt", "bad_decrypt", "bad_decrypt"),
    3: ("bad_decrypt", "bad_decrypt", "bad_decrypt"),
    4: ("bad_decrypt", "bad_decrypt", "bad_base64"),
}
#: a flip at offset 3 of each part of a per-message JWE
PER_MESSAGE_FLIPS: Final = ("bad_alg", "bad_decrypt", "bad_decrypt", "bad_decrypt", "bad_decrypt")


def bit_flips(k: Keys) -> Iterable[Case]:
    key = k.consumer["x25519"]
    for part in range(5):
        pair = _pair(key, 10 + part)
        key_env, data = _sealed(pair, 1)
        body = env_map(data)["body"]
        case = Case(f"flip data part {part}", pair).ok(key_env)
        for offset, reason in zip((0, 7, -1), DATA_FLIPS[part], strict=True):
            case.bad(reason, repack(data, body=flip(body, part, offset)))
        yield case.ok(data)  # the genuine one still passes

        pair = _pair(key, 20 + part)
        key_env, _ = _sealed(pair, 1)
        body = env_map(key_env)["body"]
        case = Case(f"flip key part {part}", pair)
        for offset, reason in zip((0, 11, -1), KEY_FLIPS[part], strict=True):
            case.bad(reason, repack(key_env, body=flip(body, part, offset)))
        yield case.ok(key_env)

        pair = _pair(key, 30 + part, key_mode="per-message")
        (data,) = _sealed(pair, 1)
        flipped = repack(data, body=flip(env_map(data)["body"], part, 3))
        yield (
            Case(f"flip per-message part {part}", pair)
            .bad(PER_MESSAGE_FLIPS[part], flipped)
            .ok(data)
        )


# --- header swaps: routing fields changed in the envelope, or in the sealed header ------------

#: a routing field changed, and the consumer's verdict when the change is in the clear
#: envelope (the protected header then disagrees, or the envelope is not for this session)
ROUTING_CHANGES: Final[dict[str, tuple[Any, str]]] = {
    "cluster": ("other", "wrong_route"),
    "kind": ("end", "header_mismatch"),
    "seq": (5, "header_mismatch"),
    "session": ("B" * 43, "wrong_route"),
    "stream": ("t", "header_mismatch"),
    "ts": (1, "header_mismatch"),
}


def header_swaps(k: Keys) -> Iterable[Case]:
    key = k.consumer["x25519"]
    for n, (name, (value, reason)) in enumerate(sorted(ROUTING_CHANGES.items())):
        pair = _pair(key, 40 + n)
        key_env, data = _sealed(pair, 1)
        if name == "kind":
            tampered = repack(data, kind="end", stream="_session")
        else:
            tampered = repack(data, **{name: value})
        yield Case(f"envelope {name} changed", pair).ok(key_env).bad(reason, tampered).ok(data)
        # even with the session key (a bug or an insider), a header that disagrees with its
        # envelope is refused
        pair = _pair(key, 50 + n)
        key_env, data = _sealed(pair, 1)
        header = {**_header(env_map(data)["body"]), name: value}
        forged = _resealed(pair, data, header, encode_rows(ROWS))
        yield Case(f"header {name} changed", pair).ok(key_env).bad("header_mismatch", forged)
    # the same value as another JSON type, in the header under the real key
    for n, (name, value) in enumerate(
        (("seq", 1.0), ("ts", float(TS_BIG)), ("seq", True), ("ts", str(TS_BIG)))
    ):
        pair = _pair(key, 60 + n)
        key_env, data = _sealed(pair, 1)
        header = {**_header(env_map(data)["body"]), name: value}
        forged = _resealed(pair, data, header, encode_rows(ROWS))
        case = Case(f"header {name} as {type(value).__name__}", pair)
        yield case.ok(key_env).bad("header_mismatch", forged)
    pair = _pair(key, 64)
    key_env, data = _sealed(pair, 1)
    header = _header(env_map(data)["body"])
    header["ts"] += 1  # off by one ns above 2**53: a rounding parser would not see it
    forged = _resealed(pair, data, header, encode_rows(ROWS))
    yield Case("header ts off by one above 2**53", pair).ok(key_env).bad("header_mismatch", forged)
    pair = _pair(key, 65)
    _, data = _sealed(pair, 1)
    for n, (name, v) in enumerate((("seq", 1.0), ("ts", True), ("v", 1.0))):
        bad = msgpack.packb({**env_map(data), name: v}, use_bin_type=True)
        yield Case(f"envelope {name} as {type(v).__name__}", _pair(key, 66 + n)).bad(
            "malformed", bad
        )
    as_str = msgpack.packb({**env_map(data), "body": env_map(data)["body"].decode()})
    yield Case("envelope body as str", _pair(key, 69)).bad("malformed", as_str)


# --- replay and reorder ----------------------------------------------------------------------


def replays(k: Keys) -> Iterable[Case]:
    key = k.consumer["x25519"]
    pair = _pair(key, 70)
    key_env, d1, d2, d3 = _sealed(pair, 3)
    yield (
        Case("replay and reorder", pair)
        .ok(key_env, d1)
        .bad("replay", d1, key_env)
        .ok(d3)
        .bad("replay", d2)  # arrived after a later one: reorder
    )
    a = _pair(key, 71)
    b = _pair(key, 72)  # same consumer key, a second producer session
    _, data_a = _sealed(a, 1)
    key_b = _sealed(b, 2)[0]
    # an envelope from session a's key epoch, replayed with a higher seq into session b
    yield (
        Case("replay into another session", b)
        .ok(key_b)
        .bad("header_mismatch", repack(data_a, seq=9))
    )


# --- forged and substituted key envelopes -----------------------------------------------------


def forged_keys(k: Keys) -> Iterable[Case]:
    key = k.consumer["x25519"]
    forger = ProducerSession(
        k.identity["forger"],
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
        random=seeded(80),
    )
    key_env, data = forger.seal("s", encode_rows(ROWS))
    yield (
        Case("key signed by an unknown key", _pair(key, 81))
        .bad("untrusted_key", key_env)
        .bad("unknown_kid", data)
    )

    # the relay swaps the consumer's key for its own: it gets a genuine signed key envelope
    # for ITS key, decrypts it, and re-encrypts the signed claims to the consumer; the claims
    # name the relay's session, so the consumer refuses them
    pair = _pair(key, 82)
    relay_key = k.consumer["relay"]
    to_relay = ProducerSession(
        pair.identity,
        cluster=CLUSTER,
        session=relay_key.session_id,
        consumer_jwk=relay_key.public_jwk,
        random=seeded(83),
    )
    relay_env = decode_envelope(to_relay.seal("s", encode_rows(ROWS))[0])
    obj = jc_jwe.JWE()
    obj.deserialize(relay_env.body.decode(), relay_key._key)
    body = seal_to_key(key.public_jwk, _key_header(key), obj.plaintext)
    yield Case("key substituted by the relay", pair).bad("bad_claims", _key_env(key, body))

    # the relay sees every open before the cluster answers: its key envelope, raced ahead of
    # the genuine one, is counted and ignored (never fatal, under "fail" too); rows then flow
    pair = _pair(key, 140)
    racer = ProducerSession(
        k.identity["forger"],
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
        random=seeded(141),
    )
    racer.seq = 10**9  # refused as untrusted, not as a replay, wherever it lands
    yield (
        Case("forged key raced ahead of the genuine one", pair, policy="fail")
        .bad("untrusted_key", *racer.start())
        .ok(*_sealed(pair, 2))
    )

    pair = _pair(key, 84)
    other_key = _sealed(_pair(k.consumer["other"], 85), 1)[0]
    swapped = repack(other_key, session=key.session_id)
    yield Case("key of another session", pair).bad("header_mismatch", swapped)

    # each key envelope names a new kid: reusing one would replace the key that data in
    # flight is sealed with, under the same name
    pair = _pair(
        key,
        86,
        rotation=Rotation(max_envelopes=1),
        random=lambda n: b"\x07" * n if n == 12 else os.urandom(n),  # the kid's 12 bytes
    )
    first_key, first_data, second_key, second_data = _sealed(pair, 2)
    yield (
        Case("rotation reusing the kid", pair)
        .ok(first_key, first_data)
        .bad("reused_kid", second_key)
        .bad("bad_tag", second_data)  # sealed with the refused key: not opened by the old one
    )

    pair = _pair(key, 87)
    h = b64u_encode(json.dumps({"alg": "none", "kid": pair.identity.kid}).encode())
    jws = f"{h}.{b64u_encode(json.dumps(_claims(key)).encode())}.".encode()
    body = seal_to_key(key.public_jwk, _key_header(key), jws)
    yield Case("alg none", pair).bad("bad_sig_alg", _key_env(key, body))

    # algorithm confusion: HS256 keyed with the cluster's public key bytes
    pair = _pair(key, 88)
    hmac_key = jc_jwk.JWK(kty="oct", k=pair.identity.public_jwk["x"])
    token = jc_jws.JWS(json.dumps(_claims(key)).encode())
    token.add_signature(
        hmac_key, alg="HS256", protected=json.dumps({"alg": "HS256", "kid": pair.identity.kid})
    )
    body = seal_to_key(key.public_jwk, _key_header(key), token.serialize(compact=True).encode())
    yield Case("HS256 keyed with the public key", pair).bad("bad_sig_alg", _key_env(key, body))

    pair = _pair(key, 89)
    body = seal_dir(AESGCM(os.urandom(32)), _key_header(key, alg="dir", enc="A256GCM"), b"x.y.z")
    yield Case("dir where a key envelope is due", pair).bad("bad_key_header", _key_env(key, body))

    # claims checked exactly: a kid of 1 to 64 characters (code points), integer epoch and iat
    claim_changes: tuple[tuple[str, dict[str, Any], str | None], ...] = (
        ("kid of 64 astral characters", {"kid": "\U0001f511" * 64}, None),
        ("kid of 65 characters", {"kid": "k" * 65}, "bad_claims"),
        ("empty kid", {"kid": ""}, "bad_claims"),
        ("epoch as float", {"epoch": 0.0}, "bad_claims"),
        ("iat as str", {"iat": "1"}, "bad_claims"),
        ("k of 31 bytes", {"k": b64u_encode(os.urandom(31))}, "bad_claims"),
        ("k non-canonical", {"k": b64u_encode(os.urandom(32))[:-1] + "B"}, "bad_claims"),
    )
    for n, (name, changes, reason) in enumerate(claim_changes):
        pair = _pair(key, 90 + n)
        jws = sign_claims(pair.identity, {**_claims(key), "kid": "kid", **changes})
        env = _key_env(key, seal_to_key(key.public_jwk, _key_header(key), jws))
        case = Case(f"claims: {name}", pair)
        yield case.ok(env) if reason is None else case.bad(reason, env)


def rsa1_5(k: Keys) -> Case:
    key = k.consumer["rsa"]
    pair = _pair(key, 100)
    obj = jc_jwe.JWE(b"a.b.c", protected=json.dumps(_key_header(key, alg="RSA1_5", enc="A256GCM")))
    obj.allowed_algs = ["RSA1_5", "A256GCM"]
    obj.add_recipient(jc_jwk.JWK(**key.public_jwk | {"alg": "RSA1_5"}))
    env = _key_env(key, obj.serialize(compact=True).encode())
    key_env, data = _sealed(pair, 1)
    flipped = repack(key_env, body=flip(env_map(key_env)["body"], 1, 5))
    return (
        Case("RSA1_5 key envelope", pair)
        .bad("bad_key_header", env)
        .bad("bad_decrypt", flipped)
        .ok(key_env, data)
    )


# --- downgrades ------------------------------------------------------------------------------


def downgrades(k: Keys) -> Iterable[Case]:
    key = k.consumer["x25519"]
    # anyone can encrypt to the consumer's public key: a session consumer refuses it
    pair = _pair(key, 110)
    key_env, _ = _sealed(pair, 1)
    down = _pair(key, 111, key_mode="per-message")
    down.producer.seq = 2
    yield Case("downgrade to per-message", pair).ok(key_env).bad("bad_alg", *_sealed(down, 1))

    pair = _pair(key, 112, key_mode="per-message")
    key_env = _sealed(_pair(key, 113), 1)[0]
    yield Case("key envelope on per-message", pair).bad("unexpected_key", key_env)

    pair = _pair(key, 114)
    key_env, data = _sealed(pair, 1)
    header = {**_header(env_map(data)["body"]), "enc": "A128GCM"}
    weak = jc_jwe.JWE(encode_rows(ROWS), protected=json.dumps(header))
    weak.add_recipient(jc_jwk.JWK(kty="oct", k=b64u_encode(os.urandom(16))))
    weak_env = repack(data, body=weak.serialize(compact=True).encode())
    yield Case("weaker enc", pair).ok(key_env).bad("bad_enc", weak_env)

    pair = _pair(key, 115)
    key_env, data = _sealed(pair, 1)
    header = {**_header(env_map(data)["body"]), "crit": ["x"]}
    crit = _resealed(pair, data, header, encode_rows(ROWS))
    yield Case("crit header", pair).ok(key_env).bad("crit_header", crit)


# --- sizes, compression, plaintext ----------------------------------------------------------


def oversize(k: Keys) -> Iterable[Case]:
    key = k.consumer["x25519"]
    pair = _pair(key, 120)
    key_env = _sealed(pair, 1)[0]
    big = repack(key_env, body=b"A" * (2 * 1024 * 1024))
    yield Case("oversize envelope", pair).bad("malformed", big)

    pair = _pair(key, 121, max_plaintext=1000)
    key_env = _sealed(pair, 1)[0]
    (big,) = pair.producer.seal("s", encode_rows([{"x": "y" * 5000}]))
    yield Case("plaintext over the cap", pair, max_plaintext=1000).ok(key_env).bad("bad_sizes", big)

    pair = _pair(key, 122, compress=True)
    key_env, data = _sealed(pair, 1)
    yield Case("zip refused unless asked", pair).ok(key_env).bad("zip_not_allowed", data)

    pair = _pair(key, 123, compress=True, allow_zip=True, max_plaintext=64 * 1024)
    key_env, _ = _sealed(pair, 1)
    bomb = msgpack.packb({"rows": [{"x": "\0" * (10 * 1024 * 1024)}]})  # deflates to 10 KiB
    (env,) = pair.producer.seal("s", bomb)
    case = Case("zip bomb", pair, allow_zip=True, max_plaintext=64 * 1024)
    yield case.ok(key_env).bad("zip_bomb", env)


def plaintexts(k: Keys) -> Iterable[Case]:
    key = k.consumer["x25519"]
    pair = _pair(key, 130)
    key_env, data = _sealed(pair, 1)
    plain = [repack(data, body=msgpack.packb({"rows": ROWS})), repack(data, body=b"e30.e30.sig")]
    yield Case("plaintext body", pair).ok(key_env).bad("not_jwe", *plain)

    pair = _pair(key, 131)
    yield Case("data before any key", pair).bad("unknown_kid", _sealed(pair, 1)[1])

    # a change in padding bits decodes to identical bytes: it must still be refused
    for index in (0, 1):
        pair = _pair(key, 132 + index)
        envs = _sealed(pair, 1)
        parts = env_map(envs[index])["body"].split(b".")
        changed = []
        for n, part in enumerate(parts):
            alt = non_canonical(part)
            if alt is not None:
                joined = b".".join([*parts[:n], alt, *parts[n + 1 :]])
                changed.append(repack(envs[index], body=joined))
        assert changed, "no part with unused bits: nothing tampered"
        case = Case(f"non-canonical base64 in envelope {index}", pair).ok(*envs[:index])
        yield case.bad("bad_base64", *changed).ok(envs[index])

    # plaintexts that are not what the contract says, sealed under the real session key
    pair = _pair(key, 134)
    key_env, data = _sealed(pair, 1)
    header = _header(env_map(data)["body"])
    odd = []
    for i, plaintext in enumerate(
        [
            msgpack.packb({"rows": [msgpack.ExtType(5, b"x")]}),
            msgpack.packb({"rows": [[1, 2]]}),
            msgpack.packb({"rows": {"a": 1}}),
            msgpack.packb({1: 2}, strict_types=False),
            msgpack.packb([1]),
            b"\xc1",
        ]
    ):
        odd_header = {**header, "seq": 2 + i, "ts": TS_BIG + i}
        odd.append(_resealed(pair, repack(data, seq=2 + i, ts=TS_BIG + i), odd_header, plaintext))
    yield Case("plaintexts that are not rows", pair).ok(key_env).bad("bad_plaintext", *odd)

    pair = _pair(key, 135)
    envs = _sealed(pair, 2)
    garbage = [b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"v": 1}), envs[1][:-3]]
    yield Case("malformed payloads", pair).ok(envs[0]).bad("malformed", *garbage).ok(envs[1])


#: the matrix, in the order of the vectors; each entry makes one case or several
CASES: Final[list[Callable[[Keys], Case | Iterable[Case]]]] = [
    genuine,
    bit_flips,
    header_swaps,
    replays,
    forged_keys,
    rsa1_5,
    downgrades,
    oversize,
    plaintexts,
]


def session_cases() -> list[Case]:
    """Every case of the matrix, freshly sealed."""
    k = keys()
    out: list[Case] = []
    for make in CASES:
        made = make(k)
        out += [made] if isinstance(made, Case) else list(made)
    return out
