"""The tamper matrix: everything a hostile relay can do besides drop and delay is caught,
and always as the one opaque IntegrityError."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jwe as jc_jwe
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws

from sealstream import IntegrityError
from sealstream.crypto import (
    Batch,
    ClusterIdentity,
    ConsumerKey,
    ProducerSession,
    Rotation,
    encode_rows,
)
from sealstream.crypto._jose import seal_dir, seal_to_key
from sealstream.jwk import b64u_encode
from sealstream.wire import Envelope, decode_envelope, encode_envelope
from tests.support.helpers import CLUSTER, Pair, env_map, gen_key, make_pair, repack

ROWS = [{"path": "/secret", "n": 1}]


@pytest.fixture(scope="module")
def key() -> ConsumerKey:
    return gen_key("x25519")


@pytest.fixture
def pair(key: ConsumerKey) -> Pair:
    return make_pair(key)


def sealed(pair: Pair, n: int = 2) -> list[bytes]:
    """[key, data, data, ...] envelopes of one session."""
    return [e for i in range(n) for e in pair.producer.seal("s", encode_rows([{"i": i}]))]


def rejected(pair: Pair, payload: bytes, reason: str | None = None) -> None:
    before = pair.consumer.rejected.copy()
    if reason == "untrusted_key":  # anyone's key envelope: counted and ignored, never fatal
        assert pair.consumer.accept(payload) is None
    else:
        with pytest.raises(IntegrityError) as err:
            pair.consumer.accept(payload)
        assert type(err.value) is IntegrityError  # the one opaque class, not a subclass
        assert str(err.value) == "envelope rejected"
        assert err.value.__cause__ is None
    delta = pair.consumer.rejected - before
    assert sum(delta.values()) == 1
    if reason is not None:
        assert reason in delta, delta


def flip(body: bytes, part: int, offset: int = 0) -> bytes:
    parts = body.split(b".")
    p = bytearray(parts[part])
    if not p:
        parts[part] = b"A"
    else:
        i = offset % len(p)
        p[i] = ord("B") if p[i] != ord("B") else ord("C")
        parts[part] = bytes(p)
    return b".".join(parts)


# --- bit flips in every part of every JWE ----------------------------------------------------


@pytest.mark.parametrize("part", range(5))
def test_flip_in_data_jwe(pair: Pair, part: int) -> None:
    key_env, data = sealed(pair, 1)
    pair.consumer.accept(key_env)
    body = env_map(data)["body"]
    for offset in (0, 7, -1):
        rejected(pair, repack(data, body=flip(body, part, offset)))
    assert isinstance(pair.consumer.accept(data), Batch)  # the genuine one still passes


@pytest.mark.parametrize("part", range(5))
def test_flip_in_key_jwe(pair: Pair, part: int) -> None:
    key_env, _ = sealed(pair, 1)
    body = env_map(key_env)["body"]
    for offset in (0, 11, -1):
        rejected(pair, repack(key_env, body=flip(body, part, offset)))
    assert pair.consumer.accept(key_env) is None


@pytest.mark.parametrize("part", range(5))
def test_flip_in_per_message_jwe(key: ConsumerKey, part: int) -> None:
    pair = make_pair(key, key_mode="per-message")
    (data,) = sealed(pair, 1)
    body = env_map(data)["body"]
    rejected(pair, repack(data, body=flip(body, part, 3)))


# --- routing fields ----------------------------------------------------------------------------

OTHER_SESSION = "B" * 43
CHANGES: dict[str, Any] = {
    "cluster": "other",
    "session": OTHER_SESSION,
    "stream": "t",
    "seq": 5,
    "ts": 1,
    "kind": "end",
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_envelope_routing_field_changed(pair: Pair, field: str) -> None:
    key_env, data = sealed(pair, 1)
    pair.consumer.accept(key_env)
    value = CHANGES[field]
    if field == "kind":
        tampered = repack(data, kind="end", stream="_session")
    else:
        tampered = repack(data, **{field: value})
    rejected(pair, tampered)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_header_routing_field_changed_under_the_real_key(pair: Pair, field: str) -> None:
    """Even with the session key (a bug or an insider), a header that disagrees with its
    envelope is refused."""
    key_env, data = sealed(pair, 1)
    pair.consumer.accept(key_env)
    m = env_map(data)
    header = json.loads(__import__("base64").urlsafe_b64decode(m["body"].split(b".")[0] + b"=="))
    header[field] = CHANGES[field]
    cipher = pair.producer._aead
    assert cipher is not None
    rejected(
        pair, repack(data, body=seal_dir(cipher, header, encode_rows(ROWS))), "header_mismatch"
    )


def test_replay_and_reorder(pair: Pair) -> None:
    key_env, d1, d2, d3 = sealed(pair, 3)
    pair.consumer.accept(key_env)
    pair.consumer.accept(d1)
    rejected(pair, d1, "replay")
    rejected(pair, key_env, "replay")
    assert isinstance(pair.consumer.accept(d3), Batch)
    rejected(pair, d2, "replay")  # arrived after a later one: reorder
    assert pair.consumer.lost == 1


def test_replay_into_another_session(key: ConsumerKey) -> None:
    a = make_pair(key)
    b = make_pair(key, identity=a.identity)  # same consumer key, a second producer session
    _, data_a = sealed(a, 1)
    key_b = sealed(b, 2)[0]
    b.consumer.accept(key_b)
    # an envelope from session a's key epoch, replayed with a higher seq into session b
    rejected(b, repack(data_a, seq=9))


# --- forged and substituted key envelopes ---------------------------------------------------


def test_key_envelope_signed_by_unknown_key(key: ConsumerKey) -> None:
    pair = make_pair(key)
    forger = ProducerSession(
        ClusterIdentity.generate(),
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
    )
    key_env, data = sealed_from(forger)
    rejected(pair, key_env, "untrusted_key")
    rejected(pair, data, "unknown_kid")


def sealed_from(producer: ProducerSession) -> list[bytes]:
    return producer.seal("s", encode_rows(ROWS))


def test_key_substitution_by_the_relay(key: ConsumerKey) -> None:
    """The relay swaps the consumer's key for its own: it gets a genuine signed key envelope
    for ITS key, decrypts it, and re-encrypts the signed claims to the consumer. The claims
    name the relay's session, so the consumer refuses them."""
    pair = make_pair(key)
    relay_key = gen_key("x25519")
    to_relay = ProducerSession(
        pair.identity,
        cluster=CLUSTER,
        session=relay_key.session_id,
        consumer_jwk=relay_key.public_jwk,
    )
    relay_key_env = decode_envelope(sealed_from(to_relay)[0])
    obj = jc_jwe.JWE()
    obj.deserialize(relay_key_env.body.decode(), relay_key._key)
    signed_claims = obj.plaintext  # the relay now holds the session key of ITS session
    header = {
        "kid": key.session_id,
        "cty": "JWT",
        "cluster": CLUSTER,
        "session": key.session_id,
        "stream": "_session",
        "seq": 0,
        "kind": "key",
        "ts": 1,
    }
    body = seal_to_key(key.public_jwk, header, signed_claims)
    forged = encode_envelope(Envelope("key", CLUSTER, key.session_id, "_session", 0, 1, body))
    rejected(pair, forged, "bad_claims")


def test_key_envelope_of_another_session(key: ConsumerKey) -> None:
    pair = make_pair(key)
    other = make_pair(gen_key("x25519"), identity=pair.identity)
    other_key_env = sealed(other, 1)[0]
    rejected(pair, repack(other_key_env, session=key.session_id))


def test_a_rotation_that_reuses_the_kid_is_refused(key: ConsumerKey) -> None:
    """Each key envelope names a new ``kid``: reusing one would replace the key data in flight
    is still sealed with, under the same name."""
    pair = make_pair(
        key,
        rotation=Rotation(max_envelopes=1),
        random=lambda n: b"\x07" * n if n == 12 else os.urandom(n),  # the kid's 12 bytes
    )
    first_key, first_data, second_key, second_data = sealed(pair, 2)
    assert pair.consumer.accept(first_key) is None
    assert isinstance(pair.consumer.accept(first_data), Batch)
    rejected(pair, second_key, "reused_kid")
    rejected(pair, second_data, "bad_tag")  # sealed with the refused key: not opened by the old


def _key_envelope_with(
    key: ConsumerKey, jws: bytes, *, alg_header: dict[str, Any] | None = None
) -> bytes:
    header = {
        "kid": key.session_id,
        "cty": "JWT",
        "cluster": CLUSTER,
        "session": key.session_id,
        "stream": "_session",
        "seq": 0,
        "kind": "key",
        "ts": 1,
        **(alg_header or {}),
    }
    body = seal_to_key(key.public_jwk, header, jws)
    return encode_envelope(Envelope("key", CLUSTER, key.session_id, "_session", 0, 1, body))


def _claims(key: ConsumerKey) -> bytes:
    return json.dumps(
        {
            "cluster": CLUSTER,
            "session": key.session_id,
            "kid": "x",
            "k": b64u_encode(os.urandom(32)),
            "iat": 1,
            "epoch": 0,
        }
    ).encode()


def test_unsigned_key_envelope_alg_none(pair: Pair, key: ConsumerKey) -> None:
    h = b64u_encode(json.dumps({"alg": "none", "kid": pair.identity.kid}).encode())
    jws = f"{h}.{b64u_encode(_claims(key))}.".encode()
    rejected(pair, _key_envelope_with(key, jws), "bad_sig_alg")


def test_key_envelope_signed_with_hmac_of_the_public_key(pair: Pair, key: ConsumerKey) -> None:
    """Algorithm confusion: HS256 keyed with the cluster's public key bytes."""
    hmac_key = jc_jwk.JWK(kty="oct", k=pair.identity.public_jwk["x"])
    token = jc_jws.JWS(_claims(key))
    token.add_signature(
        hmac_key, alg="HS256", protected=json.dumps({"alg": "HS256", "kid": pair.identity.kid})
    )
    rejected(pair, _key_envelope_with(key, token.serialize(compact=True).encode()), "bad_sig_alg")


def test_dir_where_a_key_envelope_is_due(pair: Pair, key: ConsumerKey) -> None:
    header = {
        "alg": "dir",
        "enc": "A256GCM",
        "kid": key.session_id,
        "cty": "JWT",
        "cluster": CLUSTER,
        "session": key.session_id,
        "stream": "_session",
        "seq": 0,
        "kind": "key",
        "ts": 1,
    }
    body = seal_dir(AESGCM(os.urandom(32)), header, b"x.y.z")
    rejected(
        pair,
        encode_envelope(Envelope("key", CLUSTER, key.session_id, "_session", 0, 1, body)),
        "bad_key_header",
    )


# --- downgrades -------------------------------------------------------------------------------


def test_per_message_data_on_a_session_mode_consumer_is_a_downgrade(key: ConsumerKey) -> None:
    """Anyone can encrypt to the consumer's public key; a session consumer refuses it."""
    pair = make_pair(key)
    key_env, _ = sealed(pair, 1)
    pair.consumer.accept(key_env)
    downgrade = make_pair(key, key_mode="per-message")
    downgrade.producer.seq = 2
    (data,) = sealed(downgrade, 1)
    rejected(pair, data, "bad_alg")


def test_key_envelope_on_a_per_message_consumer(key: ConsumerKey) -> None:
    pair = make_pair(key, key_mode="per-message")
    session_pair = make_pair(key)
    rejected(pair, sealed(session_pair, 1)[0], "unexpected_key")


def test_weaker_enc_is_refused(pair: Pair, key: ConsumerKey) -> None:
    key_env, data = sealed(pair, 1)
    pair.consumer.accept(key_env)
    m = env_map(data)
    header = json.loads(__import__("base64").urlsafe_b64decode(m["body"].split(b".")[0] + b"=="))
    header["enc"] = "A128GCM"
    weak = jc_jwe.JWE(encode_rows(ROWS), protected=json.dumps(header))
    weak.add_recipient(jc_jwk.JWK(kty="oct", k=b64u_encode(os.urandom(16))))
    rejected(pair, repack(data, body=weak.serialize(compact=True).encode()), "bad_enc")


def test_rsa1_5_key_envelope_is_refused() -> None:
    key = gen_key("rsa")
    pair = make_pair(key)
    header = {
        "alg": "RSA1_5",
        "enc": "A256GCM",
        "kid": key.session_id,
        "cty": "JWT",
        "cluster": CLUSTER,
        "session": key.session_id,
        "stream": "_session",
        "seq": 0,
        "kind": "key",
        "ts": 1,
    }
    obj = jc_jwe.JWE(b"a.b.c", protected=json.dumps(header))
    obj.allowed_algs = ["RSA1_5", "A256GCM"]
    obj.add_recipient(jc_jwk.JWK(**key.public_jwk | {"alg": "RSA1_5"}))
    env = encode_envelope(
        Envelope(
            "key", CLUSTER, key.session_id, "_session", 0, 1, obj.serialize(compact=True).encode()
        )
    )
    rejected(pair, env, "bad_key_header")


# --- sizes, compression, plaintext -------------------------------------------------------------


def test_oversize_envelope(key: ConsumerKey) -> None:
    pair = make_pair(key)
    key_env = sealed(pair, 1)[0]
    rejected(pair, repack(key_env, body=b"A" * (2 * 1024 * 1024)), "malformed")


def test_plaintext_over_the_cap(key: ConsumerKey) -> None:
    pair = make_pair(key, max_plaintext=1000)
    key_env = sealed(pair, 1)[0]
    pair.consumer.accept(key_env)
    (big,) = pair.producer.seal("s", encode_rows([{"x": "y" * 5000}]))
    rejected(pair, big, "bad_sizes")


def test_zip_refused_unless_asked_for(key: ConsumerKey) -> None:
    pair = make_pair(key, compress=True, allow_zip=False)
    key_env, data = sealed(pair, 1)
    pair.consumer.accept(key_env)
    rejected(pair, data, "zip_not_allowed")


def test_zip_bomb_is_capped(key: ConsumerKey) -> None:
    pair = make_pair(key, compress=True, allow_zip=True, max_plaintext=64 * 1024)
    key_env, _ = sealed(pair, 1)
    pair.consumer.accept(key_env)
    bomb = msgpack.packb({"rows": [{"x": "\0" * (10 * 1024 * 1024)}]})
    assert len(zlib.compress(bomb)) < 64 * 1024  # small on the wire
    (env,) = pair.producer.seal("s", bomb)
    rejected(pair, env, "zip_bomb")


def test_plaintext_body_is_refused(pair: Pair) -> None:
    key_env, data = sealed(pair, 1)
    pair.consumer.accept(key_env)
    rejected(pair, repack(data, body=msgpack.packb({"rows": ROWS})), "not_jwe")
    rejected(pair, repack(data, body=b"e30.e30.sig"), "not_jwe")


def test_data_before_any_key(pair: Pair) -> None:
    _, data = sealed(pair, 1)
    rejected(pair, data, "unknown_kid")


def test_discard_policy_counts_and_continues(key: ConsumerKey) -> None:
    pair = make_pair(key, policy="discard")
    key_env, d1, d2 = sealed(pair, 2)
    pair.consumer.accept(key_env)
    assert pair.consumer.accept(repack(d1, body=flip(env_map(d1)["body"], 3))) is None
    assert isinstance(pair.consumer.accept(d2), Batch)
    assert pair.consumer.rejected["bad_tag"] == 1


# --- property: any single-byte change is detected --------------------------------------------


@pytest.fixture(scope="module")
def stream(key: ConsumerKey) -> tuple[Pair, list[bytes]]:
    pair = make_pair(key)
    return pair, sealed(pair, 2)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_single_byte_change_is_rejected(
    key: ConsumerKey, stream: tuple[Pair, list[bytes]], data: st.DataObject
) -> None:
    pair, envs = stream
    index = data.draw(st.integers(0, len(envs) - 1), label="envelope")
    payload = envs[index]
    pos = data.draw(st.integers(0, len(payload) - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != payload[pos]), label="byte")
    tampered = payload[:pos] + bytes([byte]) + payload[pos + 1 :]
    fresh = make_pair(key, identity=pair.identity)
    for earlier in envs[:index]:
        fresh.consumer.accept(earlier)
    with pytest.raises(IntegrityError):
        fresh.consumer.accept(tampered)


_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _non_canonical(part: bytes) -> bytes | None:
    """The same bytes with an unused trailing bit set: lenient decoders accept it."""
    if len(part) % 4 not in (2, 3):
        return None
    i = _B64.index(part[-1:])
    return part[:-1] + _B64[i ^ 1 : (i ^ 1) + 1]


@pytest.mark.parametrize("index", [0, 1])
def test_non_canonical_base64_is_rejected(key: ConsumerKey, index: int) -> None:
    """A change in padding bits decodes to identical bytes; it must still be refused."""
    pair = make_pair(key)
    envs = sealed(pair, 1)
    if index:
        pair.consumer.accept(envs[0])
    body = env_map(envs[index])["body"]
    parts = body.split(b".")
    tried = 0
    for n, part in enumerate(parts):
        alt = _non_canonical(part)
        if alt is None:
            continue
        tried += 1
        changed = b".".join([*parts[:n], alt, *parts[n + 1 :]])
        rejected(pair, repack(envs[index], body=changed))
    assert tried >= 1
