"""The two ends of the OTLP tests: :func:`run_app` runs an application on the stock SDK
(tests/support/otlp_app.py, its own process); :class:`OtlpSink` is an OTLP/HTTP endpoint that
records every request it is sent, decodes it with opentelemetry-proto's messages, and answers
what the test scripted (200 by default).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import msgpack
from aiohttp import web

from producers._otlp_grpc import STATUS_DETAILS, retry_info
from sealstream.otlp import SIGNALS, Signal

__all__ = ["Answer", "OtlpSink", "Received", "run_app"]

_BY_PATH = {s.path: s for s in SIGNALS.values()}
_GRPC_CODES = {
    503: grpc.StatusCode.UNAVAILABLE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
}


async def run_app(
    endpoint: str,
    out: Path,
    marker: str,
    *,
    protocol: str = "http",
    env: Mapping[str, str] | None = None,
) -> list[tuple[Signal, bytes]]:
    """Run the application until it has exported everything to ``endpoint`` (an OTLP/HTTP
    base URL, or ``HOST:PORT`` for ``protocol="grpc"``), with ``env`` added to its
    environment; each export request it sent, in order, with its signal."""
    app = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.otlp_app",
        endpoint,
        str(out),
        marker,
        protocol,
        env={**os.environ, **(env or {})},
    )
    assert await asyncio.wait_for(app.wait(), 60) == 0
    sent = msgpack.unpackb(await asyncio.to_thread(out.read_bytes))
    return [(SIGNALS[signal], body) for signal, body in sent]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Received:
    path: str
    body: bytes
    headers: dict[str, str]
    #: the decoded export request
    message: Any


class OtlpSink:
    """``async with OtlpSink() as sink``: ``sink.url`` is its OTLP/HTTP base URL and
    ``sink.grpc_url`` its OTLP/gRPC endpoint (the three Export services); ``answers`` are used
    in order (HTTP: the status; gRPC: 200 is OK, 503 UNAVAILABLE, 429 RESOURCE_EXHAUSTED,
    400 INVALID_ARGUMENT; a ``Retry-After`` becomes a ``RetryInfo``), then success with an
    empty response; ``received`` holds every request, in order."""

    def __init__(self) -> None:
        self.answers: deque[Answer] = deque()
        self.received: list[Received] = []
        self.arrived = asyncio.Condition()
        self._runner: web.ServerRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.url = ""
        self.grpc_url = ""

    async def __aenter__(self) -> Self:
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._grpc = grpc.aio.server()
        self._grpc.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    signal.service,
                    {"Export": grpc.unary_unary_rpc_method_handler(self._grpc_export(signal))},
                )
                for signal in SIGNALS.values()
            ]
        )
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        self.grpc_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._grpc is not None:
            await self._grpc.stop(None)

    async def wait_for(self, count: int) -> None:
        """Until ``count`` requests arrived (the caller bounds the wait)."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= count)

    async def _record(self, path: str, body: bytes, headers: dict[str, str], signal: Any) -> Answer:
        message = signal.request.FromString(body) if signal is not None else None
        self.received.append(Received(path, body, headers, message))
        async with self.arrived:
            self.arrived.notify_all()
        return self.answers.popleft() if self.answers else Answer()

    def _grpc_export(
        self, signal: Signal
    ) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]:
        async def export(body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            path = f"/{signal.service}/Export"
            answer = await self._record(path, body, metadata, signal)
            if answer.status == 200:
                return answer.body
            code = _GRPC_CODES[answer.status]
            delay = answer.headers.get("Retry-After")
            trailers: tuple[tuple[str, str | bytes], ...] = ()
            if delay is not None:
                trailers = ((STATUS_DETAILS, retry_info("retry", int(delay))),)
            await context.abort(code, f"scripted {answer.status}", trailing_metadata=trailers)
            raise AssertionError("abort returned")

        return export

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        signal = _BY_PATH.get(request.path)
        answer = await self._record(request.path, body, dict(request.headers), signal)
        return web.Response(
            status=answer.status,
            headers=answer.headers,
            body=answer.body,
            content_type="application/x-protobuf",
        )
