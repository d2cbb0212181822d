"""OTLP export requests in and out of their encodings, pure: protobuf and OTLP/JSON decoding,
bounded gzip, the split of a request into rows that fit a batch (docs/protocol.md,
"OpenTelemetry streams"), and the refusals with their HTTP status and gRPC code. The
receiver's HTTP and gRPC servers share it; :func:`prepare` (decoding and splitting, CPU-bound)
runs in a worker thread, never on the producer's event loop."""

from __future__ import annotations

import binascii
import json
import zlib
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from sealstream.otlp import Signal, count_items, otlp_row

__all__ = [
    "INTERNAL",
    "INVALID_ARGUMENT",
    "JSON",
    "NOT_FOUND",
    "PROTOBUF",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "Gunzip",
    "Refused",
    "bad",
    "decode",
    "prepare",
    "split_request",
    "to_rows",
    "too_large",
]

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
#: what the JSON mapping writes as hex, and protobuf's JSON parser reads as base64
_ID_FIELDS: Final = frozenset(
    {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
)
# google.rpc.Code values (the Status bodies of HTTP refusals, the codes of gRPC's)
INVALID_ARGUMENT: Final = 3
NOT_FOUND: Final = 5
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16


class Refused(Exception):
    """A request refused: its HTTP ``status``, its ``reason`` (the counter's label) and its
    google.rpc ``code``; the message is the answer's."""

    def __init__(self, status: int, reason: str, message: str, code: int) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.code = code


def bad(reason: str, message: str) -> Refused:
    return Refused(400, reason, message, INVALID_ARGUMENT)


def too_large(limit: int) -> Refused:
    return Refused(413, "too_large", f"body over {limit} bytes", RESOURCE_EXHAUSTED)


class Gunzip:
    """Streaming gzip decompression (several members allowed) that stops at ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.out = bytearray()

    def feed(self, data: bytes) -> None:
        try:
            while data:
                room = self._limit - len(self.out) + 1
                self.out += self._inflater.decompress(data, room)
                if len(self.out) > self._limit or self._inflater.unconsumed_tail:
                    raise too_large(self._limit)
                data = b""
                if self._inflater.eof and self._inflater.unused_data:  # the next member
                    data = self._inflater.unused_data
                    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        except zlib.error:
            raise bad("bad_gzip", "the body is not valid gzip") from None

    def end(self) -> bytes:
        if not self._inflater.eof:
            raise bad("bad_gzip", "the gzip body is truncated")
        return bytes(self.out)


def _hex_ids(node: Any) -> Any:
    """OTLP/JSON's hex ids as the base64 protobuf's JSON parser reads (in place)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    node[key] = binascii.b2a_base64(binascii.a2b_hex(value), newline=False).decode()
                except (binascii.Error, ValueError):  # odd length, not hex, not ASCII
                    raise bad("bad_json", f"{key} is not hex") from None
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for value in node:
            _hex_ids(value)
    return node


def decode(signal: Signal, body: bytes, content_type: str) -> Message:
    message = signal.request()
    if content_type == PROTOBUF:
        try:
            message.ParseFromString(body)
        except (DecodeError, RecursionError):
            raise bad("bad_protobuf", "the body is not a valid protobuf request") from None
        return message
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise bad("bad_json", "the body is not JSON") from None
    if not isinstance(parsed, dict):
        raise bad("bad_json", "the body is not a JSON object")
    try:
        json_format.ParseDict(_hex_ids(parsed), message, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError):
        raise bad("bad_json", "the JSON body is not a valid OTLP request") from None
    return message


def split_request(signal: Signal, request: Any, limit: int) -> tuple[list[Message], int]:
    """``request`` as requests of at most ``limit`` bytes each (resource and scope messages
    copied into each part, items in order), and how many items (as the partial success counts
    them) had to be refused because one alone is over ``limit`` (pure)."""
    parts: list[Message] = []
    refused = 0
    current: Any = signal.request()
    size = 0
    for group in getattr(request, signal.resources):
        head: Any = type(group)()
        head.CopyFrom(group)
        head.ClearField(signal.scopes)
        head_size = head.ByteSize() + 12  # its tag and length, and the scopes list's
        cur_group: Any = None
        for scope in getattr(group, signal.scopes):
            scope_head: Any = type(scope)()
            scope_head.CopyFrom(scope)
            scope_head.ClearField(signal.items)
            scope_size = scope_head.ByteSize() + 12
            cur_scope: Any = None
            for item in getattr(scope, signal.items):
                item_size = item.ByteSize() + 6
                if head_size + scope_size + item_size > limit:
                    refused += count_items(signal, [item])
                    continue
                need = (
                    item_size
                    + (0 if cur_scope is not None else scope_size)
                    + (0 if cur_group is not None else head_size)
                )
                if size and size + need > limit:
                    parts.append(current)
                    current, size, cur_group, cur_scope = signal.request(), 0, None, None
                if cur_group is None:
                    cur_group = getattr(current, signal.resources).add()
                    cur_group.CopyFrom(head)
                    size += head_size
                if cur_scope is None:
                    cur_scope = getattr(cur_group, signal.scopes).add()
                    cur_scope.CopyFrom(scope_head)
                    size += scope_size
                getattr(cur_scope, signal.items).append(item)
                size += item_size
    if size:
        parts.append(current)
    return parts, refused


def prepare(
    signal: Signal, body: bytes, content_type: str, *, limit: int, max_items: int
) -> tuple[list[dict[str, Any]], int]:
    """Decode a request and split it into rows of at most ``limit`` bytes of ``otlp``; the
    rows and how many items were refused one by one. More than ``max_items`` spans, metrics or
    log records in one request: refused whole (413), before the split that costs per item."""
    message = decode(signal, body, content_type)
    items = sum(
        len(getattr(scope, signal.items))
        for group in getattr(message, signal.resources)
        for scope in getattr(group, signal.scopes)
    )
    if items > max_items:
        raise Refused(
            413, "too_many_items", f"over {max_items} items in one request", RESOURCE_EXHAUSTED
        )
    return to_rows(signal, message, body, content_type == PROTOBUF, limit)


def to_rows(
    signal: Signal, request: Message, body: bytes, as_protobuf: bool, limit: int
) -> tuple[list[dict[str, Any]], int]:
    if not as_protobuf:
        body = request.SerializeToString()
    if len(body) <= limit:
        return [otlp_row(signal, request, body)] if request.ByteSize() else [], 0
    parts, refused = split_request(signal, request, limit)
    return [otlp_row(signal, part, part.SerializeToString()) for part in parts], refused
