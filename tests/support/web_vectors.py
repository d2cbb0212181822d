"""Cross-language vectors for the browser consumer (``consumers/web``): sessions sealed by the
real :class:`ProducerSession` for every key kind, and the tamper matrix of ``test_tamper.py``.

The Python :class:`ConsumerSession` is the oracle: each step records what it made of the
payload (a batch and its rows, an installed key, an end, a notice, or a rejection and its
reason), and ``node --test consumers/web/test/`` asserts the JavaScript session does the same.
The consumer keys are made here and their PRIVATE JWKs written to the file: a test fixture,
never shipped. Run: ``python -m tests.support.web_vectors OUT.json``.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwe as jc_jwe
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws

from sealstream import configure_logging
from sealstream.crypto import (
    Batch,
    ClusterIdentity,
    ConsumerKey,
    End,
    ProducerSession,
    Rotation,
    encode_rows,
)
from sealstream.crypto._jose import seal_dir, seal_to_key, sign_claims
from sealstream.jwk import b64u_encode
from sealstream.wire import Envelope, Notice, decode_envelope, encode_envelope, notice
from tests.support.helpers import CLUSTER, Pair, env_map, gen_key, make_pair, repack

__all__ = ["build_vectors", "main"]

TS_BIG = 1_790_000_000_123_456_789  # above 2**53: JSON.parse would round it
ROWS: list[dict[str, Any]] = [{"path": "/secret", "n": 1, "big": 2**60 + 1, "f": 1.5}]


def _clock(start: int = TS_BIG) -> Callable[[], int]:
    t = [start]

    def now() -> int:
        t[0] += 1_000_001
        return t[0]

    return now


def _plain(value: Any) -> Any:
    """Rows as JSON the JS side compares with: ints as decimal strings (exact), bin as
    base64."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, bytes):
        return {"bin": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(type(value))


class Case:
    """One consumer session fed a list of payloads; each step records the oracle's verdict."""

    def __init__(self, name: str, pair: Pair, **options: Any) -> None:
        self.name = name
        self.pair = pair
        self.options = options
        self.steps: list[dict[str, Any]] = []

    def feed(self, payloads: Iterable[bytes]) -> Case:
        consumer = self.pair.consumer
        for payload in payloads:
            before = consumer.rejected.copy()
            result = consumer.accept(payload)
            step: dict[str, Any] = {"payload": base64.b64encode(payload).decode()}
            delta = consumer.rejected - before
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
            elif isinstance(result, Notice):
                step.update(expect="notice", code=result.code)
            else:
                step.update(expect="key", epoch=str(consumer.epoch))
            self.steps.append(step)
        return self

    def to_json(self) -> dict[str, Any]:
        key = self.pair.key
        consumer = self.pair.consumer
        return {
            "name": self.name,
            "cluster": CLUSTER,
            "key": {
                "kind": key.kind,
                "public_jwk": key.public_jwk,
                "private_jwk": key._key.export_private(as_dict=True),
                "session_id": key.session_id,
            },
            "trust": {CLUSTER: [self.pair.identity.public_jwk]},
            "options": {
                "key_mode": consumer.key_mode,
                "allow_zip": self.options.get("allow_zip", False),
                "max_plaintext": self.options.get("max_plaintext", 16 * 1024 * 1024),
                "policy": consumer.policy,
            },
            "steps": self.steps,
            "final": {
                "accepted": consumer.accepted,
                "gaps": consumer.gaps,
                "lost": str(consumer.lost),
                "epoch": str(consumer.epoch),
                "ended": consumer.ended,
                "rejected": dict(consumer.rejected),
            },
        }


def _pair(key: ConsumerKey, **options: Any) -> Pair:
    options.setdefault("clock", _clock())
    return make_pair(key, policy="discard", **options)


def _sealed(pair: Pair, n: int = 2, stream: str = "s") -> list[bytes]:
    return [e for i in range(n) for e in pair.producer.seal(stream, encode_rows([*ROWS, {"i": i}]))]


def _flip(body: bytes, part: int, offset: int = 0) -> bytes:
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


def _claims(key: ConsumerKey) -> bytes:
    claims = {
        "cluster": CLUSTER,
        "session": key.session_id,
        "kid": "x",
        "k": b64u_encode(os.urandom(32)),
        "iat": 1,
        "epoch": 0,
    }
    return json.dumps(claims).encode()


def _non_canonical(part: bytes) -> bytes | None:
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(part) % 4 not in (2, 3):
        return None
    i = alphabet.index(part[-1:])
    return part[:-1] + alphabet[i ^ 1 : (i ^ 1) + 1]


def _genuine(keys: dict[str, ConsumerKey]) -> list[Case]:
    cases = []
    for kind, key in keys.items():
        pair = _pair(key)
        envs = pair.producer.start() + _sealed(pair, 3) + pair.producer.end("stopping")
        cases.append(Case(f"genuine {kind}", pair).feed(envs))
    key = keys["x25519"]
    pair = _pair(key, rotation=Rotation(max_envelopes=2))
    envs = _sealed(pair, 7)
    # data sealed under the previous key arrives after the rotation: still opened
    late = [envs[0], envs[1], envs[3], envs[2], *envs[4:]]
    cases.append(Case("rotation keeps the previous key", pair).feed(late))
    for kind, key in keys.items():
        pair = _pair(key, key_mode="per-message")
        envs = _sealed(pair, 2) + pair.producer.end("bye")
        cases.append(Case(f"per-message {kind}", pair).feed(envs))
    pair = _pair(key, compress=True, allow_zip=True)
    cases.append(Case("zip when asked", pair, allow_zip=True).feed(_sealed(pair, 2)))
    pair = _pair(key)
    envs = _sealed(pair, 4)
    cases.append(Case("gaps are counted", pair).feed([envs[0], envs[1], envs[4]]))
    pair = _pair(key)
    envs = _sealed(pair, 1)
    note = notice(key.session_id, "expired", "no keepalive")
    other = notice("B" * 43, "expired", "not yours")
    cases.append(Case("notices", pair).feed([envs[0], note, other, envs[1]]))
    pair = _pair(key)
    envs = _sealed(pair, 1) + pair.producer.end("done")
    cases.append(Case("nothing after end", pair).feed([*envs, *_sealed(_pair(key), 1)]))
    return cases


def _tampered(key: ConsumerKey) -> list[Case]:
    cases: list[Case] = []
    for part in range(5):
        pair = _pair(key)
        key_env, data = _sealed(pair, 1)
        body = env_map(data)["body"]
        flips = [repack(data, body=_flip(body, part, off)) for off in (0, 7, -1)]
        cases.append(Case(f"flip data part {part}", pair).feed([key_env, *flips, data]))
        pair = _pair(key)
        key_env, _ = _sealed(pair, 1)
        kbody = env_map(key_env)["body"]
        flips = [repack(key_env, body=_flip(kbody, part, off)) for off in (0, 11, -1)]
        cases.append(Case(f"flip key part {part}", pair).feed([*flips, key_env]))
        pair = _pair(key, key_mode="per-message")
        (data,) = _sealed(pair, 1)
        flipped = repack(data, body=_flip(env_map(data)["body"], part, 3))
        cases.append(Case(f"flip per-message part {part}", pair).feed([flipped, data]))

    changes: dict[str, Any] = {
        "cluster": "other",
        "session": "B" * 43,
        "stream": "t",
        "seq": 5,
        "ts": 1,
        "kind": "end",
    }
    for field, value in sorted(changes.items()):
        pair = _pair(key)
        key_env, data = _sealed(pair, 1)
        if field == "kind":
            tampered = repack(data, kind="end", stream="_session")
        else:
            tampered = repack(data, **{field: value})
        cases.append(Case(f"envelope {field} changed", pair).feed([key_env, tampered, data]))
        pair = _pair(key)
        key_env, data = _sealed(pair, 1)
        header = _header(env_map(data)["body"])
        header[field] = value
        cipher = pair.producer._aead
        assert cipher is not None
        forged = repack(data, body=seal_dir(cipher, header, encode_rows(ROWS)))
        cases.append(Case(f"header {field} changed", pair).feed([key_env, forged]))
    for field, value in (("seq", 1.0), ("ts", float(TS_BIG)), ("seq", True), ("ts", str(TS_BIG))):
        # the same value as another JSON type, in the header under the real key
        pair = _pair(key)
        key_env, data = _sealed(pair, 1)
        header = _header(env_map(data)["body"])
        header[field] = value
        cipher = pair.producer._aead
        assert cipher is not None
        forged = repack(data, body=seal_dir(cipher, header, encode_rows(ROWS)))
        name = f"header {field} as {type(value).__name__}"
        cases.append(Case(name, pair).feed([key_env, forged]))
    pair = _pair(key)
    key_env, data = _sealed(pair, 1)
    header = _header(env_map(data)["body"])
    header["ts"] += 1  # off by one ns above 2**53: a rounding parser would not see it
    cipher = pair.producer._aead
    assert cipher is not None
    forged = repack(data, body=seal_dir(cipher, header, encode_rows(ROWS)))
    cases.append(Case("header ts off by one above 2**53", pair).feed([key_env, forged]))
    pair = _pair(key)
    key_env, data = _sealed(pair, 1)
    for name, v in (("seq", 1.0), ("ts", True), ("v", 1.0)):
        bad = msgpack.packb({**env_map(data), name: v}, use_bin_type=True)
        cases.append(Case(f"envelope {name} as {type(v).__name__}", _pair(key)).feed([bad]))
    cases.append(
        Case("envelope body as str", _pair(key)).feed(
            [
                msgpack.packb(
                    {**env_map(data), "body": env_map(data)["body"].decode()}, use_bin_type=True
                )
            ]
        )
    )

    pair = _pair(key)
    key_env, d1, d2, d3 = _sealed(pair, 3)
    cases.append(Case("replay and reorder", pair).feed([key_env, d1, d1, key_env, d3, d2]))

    a = _pair(key)
    b = _pair(key, identity=a.identity)
    _, data_a = _sealed(a, 1)
    key_b = _sealed(b, 2)[0]
    cases.append(Case("replay into another session", b).feed([key_b, repack(data_a, seq=9)]))

    pair = _pair(key)
    forger = ProducerSession(
        ClusterIdentity.generate(),
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
    )
    cases.append(
        Case("key signed by an unknown key", pair).feed(forger.seal("s", encode_rows(ROWS)))
    )

    pair = _pair(key)
    relay_key = gen_key("x25519")
    to_relay = ProducerSession(
        pair.identity,
        cluster=CLUSTER,
        session=relay_key.session_id,
        consumer_jwk=relay_key.public_jwk,
    )
    relay_env = decode_envelope(to_relay.seal("s", encode_rows(ROWS))[0])
    obj = jc_jwe.JWE()
    obj.deserialize(relay_env.body.decode(), relay_key._key)
    body = seal_to_key(key.public_jwk, _key_header(key), obj.plaintext)
    cases.append(Case("key substituted by the relay", pair).feed([_key_env(key, body)]))

    pair = _pair(key)
    other = _pair(gen_key("x25519"), identity=pair.identity)
    other_key = _sealed(other, 1)[0]
    cases.append(
        Case("key of another session", pair).feed([repack(other_key, session=key.session_id)])
    )

    pair = _pair(
        key,
        rotation=Rotation(max_envelopes=1),
        random=lambda n: b"\x07" * n if n == 12 else os.urandom(n),
    )
    cases.append(Case("rotation reusing the kid", pair).feed(_sealed(pair, 2)))

    pair = _pair(key)
    h = b64u_encode(json.dumps({"alg": "none", "kid": pair.identity.kid}).encode())
    jws = f"{h}.{b64u_encode(_claims(key))}.".encode()
    body = seal_to_key(key.public_jwk, _key_header(key), jws)
    cases.append(Case("alg none", pair).feed([_key_env(key, body)]))

    pair = _pair(key)
    hmac_key = jc_jwk.JWK(kty="oct", k=pair.identity.public_jwk["x"])
    token = jc_jws.JWS(_claims(key))
    token.add_signature(
        hmac_key, alg="HS256", protected=json.dumps({"alg": "HS256", "kid": pair.identity.kid})
    )
    body = seal_to_key(key.public_jwk, _key_header(key), token.serialize(compact=True).encode())
    cases.append(Case("HS256 keyed with the public key", pair).feed([_key_env(key, body)]))

    pair = _pair(key)
    header = _key_header(key, alg="dir", enc="A256GCM")
    body = seal_dir(AESGCM(os.urandom(32)), header, b"x.y.z")
    cases.append(Case("dir where a key envelope is due", pair).feed([_key_env(key, body)]))

    pair = _pair(key)
    key_env, _ = _sealed(pair, 1)
    down = _pair(key, key_mode="per-message")
    down.producer.seq = 2
    cases.append(Case("downgrade to per-message", pair).feed([key_env, *_sealed(down, 1)]))

    pair = _pair(key, key_mode="per-message")
    cases.append(Case("key envelope on per-message", pair).feed([_sealed(_pair(key), 1)[0]]))

    pair = _pair(key)
    key_env, data = _sealed(pair, 1)
    header = _header(env_map(data)["body"])
    header["enc"] = "A128GCM"
    weak = jc_jwe.JWE(encode_rows(ROWS), protected=json.dumps(header))
    weak.add_recipient(jc_jwk.JWK(kty="oct", k=b64u_encode(os.urandom(16))))
    weak_env = repack(data, body=weak.serialize(compact=True).encode())
    cases.append(Case("weaker enc", pair).feed([key_env, weak_env]))

    pair = _pair(key)
    key_env, data = _sealed(pair, 1)
    header = _header(env_map(data)["body"])
    header["crit"] = ["x"]
    cipher = pair.producer._aead
    assert cipher is not None
    crit = repack(data, body=seal_dir(cipher, header, encode_rows(ROWS)))
    cases.append(Case("crit header", pair).feed([key_env, crit]))

    pair = _pair(key)
    key_env = _sealed(pair, 1)[0]
    big = repack(key_env, body=b"A" * (2 * 1024 * 1024))
    cases.append(Case("oversize envelope", pair).feed([big]))

    pair = _pair(key, max_plaintext=1000)
    key_env = _sealed(pair, 1)[0]
    (big,) = pair.producer.seal("s", encode_rows([{"x": "y" * 5000}]))
    cases.append(Case("plaintext over the cap", pair, max_plaintext=1000).feed([key_env, big]))

    pair = _pair(key, compress=True)
    cases.append(Case("zip refused unless asked", pair).feed(_sealed(pair, 1)))

    pair = _pair(key, compress=True, allow_zip=True, max_plaintext=64 * 1024)
    key_env, _ = _sealed(pair, 1)
    bomb = msgpack.packb({"rows": [{"x": "\0" * (10 * 1024 * 1024)}]})
    (env,) = pair.producer.seal("s", bomb)
    cases.append(
        Case("zip bomb", pair, allow_zip=True, max_plaintext=64 * 1024).feed([key_env, env])
    )

    pair = _pair(key)
    key_env, data = _sealed(pair, 1)
    plain = [repack(data, body=msgpack.packb({"rows": ROWS})), repack(data, body=b"e30.e30.sig")]
    cases.append(Case("plaintext body", pair).feed([key_env, *plain]))

    pair = _pair(key)
    cases.append(Case("data before any key", pair).feed([_sealed(pair, 1)[1]]))

    for index in (0, 1):
        pair = _pair(key)
        envs = _sealed(pair, 1)
        body = env_map(envs[index])["body"]
        parts = body.split(b".")
        changed = []
        for n, part in enumerate(parts):
            alt = _non_canonical(part)
            if alt is not None:
                joined = b".".join([*parts[:n], alt, *parts[n + 1 :]])
                changed.append(repack(envs[index], body=joined))
        feed = [*envs[:index], *changed, envs[index]]
        cases.append(Case(f"non-canonical base64 in envelope {index}", pair).feed(feed))

    # plaintexts that are not what the contract says, sealed under the real session key
    pair = _pair(key)
    key_env, data = _sealed(pair, 1)
    cipher = pair.producer._aead
    assert cipher is not None
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
        body = seal_dir(cipher, odd_header, plaintext)
        odd.append(repack(data, seq=2 + i, ts=TS_BIG + i, body=body))
    cases.append(Case("plaintexts that are not rows", pair).feed([key_env, *odd]))

    # claims checked exactly: a kid of 1 to 64 characters (code points), integer epoch and iat
    for name, changes in (
        ("kid of 64 astral characters", {"kid": "\U0001f511" * 64}),
        ("kid of 65 characters", {"kid": "k" * 65}),
        ("empty kid", {"kid": ""}),
        ("epoch as float", {"epoch": 0.0}),
        ("iat as str", {"iat": "1"}),
        ("k of 31 bytes", {"k": b64u_encode(os.urandom(31))}),
        ("k non-canonical", {"k": b64u_encode(os.urandom(32))[:-1] + "B"}),
    ):
        pair = _pair(key)
        claims = {
            "cluster": CLUSTER,
            "session": key.session_id,
            "kid": "kid",
            "k": b64u_encode(os.urandom(32)),
            "iat": 1,
            "epoch": 0,
            **changes,
        }
        jws = sign_claims(pair.identity, claims)
        body = seal_to_key(key.public_jwk, _key_header(key), jws)
        cases.append(Case(f"claims: {name}", pair).feed([_key_env(key, body)]))

    pair = _pair(key)
    envs = _sealed(pair, 2)
    garbage = [b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"v": 1}), envs[1][:-3]]
    cases.append(Case("malformed payloads", pair).feed([envs[0], *garbage, envs[1]]))
    return cases


def _raced(key: ConsumerKey) -> list[Case]:
    """A relay's key envelope, signed by its own key, raced ahead of the cluster's: counted as
    ``untrusted_key`` and ignored even under policy ``fail``; the genuine key and rows follow."""
    pair = make_pair(key, policy="fail", clock=_clock())
    forger = ProducerSession(
        ClusterIdentity.generate(),
        cluster=CLUSTER,
        session=key.session_id,
        consumer_jwk=key.public_jwk,
    )
    forger.seq = 10**9  # refused as untrusted, not as a replay, wherever it lands
    raced = [*forger.start(), *_sealed(pair, 2)]
    return [Case("forged key raced ahead of the genuine one, policy fail", pair).feed(raced)]


def build_vectors() -> dict[str, Any]:
    keys = {kind: gen_key(kind) for kind in ("x25519", "p256", "rsa")}
    cases = _genuine(keys) + _tampered(keys["x25519"]) + _tampered_rsa(keys["rsa"])
    cases += _raced(keys["x25519"])
    from tests.support.web_group_vectors import build_group_cases

    return {
        "version": 1,
        "cases": [c.to_json() for c in cases],
        "group_cases": build_group_cases(),
    }


def _tampered_rsa(key: ConsumerKey) -> list[Case]:
    pair = _pair(key)
    header = _key_header(key, alg="RSA1_5", enc="A256GCM")
    obj = jc_jwe.JWE(b"a.b.c", protected=json.dumps(header))
    obj.allowed_algs = ["RSA1_5", "A256GCM"]
    obj.add_recipient(jc_jwk.JWK(**key.public_jwk | {"alg": "RSA1_5"}))
    env = _key_env(key, obj.serialize(compact=True).encode())
    key_env, data = _sealed(pair, 1)
    flipped = repack(key_env, body=_flip(env_map(key_env)["body"], 1, 5))
    return [Case("RSA1_5 key envelope", pair).feed([env, flipped, key_env, data])]


def main(argv: list[str] | None = None) -> int:
    configure_logging(level="error")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.support.web_vectors OUT.json", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(build_vectors()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
