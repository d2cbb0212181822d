"""The OTLP receiver: OpenTelemetry data in, sealed as rows (docs/protocol.md,
"OpenTelemetry streams").

A request, ``POST /v1/traces|metrics|logs`` (protobuf or JSON, gzip or not) or a call of the
OTLP/gRPC Export services (producers/_otlp_grpc.py), is decoded, split into rows that fit a
batch (in a worker thread: the event loop serves the producer's sessions meanwhile), and
handed to a :class:`SealingSink` (the :class:`~producers.Agent`), which returns once the rows
are sealed into its outbox for every session reading them: only then, and only if the outbox
dropped nothing meanwhile, is the answer a success. Each request in hand reserves room in the
outbox for what it will seal (:data:`SEALED_PER_BYTE` times its body, for every session), so
requests admitted together cannot overflow it: a request is refused (503, ``Retry-After``)
while the outbox is over ``high_water`` of its bound, when its reservation would not fit,
while ``max_concurrent`` requests are being handled, or when the outbox dropped envelopes
while it was sealed. Refusals are counted by reason (:attr:`OtlpReceiver.refused`) and logged,
never with the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc.status_pb2 import Status

from producers._otlp_codec import (
    INTERNAL,
    INVALID_ARGUMENT,
    JSON,
    NOT_FOUND,
    PROTOBUF,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    Gunzip,
    Refused,
    bad,
    prepare,
    too_large,
)
from producers._otlp_grpc import serve_grpc
from sealstream.metrics import Sample
from sealstream.otlp import OTLP_STREAMS, SIGNALS, Signal
from sealstream.resource import AsyncResource

__all__ = ["SEALED_PER_BYTE", "OtlpConfig", "OtlpReceiver", "SealingSink"]

log = structlog.get_logger(__name__)

_CHUNK: Final = 64 * 1024
#: room in a row for the index columns and msgpack framing (``service`` is <= 256 characters)
_ROW_OVERHEAD: Final = 2048
_BY_PATH: Final = {s.path: s for s in SIGNALS.values()}
#: outbox bytes a request's body becomes, per session, at most: base64url of the JWE (4/3),
#: its header and the rows' framing
SEALED_PER_BYTE: Final = 1.4
#: outbox bytes reserved for a request on top of that: its envelopes' headers
_RESERVE_OVERHEAD: Final = 16 * 1024


class SealingSink(Protocol):
    """Where the receiver's rows go (the agent)."""

    @property
    def streams(self) -> frozenset[str]:
        """The streams it carries: the OTLP streams must be among them."""

    @property
    def max_row_bytes(self) -> int:
        """The largest packed row a batch takes."""

    @property
    def buffer_bytes(self) -> int:
        """The outbox's bound for one session's queue."""

    def backlog(self, reserve: int = 0) -> float:
        """How full the outbox is: 0 empty, 1 at its bound (the fullest of its limits), once
        ``reserve`` more bytes wait for every session."""

    async def seal_rows(self, stream: str, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Seal ``rows`` into the outbox for every session reading ``stream``; return how many
        were too large for a batch (not sealed), and how many envelopes the outbox dropped
        (over its bound) meanwhile."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpConfig:
    """``host``/``port`` to listen on (port 0: any free port), and ``grpc_port`` for OTLP/gRPC;
    ``max_body_bytes`` caps a request body before and after gzip (and is lowered to what the
    outbox can take above ``high_water``: ``(1 - high_water) * buffer_bytes / 1.4``),
    ``max_items`` its spans, metrics or log records, ``body_timeout_s`` the time its body may
    take to arrive; beyond ``high_water`` of the outbox's bound, or with ``max_concurrent``
    requests in hand, requests are refused with 503 and ``Retry-After`` (gRPC:
    ``UNAVAILABLE`` with ``RetryInfo``). With a ``token``, a request must carry
    ``Authorization: Bearer <token>`` (gRPC: the ``authorization`` metadata)."""

    host: str = "127.0.0.1"
    port: int = 4318
    #: OTLP/gRPC (the three Export services) on this port too; None: HTTP only
    grpc_port: int | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_items: int = 100_000
    max_concurrent: int = 16
    high_water: float = 0.5
    retry_after_s: int = 1
    body_timeout_s: float = 30.0
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (
            self.max_body_bytes < 1024
            or self.max_items < 1
            or self.max_concurrent < 1
            or self.retry_after_s < 1
            or not self.body_timeout_s > 0
        ):
            raise ValueError(
                "max_body_bytes, max_items, max_concurrent, retry_after_s and body_timeout_s "
                "must be positive"
            )
        if not 0 < self.high_water < 1:
            raise ValueError("high_water must be in (0, 1)")
        if self.token is not None and not self.token.strip():
            raise ValueError("an OTLP token must not be empty")


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("gzip", "identity", ""):
        raise Refused(415, "unsupported_encoding", "use gzip or no encoding", INVALID_ARGUMENT)
    gunzip = Gunzip(limit) if encoding == "gzip" else None
    raw = bytearray()
    received = 0
    try:
        async for chunk in request.content.iter_chunked(_CHUNK):
            received += len(chunk)
            if received > limit:  # as sent (a chunked body has no length)...
                raise too_large(limit)
            if gunzip is not None:
                gunzip.feed(chunk)  # ... and inflated
            else:
                raw += chunk
    except (OSError, HttpProcessingError):  # the client went away, or a bad chunked body
        raise bad("incomplete_body", "the body ended before its end") from None
    return gunzip.end() if gunzip is not None else bytes(raw)


class OtlpReceiver(AsyncResource):
    """``async with OtlpReceiver(agent, config=...) as receiver:`` serves OTLP/HTTP (and
    OTLP/gRPC when ``config.grpc_port`` is set) into ``agent``'s streams ``otlp_traces``,
    ``otlp_metrics`` and ``otlp_logs`` (which the agent must declare). :attr:`port` and
    :attr:`grpc_port` are the ports it listens on."""

    def __init__(
        self,
        sink: SealingSink,
        *,
        config: OtlpConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.config = config or OtlpConfig()
        self._sink = sink
        self._clock = clock
        self.port = self.config.port
        self.grpc_port = self.config.grpc_port
        #: the body size limit: the config's, at most what the outbox takes above high water
        self.max_body_bytes = self.config.max_body_bytes
        self._busy = 0
        #: outbox bytes reserved, per session, by the requests in hand
        self._reserved = 0
        #: requests refused, by reason; items refused one by one, by signal
        self.refused: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.items: Counter[str] = Counter()
        self.items_refused: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._last_log: dict[str, float] = {}

    async def _start(self) -> None:
        missing = sorted(set(OTLP_STREAMS) - self._sink.streams)
        if missing:
            raise ValueError(f"the agent must declare the OTLP streams: {missing} are missing")
        config = self.config
        room = (1 - config.high_water) * self._sink.buffer_bytes - _RESERVE_OVERHEAD
        self.max_body_bytes = min(config.max_body_bytes, int(room / SEALED_PER_BYTE))
        if self.max_body_bytes < 1024:
            raise ValueError("the outbox is too small for OTLP requests: raise buffer_bytes")
        if config.token is None and not _loopback(config.host):
            log.warning(
                "otlp.unauthenticated",
                host=config.host,
                hint="anyone who reaches this address can add rows: set a token",
            )
        # the body is inflated here, within the size limit (a gzip bomb stops at it)
        server = web.Server(self._handle, access_log=None, auto_decompress=False)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, config.host, config.port).start()
        self.port = int(runner.addresses[0][1])
        log.info(
            "otlp.listening",
            protocol="http",
            host=config.host,
            port=self.port,
            max_body_bytes=self.max_body_bytes,
        )
        if config.grpc_port is not None:
            grpc_server, self.grpc_port = await serve_grpc(
                self,
                host=config.host,
                port=config.grpc_port,
                max_bytes=self.max_body_bytes,
                retry_after_s=config.retry_after_s,
            )
            self._stack.push_async_callback(grpc_server.stop, 1.0)
            log.info("otlp.listening", protocol="grpc", host=config.host, port=self.grpc_port)

    def samples(self) -> list[Sample]:
        return [
            Sample(
                "sealstream_producer_otlp_requests",
                "OTLP export requests sealed, by signal",
                "counter",
                self.requests,
                label="signal",
            ),
            Sample(
                "sealstream_producer_otlp_items",
                "OTLP spans, data points and log records sealed, by signal",
                "counter",
                self.items,
                label="signal",
            ),
            Sample(
                "sealstream_producer_otlp_refused",
                "OTLP requests refused, by reason",
                "counter",
                self.refused,
            ),
            Sample(
                "sealstream_producer_otlp_items_refused",
                "OTLP items refused one by one (partial success), by signal",
                "counter",
                self.items_refused,
                label="signal",
            ),
        ]

    # --- shared by the HTTP and gRPC servers --------------------------------------------------

    def authenticate(self, authorization: str | None) -> None:
        """Refuse (401) a request without the configured bearer token."""
        token = self.config.token
        if token is None:
            return
        # header values and the environment keep undecodable bytes as surrogates
        given = (authorization or "").encode(errors="surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {token}".encode(errors="surrogateescape")):
            raise Refused(
                401, "unauthenticated", "a valid bearer token is required", UNAUTHENTICATED
            )

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the ``max_concurrent`` slots, or refuse (503) while the outbox (with
        the room reserved by the requests in hand) is behind or every slot is taken."""
        if self._sink.backlog(self._reserved) >= self.config.high_water:
            raise Refused(503, "backpressure", "the producer is behind", UNAVAILABLE)
        if self._busy >= self.config.max_concurrent:
            raise Refused(503, "busy", "too many requests in hand", UNAVAILABLE)
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    @contextlib.contextmanager
    def _reserving(self, body: int) -> Iterator[None]:
        """Reserve the outbox room a body of ``body`` bytes takes once sealed, or refuse
        (503) if it would not fit beside what is there and what the requests in hand hold."""
        need = int(body * SEALED_PER_BYTE) + _RESERVE_OVERHEAD
        if self._sink.backlog(self._reserved + need) > 1:
            raise Refused(503, "backpressure", "the producer is behind", UNAVAILABLE)
        self._reserved += need
        try:
            yield
        finally:
            self._reserved -= need

    async def accept(self, signal: Signal, body: bytes, content_type: str) -> Message:
        """Decode, seal and count one export request; its response (raises :class:`Refused`)."""
        limit = self._sink.max_row_bytes - _ROW_OVERHEAD
        with self._reserving(len(body)):
            rows, refused = await asyncio.to_thread(
                prepare, signal, body, content_type, limit=limit, max_items=self.config.max_items
            )
            oversize, dropped = await self._sink.seal_rows(signal.stream, rows)
        if oversize:  # a row sized to fit should always fit: say so if one did not
            log.error("otlp.row_too_large", signal=signal.name, rows=oversize)
            raise Refused(500, "row_too_large", "a row did not fit a batch", INTERNAL)
        if dropped:  # the outbox overflowed meanwhile: these rows may be among what it lost
            raise Refused(503, "outbox_full", "the producer dropped data: retry", UNAVAILABLE)
        self.requests[signal.name] += 1
        self.items[signal.name] += sum(row["items"] for row in rows)
        response: Any = signal.response()
        if refused:
            self.items_refused[signal.name] += refused
            log.warning("otlp.items_refused", signal=signal.name, count=refused)
            partial = response.partial_success
            setattr(partial, signal.rejected, refused)
            partial.error_message = f"{refused} item(s) too large to seal"
        return response  # type: ignore[no-any-return]

    def refuse(self, refused: Refused) -> None:
        """Count a refusal; log it, at most one line a second per reason, with the count
        since the last one."""
        self.refused[refused.reason] += 1
        self._unlogged[refused.reason] += 1
        now = self._clock()
        if now - self._last_log.get(refused.reason, float("-inf")) >= 1.0:
            log.warning(
                "otlp.refused",
                reason=refused.reason,
                status=refused.status,
                message=str(refused),
                count=self._unlogged.pop(refused.reason),
            )
            self._last_log[refused.reason] = now

    # --- OTLP/HTTP ----------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        content_type = request.content_type
        answer_type = JSON if content_type == JSON else PROTOBUF
        try:
            signal = _BY_PATH.get(request.path)
            if signal is None:
                raise Refused(
                    404, "not_found", "use /v1/traces, /v1/metrics or /v1/logs", NOT_FOUND
                )
            if request.method != "POST":
                raise Refused(405, "method_not_allowed", "use POST", UNIMPLEMENTED)
            if content_type not in (PROTOBUF, JSON):
                raise Refused(
                    415, "unsupported_media_type", f"use {PROTOBUF} or {JSON}", INVALID_ARGUMENT
                )
            self.authenticate(request.headers.get("Authorization"))
            with self.admitted():
                try:
                    async with asyncio.timeout(self.config.body_timeout_s):
                        body = await _read_body(request, self.max_body_bytes)
                except TimeoutError:
                    raise Refused(
                        408, "slow_body", "the body did not arrive in time", INVALID_ARGUMENT
                    ) from None
                return _answer(await self.accept(signal, body, content_type), answer_type)
        except Refused as refused:
            self.refuse(refused)
            headers = {}
            if refused.status == 503:
                headers["Retry-After"] = str(self.config.retry_after_s)
            status = Status(code=refused.code, message=str(refused))
            return _answer(status, answer_type, status=refused.status, headers=headers)


def _answer(
    message: Message,
    content_type: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if content_type == JSON:
        body = json_format.MessageToJson(message, indent=None).encode()
    else:
        body = message.SerializeToString()
    return web.Response(body=body, status=status, content_type=content_type, headers=headers)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False
