"""The hostile relay (issue 5), as a harness: a corpus of malformed and random payloads for
every subject the proxy and the producer listen on and for a consumer's inbox, drawn with
hypothesis, and a storm that sends it while a legitimate stream runs and reports what each
party did with it (``tests/system/test_hostile.py`` says what must have happened).

The corpus is drawn once per module by hypothesis' engine (derandomized, generate phase only:
nothing is shrunk, the inputs go to real servers), stratified so that every kind of near-valid
input is there: a few hundred inputs per subject, sent one by one, or all at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import astuple, dataclass, field
from typing import Any, Final, TypeVar

import msgpack
import nats.errors
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws

from consumers import Batch, Stats, Subscription
from sealstream import SESSION_STREAM
from sealstream.control import ERROR_CODES
from sealstream.crypto import ClusterIdentity, ConsumerKey
from sealstream.crypto._jose import seal_to_key
from sealstream.jwk import b64u_encode
from sealstream.nats import connect
from tests.support.pipeline import Stack, Tap, eventually, fresh_key

T = TypeVar("T")

#: inputs per target subject (nine targets)
PER_TARGET: Final = 200
#: a request must be answered within this (the proxy waits 2 s for a cluster in these stacks)
REPLY_TIMEOUT: Final = 5.0
OTHER_CLUSTER: Final = "c2"
API_OPS: Final = ("open", "close", "keepalive", "bogus")
REQUEST_TARGETS: Final = frozenset({*API_OPS, "control"})
DATA_TARGETS: Final = ("data_random", "data_legit", "data_other")
ALL_TARGETS: Final = (*API_OPS, "control", *DATA_TARGETS, "inbox")

# the contract's identifier grammar, spelled out here rather than imported from the product
_ID_CHARS: Final = string.ascii_letters + string.digits + "-_"
_SESSION_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_CLUSTER_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STREAM_RE: Final = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")


# --- drawing a corpus with hypothesis ----------------------------------------------------------


def draw_examples(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """Up to ``n`` examples of ``strategy`` from hypothesis' engine, the same on every run
    (derandomized, no example database, generate phase only); fewer if it runs out of distinct
    ones."""
    out: list[T] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: T) -> None:
        out.append(value)

    collect()
    return out


#: (weight, strategy) pairs
Strata = list[tuple[int, st.SearchStrategy[T]]]


def draw_strata(strata: Strata[T], n: int) -> list[T]:
    """About ``n`` examples, shared between the strata by weight (at least two each): every
    kind of input is in the corpus, however hypothesis happens to explore a union."""
    total = sum(weight for weight, _ in strata)
    out: list[T] = []
    for weight, strategy in strata:
        out.extend(draw_examples(strategy, max(2, n * weight // total)))
    return out


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _b64(data: bytes) -> bytes:
    return b64u_encode(data).encode("ascii")


def _unpack(payload: bytes) -> Any:
    """The payload as a lenient decoder sees it (None if it is not msgpack at all)."""
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        return None


# --- values -----------------------------------------------------------------------------------

#: ints at the edges of msgpack's range and of the contract's (u63)
INTS: Final = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
#: every type msgpack has
SCALARS: Final = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(),
    st.text(max_size=24),
    st.binary(max_size=24),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    st.builds(msgpack.Timestamp, st.integers(-(2**34), 2**34), st.integers(0, 999_999_999)),
)
VALUES: Final = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
JSON_VALUES: Final = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=16)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
CONTRACT_KEYS: Final = (
    *("v", "token", "cluster", "streams", "jwk", "key_mode", "zip", "session", "op", "user"),
    *("sessions", "reason", "kind", "stream", "seq", "ts", "body", "code", "message", "ok"),
)
RANDOM_MAPS: Final = st.dictionaries(
    st.one_of(st.sampled_from(CONTRACT_KEYS), st.text(max_size=10)), VALUES, max_size=8
)
NON_STR_KEY_MAPS: Final = st.dictionaries(
    st.one_of(INTS, st.binary(max_size=4), st.booleans(), st.none(), st.floats()),
    VALUES,
    min_size=1,
    max_size=3,
)
#: nesting far past any decoder's stack: arrays or maps of one element, d levels deep
DEEP: Final = st.tuples(st.sampled_from([b"\x91", b"\x81\xa1k"]), st.integers(1, 150_000)).map(
    lambda t: t[0] * t[1] + b"\xc0"
)
#: extension type -1 (timestamps) of every size, valid or not
RAW_TIMESTAMPS: Final = st.tuples(
    st.sampled_from([b"\xd4\xff", b"\xd5\xff", b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff"]),
    st.binary(max_size=14),
).map(b"".join)
#: bigger than the API cap (64 KiB), up to nearly the server's max_payload (1 MiB): a str16
#: header announcing 65535 bytes, then n bytes
OVERSIZE: Final = st.integers(60_000, 1_000_000).map(lambda n: b"\xda\xff\xff" + b"x" * n)
HUGE_STRINGS: Final = st.integers(65_000, 400_000).map(lambda n: "x" * n)

SESSION_IDS: Final = st.text(alphabet=_ID_CHARS, min_size=43, max_size=43)
BAD_SESSION_IDS: Final = st.one_of(
    st.text(alphabet=_ID_CHARS, max_size=42),
    st.text(alphabet=_ID_CHARS, min_size=44, max_size=90),
    st.text(max_size=50),
    st.binary(min_size=43, max_size=43),
    VALUES,
).filter(lambda v: not (isinstance(v, str) and _SESSION_RE.fullmatch(v)))
VALID_CLUSTERS: Final = st.text(alphabet=_ID_CHARS, min_size=1, max_size=64)
BAD_CLUSTERS: Final = st.one_of(
    st.just(""), st.text(max_size=70), st.text(alphabet=_ID_CHARS, min_size=65), VALUES
).filter(lambda v: not (isinstance(v, str) and _CLUSTER_RE.fullmatch(v)))
BAD_STREAM_NAMES: Final = st.one_of(st.text(max_size=70), VALUES).filter(
    lambda v: not (isinstance(v, str) and _STREAM_RE.fullmatch(v))
)
#: ``streams`` values the contract refuses
BAD_STREAMS: Final = st.one_of(
    VALUES.filter(lambda v: not isinstance(v, list)),
    st.just([]),
    st.lists(BAD_STREAM_NAMES, min_size=1, max_size=4),
    st.lists(st.sampled_from(["records", "a", "b_1"]), min_size=65, max_size=80),
    st.lists(BAD_STREAM_NAMES, min_size=1, max_size=2).map(lambda s: ["records", *s]),
)
#: well-formed stream names no agent here declares (with or without a known one): only the
#: producer can refuse them
UNKNOWN_STREAMS: Final = st.tuples(
    st.lists(
        st.text(alphabet="abcdefgh_", min_size=1, max_size=20).map(lambda s: "zz" + s),
        min_size=1,
        max_size=3,
    ),
    st.booleans(),
).map(lambda t: [*t[0], "records"] if t[1] else t[0])
#: more streams than the proxy allows per session (16), fewer than the contract's cap (64)
MANY_STREAMS: Final = st.integers(17, 64).map(lambda n: [f"s{i}" for i in range(n)])
NON_BOOLS: Final = VALUES.filter(lambda v: not isinstance(v, bool))
BAD_VERSIONS: Final = VALUES.filter(lambda v: not (type(v) is int and v == 1))
_KEY_MODES: Final = ("session", "per-message")
BAD_KEY_MODES: Final = VALUES.filter(lambda v: not (isinstance(v, str) and v in _KEY_MODES))
_CONTROL_OPS: Final = ("open", "close", "ping")
BAD_OPS: Final = VALUES.filter(lambda v: not (isinstance(v, str) and v in _CONTROL_OPS))


def _bad_jwks(private: Mapping[str, Any], foreign: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """A ``jwk`` the contract refuses, or one whose thumbprint is not the session's."""
    x25519 = {"kty": "OKP", "crv": "X25519"}
    return st.one_of(
        VALUES,
        st.dictionaries(st.text(max_size=4), st.text(max_size=12), max_size=4),
        st.just(dict(private)),
        st.dictionaries(st.sampled_from(["alg", "use", "crv", "kty", "x"]), VALUES, min_size=1).map(
            lambda m: {**foreign, **m}
        ),
        st.binary(max_size=64)
        .filter(lambda b: len(b) != 32)
        .map(lambda b: {**x25519, "x": b64u_encode(b)}),
        st.binary(min_size=32, max_size=32).map(lambda b: {**x25519, "x": b64u_encode(b) + "="}),
        st.sampled_from(["RSA", "EC", "oct", "OKP", ""]).map(lambda kty: {"kty": kty}),
    )


# --- near-valid maps --------------------------------------------------------------------------


class Mutation:
    """ONE thing wrong in a map: ``key`` set to a value drawn from ``bad``, or one of ``drop``
    removed (or neither); plus a few unknown keys, which the contract ignores, so that they
    never make a message valid. Its strategies are built once: hypothesis validates every new
    strategy object, which would otherwise dominate the cost of drawing a corpus."""

    def __init__(
        self,
        keys: Iterable[str],
        *,
        key: str | None = None,
        bad: st.SearchStrategy[Any] | None = None,
        drop: Sequence[str] = (),
        extra: st.SearchStrategy[Any] = VALUES,
    ) -> None:
        known = frozenset(keys)
        self._key = key
        self._bad = bad
        self._drop = st.sampled_from(tuple(drop)) if drop else None
        self._unknown = st.dictionaries(
            st.text(max_size=6).filter(lambda k: k not in known), extra, max_size=2
        )

    def apply(self, draw: st.DrawFn, base: Mapping[str, Any]) -> dict[str, Any]:
        m = dict(base)
        if self._key is not None and self._bad is not None:
            m[self._key] = draw(self._bad)
        elif self._drop is not None:
            del m[draw(self._drop)]
        return {**m, **draw(self._unknown)}

    def of(self, base: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        @st.composite
        def build(draw: st.DrawFn) -> dict[str, Any]:
            return self.apply(draw, base)

        return build()


def near_each(
    base: Mapping[str, Any],
    bad: Sequence[tuple[str, st.SearchStrategy[Any]]],
    drop: Sequence[str],
    extra: st.SearchStrategy[Any] = VALUES,
) -> list[st.SearchStrategy[bytes]]:
    """One packed strategy per way ``base`` can be wrong: each ``(key, bad values)``, and a
    required key dropped."""
    out = [Mutation(base, key=k, bad=s, extra=extra).of(base).map(_pack) for k, s in bad]
    if drop:
        out.append(Mutation(base, drop=drop, extra=extra).of(base).map(_pack))
    return out


def _generic(near_valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Payloads that are not one of the contract's messages at all, and near-valid ones cut
    short or with bytes after their end."""
    return st.one_of(
        st.binary(max_size=300),
        VALUES.map(_pack),
        RANDOM_MAPS.map(_pack),
        NON_STR_KEY_MAPS.map(_pack),
        DEEP,
        RAW_TIMESTAMPS,
        OVERSIZE,
        st.tuples(near_valid, st.integers(0)).map(lambda t: t[0][: t[1] % len(t[0])]),
        st.tuples(near_valid, st.binary(min_size=1, max_size=8)).map(lambda t: t[0] + t[1]),
    )


def _even(strategies: Iterable[st.SearchStrategy[T]]) -> Strata[T]:
    return [(2, s) for s in strategies]


def _union(strata: Strata[T]) -> st.SearchStrategy[T]:
    return st.one_of([s for _, s in strata])


def _with_generic(near: Strata[bytes]) -> Strata[bytes]:
    """The near-valid strata, and a third of the inputs not near-valid at all."""
    return [*near, (sum(w for w, _ in near) // 2, _generic(_union(near)))]


# --- tokens -----------------------------------------------------------------------------------


def _signed(key: jc_jwk.JWK, claims: Any) -> str:
    obj = jc_jws.JWS(json.dumps(claims).encode("utf-8"))
    obj.add_signature(key, alg="HS256", protected=json.dumps({"alg": "HS256"}))
    return str(obj.serialize(compact=True))


def _forge_alg(claims: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    """A token whose header names another algorithm, with a junk signature."""
    head = _b64(json.dumps(dict(header)).encode()).decode()
    body = _b64(json.dumps(dict(claims)).encode()).decode()
    return f"{head}.{body}.{b64u_encode(b'sig' * 11)}"


def unauthorized_tokens(stack: Stack) -> list[st.SearchStrategy[Any]]:
    """Kinds of tokens the proxy must refuse as ``unauthorized`` whatever they are used for.
    (Close and keepalive ignore ``clusters``: a token that only lacks the cluster is NOT
    here. Those signed with the stack's secret are for "mallory", never the legit user.)"""
    key = jc_jwk.JWK(kty="oct", k=b64u_encode(stack.secret))
    now = int(time.time())
    good = {"sub": "mallory", "clusters": [stack.cluster], "exp": now + 3600}
    not_a_cluster = st.one_of(st.text(max_size=70), JSON_VALUES).filter(
        lambda v: v != "*" and not (isinstance(v, str) and _CLUSTER_RE.fullmatch(v))
    )
    near_claims = [
        Mutation(good, key=k, bad=s, extra=JSON_VALUES).of(good)
        for k, s in (
            ("sub", JSON_VALUES.filter(lambda v: not isinstance(v, str))),
            ("sub", st.sampled_from(["", "m" * 257])),
            ("clusters", JSON_VALUES.filter(lambda v: not isinstance(v, list))),
            ("clusters", st.lists(not_a_cluster, min_size=1, max_size=3)),
            ("exp", JSON_VALUES.filter(lambda v: type(v) is not int)),
            ("exp", st.integers(max_value=now - 120)),
            ("nbf", JSON_VALUES.filter(lambda v: type(v) is not int)),
            ("nbf", st.integers(min_value=now + 3600)),
        )
    ]
    claims = [*near_claims, Mutation(good, drop=("sub", "exp"), extra=JSON_VALUES).of(good)]
    # another algorithm in the header (with a junk signature): the token never chooses it
    headers: list[dict[str, Any]] = [{"alg": "none"}, {"alg": "HS512"}, {"alg": "RS256"}, {}]
    return [
        *(c.map(lambda m: _signed(key, m)) for c in claims),
        JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(lambda v: _signed(key, v)),
        st.builds(lambda: _signed(jc_jwk.JWK(kty="oct", k=b64u_encode(b"w" * 32)), good)),
        st.sampled_from(headers).map(lambda h: _forge_alg(good, h)),
        st.just(stack.token(ttl_s=-3600)),
        st.tuples(
            JSON_VALUES.map(lambda v: _b64(json.dumps(v).encode())),
            st.binary(max_size=40).map(_b64),
            st.binary(max_size=40).map(_b64),
        ).map(lambda p: b".".join(p).decode("ascii")),
        st.text(max_size=60),
        st.integers(8193, 20_000).map(lambda n: "a" * n),
        VALUES.filter(lambda v: not isinstance(v, str)),
    ]


# --- envelopes and their bodies ----------------------------------------------------------------

KIDS: Final = st.one_of(st.text(max_size=16), JSON_VALUES)
ROWS: Final = st.lists(st.dictionaries(st.text(max_size=5), SCALARS, max_size=3), max_size=3)
EPK: Final = st.binary(min_size=32, max_size=32).map(
    lambda b: {"kty": "OKP", "crv": "X25519", "x": b64u_encode(b)}
)
JWE_ALGS: Final = st.one_of(
    st.sampled_from(["dir", "dir", "ECDH-ES+A256KW", "RSA-OAEP-256", "none"]), JSON_VALUES
)
JWE_ENCS: Final = st.one_of(st.just("A256GCM"), JSON_VALUES)
JWE_EXTRAS: Final = st.dictionaries(
    st.sampled_from(["zip", "crit", "cty", "epk", "jwk", "apu", "typ"]),
    st.one_of(EPK, st.just("DEF"), JSON_VALUES),
    max_size=3,
)
ROUTING_KEYS: Final = ("cluster", "kind", "seq", "session", "stream", "ts")
PARTS: Final = st.one_of(
    st.binary(max_size=60).map(_b64),
    st.sampled_from([0, 12, 16, 32, 40])
    .flatmap(lambda n: st.binary(min_size=n, max_size=n))
    .map(_b64),
    st.binary(max_size=16),
    st.text(alphabet=_ID_CHARS + "=+/", max_size=30).map(lambda s: s.encode()),
)
IVS: Final = st.binary(min_size=12, max_size=12)
TAGS: Final = st.binary(min_size=16, max_size=16)
PART_COUNTS: Final = st.sampled_from([5, 5, 5, 5, 1, 3, 4, 6])
#: mostly past the session's last seq, so that the consumer goes beyond its replay check
SEQS: Final = st.one_of(
    st.integers(10**6, 2**63 - 1), st.integers(0, 2**63 - 1), st.sampled_from([0, 2**63 - 1])
)
ENVELOPE_KEYS: Final = ("v", *ROUTING_KEYS, "body")
#: one header field wrong (the body is random anyway)
ENVELOPE_MUTATIONS: Final = [
    *(
        Mutation(ENVELOPE_KEYS, key=k, bad=s)
        for k, s in (
            ("v", BAD_VERSIONS),
            ("kind", VALUES.filter(lambda v: v not in ("key", "data", "end"))),
            ("cluster", BAD_CLUSTERS),
            ("session", BAD_SESSION_IDS),
            ("stream", st.one_of(BAD_STREAM_NAMES, st.sampled_from(["_session", "records"]))),
            ("seq", st.one_of(VALUES, st.integers(-(2**63), -1), st.just(2**63))),
            ("ts", st.one_of(VALUES, st.integers(-(2**63), -1), st.just(2**64 - 1))),
            ("body", st.one_of(VALUES, st.just(b""), HUGE_STRINGS)),
        )
    ),
    Mutation(ENVELOPE_KEYS, drop=ENVELOPE_KEYS),
]


def _jwe_like(draw: st.DrawFn, routing: Mapping[str, Any]) -> bytes:
    """A compact-JWE-shaped body whose protected header carries the envelope's routing fields
    (so the consumer gets past its cheap checks) and random everything else."""
    header: dict[str, Any] = dict(routing)
    header["alg"] = draw(JWE_ALGS)
    header["enc"] = draw(JWE_ENCS)
    header["kid"] = routing["session"] if draw(st.booleans()) else draw(KIDS)
    header.update(draw(JWE_EXTRAS))
    if draw(st.booleans()):
        header[draw(st.sampled_from(ROUTING_KEYS))] = draw(JSON_VALUES)
    protected = _b64(json.dumps(header).encode())
    protected = (protected, protected + b"=", protected[:-1])[draw(st.integers(0, 2))]
    if draw(st.booleans()):  # shaped like the real thing: a 12-byte IV, a 16-byte tag
        return _shaped(draw, protected)
    parts = [protected, *(draw(PARTS) for _ in range(4))]
    return b".".join((parts * 2)[: draw(PART_COUNTS)])


def _shaped(draw: st.DrawFn, protected: bytes) -> bytes:
    ek = b"" if draw(st.booleans()) else draw(PARTS)
    return b".".join((protected, ek, _b64(draw(IVS)), draw(PARTS), _b64(draw(TAGS))))


def _dir_jwe(draw: st.DrawFn, routing: Mapping[str, Any]) -> bytes:
    """A ``dir`` data JWE exactly as the producer makes them, under a key id nobody gave the
    consumer: everything checks out up to the key lookup."""
    kid = draw(st.one_of(KIDS, st.binary(min_size=12, max_size=12).map(b64u_encode)))
    header = {"alg": "dir", "enc": "A256GCM", "kid": kid, **routing}
    return _shaped(draw, _b64(json.dumps(header, separators=(",", ":")).encode()))


class Forger:
    """Envelopes a raw NATS client can build with what it may know: the consumer's PUBLIC
    key, the cluster's kid, and a signing key of its own."""

    BODIES: Final = ("binary", "jwe_like", "dir_jwe", "key_jwe", "per_message_jwe")

    def __init__(self, consumer: ConsumerKey, cluster_kid: str) -> None:
        self.consumer_jwk = consumer.public_jwk
        self.session = consumer.session_id
        self.attacker = ClusterIdentity.generate()
        self._jws_headers = st.fixed_dictionaries(
            {
                "alg": st.just("Ed25519"),
                "kid": st.one_of(
                    st.sampled_from([self.attacker.kid, cluster_kid]), st.text(max_size=43)
                ),
            },
            optional={"typ": st.just("JWT"), "jwk": st.just(self.attacker.public_jwk)},
        )
        self._claims: dict[str, st.SearchStrategy[Any]] = {}

    def _claim_sets(self, cluster: str) -> st.SearchStrategy[Any]:
        if cluster not in self._claims:
            claims = {
                "cluster": cluster,
                "session": self.session,
                "kid": "forged",
                "k": b64u_encode(b"k" * 32),
                "iat": int(time.time()),
                "epoch": 10**6,
            }
            mutations = [
                Mutation(claims, key=k, bad=JSON_VALUES, extra=JSON_VALUES) for k in claims
            ]
            self._claims[cluster] = st.one_of(st.just(claims), *(m.of(claims) for m in mutations))
        return self._claims[cluster]

    def key_jwe(self, draw: st.DrawFn, routing: Mapping[str, Any]) -> bytes:
        """A key envelope body really encrypted to the consumer's key, carrying claims signed
        by the attacker (under its own kid, the cluster's, or another)."""
        obj = jc_jws.JWS(json.dumps(draw(self._claim_sets(routing["cluster"]))).encode())
        header = json.dumps(draw(self._jws_headers))
        obj.add_signature(self.attacker._key, alg="Ed25519", protected=header)
        jws = str(obj.serialize(compact=True)).encode("ascii")
        return seal_to_key(self.consumer_jwk, {"kid": self.session, "cty": "JWT", **routing}, jws)

    def per_message_jwe(self, draw: st.DrawFn, routing: Mapping[str, Any]) -> bytes:
        """A body encrypted straight to the consumer's public key: per-message mode, which
        anyone can forge, and which a session-mode consumer must refuse (a downgrade)."""
        plaintext = _pack({"rows": draw(ROWS)})
        return seal_to_key(self.consumer_jwk, {"kid": self.session, **routing}, plaintext)

    def _envelope(self, draw: st.DrawFn, cluster: str, session: str, body: str) -> dict[str, Any]:
        # a key body in a key envelope, a data body in a data or end one: the deep paths
        kinds = {
            "key_jwe": ("key",),
            "per_message_jwe": ("data", "end"),
            "dir_jwe": ("data", "end"),
        }
        kind = draw(st.sampled_from(kinds.get(body, ("key", "data", "end"))))
        routing = {
            "cluster": cluster,
            "session": session,
            "stream": draw(st.sampled_from(("records", "zz")))
            if kind == "data"
            else SESSION_STREAM,
            "seq": draw(SEQS),
            "kind": kind,
            "ts": draw(SEQS),
        }
        if body == "binary":
            sealed = draw(st.binary(min_size=1, max_size=200))
        elif body == "jwe_like":
            sealed = _jwe_like(draw, routing)
        elif body == "dir_jwe":
            sealed = _dir_jwe(draw, routing)
        elif body == "key_jwe":
            sealed = self.key_jwe(draw, routing)
        else:
            sealed = self.per_message_jwe(draw, routing)
        return {"v": 1, **routing, "body": sealed}

    def well_formed(self, cluster: str, session: str, body: str) -> st.SearchStrategy[bytes]:
        """Well-formed envelopes whose body nobody but the producer could make valid: only
        the consumer can tell."""

        @st.composite
        def build(draw: st.DrawFn) -> bytes:
            return _pack(self._envelope(draw, cluster, session, body))

        return build()

    def mutated(self, cluster: str, session: str, m: Mutation) -> st.SearchStrategy[bytes]:
        @st.composite
        def build(draw: st.DrawFn) -> bytes:
            body = draw(st.sampled_from(self.BODIES))
            return _pack(m.apply(draw, self._envelope(draw, cluster, session, body)))

        return build()

    def strata(self, cluster: str, session: str) -> Strata[bytes]:
        """Each body kind well formed (most of them: they go deepest), and each header field
        wrong."""
        return [
            *((5, self.well_formed(cluster, session, body)) for body in self.BODIES),
            *((1, self.mutated(cluster, session, m)) for m in ENVELOPE_MUTATIONS),
        ]


# --- the corpus -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shot:
    """One hostile input: ``target`` names the subject family, for the accounting."""

    target: str
    subject: str
    payload: bytes = field(repr=False)

    @property
    def request(self) -> bool:
        return self.target in REQUEST_TARGETS


def _is_own_notice(payload: bytes, session: str) -> bool:
    """A well-formed proxy notice for the legit session: it is not rejected (notices are
    unauthenticated hints), and ``ended`` would end the legit stream. Not hostile input."""
    m = _unpack(payload)
    return (
        isinstance(m, dict)
        and m.get("kind") == "notice"
        and type(m.get("v")) is int
        and m.get("v") == 1
        and m.get("session") == session
        and isinstance(m.get("code"), str)
        and isinstance(m.get("message"), str)
    )


def _names_a_control_op(payload: bytes) -> bool:
    """A random map that happens to name a real control op: not hostile by construction."""
    m = _unpack(payload)
    return isinstance(m, dict) and isinstance(m.get("op"), str) and m["op"] in _CONTROL_OPS


def hostile_corpus(stack: Stack, legit: ConsumerKey, per_target: int = PER_TARGET) -> list[Shot]:
    """Every target's inputs, drawn for this stack (its prefix and token secret) and the
    legitimate session of ``legit``, shuffled with a fixed seed."""
    s = stack.subjects
    cluster = stack.cluster
    sid = legit.session_id
    unknown_sid = sid[::-1]  # well formed, and no session has it
    forger = Forger(legit, stack.identity.kid)
    api_key, control_key = fresh_key(), fresh_key()
    unauthorized = unauthorized_tokens(stack)
    alice, mallory = stack.token(), stack.token(sub="mallory")
    forbidden = st.sampled_from(
        [stack.token(clusters=[OTHER_CLUSTER]), stack.token(clusters=[OTHER_CLUSTER], sub="x")]
    )

    # P.api.session.open: a request for alice that would be valid, with ONE thing wrong; the
    # cluster's stream list is checked by the producer, behind the proxy
    open_base = {
        "v": 1,
        "token": alice,
        "cluster": cluster,
        "streams": ["records"],
        "jwk": api_key.public_jwk,
        "key_mode": "session",
        "zip": False,
    }
    near_open = near_each(
        open_base,
        [
            ("v", BAD_VERSIONS),
            *(("token", t) for t in [*unauthorized, forbidden]),
            ("cluster", BAD_CLUSTERS),
            ("cluster", VALID_CLUSTERS.filter(lambda c: c != cluster)),
            ("streams", BAD_STREAMS),
            ("streams", UNKNOWN_STREAMS),
            ("streams", MANY_STREAMS),
            ("jwk", _bad_jwks(api_key._key.export_private(as_dict=True), legit.public_jwk)),
            ("jwk", st.just(legit.public_jwk)),  # the legit session's key: a takeover attempt
            ("key_mode", BAD_KEY_MODES),
            ("zip", NON_BOOLS),
        ],
        ["v", "token", "cluster", "streams", "jwk"],
    )

    # close/keepalive: never alice's token with the legit session (that one is valid)
    def near_refs() -> list[st.SearchStrategy[bytes]]:
        out: list[st.SearchStrategy[bytes]] = []
        for token, session in ((alice, unknown_sid), (mallory, sid), ("x.y.z", sid)):
            ref = {"v": 1, "token": token, "session": session}
            out.append(Mutation(ref).of(ref).map(_pack))  # only unknown keys added
            out += near_each(
                ref,
                [
                    ("v", BAD_VERSIONS),
                    ("session", BAD_SESSION_IDS),
                    ("token", st.one_of(unauthorized)),
                ],
                ["v", "token", "session"],
            )
        return out

    # P.api.session.bogus: anything, the valid requests included
    valid_close = {"v": 1, "token": alice, "session": sid}
    valid_open = {**open_base, "jwk": fresh_key().public_jwk}
    near_bogus = [
        Mutation(valid_close).of(valid_close).map(_pack),
        Mutation(valid_open).of(valid_open).map(_pack),
        st.one_of(near_open),
        st.one_of(near_refs()),
    ]

    # P.cluster.<id>.control, played by a hostile "proxy"
    control_open = {
        "v": 1,
        "op": "open",
        "session": control_key.session_id,
        "streams": ["records"],
        "jwk": control_key.public_jwk,
        "key_mode": "session",
        "zip": False,
        "user": "mallory",
    }
    close_op = {"v": 1, "op": "close", "session": unknown_sid, "reason": "r"}
    ping_op = {"v": 1, "op": "ping", "sessions": [sid]}
    near_control = [
        *near_each(
            control_open,
            [
                ("v", BAD_VERSIONS),
                ("op", BAD_OPS),
                ("session", BAD_SESSION_IDS),
                ("session", st.one_of(SESSION_IDS, st.just(sid))),  # not the key's thumbprint
                ("streams", BAD_STREAMS),
                ("streams", UNKNOWN_STREAMS),
                ("jwk", _bad_jwks(control_key._key.export_private(as_dict=True), legit.public_jwk)),
                ("jwk", st.just(legit.public_jwk)),
                ("key_mode", BAD_KEY_MODES),
                ("zip", NON_BOOLS),
            ],
            ["v", "op", "session", "streams", "jwk"],
        ),
        *near_each(close_op, [("v", BAD_VERSIONS), ("session", BAD_SESSION_IDS)], ["v", "session"]),
        *near_each(
            ping_op,
            [("v", BAD_VERSIONS), ("sessions", VALUES.filter(lambda v: not isinstance(v, list)))],
            ["v", "sessions"],
        ),
    ]

    # P.cluster.<id>.data.<session>: the legit session, a random one, another cluster's
    legit_envelopes = forger.strata(cluster, sid)
    phantom = forger.strata(cluster, unknown_sid)

    def on_random_subject(
        payloads: st.SearchStrategy[bytes], *, same_session: bool
    ) -> st.SearchStrategy[tuple[str, bytes]]:
        """On ``data.<random id>``; with ``same_session`` the envelope names that id too (an
        unknown session), else another one (the subject disagrees)."""

        @st.composite
        def build(draw: st.DrawFn) -> tuple[str, bytes]:
            random_sid, payload = draw(SESSION_IDS), draw(payloads)
            if same_session:  # same length: the msgpack stays what it was
                payload = payload.replace(unknown_sid.encode(), random_sid.encode())
            return s.data(cluster, random_sid), payload

        return build()

    random_strata = [
        *((w, on_random_subject(p, same_session=True)) for w, p in phantom),
        (4, on_random_subject(_union(phantom), same_session=False)),
        (4, on_random_subject(_union(legit_envelopes), same_session=False)),
        (16, on_random_subject(_generic(_union(phantom)), same_session=True)),
    ]
    other_envelopes = [*forger.strata(OTHER_CLUSTER, sid), (6, _union(legit_envelopes))]

    # P.inbox.<legit>: envelopes and notices, as only the proxy should send them
    notice = {"v": 1, "kind": "notice", "session": sid, "code": "ended", "message": "bye"}
    near_notice = near_each(
        notice,
        [
            ("v", BAD_VERSIONS),
            ("session", BAD_SESSION_IDS),
            ("session", SESSION_IDS),  # another session's notice
            ("code", VALUES.filter(lambda v: not isinstance(v, str))),
            ("message", VALUES.filter(lambda v: not isinstance(v, str))),
            ("kind", VALUES),
        ],
        ["v", "session", "code", "message"],
    )

    def requests(target: str, near: list[st.SearchStrategy[bytes]]) -> list[Shot]:
        subject = f"{s.prefix}.api.session.{target}"
        strata = _with_generic(_even(near))
        return [Shot(target, subject, p) for p in draw_strata(strata, per_target)]

    def published(target: str, subject: str, strata: Strata[bytes]) -> list[Shot]:
        return [Shot(target, subject, p) for p in draw_strata(strata, per_target)]

    control_strata = [
        *_even(near_control),
        (
            len(near_control),
            _generic(st.one_of(near_control)).filter(lambda p: not _names_a_control_op(p)),
        ),
    ]
    inbox_strata = [
        (weight, strategy.filter(lambda p: not _is_own_notice(p, sid)))
        for weight, strategy in _with_generic([*legit_envelopes, *_even(near_notice)])
    ]
    shots = [
        *requests("open", near_open),
        *requests("close", near_refs()),
        *requests("keepalive", near_refs()),
        *requests("bogus", near_bogus),
        *published("control", s.control(cluster), control_strata),
        *(
            Shot("data_random", subject, payload)
            for subject, payload in draw_strata(random_strata, per_target)
        ),
        *published("data_legit", s.data(cluster, sid), _with_generic(legit_envelopes)),
        *published("data_other", s.data(OTHER_CLUSTER, sid), _with_generic(other_envelopes)),
        *published("inbox", s.inbox(sid), inbox_strata),
    ]
    random.Random(5).shuffle(shots)
    return shots


# --- the legitimate stream --------------------------------------------------------------------


class Steady:
    """The legitimate producer: one row every few milliseconds until stopped, and a reader
    that collects them until the final marker row."""

    def __init__(self, stack: Stack, sub: Subscription[Batch]) -> None:
        self.stack = stack
        self.sub = sub
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self._stop = asyncio.Event()

    async def emit(self) -> None:
        while not self._stop.is_set():
            row = {"i": len(self.sent)}
            await self.stack.agent.emit("records", [row])
            self.sent.append(row)
            await asyncio.sleep(0.003)

    def stop(self) -> None:
        self._stop.set()

    async def finish(self) -> None:
        """After ``stop``: a final row; every item queued before it is processed first."""
        row = {"i": len(self.sent), "last": True}
        await self.stack.agent.emit("records", [row])
        self.sent.append(row)

    async def read(self) -> None:
        async with asyncio.timeout(30):
            async for batch in self.sub:
                self.received.extend(batch.rows)
                if self.received and self.received[-1].get("last"):
                    return


@contextlib.asynccontextmanager
async def legit_stream(stack: Stack, sub: Subscription[Batch]) -> AsyncIterator[Steady]:
    """Run the steady stream in a task group owned by the test; yields the :class:`Steady`."""
    steady = Steady(stack, sub)
    async with asyncio.TaskGroup() as tg:
        emitter = tg.create_task(steady.emit())
        reader = tg.create_task(steady.read())
        # the session key is installed before the storm: forged keys then meet a keyed session
        await eventually(lambda: len(steady.received) >= 3, timeout=10)
        yield steady
        steady.stop()
        await emitter
        await steady.finish()
        await reader


# --- sending and accounting -------------------------------------------------------------------

Sender = Callable[[Any, Sequence["Shot"], "Outcome"], Awaitable[None]]


@dataclass
class Outcome:
    """What was sent, and the replies to the requests."""

    shots: list[Shot]
    replies: list[tuple[Shot, Any]] = field(default_factory=list)

    def shots_of(self, *targets: str) -> Iterator[Shot]:
        return (shot for shot in self.shots if shot.target in targets)

    def count(self, *targets: str) -> int:
        return sum(1 for _ in self.shots_of(*targets))


async def fire(nc: Any, shot: Shot, outcome: Outcome) -> None:
    if not shot.request:
        await nc.publish(shot.subject, shot.payload)
        return
    try:
        msg = await nc.request(shot.subject, shot.payload, timeout=REPLY_TIMEOUT)
    except (TimeoutError, nats.errors.Error) as exc:  # a hang, or no responder: report it
        pytest.fail(f"no reply to {shot!r}, payload {shot.payload[:300]!r}: {exc!r}")
    reply = msgpack.unpackb(msg.data, raw=False)
    outcome.replies.append((shot, reply))


def check_reply(shot: Shot, reply: Any) -> None:
    """``{"ok": false, "error": {"code": <contract code>, "message": str}}``."""
    assert isinstance(reply, dict), shot
    assert reply.get("ok") is False, (shot, shot.payload[:200], reply)
    error = reply.get("error")
    assert isinstance(error, dict), (shot, reply)
    assert error.get("code") in ERROR_CODES, (shot, reply)
    assert isinstance(error.get("message"), str), (shot, reply)


def forwarded_opens(tap: Tap, control_subject: str, hostile: set[bytes]) -> int:
    """Open operations the proxy forwarded to the producer (the tap also saw ours)."""
    n = 0
    for m in tap.on(control_subject):
        if m.data in hostile:
            continue
        if msgpack.unpackb(m.data, raw=False).get("op") == "open":
            n += 1
    return n


@dataclass(frozen=True, slots=True)
class Counts:
    """The counters that matter, summed (the stack serves both tests: they use differences)."""

    refused: int  # requests the proxy refused
    rejected: int  # envelopes the proxy dropped
    relayed: int  # envelopes the proxy relayed...
    hostile_relayed: int  # ...that the producer did not send
    agent_refused: int  # control requests the producer refused
    received: int  # messages on the legit consumer's inbox

    @classmethod
    def of(cls, stack: Stack, sub: Subscription[Batch]) -> Counts:
        proxy, agent = stack.proxy, stack.agent
        return cls(
            refused=sum(proxy.refused.values()),
            rejected=sum(proxy.rejected.values()),
            relayed=proxy.relayed,
            hostile_relayed=proxy.relayed - agent.published,
            agent_refused=sum(agent.refused.values()),
            received=sub.stats().received,
        )

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True, slots=True)
class Storm:
    """What a storm did, as seen from outside the proxy, the producer and the consumer."""

    outcome: Outcome
    #: the legitimate rows sent, and those the consumer received
    sent: list[dict[str, Any]]
    received: list[dict[str, Any]]
    #: the counters' growth over the storm
    delta: Counts
    #: envelopes the proxy dropped during the storm, by reason
    proxy_rejected: Counter[str]
    #: open requests the proxy forwarded to the producer (only it can refuse them)
    forwarded_opens: int
    #: the legitimate subscription's counters after the storm
    stats: Stats


async def storm(
    stack: Stack, sub: Subscription[Batch], shots: Sequence[Shot], send: Sender
) -> Storm:
    """Send ``shots`` with ``send`` during a steady legit stream; what happened, once every
    input has been dealt with (or 15 s have passed: the caller's checks say what is missing)."""
    control = stack.subjects.control(stack.cluster)
    outcome = Outcome(shots=list(shots))
    n_data = outcome.count(*DATA_TARGETS)
    n_inbox = outcome.count("inbox")
    # quiet: the session's key envelope has arrived, nothing else is in flight
    await eventually(lambda: sub.stats().received >= 1)
    before = Counts.of(stack, sub)
    proxy_before = stack.proxy.rejected.copy()

    def quiet() -> bool:
        # every data input dropped (counted) or relayed; every relayed or injected envelope
        # has reached the consumer's subscription (so it is queued before the final row)
        d = Counts.of(stack, sub) - before
        return d.rejected + d.hostile_relayed == n_data and d.received == d.relayed + n_inbox

    async with Tap(stack.nats_url, control) as tap:
        nc = await connect(stack.nats_url, name="hostile")
        try:
            async with legit_stream(stack, sub) as steady:
                await send(nc, shots, outcome)
                await nc.flush()
                steady.stop()
                with contextlib.suppress(TimeoutError):
                    await eventually(quiet, timeout=15)
        finally:
            await nc.drain()
        await tap.flush()
    hostile = {s.payload for s in outcome.shots_of("control")}
    return Storm(
        outcome=outcome,
        sent=steady.sent,
        received=steady.received,
        delta=Counts.of(stack, sub) - before,
        proxy_rejected=stack.proxy.rejected - proxy_before,
        forwarded_opens=forwarded_opens(tap, control, hostile),
        stats=sub.stats(),
    )
