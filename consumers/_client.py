"""The consumer library: ``async with Client(config) as client`` then
``async with client.subscribe(cluster, streams) as sub: async for batch in sub: ...``.

Each subscription makes an ephemeral key pair (off the event loop), subscribes its inbox
BEFORE asking the proxy to open the session, keeps the session alive, and verifies and
decrypts every envelope. Without NATS credentials configured, each subscription logs in to NATS
on a connection of its own, user = its session id and password = the access token (the
broker's auth callout confines that connection to the session's inbox); with credentials, all
share the client's connection. Failures follow the policy: ``fail`` raises the one opaque
:class:`IntegrityError`, ``discard`` drops and counts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import nats.errors
import structlog

from consumers._config import ClientConfig
from sealstream import BrokerError, Envelope, Notice, SessionError, Subjects, TrustError, WireError
from sealstream._ids import check_cluster_id, check_stream
from sealstream._nats import connect, release, settle
from sealstream._resource import AsyncResource
from sealstream._wire import VERSION, OpenRequest, decode_map, encode_map
from sealstream.crypto import Batch, ConsumerKey, ConsumerSession, End, TrustStore

__all__ = ["Client", "Stats", "Subscription"]

log = structlog.get_logger(__name__)

_MAX_TOKEN = 8192  # docs/protocol.md: the proxy's token size cap


@dataclass(frozen=True, slots=True)
class Stats:
    """What a subscription received and what became of it."""

    received: int
    batches: int
    rows: int
    rejected: dict[str, int]
    dropped: int
    gaps: int
    lost: int


class Client:
    """A connection to NATS from which sessions are opened."""

    def __init__(self, config: ClientConfig, *, trust: TrustStore | None = None) -> None:
        self.config = config
        self.trust = (
            trust if trust is not None else TrustStore.load(config.trust_store, tofu=config.tofu)
        )
        self.subjects = Subjects(config.prefix)
        self._nc: Any = None
        #: no NATS credentials: each session logs in with its id and token (auth callout)
        self.callout = _callout_mode(config)

    async def __aenter__(self) -> Self:
        if self.callout:
            return self
        auth = self.config.nats_auth
        self._nc = await connect(
            self.config.nats_url,
            name="sealstream-consumer",
            user=auth.user,
            password=auth.password,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drain the connection; idempotent."""
        nc, self._nc = self._nc, None
        await release(nc)

    @property
    def nc(self) -> Any:
        if self._nc is None:
            raise RuntimeError("use the client inside 'async with'")
        return self._nc

    def subscribe(
        self, cluster: str, streams: Sequence[str], *, key: ConsumerKey | None = None
    ) -> Subscription:
        """A session on ``cluster`` for ``streams``; enter it with ``async with``."""
        return Subscription(
            self, check_cluster_id(cluster), [check_stream(s) for s in streams], key
        )

    def token(self) -> str:
        """The token to send now (the configured one, or what its function returns); raises
        :class:`SessionError` ``unauthorized`` if the function fails or gives no token."""
        source = self.config.token
        if isinstance(source, str):
            return source
        try:
            token = source()
        except (OSError, ValueError) as exc:  # the documented failures of a token function
            raise SessionError("unauthorized", f"cannot read the token: {exc}") from None
        if not isinstance(token, str) or not token:
            raise SessionError("unauthorized", "the token function returned no token")
        return token

    async def request(
        self,
        subject: str,
        body: dict[str, Any],
        *,
        timeout_s: float | None = None,
        nc: Any = None,
    ) -> dict[str, Any]:
        """A session API request (on ``nc``, by default the client's connection); the reply's
        error becomes :class:`SessionError`."""
        try:
            msg = await (nc if nc is not None else self.nc).request(
                subject, encode_map(body), timeout=timeout_s or self.config.request_timeout_s
            )
        except nats.errors.NoRespondersError:
            raise BrokerError("no sealstream proxy is serving this NATS server") from None
        except nats.errors.TimeoutError:
            raise BrokerError("the proxy did not answer in time") from None
        except nats.errors.Error as exc:  # closed, draining, reconnecting...
            raise BrokerError(f"cannot send a session request: {exc!r}") from exc
        try:
            reply = decode_map(msg.data)
        except WireError as exc:
            raise BrokerError(f"malformed reply from the proxy: {exc}") from None
        if reply.get("ok") is not True:
            error = reply.get("error")
            if not isinstance(error, dict):
                raise SessionError("bad_request", "malformed error reply")
            raise SessionError(str(error.get("code", "bad_request")), str(error.get("message", "")))
        return reply


class Subscription(AsyncResource):
    """One live session: an async iterator of :class:`Batch` until the producer ends it."""

    def __init__(
        self, client: Client, cluster: str, streams: list[str], key: ConsumerKey | None
    ) -> None:
        self._client = client
        self.cluster = cluster
        self.streams = streams
        self._key = key
        self.session: ConsumerSession | None = None
        self.end_reason: str | None = None
        cfg = client.config
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(cfg.queue_size)
        self._sub: Any = None
        super().__init__()
        self._stop = asyncio.Event()
        self._received = 0
        self._batches = 0
        self._rows = 0
        self._dropped = 0
        self._last_drop_log = 0.0
        self.keepalive_s = 10.0
        self._closed = False
        self._own_nc: Any = None  # the session's own connection (auth callout)
        self._login: _Login | None = None

    @property
    def session_id(self) -> str:
        if self.session is None:
            raise RuntimeError("subscription not started")
        return self.session.session

    def stats(self) -> Stats:
        s = self.session
        rejected: Counter[str] = Counter(s.rejected if s else {})
        return Stats(
            received=self._received,
            batches=self._batches,
            rows=self._rows,
            rejected=dict(rejected),
            dropped=self._dropped,
            gaps=s.gaps if s else 0,
            lost=s.lost if s else 0,
        )

    async def _start(self) -> None:
        cfg = self._client.config
        key = self._key or await ConsumerKey.agenerate(cfg.key_kind)
        self.session = ConsumerSession(
            key,
            cluster=self.cluster,
            trust=self._client.trust,
            key_mode=cfg.key_mode,
            allow_zip=cfg.allow_zip,
            policy=cfg.policy,
        )
        subjects = self._client.subjects
        own = await _session_connection(self._client, key.session_id)
        if own is not None:
            self._own_nc, self._login = own
        self._stack.push_async_callback(release, self._own_nc)
        nc = self._conn
        # the inbox first: the producer's key envelope may arrive before the open reply
        self._sub = await nc.subscribe(subjects.inbox(key.session_id), cb=self._on_msg)
        self._stack.push_async_callback(self._unsubscribe)
        await settle(nc)
        req = OpenRequest(
            cluster=self.cluster,
            streams=tuple(self.streams),
            jwk=key.public_jwk,
            key_mode=cfg.key_mode,
            token=self._client.token(),
            zip=cfg.allow_zip,
        )
        reply = await self._client.request(subjects.api_open, req.to_map(), nc=nc)
        if reply.get("session") != key.session_id:
            raise BrokerError("the proxy answered for another session")
        self._stack.push_async_callback(self._close_session)
        ka = reply.get("keepalive_s")
        if isinstance(ka, int | float) and not isinstance(ka, bool) and ka > 0:
            self.keepalive_s = float(ka)
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self._stop.set)
        tg.create_task(self._keepalive())
        log.info(
            "session.opened",
            cluster=self.cluster,
            session=key.session_id,
            streams=self.streams,
            key=key.kind,
            key_mode=cfg.key_mode,
        )

    @property
    def _conn(self) -> Any:
        """The session's connection: its own (auth callout) or the client's (None: closed)."""
        return self._own_nc if self._own_nc is not None else self._client._nc

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and self._conn is not None and not self._conn.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _close_session(self) -> None:
        if self._closed or self.session is None or self._conn is None or self._conn.is_closed:
            return
        self._closed = True
        try:
            body = {"v": VERSION, "token": self._client.token(), "session": self.session.session}
            # short: on shutdown the proxy may be going away too; it expires the session anyway
            await self._client.request(
                self._client.subjects.api_close, body, timeout_s=2.0, nc=self._conn
            )
        except (BrokerError, SessionError) as exc:
            log.info("session.close_failed", session=self.session.session, error=str(exc))

    async def _keepalive(self) -> None:
        assert self.session is not None
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.keepalive_s)
            if self._stop.is_set():
                return
            if self._conn is None:  # the client was closed under the subscription
                self._push(SessionError("ended", "the client is closed"))
                return
            try:
                # read each time: a TokenFile renewed on disk keeps the session going
                token = self._client.token()
            except SessionError as exc:
                # a file caught mid-rewrite reads empty: try again at the next interval (the
                # proxy's expiry bounds how long)
                log.warning(
                    "session.token_unreadable", session=self.session.session, error=exc.detail
                )
                continue
            if self._login is not None and self._login.renew_due(token):
                # renewed: log in again with it (the broker ends the old login after its exp)
                await self._own_nc.force_reconnect()
            try:
                body = {"v": VERSION, "token": token, "session": self.session.session}
                await self._client.request(self._client.subjects.api_keepalive, body, nc=self._conn)
            except SessionError as exc:
                if exc.retriable or exc.code == "limit_exceeded":  # busy: the session stays
                    log.warning(
                        "session.keepalive_refused", session=self.session.session, code=exc.code
                    )
                    continue
                self._push(SessionError("ended", f"session lost: {exc.detail}"))
                return
            except BrokerError as exc:
                nc = self._conn
                if nc is None or nc.is_closed:  # no connection will come back: say so
                    self._push(SessionError("ended", "the NATS connection is closed"))
                    return
                log.warning(
                    "session.keepalive_failed", session=self.session.session, error=str(exc)
                )

    def _push(self, item: bytes | BaseException) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 1.0:
                self._last_drop_log = now
                log.warning("inbox.overflow", dropped=self._dropped, queue=self._queue.maxsize)

    async def _on_msg(self, msg: Any) -> None:
        self._received += 1
        self._push(msg.data)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Batch:
        session = self.session
        if session is None:
            raise RuntimeError("use the subscription inside 'async with'")
        while True:
            if self.end_reason is not None:
                raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            result = await self._open_one(session, item)
            if isinstance(result, Batch):
                self._batches += 1
                self._rows += len(result.rows)
                return result
            if isinstance(result, End):
                self.end_reason = result.reason
                log.info("session.ended", session=session.session, reason=result.reason)
                # the proxy cannot tell a genuine end from a forged one: the consumer, which
                # verified it, stops its keepalives and lets the proxy's session go now
                self._stop.set()
                await self._close_session()
                raise StopAsyncIteration
            if isinstance(result, Notice):
                log.info("session.notice", session=session.session, code=result.code)
                if result.code in ("expired", "ended"):
                    # unauthenticated, but a relay able to send it could drop everything anyway
                    raise SessionError("ended", f"the proxy ended this session: {result.message}")

    async def _open_one(
        self, session: ConsumerSession, payload: bytes
    ) -> Batch | End | Notice | None:
        try:
            item = session.parse(payload)
            if isinstance(item, Envelope):
                if item.kind == "key" or session.key_mode == "per-message":
                    # public-key decryption (RSA: milliseconds) stays off the event loop
                    return await asyncio.to_thread(session.open, item)
                return session.open(item)
            return item
        finally:
            self._check_trust(session)

    def _check_trust(self, session: ConsumerSession) -> None:
        if not session.keyed and session.untrusted_kid is not None:
            store = self._client.trust.path or "(in memory)"
            raise TrustError(
                f"cluster {self.cluster!r} signs with key {session.untrusted_kid}, which the "
                f"trust store {store} does not hold: pin it with 'sealstream-consume trust add'"
            )


def _callout_mode(config: ClientConfig) -> bool:
    """True without NATS credentials (neither configured nor in a URL)."""
    auth = config.nats_auth
    if auth.user is not None or auth.password is not None:
        return False
    urls = [u.strip() for u in config.nats_url.split(",")]
    return not any(urlsplit(u if "://" in u else f"nats://{u}").username for u in urls)


class _Login:
    """The NATS password of a session connection: the client's token, read again for every
    (re)connect (the last good one when it cannot be read at that instant). ``sent`` is the
    token the connection last logged in with: once the token is renewed, a reconnect presents
    it before the broker ends the login that the old one bounds."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.sent = client.token()  # no token at all: fail now, with the token's error

    def __call__(self) -> str:
        with contextlib.suppress(SessionError):
            self.sent = self._client.token()
        return self.sent

    def renew_due(self, token: str, *, margin_s: float = 60.0) -> bool:
        """True when ``token`` differs from the login's and the login's token expires within
        ``margin_s`` (read from its claims, unverified: only to time the new login; a token
        function that mints a fresh token per call must not reconnect every keepalive)."""
        if token == self.sent:
            return False
        exp = _unverified_exp(self.sent)
        return exp is None or exp - time.time() < margin_s


def _unverified_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWS compact token, without verifying it; None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


async def _session_connection(client: Client, session_id: str) -> tuple[Any, _Login] | None:
    """A connection logged in as ``session_id`` with the token (``docs/protocol.md``, consumer
    connections), or None when the client's shared connection serves (NATS credentials)."""
    if not client.callout:
        return None
    password = _Login(client)
    if len(password.sent) > _MAX_TOKEN:  # the proxy would refuse it; NATS may just drop the line
        raise SessionError("unauthorized", f"the access token is too large (over {_MAX_TOKEN} B)")
    try:
        nc = await connect(
            client.config.nats_url,
            name="sealstream-consumer",
            user=session_id,
            password=password,
            inbox_prefix=f"_INBOX.{session_id}",
            fail_fast=True,  # a refused login is final: say so now
        )
    except BrokerError as exc:
        said = str(exc).lower()
        if "control line" in said:  # the CONNECT line is capped (4 KiB by default)
            raise SessionError("unauthorized", "the access token is too large for NATS") from None
        if exc.retriable:
            raise
        exp = _unverified_exp(password.sent)
        if exp is not None and exp < time.time() - 30:  # the proxy's leeway
            raise SessionError(
                "unauthorized", "NATS refused the connection: token expired"
            ) from None
        refused = SessionError(
            "unauthorized",
            "NATS refused the connection: the broker's authorization service refused the "
            "token (not yet valid, invalid, or for no cluster; see the proxy log) or is not "
            "running",
        )
        refused.retriable = True  # the service may be starting: worth another try
        raise refused from None
    return nc, password
