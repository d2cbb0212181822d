"""The control codec: round trips, the contract's exact bytes, every refusal form, and the
form checks made where a message is decoded (the session id bound to its key among them)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealstream import SessionError, WireError
from sealstream.control import (
    ERROR_CODES,
    KEEPALIVE_MAX_S,
    KEEPALIVE_MIN_S,
    MAX_GRANTS,
    MAX_MESSAGE,
    MAX_PING,
    MAX_PROOF,
    MAX_REPLAY_LIMIT,
    MAX_STREAMS,
    MAX_USER,
    ControlClose,
    ControlGrants,
    ControlOpen,
    Granted,
    GrantsRequest,
    KeptAlive,
    Ok,
    Opened,
    OpenRequest,
    Ping,
    Pong,
    Refusal,
    Replayed,
    ResumeRequest,
    SessionRef,
    decode_control,
    decode_reply,
    decode_request,
    encode,
)
from sealstream.jwk import b64u_encode, thumbprint
from sealstream.wire import DEFAULT_MAX_REQUEST


def pack(m: Any) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def x25519_jwk(x: bytes | None = None) -> dict[str, Any]:
    return {"kty": "OKP", "crv": "X25519", "x": b64u_encode(x or os.urandom(32))}


def key_whose_id_starts_with(first: str) -> dict[str, Any]:
    """A public key whose thumbprint (the session id) starts with ``first``: an edge of the
    id alphabet on purpose (one key in 64 has it)."""
    for i in range(100_000):
        jwk = x25519_jwk(hashlib.sha256(f"{first}{i}".encode()).digest())
        if thumbprint(jwk).startswith(first):
            return jwk
    raise AssertionError("no key found")  # pragma: no cover - 100k tries, p ~ 0


DASH_KEY = key_whose_id_starts_with("-")
UNDERSCORE_KEY = key_whose_id_starts_with("_")
KEY = x25519_jwk()
SESSION = thumbprint(KEY)

# --- strategies -------------------------------------------------------------------------------

session_ids = st.from_regex(r"[A-Za-z0-9_-]{43}", fullmatch=True)
streams = st.lists(
    st.from_regex(r"[a-z0-9][a-z0-9_]{0,63}", fullmatch=True),
    min_size=1,
    max_size=MAX_STREAMS,
    unique=True,
).map(tuple)
clusters = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
key_modes = st.sampled_from(["session", "per-message", "group"])
opaque = st.none() | st.text(min_size=1, max_size=200)
jwks = st.binary(min_size=32, max_size=32).map(x25519_jwk)
short = st.text(max_size=MAX_USER)
keepalives = st.none() | st.integers(1, 3600) | st.floats(KEEPALIVE_MIN_S, KEEPALIVE_MAX_S)

open_requests = st.builds(
    OpenRequest,
    cluster=clusters,
    streams=streams,
    jwk=jwks,
    key_mode=key_modes,
    token=st.text(max_size=100),
    zip=st.booleans(),
    proof=opaque,
    authz=opaque,
)
control_opens = st.builds(lambda req, user: req.control(user=user), open_requests, short)
controls = (
    control_opens
    | st.builds(ControlClose, session_ids, short)
    | st.builds(Ping, st.lists(session_ids, max_size=20).map(tuple))
)
refusals = st.builds(
    Refusal, st.sampled_from(sorted(ERROR_CODES)), st.text(max_size=MAX_MESSAGE), st.booleans()
)


@settings(max_examples=200)
@given(open_requests)
def test_an_open_request_round_trips(req: OpenRequest) -> None:
    assert decode_request("open", encode(req)) == req


@settings(max_examples=100)
@given(session_ids, st.text(max_size=100), st.sampled_from(["close", "keepalive"]))
def test_a_session_ref_round_trips(session: str, token: str, op: str) -> None:
    ref = SessionRef(session, token)
    assert decode_request(op, encode(ref)) == ref


@settings(max_examples=100)
@given(session_ids, st.text(max_size=100), st.integers(-1, 2**63 - 1))
def test_a_resume_request_round_trips(session: str, token: str, after: int) -> None:
    req = ResumeRequest(session, token, after)
    assert decode_request("resume", encode(req)) == req
    assert encode(req) == pack({"v": 1, "token": token, "session": session, "after": after})


@settings(max_examples=100)
@given(
    session_ids,
    st.integers(-1, 2**63 - 1),
    st.integers(1, MAX_REPLAY_LIMIT),
    st.none() | st.integers(1, 2**63 - 1),
)
def test_a_page_request_round_trips(session: str, after: int, limit: int, cursor: Any) -> None:
    req = ResumeRequest(session, "t", after, limit, cursor)
    assert decode_request("resume", encode(req)) == req
    extra = {"limit": limit} | ({} if cursor is None else {"cursor": cursor})
    assert encode(req) == pack({"v": 1, "token": "t", "session": session, "after": after} | extra)


def test_a_group_resume_names_its_group() -> None:
    req = ResumeRequest(SESSION, "t", 7, 50, None, "http_events")
    assert decode_request("resume", encode(req)) == req
    assert encode(req) == pack(
        {"v": 1, "token": "t", "session": SESSION, "after": 7, "limit": 50, "group": "http_events"}
    )
    base = {"v": 1, "token": "t", "session": SESSION, "after": 3}
    for group in (1, None, b"records", ["records"]):
        with pytest.raises(WireError):
            decode_request("resume", pack({**base, "group": group}))


def test_a_page_is_1_to_the_limit_from_a_positive_cursor() -> None:
    base = {"v": 1, "token": "t", "session": SESSION, "after": 3}
    for bad in (
        {"limit": 0},
        {"limit": MAX_REPLAY_LIMIT + 1},
        {"limit": 1.0},
        {"limit": True},
        {"cursor": 0},
        {"cursor": -1},
        {"cursor": 2**63},
        {"cursor": "1"},
    ):
        with pytest.raises(WireError):
            decode_request("resume", pack({**base, **bad}))
    for answer in (
        {"ok": True, "replayed": 0, "first": 1},  # a first of nothing
        {"ok": True, "replayed": 1, "first": -1},
        {"ok": True, "replayed": 1, "more": 1},
        {"ok": True, "replayed": 1, "cursor": 0},
    ):
        with pytest.raises(WireError):
            decode_reply(pack(answer), Replayed)
    # a proxy that pages nothing answers as before
    assert decode_reply(pack({"ok": True, "replayed": 2}), Replayed) == Replayed(2)


def test_a_resume_request_needs_a_seq_after() -> None:
    base = {"v": 1, "token": "t", "session": SESSION}
    for after in (-2, 2**63, 1.0, True, "3", None):
        with pytest.raises(WireError):
            decode_request("resume", pack({**base, "after": after}))
    with pytest.raises(WireError):
        decode_request("resume", pack(base))  # a resume says where it stopped
    for bad in ({"ok": True}, {"ok": True, "replayed": -1}, {"ok": True, "replayed": 1.0}):
        with pytest.raises(WireError):
            decode_reply(pack(bad), Replayed)


@settings(max_examples=200)
@given(controls)
def test_a_control_request_round_trips(control: Any) -> None:
    assert decode_control(encode(control)) == control


@given(
    st.one_of(
        st.builds(Opened, session_ids, st.text(max_size=80), keepalives),
        st.builds(KeptAlive, keepalives),
        st.builds(Replayed, st.integers(0, 2**32)),
        st.builds(
            Replayed,
            st.integers(1, 2**32),
            st.booleans(),
            st.none() | st.integers(1, 2**63 - 1),
            st.integers(0, 2**63 - 1),
        ),
        st.builds(Pong, st.lists(session_ids, max_size=20).map(tuple)),
        st.just(Ok()),
    )
)
def test_a_reply_round_trips(reply: Any) -> None:
    assert decode_reply(encode(reply), type(reply)) == reply


@given(refusals, st.sampled_from([Ok, Opened, KeptAlive, Pong]))
def test_a_refusal_round_trips_whatever_was_asked(refusal: Refusal, asked: Any) -> None:
    assert decode_reply(encode(refusal), asked) == refusal
    error = refusal.error()
    assert (error.code, error.detail, error.retry) == (refusal.code, refusal.message, refusal.retry)
    assert Refusal.of(error) == refusal


# --- the contract's bytes ---------------------------------------------------------------------


def test_each_message_has_the_contract_bytes() -> None:
    """The maps of docs/protocol.md, keys in its order: the wire the roles always sent."""
    req = OpenRequest("c1", ("a", "b"), KEY, "group", "tok", True, "p.r.f", "a.b.c")
    assert encode(req) == pack(
        {
            "v": 1,
            "token": "tok",
            "cluster": "c1",
            "streams": ["a", "b"],
            "jwk": KEY,
            "key_mode": "group",
            "zip": True,
            "proof": "p.r.f",
            "authz": "a.b.c",
        }
    )
    assert encode(SessionRef(SESSION, "tok")) == pack({"v": 1, "token": "tok", "session": SESSION})
    webcrypto = {**KEY, "ext": True, "key_ops": [], "kid": "browser"}
    control = OpenRequest("c1", ("a",), webcrypto, "session", "tok", proof="p.r.f").control(
        user="alice"
    )
    assert encode(control) == pack(
        {
            "v": 1,
            "op": "open",
            "session": SESSION,
            "streams": ["a"],
            "jwk": {"crv": "X25519", "kty": "OKP", "x": KEY["x"], "alg": "ECDH-ES+A256KW"},
            "key_mode": "session",
            "zip": False,
            "user": "alice",
            "proof": "p.r.f",
        }
    )
    closed = {"v": 1, "op": "close", "session": SESSION, "reason": "keepalive expired"}
    assert encode(ControlClose(SESSION, "keepalive expired")) == pack(closed)
    assert encode(Ping((SESSION,))) == pack({"v": 1, "op": "ping", "sessions": [SESSION]})
    assert encode(Ok()) == pack({"ok": True})
    assert encode(Pong(())) == pack({"ok": True, "unknown": []})
    assert encode(KeptAlive(10.0)) == pack({"ok": True, "keepalive_s": 10.0})
    assert encode(Opened(SESSION, "sealstream.inbox.x", 2.5)) == pack(
        {"ok": True, "session": SESSION, "inbox": "sealstream.inbox.x", "keepalive_s": 2.5}
    )


def test_a_grants_request_its_control_and_answer_have_the_contract_bytes() -> None:
    """Both ways: what is encoded decodes to the same value, with the contract's keys."""
    req = GrantsRequest("-c1", "p.r.f", "tok", "a.b.c")
    wire = pack({"v": 1, "token": "tok", "cluster": "-c1", "proof": "p.r.f", "authz": "a.b.c"})
    assert encode(req) == wire
    assert decode_request("grants", wire) == req
    control = req.control(user="-alice")
    wire = pack({"v": 1, "op": "grants", "user": "-alice", "proof": "p.r.f", "authz": "a.b.c"})
    assert encode(control) == wire
    assert decode_control(wire) == control
    assert decode_control(encode(ControlGrants("bob", "x.y.z"))) == ControlGrants("bob", "x.y.z")
    answer = Granted("h.c.s")
    assert encode(answer) == pack({"ok": True, "grants": "h.c.s"})
    assert decode_reply(encode(answer), Granted) == answer


@pytest.mark.parametrize(
    ("payload", "decode"),
    [
        ({"v": 1, "token": "t", "cluster": "c1"}, "request"),  # no proof
        ({"v": 1, "token": "t", "cluster": "c1", "proof": ""}, "request"),
        ({"v": 1, "token": "t", "cluster": "c1", "proof": "x" * (MAX_PROOF + 1)}, "request"),
        ({"v": 1, "token": "t", "cluster": "c 1", "proof": "p"}, "request"),
        ({"v": 2, "token": "t", "cluster": "c1", "proof": "p"}, "request"),
        ({"v": 1, "op": "grants", "user": "u"}, "control"),  # no proof
        ({"v": 1, "op": "grants", "user": "u" * (MAX_USER + 1), "proof": "p"}, "control"),
        ({"v": 1, "op": "grants", "user": 1, "proof": "p"}, "control"),
        ({"ok": True}, "reply"),
        ({"ok": True, "grants": ""}, "reply"),
        ({"ok": True, "grants": "x" * (MAX_GRANTS + 1)}, "reply"),
    ],
)
def test_a_malformed_grants_message_is_refused_where_it_is_decoded(
    payload: dict[str, Any], decode: str
) -> None:
    wire = pack(payload)
    with pytest.raises(WireError):
        if decode == "request":
            decode_request("grants", wire)
        elif decode == "control":
            decode_control(wire)
        else:
            decode_reply(wire, Granted)


def test_each_refusal_form() -> None:
    for code in sorted(ERROR_CODES):
        assert encode(Refusal(code, "why")) == pack(  # type: ignore[arg-type]
            {"ok": False, "error": {"code": code, "message": "why"}}
        )
    busy = Refusal("limit_exceeded", "too many pending requests", retry=True)
    assert encode(busy) == pack(
        {
            "ok": False,
            "error": {
                "code": "limit_exceeded",
                "message": "too many pending requests",
                "retry": True,
            },
        }
    )
    # a passing refusal is retriable; without the mark, retriable goes by code
    assert busy.error().retriable
    assert not Refusal("limit_exceeded", "at most 16 sessions").error().retriable
    assert Refusal("cluster_unavailable", "no producer").error().retriable
    assert not Refusal("forbidden", "key not authorized").error().retry
    # codes the wire does not have are misuse here, and malformed where decoded
    with pytest.raises(ValueError, match="unknown error code"):
        Refusal("ended", "over")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown error code"):
        Refusal.of(SessionError("ended", "the producer ended it"))
    malformed: list[dict[str, Any]] = [
        {"ok": False},
        {"ok": False, "error": "forbidden"},
        {"ok": False, "error": {"message": "no code"}},
        {"ok": False, "error": {"code": "teapot", "message": "unknown code"}},
        {"ok": False, "error": {"code": 403, "message": "int code"}},
        {"ok": False, "error": {"code": "forbidden"}},
        {"ok": False, "error": {"code": "forbidden", "message": b"bytes"}},
        {"ok": False, "error": {"code": "forbidden", "message": "m", "retry": 1}},
        {"ok": 0, "error": {"code": "forbidden", "message": "m"}},
        {"error": {"code": "forbidden", "message": "m"}},
    ]
    for m in malformed:
        with pytest.raises(WireError):
            decode_reply(pack(m), Ok)
    long = {"ok": False, "error": {"code": "bad_request", "message": "x" * 10_000}}
    refusal = decode_reply(pack(long), Ok)
    assert isinstance(refusal, Refusal)
    assert refusal.message == "x" * MAX_MESSAGE  # cut where decoded


# --- ids at the edges of their alphabet -------------------------------------------------------


@pytest.mark.parametrize("key", [DASH_KEY, UNDERSCORE_KEY], ids=["dash", "underscore"])
def test_a_session_id_starting_with_dash_or_underscore(key: dict[str, Any]) -> None:
    session = thumbprint(key)
    assert session[0] in "-_"
    control = OpenRequest("c1", ("a",), key, "session", "tok").control(user="u")
    assert control.session == session
    assert decode_control(encode(control)) == control
    for message in (ControlClose(session, "r"), Ping((session,))):
        assert decode_control(encode(message)) == message
    assert decode_request("keepalive", encode(SessionRef(session, "t"))) == SessionRef(session, "t")
    assert decode_reply(encode(Opened(session, "i", 1)), Opened) == Opened(session, "i", 1)
    assert decode_reply(encode(Pong((session,))), Pong) == Pong((session,))


# --- form checks ------------------------------------------------------------------------------


def test_the_session_id_is_bound_to_the_key_where_the_open_is_decoded() -> None:
    control = OpenRequest("c1", ("a",), KEY, "session", "tok").control(user="u")
    other = x25519_jwk()
    swapped = {**control.to_map(), "jwk": other}
    with pytest.raises(WireError) as err:
        decode_control(pack(swapped))
    assert err.value.reason == "session_mismatch"
    # the consumer's ids at the edges too: a key swapped for one whose id differs only there
    edge = {**control.to_map(), "session": thumbprint(DASH_KEY)}
    with pytest.raises(WireError) as err:
        decode_control(pack(edge))
    assert err.value.reason == "session_mismatch"
    private = {**control.to_map(), "jwk": {**KEY, "d": b64u_encode(os.urandom(32))}}
    with pytest.raises(WireError):
        decode_control(pack(private))


def test_a_control_open_built_directly_is_bound_to_its_key_too() -> None:
    """The binding is the type's, not only the decoder's: an authorizer given a ControlOpen
    made in code relies on it as well."""
    good = ControlOpen(SESSION, ("a",), KEY, "session", False, "u")
    assert good.session == SESSION
    flipped = SESSION[:-1] + ("B" if SESSION[-1] == "A" else "A")
    for session in (thumbprint(DASH_KEY), thumbprint(UNDERSCORE_KEY), flipped):
        with pytest.raises(WireError) as err:
            ControlOpen(session, ("a",), KEY, "session", False, "u")
        assert err.value.reason == "session_mismatch"
    with pytest.raises(WireError):  # a private key is no session key
        private = {**KEY, "d": b64u_encode(os.urandom(32))}
        ControlOpen(SESSION, ("a",), private, "session", False, "u")


def test_the_relays_keepalive_interval_is_clamped() -> None:
    """The relay paces the keepalives within [1, 3600] s: 1e-9 would send them back to back,
    and a huge one would never send one."""

    def interval(value: Any) -> float | None:
        opened = decode_reply(
            pack({"ok": True, "session": SESSION, "inbox": "i", "keepalive_s": value}), Opened
        )
        kept = decode_reply(pack({"ok": True, "keepalive_s": value}), KeptAlive)
        assert isinstance(opened, Opened)
        assert isinstance(kept, KeptAlive)
        assert opened.keepalive_s == kept.keepalive_s
        return kept.keepalive_s

    assert interval(1e-9) == KEEPALIVE_MIN_S == 1
    assert interval(0.5) == 1
    assert interval(1) == 1
    assert interval(2.5) == 2.5
    assert interval(3600) == 3600
    assert interval(3_000_000) == KEEPALIVE_MAX_S == 3600
    assert interval(1e300) == 3600
    assert interval(2**63) == 3600


def test_a_ping_holds_at_most_max_ping_sessions() -> None:
    full = Ping(tuple([thumbprint(DASH_KEY)] * MAX_PING))
    assert decode_control(encode(full)) == full
    with pytest.raises(WireError) as err:
        decode_control(encode(Ping(tuple([SESSION] * (MAX_PING + 1)))))
    assert err.value.reason == "oversize"


def _open_map(**changes: Any) -> dict[str, Any]:
    return {**OpenRequest("c1", ("a",), KEY, "session", "tok").to_map(), **changes}


def _control_map(**changes: Any) -> dict[str, Any]:
    control = OpenRequest("c1", ("a",), KEY, "session", "tok").control(user="u")
    return {**control.to_map(), **changes}


def test_oversize_messages_and_fields_are_refused() -> None:
    huge = pack(_open_map(token="t" * DEFAULT_MAX_REQUEST))
    with pytest.raises(WireError) as err:
        decode_request("open", huge)
    assert err.value.reason == "oversize"
    with pytest.raises(WireError) as err:
        decode_control(pack(_control_map(proof="p" * DEFAULT_MAX_REQUEST)))
    assert err.value.reason == "oversize"
    too_many = [f"s{i}" for i in range(MAX_STREAMS + 1)]
    oversize: list[dict[str, Any]] = [
        {"proof": "p" * (MAX_PROOF + 1)},
        {"authz": "a" * (MAX_PROOF + 1)},
        {"streams": too_many},
    ]
    for changes in oversize:
        with pytest.raises(WireError):
            decode_request("open", pack(_open_map(**changes)))
        with pytest.raises(WireError):
            decode_control(pack(_control_map(**changes)))
    at_the_cap = decode_request("open", pack(_open_map(proof="p" * MAX_PROOF)))
    assert isinstance(at_the_cap, OpenRequest)
    assert at_the_cap.proof == "p" * MAX_PROOF
    with pytest.raises(WireError):
        decode_control(pack(_control_map(user="u" * (MAX_USER + 1))))
    close = {"v": 1, "op": "close", "session": SESSION, "reason": "r" * (MAX_USER + 1)}
    with pytest.raises(WireError):
        decode_control(pack(close))


def test_wrong_types_are_refused() -> None:
    opens: list[dict[str, Any]] = [
        {"v": True},
        {"v": 2},
        {"v": "1"},
        {"token": 5},
        {"cluster": "no spaces"},
        {"streams": "a"},
        {"streams": []},
        {"streams": ["_session"]},
        {"jwk": ["kty"]},
        {"jwk": {"kty": "OKP"}},  # no key members: not an allowed public key
        {"key_mode": ["session"]},
        {"zip": 1},
        {"proof": b"p.r.f"},
        {"proof": ""},
        {"authz": 5},
    ]
    for changes in opens:
        with pytest.raises(WireError):
            decode_request("open", pack(_open_map(**changes)))
    controls: list[dict[str, Any]] = [
        {"v": True},
        {"op": "bogus"},
        {"op": None},
        {"session": 5},
        {"session": SESSION[:-1]},
        {"user": 5},
        {"streams": ["A"]},
        {"zip": "yes"},
    ]
    for changes in controls:
        with pytest.raises(WireError):
            decode_control(pack(_control_map(**changes)))
    others: list[dict[str, Any]] = [
        {"v": 1},  # no op
        {"v": 1, "op": "ping"},
        {"v": 1, "op": "ping", "sessions": SESSION},
        {"v": 1, "op": "ping", "sessions": [SESSION, 5]},
        {"v": 1, "op": "close"},
        {"v": 1, "op": "close", "session": SESSION, "reason": 5},
    ]
    for m in others:
        with pytest.raises(WireError):
            decode_control(pack(m))
    with pytest.raises(WireError):
        decode_control(b"\xc1 not msgpack")
    with pytest.raises(WireError):
        decode_request("keepalive", pack({"v": 1, "session": SESSION}))  # no token
    with pytest.raises(WireError):
        decode_request("rename", encode(SessionRef(SESSION, "t")))
    replies: list[tuple[type[Any], dict[str, Any]]] = [
        (Opened, {"ok": True, "inbox": "i", "keepalive_s": 1}),
        (Opened, {"ok": True, "session": SESSION, "inbox": 5}),
        (Opened, {"ok": True, "session": SESSION, "inbox": "i", "keepalive_s": True}),
        (KeptAlive, {"ok": True, "keepalive_s": -1}),
        (KeptAlive, {"ok": True, "keepalive_s": "10"}),
        (KeptAlive, {"ok": True, "keepalive_s": float("nan")}),
        (Pong, {"ok": True, "unknown": SESSION}),
        (Pong, {"ok": True, "unknown": ["short"]}),
    ]
    for kind, m in replies:
        with pytest.raises(WireError):
            decode_reply(pack(m), kind)


def test_optional_members_take_their_defaults() -> None:
    """What the contract lets a sender leave out: an open's key mode and zip, a close's
    reason, a pong's list, a reply's keepalive interval; unknown keys are ignored."""
    m = _open_map(extra="ignored")
    del m["key_mode"], m["zip"]
    req = decode_request("open", pack(m))
    assert isinstance(req, OpenRequest)
    assert (req.key_mode, req.zip, req.proof, req.authz) == ("session", False, None, None)
    assert decode_control(pack({"v": 1, "op": "close", "session": SESSION})) == ControlClose(
        SESSION
    )
    assert decode_reply(pack({"ok": True}), Pong) == Pong(())
    assert decode_reply(pack({"ok": True, "extra": 1}), KeptAlive) == KeptAlive(None)
