"""A site's leaf link through loopback ports of its own, which can be cut and restored: the
site's WAN going down while its leaf node and producer stay up (``sealstream chaos
--topology hub --faults link``, the hub fault tests). Bytes pass through untouched."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence

import structlog

__all__ = ["LinkRelay"]

log = structlog.get_logger(__name__)

_CHUNK = 64 * 1024


class LinkRelay:
    """``routes``: (listen port, hub leafnode port) pairs on 127.0.0.1, one per hub node.
    ``start()`` listens; ``cut()`` closes every connection and stops listening (a leaf node
    dialling then gets a refused connection, as across a WAN that is down); ``start()``
    again restores it. ``cut()`` also ends it for good (idempotent)."""

    def __init__(self, name: str, routes: Sequence[tuple[int, int]]) -> None:
        self.name = name
        self.routes = list(routes)
        self._servers: list[asyncio.Server] = []
        self._transports: set[asyncio.WriteTransport] = set()
        #: one more at each cut: a connection accepted under an earlier one is not relayed
        self._epoch = 0

    async def start(self) -> None:
        if self._servers:
            return
        try:
            for listen, target in self.routes:
                server = await asyncio.start_server(
                    functools.partial(self._relay, target=target, epoch=self._epoch),
                    "127.0.0.1",
                    listen,
                )
                self._servers.append(server)
        except BaseException:
            await self.cut()  # all of it or none
            raise
        log.info("link.up", link=self.name)

    async def cut(self) -> None:
        self._epoch += 1  # a connection accepted before, and not yet relaying, gives up
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for transport in list(self._transports):
            transport.abort()  # no goodbye: the far end learns it from its own pings
        self._transports.clear()
        for server in servers:
            await server.wait_closed()
        if servers:
            log.info("link.cut", link=self.name)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        target: int,
        epoch: int,
    ) -> None:
        """One leaf connection: both directions copied until either side closes or the link
        is cut (this coroutine is the server's, owned by it). A connection of a link that was
        cut since it was accepted (``epoch``) is closed at once."""
        if epoch != self._epoch:
            writer.transport.abort()
            return
        self._transports.add(writer.transport)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.transport.abort()
            self._transports.discard(writer.transport)
            return
        if epoch != self._epoch:  # cut while connecting
            for w in (writer, up_writer):
                w.transport.abort()
            self._transports.discard(writer.transport)
            return
        self._transports.add(up_writer.transport)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_copy(reader, up_writer))
                tg.create_task(_copy(up_reader, writer))
        except* (OSError, asyncio.IncompleteReadError):
            pass  # a cut or a closed side: both are closed below
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._transports.discard(w.transport)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError):
            writer.transport.abort()
