"""The two ends of the OTLP tests: :func:`run_app` runs an application on the stock SDK
(tests/support/otlp_app.py, its own process); :class:`OtlpSink` is an OTLP/HTTP endpoint that
records every request it is sent, decodes it with opentelemetry-proto's messages, and answers
what the test scripted (200 by default).
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgpack
from aiohttp import web

from sealstream.otlp import SIGNALS, Signal

__all__ = ["Answer", "OtlpSink", "Received", "run_app"]

_BY_PATH = {s.path: s for s in SIGNALS.values()}


async def run_app(
    endpoint: str, out: Path, marker: str, *, protocol: str = "http"
) -> list[tuple[Signal, bytes]]:
    """Run the application until it has exported everything to ``endpoint`` (an OTLP/HTTP
    base URL, or ``HOST:PORT`` for ``protocol="grpc"``); each export request it sent, in
    order, with its signal."""
    app = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.otlp_app", endpoint, str(out), marker, protocol
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
    """``async with OtlpSink() as sink``: ``sink.url`` is its base URL; ``answers`` are used
    in order, then 200 with an empty response; ``received`` holds every request (decodable
    or not: an undecodable one fails the test's comparison, not the server)."""

    def __init__(self) -> None:
        self.answers: deque[Answer] = deque()
        self.received: list[Received] = []
        self.arrived = asyncio.Condition()
        self._runner: web.ServerRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int) -> None:
        """Until ``count`` requests arrived (the caller bounds the wait)."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= count)

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        signal = _BY_PATH.get(request.path)
        message = signal.request.FromString(body) if signal is not None else None
        self.received.append(Received(request.path, body, dict(request.headers), message))
        async with self.arrived:
            self.arrived.notify_all()
        answer = self.answers.popleft() if self.answers else Answer()
        return web.Response(
            status=answer.status,
            headers=answer.headers,
            body=answer.body,
            content_type="application/x-protobuf",
        )
