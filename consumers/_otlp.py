"""The OTLP exporter: what a consumer decrypts from the OTLP streams, re-exported as it was
to any OTLP endpoint (http/protobuf or gRPC), with the OTLP client's rules.

Each row of ``otlp_traces``, ``otlp_metrics`` and ``otlp_logs`` is one export request
(docs/protocol.md, "OpenTelemetry streams"): its ``otlp`` bytes are sent unchanged, POSTed to
``<endpoint>/v1/traces|metrics|logs`` or to the gRPC Export service, one at a time and in
order. Only HTTP 429, 502, 503 and 504, gRPC's retryable codes (RESOURCE_EXHAUSTED only with
a ``RetryInfo``) and connection failures are retried, with exponential backoff and jitter, or
after the delay the server gave (``Retry-After``, ``RetryInfo``; never sooner than the
backoff), for at most
``max_elapsed_s``. Requests wait in a bounded
queue (``put`` waits for room). What is not delivered (refused by the endpoint, given up
after retries, not OTLP, or still queued at close) is counted in :attr:`OtlpExporter.failed`
by reason and logged, never with the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp
import grpc
import structlog
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from sealstream.crypto import Batch
from sealstream.otlp import SIGNAL_BY_STREAM, SIGNALS, Signal
from sealstream.resource import AsyncResource

__all__ = ["ExportConfig", "OtlpExporter", "grpc_retry_delay", "retry_after"]

log = structlog.get_logger(__name__)

_RETRYABLE: Final = frozenset({429, 502, 503, 504})
#: and RESOURCE_EXHAUSTED when the server says when (RetryInfo)
_GRPC_RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_STATUS_DETAILS: Final = "grpc-status-details-bin"
_PROTOBUF: Final = "application/x-protobuf"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportConfig:
    """``endpoint``: the OTLP base URL (``http://`` or ``https://``; over HTTP ``/v1/<signal>``
    is appended, as for ``OTEL_EXPORTER_OTLP_ENDPOINT``); ``headers`` sent with every request
    (gRPC metadata, in lower case, over gRPC)."""

    endpoint: str
    #: ``http/protobuf`` (POST to ``<endpoint>/v1/<signal>``) or ``grpc`` (the Export services
    #: at the endpoint's host and port; ``https://`` for TLS)
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    #: export requests waiting to be sent
    max_queue: int = 256
    #: how long one request is retried before it is given up
    max_elapsed_s: float = 60.0
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 32.0
    #: how long ``aclose`` keeps sending what is queued
    close_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"the OTLP endpoint must be an http(s) URL, not {self.endpoint!r}")
        if self.protocol not in ("http/protobuf", "grpc"):
            raise ValueError(f"protocol must be http/protobuf or grpc, not {self.protocol!r}")
        if self.max_queue < 1 or self.timeout_s <= 0 or self.initial_backoff_s <= 0:
            raise ValueError("max_queue, timeout_s and initial_backoff_s must be positive")
        if self.max_backoff_s < self.initial_backoff_s or self.max_elapsed_s < 0:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")


def retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - now, 0.0)


def grpc_retry_delay(metadata: Any) -> float | None:
    """The ``RetryInfo`` delay of a gRPC error's status details, in seconds, or None."""
    for key, value in metadata or ():
        if key != _STATUS_DETAILS or not isinstance(value, bytes):
            continue
        try:
            status = Status.FromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            info = RetryInfo()
            if detail.Unpack(info):
                return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One try: ``reason`` ``ok`` once delivered, else why not; whether to ``retry``, after
    ``wait`` seconds when the server said; the protobuf ``response`` of a delivery."""

    reason: str
    retry: bool = False
    wait: float | None = None
    response: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Request:
    signal: Signal
    body: bytes
    items: int


class OtlpExporter(AsyncResource):
    """``async with OtlpExporter(config) as exporter: await exporter.put(batch)``.

    :attr:`exported` counts requests delivered by signal, :attr:`items` their items,
    :attr:`failed` requests not delivered by reason and :attr:`rejected_items` the items an
    endpoint refused in a partial success. ``sleep``, ``clock`` (Unix seconds) and ``rng``
    are parameters for tests."""

    def __init__(
        self,
        config: ExportConfig,
        *,
        sleep: Callable[[float], Any] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(config.max_queue)
        self._http: aiohttp.ClientSession | None = None
        #: OTLP/gRPC: each signal's Export method, taking and giving bytes
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        self._metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self.exported: Counter[str] = Counter()
        self.items: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.rejected_items: Counter[str] = Counter()
        self.retries = 0
        self._sending = False

    async def _start(self) -> None:
        config = self.config
        if config.protocol == "grpc":
            target = config.endpoint.split("://", 1)[1].rstrip("/")
            channel = (
                grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
                if config.endpoint.startswith("https://")
                else grpc.aio.insecure_channel(target)
            )
            self._stack.push_async_callback(channel.close)
            self._calls = {
                name: channel.unary_unary(f"/{signal.service}/Export")
                for name, signal in SIGNALS.items()
            }
        else:
            self._http = await self._stack.enter_async_context(
                aiohttp.ClientSession(
                    headers={**config.headers, "Content-Type": _PROTOBUF},
                    timeout=aiohttp.ClientTimeout(total=config.timeout_s),
                )
            )
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        sender = tg.create_task(self._send_all())
        self._stack.push_async_callback(self._finish, sender)

    async def _finish(self, sender: asyncio.Task[None]) -> None:
        """Send what is queued for up to ``close_timeout_s``; count the rest as ``closed``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.close_timeout_s):
                await self._queue.join()
        sender.cancel()
        left = self._queue.qsize() + self._sending
        if left:
            self.failed["closed"] += left
            log.warning("otlp_export.undelivered", reason="closed", requests=left)
        log.info(
            "otlp_export.stopped",
            exported=dict(self.exported),
            failed=dict(self.failed),
            retries=self.retries,
        )

    def _requests(self, batch: Batch) -> list[_Request]:
        """The export requests of a batch's rows (a row that is not OTLP is counted)."""
        signal = SIGNAL_BY_STREAM.get(batch.stream)
        out: list[_Request] = []
        for row in batch.rows:
            body = row.get("otlp")
            if signal is None or not isinstance(body, bytes):
                self._fail("not_otlp", signal.name if signal else batch.stream)
                continue
            items = row.get("items")
            out.append(_Request(signal, body, items if type(items) is int else 0))
        return out

    async def put(self, batch: Batch) -> None:
        """Queue a batch's export requests, waiting for room."""
        for request in self._requests(batch):
            await self._queue.put(request)

    def _fail(self, reason: str, signal: str, **fields: Any) -> None:
        self.failed[reason] += 1
        log.warning("otlp_export.undelivered", reason=reason, signal=signal, **fields)

    async def _send_all(self) -> None:
        while True:
            request = await self._queue.get()
            self._sending = True
            try:
                await self._deliver(request)
            except Exception as exc:  # noqa: BLE001 - the task runs in the user's task group
                # an unexpected failure must not end the task that opened the exporter (its
                # task group would cancel it): this request is counted, the next goes on
                self._fail("error", request.signal.name, error=type(exc).__name__)
            finally:
                self._sending = False
                self._queue.task_done()

    async def _deliver(self, request: _Request) -> None:
        signal = request.signal
        backoff = self.config.initial_backoff_s
        deadline = time.monotonic() + self.config.max_elapsed_s
        while True:
            attempt = await (self._grpc_attempt if self._calls else self._http_attempt)(request)
            if not attempt.retry:
                self._done(request, attempt)
                return
            # the exponential backoff, each wait drawn from its upper half; a delay the server
            # gives replaces it, but never goes below it (Retry-After: 0 is no tight loop)
            jittered = self._rng.uniform(backoff / 2, backoff)
            if attempt.wait is None:
                wait = jittered
                backoff = min(backoff * 2, self.config.max_backoff_s)
            else:
                wait = max(attempt.wait, jittered)
            if time.monotonic() + wait > deadline:
                self._fail("gave_up", signal.name, last=attempt.reason)
                return
            self.retries += 1
            log.info(
                "otlp_export.retry",
                signal=signal.name,
                reason=attempt.reason,
                wait_s=round(wait, 3),
            )
            await self._sleep(wait)

    async def _http_attempt(self, request: _Request) -> _Attempt:
        assert self._http is not None
        url = self.config.endpoint.rstrip("/") + request.signal.path
        try:
            async with self._http.post(url, data=request.body) as response:
                answer = await response.read()
                status = response.status
                if status in _RETRYABLE:
                    wait = retry_after(response.headers.get("Retry-After"), now=self._clock())
                    return _Attempt(f"http_{status}", retry=True, wait=wait)
                if not 200 <= status < 300:
                    return _Attempt(f"http_{status}")
                protobuf = response.content_type == _PROTOBUF
                return _Attempt("ok", response=answer if protobuf else None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _Attempt(type(exc).__name__, retry=True)

    async def _grpc_attempt(self, request: _Request) -> _Attempt:
        call = self._calls[request.signal.name]
        try:
            answer = await call(
                request.body, metadata=self._metadata, timeout=self.config.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            wait = grpc_retry_delay(exc.trailing_metadata())
            retry = code in _GRPC_RETRYABLE or (
                code == grpc.StatusCode.RESOURCE_EXHAUSTED and wait is not None
            )
            return _Attempt(f"grpc_{code.name.lower()}", retry=retry, wait=wait)
        return _Attempt("ok", response=bytes(answer))

    def _done(self, request: _Request, attempt: _Attempt) -> None:
        signal = request.signal.name
        if attempt.reason != "ok":
            self._fail(attempt.reason, signal)
            return
        self.exported[signal] += 1
        self.items[signal] += request.items
        if not attempt.response:
            return
        try:
            response: Any = request.signal.response.FromString(attempt.response)
        except DecodeError:
            return  # delivered; only the partial success could not be read
        rejected = getattr(response.partial_success, request.signal.rejected)
        if rejected:
            self.rejected_items[signal] += rejected
            log.warning(
                "otlp_export.partially_rejected",
                signal=signal,
                rejected=rejected,
                message=response.partial_success.error_message[:200],
            )
