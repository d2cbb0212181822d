"""Client plumbing: one way to open a NATS connection, with logging callbacks and a bounded
first connect.

nats-py retries a refused first connect forever (even with ``allow_reconnect=False``), so
:func:`connect` bounds it with ``asyncio.timeout`` and turns failure into :class:`BrokerError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats.aio.client
import nats.errors
import structlog

from sealstream.errors import BrokerError

__all__ = ["NatsAuth", "connect", "redact_url", "release", "settle"]

log = structlog.get_logger(__name__)

_ERROR_LOG_INTERVAL = 1.0
#: the logging callbacks of each client made by connect(), for release()
_CALLBACKS_OF: weakref.WeakKeyDictionary[nats.aio.client.Client, _Callbacks] = (
    weakref.WeakKeyDictionary()
)
_CALLBACKS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb")


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """NATS user and password of a role, when they are not in its URL (a password file keeps
    them out of the process environment and of ``docker inspect``)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NatsAuth:
        """``SEALSTREAM_NATS_USER`` with ``SEALSTREAM_NATS_PASSWORD_FILE`` (or
        ``SEALSTREAM_NATS_PASSWORD``)."""
        password = env.get("SEALSTREAM_NATS_PASSWORD")
        if env.get("SEALSTREAM_NATS_PASSWORD_FILE"):
            path = Path(env["SEALSTREAM_NATS_PASSWORD_FILE"])
            password = path.read_text(encoding="utf-8").strip()
        return cls(env.get("SEALSTREAM_NATS_USER") or None, password or None)


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list) without user and password, fit for logs."""
    if "," in url:
        return ",".join(redact_url(u.strip()) for u in url.split(","))
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


class _Callbacks:
    """The four nats-py callbacks of one client, logging structlog events.

    ``nats.error`` is rate limited to one line per second: slow-consumer errors fire once per
    dropped message. The next line (or ``nats.closed``) carries the count of suppressed ones.
    Callbacks given by the caller run after the logging.
    """

    def __init__(self, name: str, url: str, user_cbs: dict[str, Any]) -> None:
        self.nc: Any = None
        self._name = name
        self._url = url
        self._user = user_cbs
        self._last_error_log: float | None = None
        self._suppressed = 0
        self.last_error: Exception | None = None
        self.last_server_error: Exception | None = None  # what the server said, if anything
        self.connected = asyncio.Event()  # set while connected (see release)

    async def _chain(self, key: str, *args: Any) -> None:
        cb: Callable[..., Awaitable[None]] | None = self._user.get(key)
        if cb is not None:
            await cb(*args)

    async def error_cb(self, exc: Exception) -> None:
        self.last_error = exc
        if isinstance(exc, nats.errors.Error):
            self.last_server_error = exc
        now = time.monotonic()
        last = self._last_error_log
        if last is None or now - last >= _ERROR_LOG_INTERVAL:
            log.warning(
                "nats.error",
                client=self._name,
                error=str(exc) or repr(exc),
                error_type=type(exc).__name__,
                suppressed=self._suppressed,
            )
            self._last_error_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        await self._chain("error_cb", exc)

    async def disconnected_cb(self) -> None:
        self.connected.clear()
        nc = self.nc
        if nc is not None and (nc.is_closed or nc.is_draining):
            log.debug("nats.disconnected", client=self._name, url=self._url, closing=True)
        else:
            log.warning("nats.disconnected", client=self._name, url=self._url)
        await self._chain("disconnected_cb")

    async def reconnected_cb(self) -> None:
        self.connected.set()
        url = self._url
        if self.nc is not None and self.nc.connected_url is not None:
            url = redact_url(self.nc.connected_url.geturl())
        log.info("nats.reconnected", client=self._name, url=url)
        await self._chain("reconnected_cb")

    async def closed_cb(self) -> None:
        log.info(
            "nats.closed", client=self._name, url=self._url, errors_suppressed=self._suppressed
        )
        self._suppressed = 0
        await self._chain("closed_cb")


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout: float = 5.0,
    user: str | None = None,
    password: str | Callable[[], str] | None = None,
    fail_fast: bool = False,
    **kwargs: Any,
) -> nats.aio.client.Client:
    """Connect to NATS at ``url`` (one URL or a comma-separated list), waiting at most
    ``connect_timeout`` seconds for the first connection; afterwards the client reconnects
    forever, every 0.5 s.

    ``kwargs`` go to nats-py's ``connect`` (they may override ``max_reconnect_attempts`` and
    ``reconnect_time_wait``); an ``error_cb``/``disconnected_cb``/``reconnected_cb``/
    ``closed_cb`` given there runs after the logging one. A callable ``password`` is called
    for every CONNECT, reconnects included (a renewed token). ``fail_fast``: the first attempt's
    failure (a refused login, say) is final, and one attempt may take the whole
    ``connect_timeout`` (a server's auth callout answers within its own timeout); reconnects
    later are as usual. Raises :class:`BrokerError` if the
    server cannot be reached (or refuses the connection) in time.
    """
    if connect_timeout <= 0:
        raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
    shown = redact_url(url)
    user_cbs = {key: kwargs.pop(key) for key in _CALLBACKS if key in kwargs}
    for key, cb in user_cbs.items():
        if not inspect.iscoroutinefunction(cb):
            raise TypeError(f"{key} must be an async function")
    cbs = _Callbacks(name, shown, user_cbs)
    options: dict[str, Any] = {
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        **kwargs,
    }
    if fail_fast:
        options["allow_reconnect"] = False  # until connected (set back below)
        options["connect_timeout"] = connect_timeout
    nc = nats.aio.client.Client()
    cbs.nc = nc
    try:
        async with asyncio.timeout(connect_timeout):
            await nc.connect(
                # "nats://a:4222,nats://b:4222": a server list, as nats CLIs accept it
                [u.strip() for u in url.split(",")] if "," in url else url,
                name=name,
                user=user,
                password=password,
                error_cb=cbs.error_cb,
                disconnected_cb=cbs.disconnected_cb,
                reconnected_cb=cbs.reconnected_cb,
                closed_cb=cbs.closed_cb,
                **options,
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        await _abandon(nc)
        # A timeout says nothing: prefer what the server said, then the last socket error.
        cause: BaseException = exc
        if isinstance(exc, TimeoutError):
            cause = cbs.last_server_error or cbs.last_error or exc
        refused = "authorization violation" in str(cause).lower()
        said = (
            os.strerror(cause.errno).lower()
            if isinstance(cause, OSError) and cause.errno
            else str(cause) or type(cause).__name__
        )
        raise BrokerError(f"cannot reach NATS at {shown}: {said}", retriable=not refused) from cause
    except asyncio.CancelledError:
        await _abandon(nc)
        raise
    if fail_fast:
        nc.options["allow_reconnect"] = True  # nats-py reads it at each disconnection
    cbs.connected.set()
    _CALLBACKS_OF[nc] = cbs
    log.info("nats.connected", client=name, url=shown, server=str(nc.connected_server_version))
    return nc


async def settle(nc: nats.aio.client.Client, *, timeout_s: int = 10) -> None:
    """Return once the server ``nc`` is connected to has processed everything it sent so
    far, subscriptions included, so another connection's request through that server can no
    longer miss them (in a NATS cluster, other servers learn of a subscription a moment later).

    One ``flush()`` does not promise that: nats-py writes its PING straight to the socket,
    ahead of the SUBs still queued for its flusher task, so the PONG can come back before the
    server has seen them (a request sent then got "no responders"). By the first PONG the
    flusher has written the queue; the second PING follows it on the wire.

    A server that does not answer within ``timeout_s`` (a stalled or overloaded one, a
    connection cut meanwhile) is a :class:`BrokerError`, passing: the caller's retry decides.
    """
    try:
        await nc.flush(timeout=timeout_s)
        await nc.flush(timeout=timeout_s)
    except nats.errors.Error as exc:
        raise BrokerError(f"the NATS server did not answer: {exc}") from None


async def release(nc: nats.aio.client.Client | None, *, reconnect_wait_s: float = 2.0) -> None:
    """Drain ``nc`` (deliver what its subscriptions hold, flush what it publishes, close).

    A connection that is reconnecting gets ``reconnect_wait_s`` to come back first (a server
    restart takes about a second). If it does not, what it buffered is dropped, counted in the
    log, and it is closed: nats-py refuses to drain while reconnecting, and its ``close()``
    raises on the buffer, writing it to the lost socket, before closing anything. Idempotent.
    """
    if nc is None or nc.is_closed:
        return
    cbs = _CALLBACKS_OF.get(nc)
    if not nc.is_connected and cbs is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(reconnect_wait_s):
                await cbs.connected.wait()
    if nc.is_closed:
        return
    if nc.is_connected:
        try:
            await nc.drain()
            return
        except nats.errors.Error as exc:  # lost the server while draining
            log.warning("nats.drain_failed", error=str(exc) or repr(exc))
    if not nc.is_connected and nc.pending_data_size:
        log.warning("nats.unsent_dropped", bytes=nc.pending_data_size)
        nc._pending.clear()  # nats-py 2.x keeps the buffer here; no public way to drop it
        nc._pending_data_size = 0
    try:
        await nc.close()
    except OSError as exc:  # the socket went away under close()
        log.warning("nats.close_failed", error=str(exc) or repr(exc))
    await _end_reconnecting(nc)


async def _end_reconnecting(nc: Any, *, tries: int = 50) -> None:
    """Make sure the client's reconnection task is over once it is closed.

    nats-py 2.16 cancels that task in ``close()``, but on Python 3.11 ``asyncio.wait_for``
    can swallow a cancellation that lands as its connect attempt completes: the task then
    goes on reconnecting every 0.5 s after the close, and a process (or an event loop that
    cancels what is left) waits for it forever. Cancel it until it ends."""
    task = getattr(nc, "_reconnection_task", None)
    for _ in range(tries):
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task is not None and not task.done():
        log.warning("nats.reconnect_task_stuck")


async def _abandon(nc: Any) -> None:
    """Close a client whose first connect failed, so no socket or task outlives it."""
    if not nc.is_closed:
        await nc.close()
    await _end_reconnecting(nc)
