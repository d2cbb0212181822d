"""Session crypto: round trips for every key type and mode, rotation, trust, identity files,
and interoperability with an independent JOSE implementation (joserfc)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc import jwe as jf_jwe
from joserfc import jws as jf_jws
from joserfc.jwk import OctKey, import_key
from jwcrypto import jwe as jc_jwe
from jwcrypto import jwk as jc_jwk

from sealstream import TrustError, WireError, check_public_jwk, thumbprint
from sealstream.control import decode_open
from sealstream.crypto import (
    Batch,
    ClusterIdentity,
    ConsumerKey,
    End,
    ProducerSession,
    Rotation,
    TrustStore,
    encode_rows,
)
from sealstream.crypto._jose import open_dir, parse_compact, seal_dir
from sealstream.jwk import b64u_decode, b64u_encode
from sealstream.wire import decode_envelope
from tests.support.helpers import CLUSTER, gen_key, make_pair

ROWS = [{"time_": 1, "path": "/a", "status": 200, "latency": 1.5, "ok": True, "none": None}]
MODES = ["session", "per-message"]
KINDS = ["x25519", "p256", "rsa"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: str, mode: str) -> None:
    pair = make_pair(gen_key(kind), key_mode=mode)  # type: ignore[arg-type]
    got: list[object] = []
    for i in range(3):
        for env in pair.producer.seal("http_events", encode_rows([{**ROWS[0], "i": i}])):
            got.append(pair.consumer.accept(env))
    for env in pair.producer.end("producer stopping"):
        got.append(pair.consumer.accept(env))
    batches = [g for g in got if isinstance(g, Batch)]
    assert [b.rows[0]["i"] for b in batches] == [0, 1, 2]
    assert batches[0].rows[0] == {**ROWS[0], "i": 0}
    assert isinstance(got[-1], End)
    assert got[-1].reason == "producer stopping"
    assert pair.consumer.rejected == {}
    assert pair.consumer.lost == 0
    # a key envelope first in session mode only
    assert (got[0] is None) == (mode == "session")


def test_default_rsa_4096_round_trip() -> None:
    key = ConsumerKey.generate()
    assert key.kind == "rsa"
    assert key.alg == "RSA-OAEP-256"
    n_bits = int.from_bytes(b64u_decode(key.public_jwk["n"]), "big").bit_length()
    assert n_bits == 4096
    pair = make_pair(key)
    out = [pair.consumer.accept(e) for e in pair.producer.seal("s", encode_rows(ROWS))]
    assert isinstance(out[-1], Batch)
    assert out[-1].rows == ROWS


async def test_generation_runs_off_the_event_loop() -> None:
    key = await ConsumerKey.agenerate("x25519")
    assert key.session_id == thumbprint(key.public_jwk)
    assert "d" not in key.public_jwk
    assert key._key.export_private(as_dict=True)["d"] not in repr(key)


def test_compression_when_asked() -> None:
    pair = make_pair(gen_key("x25519"), compress=True, allow_zip=True)
    rows = [{"path": "/api/v1/items", "n": i} for i in range(500)]
    envs = pair.producer.seal("s", encode_rows(rows))
    assert parse_compact(decode_envelope(envs[-1]).body).header["zip"] == "DEF"
    assert [pair.consumer.accept(e) for e in envs][-1] == Batch(
        "s", 1, decode_envelope(envs[-1]).ts, rows
    )


def test_rotation_after_n_envelopes_keeps_previous_key_for_in_flight_data() -> None:
    pair = make_pair(gen_key("x25519"), rotation=Rotation(max_envelopes=2))
    envs = [e for i in range(5) for e in pair.producer.seal("s", encode_rows([{"i": i}]))]
    kinds = [decode_envelope(e).kind for e in envs]
    assert kinds == ["key", "data", "data", "key", "data", "data", "key", "data"]
    assert pair.producer.epoch == 2
    # deliver the key of epoch 1 before the last data of epoch 0 (in flight): still accepted
    order = [0, 1, 3, 2, 4, 5, 6, 7]
    results: list[object] = []
    for i in order:
        try:
            results.append(pair.consumer.accept(envs[i]))
        except Exception as exc:
            results.append(exc)
    # seq 2 arrives after seq 3: rejected as reorder; everything else accepted
    assert pair.consumer.rejected == {"replay": 1}
    assert sum(isinstance(r, Batch) for r in results) == 4
    assert pair.consumer.epoch == 2


def test_rotation_after_time() -> None:
    now = [10**18]
    pair = make_pair(gen_key("x25519"), rotation=Rotation(max_age_s=60), clock=lambda: now[0])
    first = pair.producer.seal("s", encode_rows(ROWS))
    now[0] += 59 * 10**9
    second = pair.producer.seal("s", encode_rows(ROWS))
    now[0] += 2 * 10**9
    third = pair.producer.seal("s", encode_rows(ROWS))
    assert (len(first), len(second), len(third)) == (2, 1, 2)
    for e in first + second + third:
        pair.consumer.accept(e)
    assert pair.consumer.epoch == 1


def test_gap_is_reported_not_rejected() -> None:
    pair = make_pair(gen_key("x25519"))
    envs = [e for i in range(4) for e in pair.producer.seal("s", encode_rows([{"i": i}]))]
    pair.consumer.accept(envs[0])
    pair.consumer.accept(envs[1])
    batch = pair.consumer.accept(envs[4])
    assert isinstance(batch, Batch)
    assert batch.lost_before == 2
    assert (pair.consumer.gaps, pair.consumer.lost) == (1, 2)


def test_producer_refuses_a_session_id_that_is_not_the_key_thumbprint() -> None:
    key, other = gen_key("x25519"), gen_key("x25519")
    with pytest.raises(WireError):
        ProducerSession(
            ClusterIdentity.generate(),
            cluster=CLUSTER,
            session=other.session_id,
            consumer_jwk=key.public_jwk,
        )


def test_nothing_sealed_after_end() -> None:
    pair = make_pair(gen_key("x25519"))
    pair.producer.end("bye")
    with pytest.raises(ValueError):
        pair.producer.seal("s", encode_rows(ROWS))


# --- received JWK validation ----------------------------------------------------------------


def test_public_jwk_validation() -> None:
    good = gen_key("p256").public_jwk
    assert check_public_jwk(good)["alg"] == "ECDH-ES+A256KW"
    private = jc_jwk.JWK.generate(kty="OKP", crv="X25519").export_private(as_dict=True)
    small_rsa = jc_jwk.JWK.generate(kty="RSA", size=1024).export_public(as_dict=True)
    ed = ClusterIdentity.generate().public_jwk
    p384 = jc_jwk.JWK.generate(kty="EC", crv="P-384").export_public(as_dict=True)
    cases = {
        "private_jwk": private,
        "weak_key": small_rsa,
        "bad_curve": ed,
        "bad_alg": {**good, "alg": "RSA1_5"},
        "bad_jwk": {"kty": "oct"},
    }
    for reason, jwk in cases.items():
        with pytest.raises(WireError) as err:
            check_public_jwk(jwk)
        assert err.value.reason == reason
    with pytest.raises(WireError):
        check_public_jwk(p384)
    with pytest.raises(WireError) as err:
        check_public_jwk({**good, "x": 1})
    assert err.value.reason == "bad_jwk"


def test_a_webcrypto_export_is_accepted_and_normalised() -> None:
    """``crypto.subtle.exportKey("jwk", publicKey)`` adds ``ext`` (a bool) and ``key_ops`` (a
    list): a browser client must be able to send its key as exported. Only the key's own
    members and ``alg`` go on; the thumbprint is the same."""
    key = gen_key("p256")
    exported = {**key.public_jwk, "ext": True, "key_ops": [], "kid": "browser"}
    checked = check_public_jwk(exported)
    assert checked == check_public_jwk(key.public_jwk)
    assert thumbprint(exported) == key.session_id
    req = decode_open({"v": 1, "token": "t", "cluster": "c1", "streams": ["s"], "jwk": exported})
    assert req.jwk == exported


def test_thumbprint_matches_jwcrypto() -> None:
    for kind in KINDS:
        key = gen_key(kind)  # type: ignore[arg-type]
        assert key.session_id == jc_jwk.JWK(**key.public_jwk).thumbprint()
        assert len(key.session_id) == 43


def test_thumbprint_rfc7638_example() -> None:
    # RFC 7638 section 3.1
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1"
            "L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4"
            "QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbO"
            "pbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csF"
            "Cur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# --- identity and trust ---------------------------------------------------------------------


def test_identity_file_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "cluster.jwk"
    first = ClusterIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = ClusterIdentity.load_or_create(path)
    assert again.kid == first.kid
    assert "d" not in first.public_jwk
    assert first.kid not in repr(json.loads(path.read_text()))  # file holds the JWK, not a kid
    os.chmod(path, 0o644)
    with pytest.raises(TrustError):
        ClusterIdentity.load(path)


def test_trust_store_file_round_trip(tmp_path: Path) -> None:
    identity = ClusterIdentity.generate()
    path = tmp_path / "trust.json"
    store = TrustStore.load(path)
    assert not store.knows(CLUSTER)
    kid = store.add(CLUSTER, identity.public_jwk)
    assert kid == identity.kid
    reloaded = TrustStore.load(path)
    assert reloaded.get(CLUSTER, kid) == identity.public_jwk
    path.write_text("{not json")
    with pytest.raises(TrustError):
        TrustStore.load(path)
    with pytest.raises(TrustError):
        TrustStore({CLUSTER: [{"kty": "OKP", "crv": "X25519", "x": identity.public_jwk["x"]}]})


def test_trust_on_first_use_is_explicit(tmp_path: Path) -> None:
    key = gen_key("x25519")
    pair = make_pair(key)
    envs = pair.producer.seal("s", encode_rows(ROWS))
    from sealstream.crypto import ConsumerSession

    strict = ConsumerSession(key, cluster=CLUSTER, trust=TrustStore(path=tmp_path / "a.json"))
    # policy "fail": an unpinned signer is still only counted (anyone can sign a key envelope)
    assert strict.accept(envs[0]) is None
    assert strict.rejected == {"untrusted_key": 1}
    assert not strict.keyed
    assert not (tmp_path / "a.json").exists()  # nothing pinned
    tofu_store = TrustStore(path=tmp_path / "b.json", tofu=True)
    tofu = ConsumerSession(key, cluster=CLUSTER, trust=tofu_store)
    assert tofu.accept(envs[0]) is None
    assert isinstance(tofu.accept(envs[1]), Batch)
    assert TrustStore.load(tmp_path / "b.json").get(CLUSTER, pair.identity.kid) is not None


# --- interoperability with joserfc and jwcrypto ---------------------------------------------


def _private(key: ConsumerKey) -> Any:
    return import_key(key._key.export_private(as_dict=True))


def _lenient_jwe(algs: list[str]) -> jf_jwe.JWERegistry:
    return jf_jwe.JWERegistry(algorithms=algs, strict_check_header=False)


@pytest.mark.parametrize("kind", KINDS)
def test_joserfc_decrypts_our_jwes_and_verifies_our_jws(kind: str) -> None:
    key = gen_key(kind)  # type: ignore[arg-type]
    pair = make_pair(key)
    key_env, data_env = (decode_envelope(e) for e in pair.producer.seal("s", encode_rows(ROWS)))
    outer = jf_jwe.decrypt_compact(
        key_env.body, _private(key), registry=_lenient_jwe([key.alg, "A256GCM"])
    )
    assert outer.protected["seq"] == 0
    assert outer.plaintext is not None
    signed = jf_jws.deserialize_compact(
        outer.plaintext,
        import_key(pair.identity.public_jwk),
        registry=jf_jws.JWSRegistry(algorithms=["Ed25519"], strict_check_header=False),
    )
    claims = json.loads(signed.payload)
    assert (claims["cluster"], claims["session"]) == (CLUSTER, key.session_id)
    data = jf_jwe.decrypt_compact(
        data_env.body,
        OctKey.import_key(b64u_decode(claims["k"])),
        registry=_lenient_jwe(["dir", "A256GCM"]),
    )
    assert data.protected["kid"] == claims["kid"]
    import msgpack

    assert data.plaintext is not None
    assert msgpack.unpackb(data.plaintext) == {"rows": ROWS}


@pytest.mark.parametrize("kind", KINDS)
def test_joserfc_decrypts_per_message_jwes(kind: str) -> None:
    key = gen_key(kind)  # type: ignore[arg-type]
    pair = make_pair(key, key_mode="per-message")
    (env,) = pair.producer.seal("s", encode_rows(ROWS))
    out = jf_jwe.decrypt_compact(
        decode_envelope(env).body, _private(key), registry=_lenient_jwe([key.alg, "A256GCM"])
    )
    assert out.protected["alg"] == key.alg


def test_we_open_dir_jwes_made_by_joserfc_and_jwcrypto() -> None:
    secret = os.urandom(32)
    header = {"alg": "dir", "enc": "A256GCM", "kid": "k1", "seq": 7}
    theirs = [
        jf_jwe.encrypt_compact(
            header, b"hello", OctKey.import_key(secret), registry=_lenient_jwe(["dir", "A256GCM"])
        ).encode(),
    ]
    jc = jc_jwe.JWE(b"hello", protected=json.dumps(header))
    jc.add_recipient(jc_jwk.JWK(kty="oct", k=b64u_encode(secret)))
    theirs.append(jc.serialize(compact=True).encode())
    for token in theirs:
        parsed = parse_compact(token)
        assert parsed.header["seq"] == 7
        assert open_dir(AESGCM(secret), parsed, max_plaintext=100) == b"hello"


def test_seal_dir_known_answer_and_cross_check() -> None:
    secret = bytes(range(32))
    nonce = bytes(12)
    header = {"alg": "dir", "enc": "A256GCM", "kid": "k"}
    token = seal_dir(AESGCM(secret), header, b"sealstream", nonce=nonce)
    protected = b64u_encode(b'{"alg":"dir","enc":"A256GCM","kid":"k"}').encode()
    sealed = AESGCM(secret).encrypt(nonce, b"sealstream", protected)
    expected = b".".join(
        [
            protected,
            b"",
            b64u_encode(nonce).encode(),
            b64u_encode(sealed[:-16]).encode(),
            b64u_encode(sealed[-16:]).encode(),
        ]
    )
    assert token == expected
    jc = jc_jwe.JWE()
    jc.deserialize(token.decode(), jc_jwk.JWK(kty="oct", k=b64u_encode(secret)))
    assert jc.plaintext == b"sealstream"
    jf = jf_jwe.decrypt_compact(token, OctKey.import_key(secret))
    assert jf.plaintext == b"sealstream"


def test_we_open_a_key_envelope_encrypted_by_joserfc() -> None:
    """A second implementation builds a whole key envelope + data; our consumer accepts it."""
    import msgpack

    from sealstream.wire import Envelope, encode_envelope

    key = gen_key("x25519")
    pair = make_pair(key)
    identity = pair.identity
    secret = os.urandom(32)
    claims = {
        "cluster": CLUSTER,
        "session": key.session_id,
        "kid": "ext",
        "k": b64u_encode(secret),
        "iat": 1,
        "epoch": 0,
    }
    jws_token = jf_jws.serialize_compact(
        {"alg": "Ed25519", "kid": identity.kid},
        json.dumps(claims).encode(),
        import_key(identity._key.export_private(as_dict=True)),
        algorithms=["Ed25519"],
    )
    routing = {
        "cluster": CLUSTER,
        "session": key.session_id,
        "stream": "_session",
        "seq": 0,
        "kind": "key",
        "ts": 5,
    }
    body = jf_jwe.encrypt_compact(
        {"alg": key.alg, "enc": "A256GCM", "kid": key.session_id, "cty": "JWT", **routing},
        jws_token.encode(),
        import_key(key.public_jwk),
        registry=_lenient_jwe([key.alg, "A256GCM"]),
    )
    env = encode_envelope(Envelope("key", CLUSTER, key.session_id, "_session", 0, 5, body.encode()))
    assert pair.consumer.accept(env) is None
    data_routing = {**routing, "stream": "s", "seq": 1, "kind": "data"}
    data = jf_jwe.encrypt_compact(
        {"alg": "dir", "enc": "A256GCM", "kid": "ext", **data_routing},
        msgpack.packb({"rows": ROWS}),
        OctKey.import_key(secret),
        registry=_lenient_jwe(["dir", "A256GCM"]),
    )
    env2 = encode_envelope(Envelope("data", CLUSTER, key.session_id, "s", 1, 5, data.encode()))
    batch = pair.consumer.accept(env2)
    assert isinstance(batch, Batch)
    assert batch.rows == ROWS
