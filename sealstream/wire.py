"""msgpack codecs of the wire contract v1, with strict validation (pure, no I/O): the
envelopes and notices; the session control messages are :mod:`sealstream.control`'s.

Every malformed input becomes a :class:`WireError` with a stable ``reason``; no msgpack
exception escapes. Sizes are capped before decoding.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgpack

from sealstream.errors import WireError
from sealstream.ids import (
    SESSION_STREAM,
    check_cluster_id,
    check_session_id,
    check_stream,
    is_cluster_id,
    is_session_id,
    is_stream,
)

__all__ = [
    "DEFAULT_MAX_ENVELOPE",
    "DEFAULT_MAX_REQUEST",
    "VERSION",
    "Envelope",
    "EnvelopeKind",
    "KeyMode",
    "Notice",
    "decode_envelope",
    "decode_inbox",
    "decode_map",
    "encode_envelope",
    "encode_map",
    "notice",
]

VERSION: Final = 1
#: NATS' default max_payload; envelopes never exceed it.
DEFAULT_MAX_ENVELOPE: Final = 1024 * 1024
DEFAULT_MAX_REQUEST: Final = 64 * 1024

#: ``group``: a group data envelope (sealstream.groupwire), never decoded by this module
EnvelopeKind = Literal["key", "data", "end", "group"]
KeyMode = Literal["session", "per-message", "group"]
_KINDS: Final = frozenset({"key", "data", "end"})
_MAX_U63: Final = 2**63 - 1
_DECODE_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)


def encode_map(value: Mapping[str, Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(payload: bytes, max_size: int) -> Any:
    if len(payload) > max_size:
        raise WireError("oversize", f"payload of {len(payload)} bytes exceeds {max_size}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except _DECODE_ERRORS as exc:
        raise WireError("not_msgpack", "payload is not a single msgpack value") from exc


def _as_map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError("not_a_map", "payload is not a msgpack map")
    if not all(isinstance(k, str) for k in value):
        raise WireError("bad_key", "map keys must be strings")
    return value


def decode_map(payload: bytes, *, max_size: int = DEFAULT_MAX_REQUEST) -> dict[str, Any]:
    """Decode a msgpack map with string keys, or raise WireError."""
    return _as_map(_unpack(payload, max_size))


def _field(m: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in m:
        raise WireError("missing_key", f"missing key {key!r}")
    value = m[key]
    # bool is an int in Python; the wire keeps them apart.
    if isinstance(value, bool) and kind is not bool:
        raise WireError("bad_type", f"key {key!r} has type bool")
    if not isinstance(value, kind):
        raise WireError("bad_type", f"key {key!r} has type {type(value).__name__}")
    return value


def _check_version(m: Mapping[str, Any]) -> None:
    if _field(m, "v", int) != VERSION:
        raise WireError("bad_version", f"unsupported version {m['v']!r}")


def _uint(m: Mapping[str, Any], key: str) -> int:
    value: int = _field(m, key, int)
    if not 0 <= value <= _MAX_U63:
        raise WireError("bad_value", f"key {key!r} out of range")
    return value


@dataclass(frozen=True, slots=True)
class Envelope:
    """One producer -> consumer message. ``body`` is a compact JWE (ASCII bytes)."""

    kind: EnvelopeKind
    cluster: str
    session: str
    stream: str
    seq: int
    ts: int
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Notice:
    """An unauthenticated hint the proxy publishes on an inbox; never data."""

    session: str
    code: str
    message: str


@functools.lru_cache(maxsize=4096)
def _envelope_prefix(kind: str, cluster: str, session: str, stream: str) -> bytes:
    """The map header and the fields that stay the same for a session's stream and kind."""
    head = msgpack.packb(
        {"v": VERSION, "kind": kind, "cluster": cluster, "session": session, "stream": stream}
    )
    return b"\x88" + head[1:]  # eight entries: seq, ts and body follow


def _bin_header(n: int) -> bytes:
    if n < 256:
        return b"\xc4" + bytes((n,))
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_envelope(env: Envelope) -> bytes:
    """The envelope as a msgpack map, keys in the contract's order (the same bytes as packing
    the map; assembled from a cached prefix, since this runs for every envelope)."""
    return b"".join(
        (
            _envelope_prefix(env.kind, env.cluster, env.session, env.stream),
            b"\xa3seq",
            msgpack.packb(env.seq),
            b"\xa2ts",
            msgpack.packb(env.ts),
            b"\xa4body",
            _bin_header(len(env.body)),
            env.body,
        )
    )


def _envelope_from_map(m: Mapping[str, Any], max_size: int) -> Envelope:
    _check_version(m)
    kind = _field(m, "kind", str)
    if kind not in _KINDS:
        raise WireError("bad_kind", f"unknown envelope kind {kind!r:.40}")
    cluster = check_cluster_id(_field(m, "cluster", str))
    session = check_session_id(_field(m, "session", str))
    stream = _field(m, "stream", str)
    if kind == "data":
        check_stream(stream)
    elif stream != SESSION_STREAM:
        raise WireError("bad_stream", f"{kind} envelopes carry stream {SESSION_STREAM!r}")
    body = _field(m, "body", bytes)
    if not body or len(body) > max_size:
        raise WireError("bad_body", "body is empty or too large")
    return Envelope(kind, cluster, session, stream, _uint(m, "seq"), _uint(m, "ts"), body)


def _well_formed(m: dict[Any, Any], max_size: int) -> Envelope | None:
    """The envelope of a map that passes every check of :func:`_envelope_from_map`, tested in
    one expression (this runs for every envelope, at the proxy and at the consumer); None
    for anything else, which the step-by-step checks then name. Exactly the eight keys, all
    strings, and exact types (msgpack yields no subclasses): never laxer than those checks."""
    if len(m) != 8:
        return None
    try:
        v, kind, cluster, session = m["v"], m["kind"], m["cluster"], m["session"]
        stream, seq, ts, body = m["stream"], m["seq"], m["ts"], m["body"]
    except KeyError:
        return None
    if (
        type(v) is not int
        or v != VERSION
        or type(kind) is not str
        or kind not in _KINDS
        or type(cluster) is not str
        or type(session) is not str
        or type(stream) is not str
        or type(seq) is not int
        or type(ts) is not int
        or type(body) is not bytes
        or not 0 <= seq <= _MAX_U63
        or not 0 <= ts <= _MAX_U63
        or not 0 < len(body) <= max_size
        or not is_cluster_id(cluster)
        or not is_session_id(session)
        or not (is_stream(stream) if kind == "data" else stream == SESSION_STREAM)
    ):
        return None
    return Envelope(kind, cluster, session, stream, seq, ts, body)  # type: ignore[arg-type]


def decode_envelope(payload: bytes, *, max_size: int = DEFAULT_MAX_ENVELOPE) -> Envelope:
    """Decode and validate an envelope; raise WireError on anything malformed."""
    value = _unpack(payload, max_size)
    if type(value) is dict and (env := _well_formed(value, max_size)) is not None:
        return env
    return _envelope_from_map(_as_map(value), max_size)


def decode_inbox(payload: bytes, *, max_size: int = DEFAULT_MAX_ENVELOPE) -> Envelope | Notice:
    """Decode what arrives on a consumer inbox: an envelope, or a proxy notice."""
    value = _unpack(payload, max_size)
    if type(value) is dict and (env := _well_formed(value, max_size)) is not None:
        return env
    m = _as_map(value)
    if m.get("kind") == "notice":
        _check_version(m)
        return Notice(
            session=check_session_id(_field(m, "session", str)),
            code=_field(m, "code", str)[:64],
            message=_field(m, "message", str)[:512],
        )
    return _envelope_from_map(m, max_size)


def notice(session: str, code: str, message: str) -> bytes:
    return encode_map(
        {"v": VERSION, "kind": "notice", "session": session, "code": code, "message": message}
    )
