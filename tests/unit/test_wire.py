"""Envelope and request codecs: strict validation, clear errors, never a msgpack exception."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealstream import Envelope, Subjects, WireError, decode_envelope, encode_envelope
from sealstream.control import decode_open, decode_session_ref
from sealstream.ids import check_cluster_id, check_session_id, check_stream
from sealstream.wire import decode_inbox, decode_map, notice

SESSION = "A" * 43
GOOD: dict[str, Any] = {
    "v": 1,
    "kind": "data",
    "cluster": "c1",
    "session": SESSION,
    "stream": "http_events",
    "seq": 3,
    "ts": 1_700_000_000_000_000_000,
    "body": b"a.b.c.d.e",
}


def pack(m: Any) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def test_round_trip() -> None:
    env = decode_envelope(pack(GOOD))
    assert env == Envelope("data", "c1", SESSION, "http_events", 3, GOOD["ts"], b"a.b.c.d.e")
    assert decode_envelope(encode_envelope(env)) == env


def test_unknown_keys_are_ignored() -> None:
    assert decode_envelope(pack({**GOOD, "extra": [1, 2]})).seq == 3


@pytest.mark.parametrize("key", sorted(GOOD))
def test_missing_key(key: str) -> None:
    m = dict(GOOD)
    del m[key]
    with pytest.raises(WireError) as err:
        decode_envelope(pack(m))
    assert err.value.reason == "missing_key"


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("v", 2, "bad_version"),
        ("v", True, "bad_type"),
        ("kind", "notice", "bad_kind"),
        ("kind", 1, "bad_type"),
        ("cluster", "a.b", "bad_cluster"),
        ("cluster", "x" * 65, "bad_cluster"),
        ("session", "short", "bad_session"),
        ("stream", "Upper", "bad_stream"),
        ("stream", "_session", "bad_stream"),
        ("seq", -1, "bad_value"),
        ("seq", 2**64 - 1, "bad_value"),
        ("seq", 1.0, "bad_type"),
        ("seq", False, "bad_type"),
        ("ts", "now", "bad_type"),
        ("body", "text", "bad_type"),
        ("body", b"", "bad_body"),
    ],
)
def test_bad_field(key: str, value: Any, reason: str) -> None:
    with pytest.raises(WireError) as err:
        decode_envelope(pack({**GOOD, key: value}))
    assert err.value.reason == reason


def test_key_and_end_envelopes_use_the_session_stream() -> None:
    assert decode_envelope(pack({**GOOD, "kind": "key", "stream": "_session"})).kind == "key"
    with pytest.raises(WireError):
        decode_envelope(pack({**GOOD, "kind": "end"}))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not_msgpack"),
        (b"\xc1", "not_msgpack"),
        (pack(GOOD) + b"\x00", "not_msgpack"),
        (pack([1, 2]), "not_a_map"),
        (msgpack.packb({1: 2}), "not_msgpack"),
        (msgpack.packb({b"v": 1}, use_bin_type=True), "bad_key"),
        (b"\x91" * 100_000, "not_msgpack"),
    ],
)
def test_malformed_payloads(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        decode_envelope(payload)
    assert err.value.reason == reason


def test_oversize_is_refused_before_decoding() -> None:
    with pytest.raises(WireError) as err:
        decode_envelope(pack({**GOOD, "body": b"x" * 2000}), max_size=1000)
    assert err.value.reason == "oversize"


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        decode_inbox(data)
    except WireError:
        pass


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(sorted(GOOD)),
        st.one_of(
            st.none(),
            st.integers(-(2**63), 2**64 - 1),
            st.text(),
            st.binary(),
            st.booleans(),
            st.floats(),
        ),
    )
)
def test_random_maps_only_raise_wire_errors(m: dict[str, Any]) -> None:
    try:
        decode_envelope(pack({**GOOD, **m}))
    except WireError:
        pass


def test_notice_on_inbox() -> None:
    item = decode_inbox(notice(SESSION, "expired", "no keepalive"))
    assert item.session == SESSION
    assert not isinstance(item, Envelope)


def test_open_request() -> None:
    m = {"v": 1, "token": "t", "cluster": "c1", "streams": ["a", "b", "a"], "jwk": {"kty": "OKP"}}
    req = decode_open(m)
    assert req.streams == ("a", "b")
    assert req.key_mode == "session"
    assert decode_open(req.to_map()) == req
    bad: dict[str, Any]
    for bad in (
        {"streams": []},
        {"streams": ["A"]},
        {"key_mode": "none"},
        {"jwk": {1: "x"}},
        {"jwk": ["kty"]},
        {"zip": 1},
    ):
        with pytest.raises(WireError):
            decode_open({**m, **bad})
    with pytest.raises(WireError):
        decode_session_ref({"v": 1, "session": SESSION})


def test_decode_map_rejects_non_string_keys() -> None:
    with pytest.raises(WireError):
        decode_map(msgpack.packb({b"k": 1}, use_bin_type=True))


def test_subjects() -> None:
    s = Subjects("acme.prod")
    assert s.control("c1") == "acme.prod.cluster.c1.control"
    assert s.data("c1", SESSION) == f"acme.prod.cluster.c1.data.{SESSION}"
    assert s.inbox(SESSION) == f"acme.prod.inbox.{SESSION}"
    assert s.parse_data(s.data("c1", SESSION)) == ("c1", SESSION)
    assert s.parse_data("acme.prod.cluster.c1.data.bad") is None
    assert s.parse_data("other.cluster.c1.data." + SESSION) is None
    with pytest.raises(ValueError):
        Subjects("a..b")


def test_id_checks() -> None:
    assert check_cluster_id("Prod_1-a") == "Prod_1-a"
    assert check_stream("http_events") == "http_events"
    assert check_session_id(SESSION) == SESSION
    for fn, bad in ((check_cluster_id, "a b"), (check_stream, ""), (check_session_id, "x" * 44)):
        with pytest.raises(WireError):
            fn(bad)
