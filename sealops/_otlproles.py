"""The worker roles of the ``otlp`` scenario of ``sealstream bench`` (:mod:`sealops._otlpbench`):
the load generator, the sink and the two pipelines' ends, run as
``python -m sealops._worker ROLE``.

- ``otlp-gen``: replays one export request built with ``opentelemetry-proto``
  (:func:`build_request`), a 16-byte stamp (sequence, ``time.monotonic_ns()``) written over the
  first span's trace id of each copy; at most a window of requests not yet at the sink, or
  paced, or a flood; counts the answers by status;
- ``otlp-sink``: an OTLP/HTTP endpoint checking every byte but the stamp, counting each
  request once by its sequence, timing it from its stamp and acknowledging the running count;
- ``otlp-producer``: ``producers.OtlpReceiver`` on an ``Agent``; ``otlp-consumer``:
  ``consumers.Client.subscribe`` into ``consumers.OtlpExporter``;
- ``otlp-plain-producer``: an aiohttp server publishing each body in a msgpack envelope;
  ``otlp-plain-consumer``: a nats-py consumer POSTing each body to the sink, one at a time
  (the relay between them is :mod:`sealops._api`'s ``plain-relay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import aiohttp
import msgpack
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from consumers import Batch, ExportConfig, OtlpExporter, Resumed
from producers import Agent, OtlpConfig, OtlpReceiver
from sealops._api import _acker, _Window, _window, producer_config, worker_client
from sealops._report import Histogram
from sealstream.nats import connect, settle
from sealstream.otlp import OTLP_STREAMS
from sealstream.store import Store

__all__ = ["ROLES", "SPANS", "build_request"]

SPANS: Final = 512
_STREAM: Final = "otlp_traces"
_PATH: Final = "/v1/traces"
_PROTOBUF: Final = "application/x-protobuf"
_PLAIN_SESSION: Final = "o" * 43
#: the first span's trace id in the built request, overwritten by each request's stamp
_MARK: Final = b"\x5a\xa5" * 8
_STAMP: Final = struct.Struct(">QQ")
#: the sink stops waiting for a phase's last requests after this long with nothing new
_IDLE_S: Final = 10.0
#: requests in hand at once without a window (paced runs, the overload; the receiver refuses
#: past its own ``max_concurrent``)
_CONNECTIONS: Final = 64


def _attr(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def build_request(spans: int = SPANS) -> tuple[bytes, int]:
    """One export request of ``spans`` server spans shaped as an instrumented HTTP service's
    (a resource, a scope, attributes, status), and the offset of its 16-byte stamp.
    Deterministic: the generator and the sink build the same bytes."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(
        [
            _attr("service.name", "checkout"),
            _attr("service.version", "1.4.2"),
            _attr("host.name", "node-7"),
        ]
    )
    scope = resource_spans.scope_spans.add()
    scope.scope.name = "opentelemetry.instrumentation.aiohttp_server"
    scope.scope.version = "0.48b0"
    start = 1_767_000_000_000_000_000
    methods = ("GET", "POST", "PUT", "DELETE")
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id = _MARK if i == 0 else (i * 0x9E3779B97F4A7C15).to_bytes(16, "big")[-16:]
        span.span_id = (i + 1).to_bytes(8, "big")
        span.parent_span_id = (i // 4 + 1_000_000).to_bytes(8, "big")
        span.name = f"{methods[i % 4]} /api/v1/products/{{id}}"
        span.kind = Span.SPAN_KIND_SERVER
        span.start_time_unix_nano = start + i * 1_000_000
        span.end_time_unix_nano = start + i * 1_000_000 + 100_000 + (i * 7919) % 5_000_000
        span.attributes.extend(
            [
                _attr("http.request.method", methods[i % 4]),
                _attr("url.path", f"/api/v1/products/{i * 31 % 100_000}"),
                _attr("http.response.status_code", 200 if i % 17 else 503),
                _attr("server.address", "checkout.internal"),
            ]
        )
        if i % 17 == 0:
            span.status.code = Status.STATUS_CODE_ERROR
    body = request.SerializeToString()
    offset = body.index(_MARK)
    if body.count(_MARK) != 1:
        raise AssertionError("the stamp's place must be unique in the request")
    return body, offset


# --- the load generator and the sink ------------------------------------------------------


class _Generator:
    """Replays the built request: stamps, POSTs, counts answers by status."""

    def __init__(self, emit_event: Callable[..., None]) -> None:
        self._emit = emit_event
        self.body, self.offset = build_request()
        self.seq = 0
        #: requests started and not refused, over every run (what the sink acknowledges)
        self.outstanding = 0

    def stamped(self) -> bytes:
        self.seq += 1
        body = bytearray(self.body)
        body[self.offset : self.offset + 16] = _STAMP.pack(self.seq, time.monotonic_ns())
        return bytes(body)

    async def run(self, http: aiohttp.ClientSession, window: _Window, cmd: dict[str, Any]) -> None:
        url = cmd["url"] + _PATH
        total = int(cmd.get("requests") or 2**62)
        rate: float | None = cmd.get("rate")
        #: a flood (no rate, no window) runs this long, as fast as its connections go
        duration = float(cmd.get("duration") or "inf")
        retry = bool(cmd.get("retry", True))
        windowed = cmd.get("window") is not None
        window.size = int(cmd.get("window") or 1)
        slots = asyncio.Semaphore(window.size if windowed else _CONNECTIONS)
        statuses: Counter[int] = Counter()
        retry_after = 0
        errors = 0

        async def post() -> None:
            nonlocal retry_after, errors
            while True:
                try:
                    async with http.post(
                        url, data=self.stamped(), headers={"Content-Type": _PROTOBUF}
                    ) as response:
                        await response.read()
                        status = response.status
                        wait = response.headers.get("Retry-After")
                except (aiohttp.ClientError, TimeoutError):
                    status, wait = 0, None
                    errors += 1
                statuses[status] += 1
                if status == 200:
                    return
                if status in (429, 503) and wait is not None:
                    retry_after += 1
                if not retry or status not in (429, 503):
                    self.outstanding -= 1  # never reaches the sink
                    return
                await asyncio.sleep(float(wait or 1))

        async def one() -> None:
            try:
                await post()
            finally:
                slots.release()

        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for i in range(total):
                if time.monotonic() - started >= duration:
                    break
                if rate is not None:
                    due = started + i / rate
                    if (delay := due - time.monotonic()) > 0:
                        await asyncio.sleep(delay)
                if windowed:
                    await window.wait_room(lambda: self.outstanding)
                await slots.acquire()
                self.outstanding += 1
                tg.create_task(one())
        self._emit(
            "ran",
            accepted=statuses[200],
            statuses={str(k): v for k, v in sorted(statuses.items())},
            retry_after=retry_after,
            errors=errors,
            seconds=time.monotonic() - started,
        )


async def otlp_gen(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    gen = _Generator(emit_event)
    limits = aiohttp.TCPConnector(limit=_CONNECTIONS)
    async with (
        contextlib.AsyncExitStack() as stack,
        aiohttp.ClientSession(connector=limits) as http,
    ):
        window = await _window(cfg, stack)
        emit_event("ready", request_bytes=len(gen.body))
        async for cmd in commands:
            if cmd.get("cmd") != "run":
                break
            await gen.run(http, window, cmd)


class _Sink:
    """Counts, checks and times every request it receives; acknowledges the running count."""

    def __init__(self, ack: Callable[[int], Any]) -> None:
        self.body, self.offset = build_request()
        self._ack = ack
        self.total = 0
        self.arrived = asyncio.Condition()
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.corrupt = 0
        self.seen: set[int] = set()
        self.duplicates = 0
        self.first = 0.0
        self.last = 0.0
        self.latency = Histogram()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        now_ns = time.monotonic_ns()
        end = self.offset + 16
        if (
            request.path != _PATH
            or len(body) != len(self.body)
            or body[: self.offset] != self.body[: self.offset]
            or body[end:] != self.body[end:]
        ):
            self.corrupt += 1
        else:
            seq, sent_ns = _STAMP.unpack(body[self.offset : end])
            if seq in self.seen:
                self.duplicates += 1
            self.seen.add(seq)
            self.latency.add_ns(now_ns - sent_ns)
        now = now_ns / 1e9
        self.first = self.first or now
        self.last = now
        self.count += 1
        self.total += 1
        await self._ack(self.total)
        async with self.arrived:
            self.arrived.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type=_PROTOBUF
        )

    async def expect(self, requests: int) -> None:
        """Until ``requests`` arrived in this phase, or nothing new for ``_IDLE_S``."""
        async with self.arrived:
            while self.count < requests:
                try:
                    await asyncio.wait_for(self.arrived.wait(), _IDLE_S)
                except TimeoutError:
                    return

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "unique": len(self.seen),
            "duplicates": self.duplicates,
            "corrupt": self.corrupt,
            "first": self.first,
            "last": self.last,
            "latency": self.latency.to_json(),
        }


async def _serve(
    stack: contextlib.AsyncExitStack, handler: Callable[[web.BaseRequest], Any]
) -> int:
    """An HTTP server on a free port of 127.0.0.1; its port."""
    runner = web.ServerRunner(web.Server(handler, access_log=None), handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return int(runner.addresses[0][1])


async def otlp_sink(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sink = _Sink(await _acker(cfg, stack))
        port = await _serve(stack, sink.handle)
        emit_event("ready", url=f"http://127.0.0.1:{port}")
        async for cmd in commands:
            if cmd.get("cmd") == "reset":
                sink.reset()
                emit_event("ok")
            elif cmd.get("cmd") == "expect":
                await sink.expect(int(cmd["requests"]))
                emit_event("done", **sink.figures())
            else:
                break


# --- the two pipelines' ends ----------------------------------------------------------------


async def otlp_producer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    config = producer_config(cfg)
    if cfg.get("store"):
        config = dataclasses.replace(config, store=Store())
    async with (
        Agent(config, streams=OTLP_STREAMS) as agent,
        OtlpReceiver(agent, config=OtlpConfig(port=0)) as receiver,
    ):
        emit_event("ready", url=f"http://127.0.0.1:{receiver.port}")
        await anext(commands, None)
        emit_event(
            "bye",
            refused=dict(receiver.refused),
            requests=dict(receiver.requests),
            outbox_bytes=agent.outbox.max_bytes,
            dropped=dict(agent.outbox.dropped),
        )


async def otlp_consumer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    async with (
        worker_client(cfg) as client,
        client.subscribe(cfg["cluster"], [_STREAM]) as sub,
        OtlpExporter(ExportConfig(endpoint=cfg["sink_url"])) as exporter,
    ):
        emit_event("ready")

        async def export() -> None:
            batch: Batch | Resumed
            async for batch in sub:
                if not isinstance(batch, Resumed):
                    await exporter.put(batch)

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(export())
            await anext(commands, None)
            task.cancel()
        stats = sub.stats()
        emit_event(
            "bye",
            exported=sum(exporter.exported.values()),
            failed=dict(exporter.failed),
            lost=stats.lost,
            dropped=stats.dropped,
            deferred=stats.deferred,
            rejected=dict(stats.rejected),
        )


async def otlp_plain_producer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(cfg["nats_url"], name="bench-otlp-plain-producer")
        stack.push_async_callback(nc.drain)
        subject = f"{cfg['prefix']}.plain.data.{_PLAIN_SESSION}"
        answer = ExportTraceServiceResponse().SerializeToString()
        seq = 0

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            nonlocal seq
            body = await request.read()
            env = {"session": _PLAIN_SESSION, "stream": _STREAM, "seq": seq, "body": body}
            await nc.publish(subject, msgpack.packb(env))
            seq += 1
            return web.Response(body=answer, content_type=_PROTOBUF)

        port = await _serve(stack, handle)
        emit_event("ready", url=f"http://127.0.0.1:{port}")
        await anext(commands, None)


async def otlp_plain_consumer(
    cfg: dict[str, Any], commands: AsyncIterator[dict[str, Any]], emit_event: Callable[..., None]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(cfg["nats_url"], name="bench-otlp-plain-consumer")
        stack.push_async_callback(nc.drain)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(headers={"Content-Type": _PROTOBUF})
        )
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            queue.put_nowait(msg.data)

        await nc.subscribe(f"{cfg['prefix']}.plain.inbox.{_PLAIN_SESSION}", cb=on_msg)
        await settle(nc)
        emit_event("ready")

        async def export() -> None:  # as the exporter does: one at a time, in order
            while True:
                env = msgpack.unpackb(await queue.get())
                async with http.post(cfg["sink_url"] + _PATH, data=env["body"]) as response:
                    await response.read()

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(export())
            await anext(commands, None)
            task.cancel()


ROLES: Final = {
    "otlp-gen": otlp_gen,
    "otlp-sink": otlp_sink,
    "otlp-producer": otlp_producer,
    "otlp-consumer": otlp_consumer,
    "otlp-plain-producer": otlp_plain_producer,
    "otlp-plain-consumer": otlp_plain_consumer,
}
