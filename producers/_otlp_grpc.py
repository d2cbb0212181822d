"""The OTLP/gRPC side of the receiver: the three ``Export`` services (opentelemetry-proto's
``TraceService``, ``MetricsService``, ``LogsService``), on grpc.aio.

Requests arrive as their protobuf bytes (no deserializer: the bytes are what is sealed) and
go through the same admission, decoding and sealing as OTLP/HTTP. Refusals map to gRPC codes:
``INVALID_ARGUMENT`` (undecodable), ``UNAVAILABLE`` with a ``RetryInfo`` in the status details
(backpressure; the OTLP client retries after its delay), ``UNAUTHENTICATED`` (no or a wrong
bearer token in the ``authorization`` metadata, when the receiver has one), ``INTERNAL``. gzip
(``grpc-encoding``) and the size limit (``RESOURCE_EXHAUSTED``, on the inflated message) are
gRPC's own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Final, Protocol

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from producers._otlp_codec import PROTOBUF, UNAVAILABLE, Refused
from sealstream.otlp import SIGNALS, Signal

__all__ = ["Accepting", "retry_info", "serve_grpc"]

_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}
#: where gRPC carries a google.rpc.Status with details
STATUS_DETAILS: Final = "grpc-status-details-bin"


class Accepting(Protocol):
    """The receiver, as the servers use it."""

    def authenticate(self, authorization: str | None) -> None: ...

    def admitted(self) -> AbstractContextManager[None]: ...

    async def accept(self, signal: Signal, body: bytes, content_type: str) -> Message: ...

    def refuse(self, refused: Refused) -> None: ...


def retry_info(message: str, seconds: int) -> bytes:
    """A ``google.rpc.Status`` (``UNAVAILABLE``) whose details say when to retry."""
    detail = AnyMessage()
    detail.Pack(RetryInfo(retry_delay=Duration(seconds=seconds)))
    status = Status(code=UNAVAILABLE, message=message, details=[detail])
    return bytes(status.SerializeToString())


def _export(
    receiver: Accepting, signal: Signal, retry_after_s: int
) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]:
    async def export(body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            metadata = dict(context.invocation_metadata() or ())
            authorization = metadata.get("authorization")
            receiver.authenticate(authorization if isinstance(authorization, str) else None)
            with receiver.admitted():
                response = await receiver.accept(signal, body, PROTOBUF)
        except Refused as refused:
            receiver.refuse(refused)
            trailers: tuple[tuple[str, str | bytes], ...] = ()
            if refused.code == UNAVAILABLE:
                trailers = ((STATUS_DETAILS, retry_info(str(refused), retry_after_s)),)
            await context.abort(_CODES[refused.code], str(refused), trailing_metadata=trailers)
        return bytes(response.SerializeToString())

    return export


async def serve_grpc(
    receiver: Accepting, *, host: str, port: int, max_bytes: int, retry_after_s: int
) -> tuple[grpc.aio.Server, int]:
    """Start the Export services on ``host:port`` (0: any free port); the server and its port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_bytes)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                signal.service,
                {
                    "Export": grpc.unary_unary_rpc_method_handler(
                        _export(receiver, signal, retry_after_s)
                    )
                },
            )
            for signal in SIGNALS.values()
        ]
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
        raise OSError(f"cannot listen for OTLP/gRPC on {host}:{port}: {exc}") from None
    await server.start()
    return server, bound
