"""The group data envelope of the wire contract (group mode; pure, no I/O, no crypto).

``{"v":1, "kind":"group", "cluster", "stream", "epoch", "gseq", "ts", "body", "sig"}``: one
batch of a stream, sealed once under the stream's group key and signed by the cluster, relayed
byte for byte to every member's inbox (docs/protocol.md, "Group mode"). The proxy decodes
these header fields to route; members decode them before verifying.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from sealstream.errors import WireError
from sealstream.ids import check_cluster_id, check_stream, is_cluster_id, is_stream
from sealstream.wire import (
    DEFAULT_MAX_ENVELOPE,
    VERSION,
    Envelope,
    Notice,
    decode_inbox,
)

__all__ = [
    "GROUP_KIND",
    "SIG_BYTES",
    "GroupEnvelope",
    "decode_group_envelope",
    "decode_member_inbox",
    "encode_group_envelope",
]

GROUP_KIND: Final = "group"
SIG_BYTES: Final = 64
_KEYS: Final = frozenset({"v", "kind", "cluster", "stream", "epoch", "gseq", "ts", "body", "sig"})
_MAX_U63: Final = 2**63 - 1
_DECODE_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)


@dataclass(frozen=True, slots=True)
class GroupEnvelope(Envelope):
    """A group batch as it arrives on an inbox. It names no session (the same bytes reach
    every member): ``session`` is empty and ``seq`` is the group's ``gseq``."""

    epoch: int
    sig: bytes = field(repr=False)


def encode_group_envelope(
    *, cluster: str, stream: str, epoch: int, gseq: int, ts: int, body: bytes, sig: bytes
) -> bytes:
    """The envelope as a msgpack map, keys in the contract's order."""
    return msgpack.packb(
        {
            "v": VERSION,
            "kind": GROUP_KIND,
            "cluster": cluster,
            "stream": stream,
            "epoch": epoch,
            "gseq": gseq,
            "ts": ts,
            "body": body,
            "sig": sig,
        },
        use_bin_type=True,
    )


def _uint(value: Any, key: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_U63:
        raise WireError("bad_value", f"key {key!r} must be an integer in 0..2**63-1")
    return value


def _from_map(m: Mapping[Any, Any], max_size: int) -> GroupEnvelope:
    if set(m) != _KEYS:
        raise WireError("bad_keys", "a group envelope has exactly its nine keys")
    if type(m["v"]) is not int or m["v"] != VERSION:
        raise WireError("bad_version", "unsupported version")
    if m["kind"] != GROUP_KIND:
        raise WireError("bad_kind", "not a group envelope")
    cluster, stream, body, sig = m["cluster"], m["stream"], m["body"], m["sig"]
    if not is_cluster_id(cluster):
        check_cluster_id(cluster)
    if not is_stream(stream):
        check_stream(stream)
    if type(body) is not bytes or not 0 < len(body) <= max_size:
        raise WireError("bad_body", "body is empty, too large, or not bin")
    if type(sig) is not bytes or len(sig) != SIG_BYTES:
        raise WireError("bad_sig", f"sig must be {SIG_BYTES} bytes of bin")
    return GroupEnvelope(
        GROUP_KIND,
        cluster,
        "",
        stream,
        _uint(m["gseq"], "gseq"),
        _uint(m["ts"], "ts"),
        body,
        _uint(m["epoch"], "epoch"),
        sig,
    )


def _unpack(payload: bytes, max_size: int) -> Any:
    if len(payload) > max_size:
        raise WireError("oversize", f"payload of {len(payload)} bytes exceeds {max_size}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except _DECODE_ERRORS as exc:
        raise WireError("not_msgpack", "payload is not a single msgpack value") from exc


def decode_group_envelope(payload: bytes, *, max_size: int = DEFAULT_MAX_ENVELOPE) -> GroupEnvelope:
    """Decode and validate a group envelope; raise WireError on anything malformed."""
    value = _unpack(payload, max_size)
    if type(value) is not dict:
        raise WireError("not_a_map", "payload is not a msgpack map")
    return _from_map(value, max_size)


def decode_member_inbox(
    payload: bytes, *, max_size: int = DEFAULT_MAX_ENVELOPE
) -> Envelope | Notice:
    """What arrives on a group member's inbox: a :class:`GroupEnvelope`, a session envelope
    (key, end) or a proxy notice."""
    value = _unpack(payload, max_size)
    if type(value) is dict and value.get("kind") == GROUP_KIND:
        return _from_map(value, max_size)
    return decode_inbox(payload, max_size=max_size)
