"""The session control protocol of docs/protocol.md ("Session control"), sans I/O: bytes in,
typed values out, and back (h11's way: the roles are the I/O shell around it).

::

    consumer -> proxy, on P.api.session.<op>    OpenRequest (open), SessionRef (close,
                                                keepalive), ResumeRequest (resume, with a
                                                store), GrantsRequest (grants):
                                                decode_request / encode
    proxy -> consumer, the reply                Opened, KeptAlive, Ok, Replayed, Granted, or
                                                a Refusal: decode_reply / encode
    proxy -> producer, on P.cluster.<id>.control  ControlOpen, ControlClose, Ping,
                                                ControlGrants: decode_control / encode
    producer -> proxy, the reply                Ok, Pong, Granted, or a Refusal:
                                                decode_reply / encode

Every form check is made here, once, where a message is decoded: the version, the types, the
sizes, and the binding of a session id to its key (a ``ControlOpen``'s ``session`` is the
RFC 7638 thumbprint of its ``jwk``). A malformed message is a :class:`WireError` (a
``bad_request``). A refusal on the wire is a :class:`Refusal` value; in the code it travels
as the one refusal exception, :class:`SessionError` (``Refusal.error()`` and
``Refusal.of()`` convert). The bytes are those of the contract, keys in its order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self, TypeVar

from sealstream.errors import SessionError, WireError
from sealstream.ids import check_cluster_id, check_session_id, check_stream
from sealstream.jwk import check_public_jwk, thumbprint
from sealstream.wire import (
    DEFAULT_MAX_REQUEST,
    VERSION,
    KeyMode,
    _check_version,
    _field,
    decode_map,
    encode_map,
)

__all__ = [
    "ERROR_CODES",
    "KEEPALIVE_MAX_S",
    "KEEPALIVE_MIN_S",
    "MAX_GRANTS",
    "MAX_MESSAGE",
    "MAX_PING",
    "MAX_PROOF",
    "MAX_REPLAY_LIMIT",
    "MAX_STREAMS",
    "MAX_USER",
    "Control",
    "ControlClose",
    "ControlGrants",
    "ControlOpen",
    "ErrorCode",
    "Granted",
    "GrantsRequest",
    "KeptAlive",
    "Ok",
    "OpenRequest",
    "Opened",
    "Ping",
    "Pong",
    "Refusal",
    "Replayed",
    "Reply",
    "Request",
    "ResumeRequest",
    "SessionRef",
    "decode_control",
    "decode_open",
    "decode_reply",
    "decode_request",
    "decode_session_ref",
    "encode",
]

ErrorCode = Literal[
    "bad_request", "unauthorized", "forbidden", "cluster_unavailable", "limit_exceeded"
]
ERROR_CODES: Final = frozenset(
    {"bad_request", "unauthorized", "forbidden", "cluster_unavailable", "limit_exceeded"}
)
MAX_STREAMS: Final = 64
#: cap on the ``proof`` and ``authz`` strings of an open
MAX_PROOF: Final = 8192
#: cap on a control open's ``user`` (a token's ``sub``) and a close's ``reason``
MAX_USER: Final = 256
#: a refusal's ``message`` is cut to this many characters where it is decoded
MAX_MESSAGE: Final = 512
#: the keepalive interval a reply sets is clamped to these bounds where it is decoded (s): the
#: relay paces the keepalives, but 1e-9 must not send them back to back
KEEPALIVE_MIN_S: Final = 1.0
KEEPALIVE_MAX_S: Final = 3600.0
#: at most this many session ids in a ping, and in a pong's ``unknown`` (a proxy pings a
#: cluster with more sessions in several pings)
MAX_PING: Final = 1000
#: a resume request's largest page (``limit``)
MAX_REPLAY_LIMIT: Final = 10_000
#: cap on a grants answer's signed ``grants`` string
MAX_GRANTS: Final = 16384
#: a tuple, not a set: membership of an unhashable value (a list, a map) is then False,
#: not TypeError
_KEY_MODES: Final = ("session", "per-message", "group")
_OPS: Final = ("open", "close", "ping", "grants")


def _opaque(m: Mapping[str, Any], key: str) -> str | None:
    if key not in m:
        return None
    value: str = _field(m, key, str)
    if not value or len(value) > MAX_PROOF:
        raise WireError("bad_value", f"key {key!r} must be 1 to {MAX_PROOF} characters")
    return value


def _short(m: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
    """A string member of at most MAX_USER characters (``default`` when absent, if given)."""
    if default is not None and key not in m:
        return default
    value: str = _field(m, key, str)
    if len(value) > MAX_USER:
        raise WireError("bad_value", f"key {key!r} exceeds {MAX_USER} characters")
    return value


def _forwarded(proof: str | None, authz: str | None) -> dict[str, str]:
    return {k: v for k, v in (("proof", proof), ("authz", authz)) if v is not None}


@dataclass(frozen=True, slots=True)
class _Asked:
    """The members an open and the control open it becomes share."""

    streams: tuple[str, ...]
    jwk: dict[str, Any]
    key_mode: KeyMode
    zip: bool
    proof: str | None
    authz: str | None


def _asked(m: Mapping[str, Any]) -> _Asked:
    raw_streams = _field(m, "streams", list)
    if not raw_streams or len(raw_streams) > MAX_STREAMS:
        raise WireError("bad_streams", f"streams must list 1 to {MAX_STREAMS} names")
    streams = tuple(dict.fromkeys(check_stream(s) for s in raw_streams))
    jwk = _field(m, "jwk", dict)
    if not all(isinstance(k, str) for k in jwk):
        raise WireError("bad_jwk", "jwk member names must be strings")
    key_mode = m.get("key_mode", "session")
    if key_mode not in _KEY_MODES:
        raise WireError("bad_key_mode", f"key_mode must be one of {sorted(_KEY_MODES)}")
    zip_ = m.get("zip", False)
    if not isinstance(zip_, bool):
        raise WireError("bad_type", "key 'zip' must be a bool")
    return _Asked(streams, dict(jwk), key_mode, zip_, _opaque(m, "proof"), _opaque(m, "authz"))


# --- consumer -> proxy ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """``P.api.session.open`` (consumer -> proxy)."""

    cluster: str
    streams: tuple[str, ...]
    jwk: dict[str, Any] = field(repr=False)
    key_mode: KeyMode
    token: str = field(default="", repr=False)
    zip: bool = False
    #: the consumer identity's proof and an issuer token, for the cluster (forwarded as is)
    proof: str | None = field(default=None, repr=False)
    authz: str | None = field(default=None, repr=False)

    def to_map(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "token": self.token,
            "cluster": self.cluster,
            "streams": list(self.streams),
            "jwk": self.jwk,
            "key_mode": self.key_mode,
            "zip": self.zip,
            **self.forwarded(),
        }

    def forwarded(self) -> dict[str, str]:
        """The members the proxy copies unchanged into the control ``open``."""
        return _forwarded(self.proof, self.authz)

    def control(self, *, user: str) -> ControlOpen:
        """The control ``open`` the proxy sends the cluster for this request: the session id
        is the thumbprint of the key, and only the key's members and ``alg`` go on."""
        jwk = check_public_jwk(self.jwk)
        return ControlOpen(
            session=thumbprint(jwk),
            streams=self.streams,
            jwk=jwk,
            key_mode=self.key_mode,
            zip=self.zip,
            user=user,
            proof=self.proof,
            authz=self.authz,
        )


def decode_open(m: Mapping[str, Any]) -> OpenRequest:
    """The members of an open request (a decoded map), checked; the key's own checks come
    with :func:`decode_request`."""
    _check_version(m)
    token = _field(m, "token", str)
    cluster = check_cluster_id(_field(m, "cluster", str))
    a = _asked(m)
    return OpenRequest(cluster, a.streams, a.jwk, a.key_mode, token, a.zip, a.proof, a.authz)


@dataclass(frozen=True, slots=True)
class SessionRef:
    """close / keepalive request: ``{"v":1, "token":JWT, "session":id}``."""

    session: str
    token: str = field(repr=False)

    def to_map(self) -> dict[str, Any]:
        return {"v": VERSION, "token": self.token, "session": self.session}


def decode_session_ref(m: Mapping[str, Any]) -> SessionRef:
    _check_version(m)
    return SessionRef(check_session_id(_field(m, "session", str)), _field(m, "token", str))


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """resume request (a deployment with a store): ``{"v":1, "token":JWT, "session":id,
    "after":n}``, ``after`` the last ``seq`` the consumer accepted (-1: none); with
    ``"group":s`` (a group member), the last ``gseq`` it accepted of group ``s``."""

    session: str
    token: str = field(repr=False)
    after: int
    #: a page: at most ``limit`` envelopes (None: all the store holds)
    limit: int | None = None
    #: where the previous page's answer said to read next (a hint; None: from the start)
    cursor: int | None = None
    #: (a group member) the group whose batches to replay: ``after`` is then a ``gseq``
    group: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and not 1 <= self.limit <= MAX_REPLAY_LIMIT:
            raise ValueError(f"limit must be 1 to {MAX_REPLAY_LIMIT}")
        if self.cursor is not None and not 1 <= self.cursor < 2**63:
            raise ValueError("cursor must be a positive integer")

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": VERSION,
            "token": self.token,
            "session": self.session,
            "after": self.after,
        }
        if self.limit is not None:
            m["limit"] = self.limit
        if self.cursor is not None:
            m["cursor"] = self.cursor
        if self.group is not None:
            m["group"] = self.group
        return m


def decode_resume(m: Mapping[str, Any]) -> ResumeRequest:
    ref = decode_session_ref(m)
    after = _field(m, "after", int)
    if not -1 <= after < 2**63:
        raise WireError("bad_value", "after must be a seq, or -1")
    limit = _field(m, "limit", int) if "limit" in m else None
    cursor = _field(m, "cursor", int) if "cursor" in m else None
    group = _field(m, "group", str) if "group" in m else None
    try:
        return ResumeRequest(ref.session, ref.token, after, limit, cursor, group)
    except ValueError as exc:
        raise WireError("bad_value", str(exc)) from None


@dataclass(frozen=True, slots=True)
class GrantsRequest:
    """``P.api.session.grants`` (consumer -> proxy): what does ``cluster`` grant the identity
    that signed ``proof`` (a grants proof, required)?"""

    cluster: str
    proof: str = field(repr=False)
    token: str = field(default="", repr=False)
    authz: str | None = field(default=None, repr=False)

    def to_map(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "token": self.token,
            "cluster": self.cluster,
            **_forwarded(self.proof, self.authz),
        }

    def control(self, *, user: str) -> ControlGrants:
        """The control ``grants`` the proxy sends the cluster (proof and authz unchanged)."""
        return ControlGrants(user, self.proof, self.authz)


def decode_grants(m: Mapping[str, Any]) -> GrantsRequest:
    _check_version(m)
    token = _field(m, "token", str)
    cluster = check_cluster_id(_field(m, "cluster", str))
    return GrantsRequest(cluster, _proof(m), token, _opaque(m, "authz"))


def _proof(m: Mapping[str, Any]) -> str:
    proof = _opaque(m, "proof")
    if proof is None:
        raise WireError("missing_key", "a grants request needs a proof")
    return proof


Request = OpenRequest | SessionRef | ResumeRequest | GrantsRequest


def decode_request(op: str, payload: bytes, *, max_size: int = DEFAULT_MAX_REQUEST) -> Request:
    """A session request on ``P.api.session.<op>``, every form check made (an open's ``jwk``
    an allowed public key among them); WireError otherwise."""
    m = decode_map(payload, max_size=max_size)
    if op == "open":
        req = decode_open(m)
        check_public_jwk(req.jwk)
        return req
    if op in ("close", "keepalive"):
        return decode_session_ref(m)
    if op == "resume":
        return decode_resume(m)
    if op == "grants":
        return decode_grants(m)
    raise WireError("bad_op", f"unknown operation {op!r:.40}")


# --- proxy -> producer ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlOpen:
    """The control ``open`` (proxy -> producer). Its ``session`` is the thumbprint of its
    ``jwk`` (an allowed public key), checked however it is made (decoded or built): no role
    checks that again."""

    session: str
    streams: tuple[str, ...]
    jwk: dict[str, Any] = field(repr=False)
    key_mode: KeyMode
    zip: bool
    user: str
    proof: str | None = field(default=None, repr=False)
    authz: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # The session id IS the key's thumbprint: a relay that swaps the key changes the id,
        # and the signed claims then name a session the consumer does not have.
        if thumbprint(check_public_jwk(self.jwk)) != self.session:
            raise WireError("session_mismatch", "session id is not the key's thumbprint")

    def to_map(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "op": "open",
            "session": self.session,
            "streams": list(self.streams),
            "jwk": self.jwk,
            "key_mode": self.key_mode,
            "zip": self.zip,
            "user": self.user,
            **_forwarded(self.proof, self.authz),  # the cluster's business, untouched
        }


@dataclass(frozen=True, slots=True)
class ControlClose:
    """The control ``close``: the consumer closed the session, or it expired."""

    session: str
    reason: str = ""

    def to_map(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "close", "session": self.session, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Ping:
    """The control ``ping``: is the cluster alive, and which of these does it not serve?"""

    sessions: tuple[str, ...]

    def to_map(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "ping", "sessions": list(self.sessions)}


@dataclass(frozen=True, slots=True)
class ControlGrants:
    """The control ``grants``: the cluster answers from its policy, creating no session."""

    user: str
    proof: str = field(repr=False)
    authz: str | None = field(default=None, repr=False)

    def to_map(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "op": "grants",
            "user": self.user,
            **_forwarded(self.proof, self.authz),
        }


Control = ControlOpen | ControlClose | Ping | ControlGrants


def _session_list(m: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(check_session_id(s) for s in _field(m, key, list))


def decode_control(payload: bytes, *, max_size: int = DEFAULT_MAX_REQUEST) -> Control:
    """A control request on ``P.cluster.<id>.control`` (the producer's side); WireError if
    malformed, ``session_mismatch`` for an open whose session is not its key's thumbprint."""
    m = decode_map(payload, max_size=max_size)
    _check_version(m)
    op = m.get("op")
    if op not in _OPS:
        raise WireError("bad_op", f"unknown op {op!r:.40}")
    if op == "ping":
        if len(_field(m, "sessions", list)) > MAX_PING:
            raise WireError("oversize", f"a ping lists at most {MAX_PING} sessions")
        return Ping(_session_list(m, "sessions"))
    if op == "grants":
        return ControlGrants(_short(m, "user"), _proof(m), _opaque(m, "authz"))
    session = check_session_id(_field(m, "session", str))
    if op == "close":
        return ControlClose(session, _short(m, "reason", default=""))
    a = _asked(m)
    jwk = check_public_jwk(a.jwk)
    user = _short(m, "user")
    return ControlOpen(session, a.streams, jwk, a.key_mode, a.zip, user, a.proof, a.authz)


# --- replies --------------------------------------------------------------------------------


def _keepalive_s(m: Mapping[str, Any]) -> float | None:
    if "keepalive_s" not in m:
        return None
    value = m["keepalive_s"]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise WireError("bad_value", "keepalive_s must be a positive number")
    return min(max(float(value), KEEPALIVE_MIN_S), KEEPALIVE_MAX_S)


class _Answer:
    """A reply that is not a refusal (decoded by :func:`decode_reply`)."""

    __slots__ = ()

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Self:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Ok(_Answer):
    """``{"ok": true}``: a close served, a control open or close accepted."""

    def to_map(self) -> dict[str, Any]:
        return {"ok": True}

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class Opened(_Answer):
    """The proxy's answer to an open (``keepalive_s`` None: the proxy did not say)."""

    session: str
    inbox: str
    keepalive_s: float | None
    #: the cluster keeps a store: the session may ask for a replay (``"store": true``)
    store: bool = False

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {"ok": True, "session": self.session, "inbox": self.inbox}
        if self.keepalive_s is not None:
            m["keepalive_s"] = self.keepalive_s
        if self.store:
            m["store"] = True
        return m

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Self:
        session = check_session_id(_field(m, "session", str))
        store = _field(m, "store", bool) if "store" in m else False
        return cls(session, _field(m, "inbox", str), _keepalive_s(m), store)


@dataclass(frozen=True, slots=True)
class KeptAlive(_Answer):
    """The proxy's answer to a keepalive."""

    keepalive_s: float | None

    def to_map(self) -> dict[str, Any]:
        return (
            {"ok": True}
            if self.keepalive_s is None
            else {"ok": True, "keepalive_s": self.keepalive_s}
        )

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Self:
        return cls(_keepalive_s(m))


@dataclass(frozen=True, slots=True)
class Replayed(_Answer):
    """The proxy's answer to a resume: how many stored envelopes it published on the inbox
    (before this answer)."""

    replayed: int
    #: (a page was asked for) stored envelopes remain past the last one published
    more: bool = False
    #: (a page was asked for) where the next page is read from, to send back as ``cursor``
    cursor: int | None = None
    #: the ``seq`` of the first envelope published (None: none was)
    first: int | None = None

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {"ok": True, "replayed": self.replayed}
        if self.more:
            m["more"] = True
        if self.cursor is not None:
            m["cursor"] = self.cursor
        if self.first is not None:
            m["first"] = self.first
        return m

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Self:
        replayed = _field(m, "replayed", int)
        if replayed < 0:
            raise WireError("bad_value", "replayed must not be negative")
        more = _field(m, "more", bool) if "more" in m else False
        cursor = _field(m, "cursor", int) if "cursor" in m else None
        first = _field(m, "first", int) if "first" in m else None
        if cursor is not None and not 1 <= cursor < 2**63:
            raise WireError("bad_value", "cursor must be a positive integer")
        if first is not None and not 0 <= first < 2**63:
            raise WireError("bad_value", "first must be a seq")
        if first is not None and replayed == 0:
            raise WireError("bad_value", "first names the first of the envelopes replayed")
        return cls(replayed, more, cursor, first)


@dataclass(frozen=True, slots=True)
class Pong(_Answer):
    """A producer's answer to a ping: the sessions it does not serve."""

    unknown: tuple[str, ...]

    def to_map(self) -> dict[str, Any]:
        return {"ok": True, "unknown": list(self.unknown)}

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Self:
        return cls(_session_list(m, "unknown") if "unknown" in m else ())


@dataclass(frozen=True, slots=True)
class Granted(_Answer):
    """The answer to a grants request: the cluster's signed answer, passed on unchanged (its
    signature and claims are the consumer's to check: the relay cannot)."""

    grants: str = field(repr=False)

    def to_map(self) -> dict[str, Any]:
        return {"ok": True, "grants": self.grants}

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Self:
        grants: str = _field(m, "grants", str)
        if not grants or len(grants) > MAX_GRANTS:
            raise WireError("bad_value", f"key 'grants' must be 1 to {MAX_GRANTS} characters")
        return cls(grants)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error reply. ``retry`` marks a passing refusal (the proxy is busy) that the same
    request may meet with success a moment later."""

    code: ErrorCode
    message: str
    retry: bool = False

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.code!r}")

    def to_map(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry:
            error["retry"] = True
        return {"ok": False, "error": error}

    @classmethod
    def of(cls, exc: SessionError) -> Refusal:
        """The refusal that answers ``exc`` (ValueError for a code the wire does not have)."""
        return cls(exc.code, exc.detail, exc.retry)  # type: ignore[arg-type]

    def error(self) -> SessionError:
        return SessionError(self.code, self.message, retry=self.retry)

    @classmethod
    def _from_map(cls, m: Mapping[str, Any]) -> Refusal:
        error = _field(m, "error", dict)
        code = _field(error, "code", str)
        if code not in ERROR_CODES:
            raise WireError("bad_code", f"unknown error code {code!r:.40}")
        retry = error.get("retry", False)
        if not isinstance(retry, bool):
            raise WireError("bad_type", "key 'retry' must be a bool")
        return cls(code, _field(error, "message", str)[:MAX_MESSAGE], retry)


Reply = Ok | Opened | KeptAlive | Replayed | Pong | Granted | Refusal
_R = TypeVar("_R", bound=_Answer)


def decode_reply(
    payload: bytes, kind: type[_R], *, max_size: int = DEFAULT_MAX_REQUEST
) -> _R | Refusal:
    """A reply that answers with ``kind``, or a refusal; WireError if malformed."""
    m = decode_map(payload, max_size=max_size)
    ok = _field(m, "ok", bool)
    return kind._from_map(m) if ok else Refusal._from_map(m)


def encode(value: Request | Control | Reply) -> bytes:
    """The value's bytes on the wire (keys in the contract's order)."""
    return encode_map(value.to_map())
