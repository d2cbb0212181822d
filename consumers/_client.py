"""The consumer library: ``async with Client(config) as client`` then
``async with client.subscribe(cluster, streams) as sub: async for batch in sub: ...``.

Each session makes an ephemeral key pair (off the event loop), subscribes its inbox BEFORE
asking the proxy to open the session, keeps the session alive, and verifies and decrypts every
envelope. Without NATS credentials configured, each session logs in to NATS on a connection
of its own, user = its session id and password = the access token (the broker's auth callout
confines that connection to the session's inbox); with credentials, all share the client's
connection. Failures follow the policy: ``fail`` raises the one opaque
:class:`IntegrityError`, ``discard`` drops and counts.

With ``resume=True`` a subscription outlives its sessions: when one ends for an
infrastructure reason (expired, ended by the proxy, lost, the cluster unavailable), it opens a
new one with a fresh key and yields a :class:`Resumed` marker before the new session's rows.
What the cluster authenticated (its ``end``), a trust error and an integrity failure under
the ``fail`` policy end it for good.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar, overload
from urllib.parse import urlsplit

import nats.errors
import structlog

from consumers._config import ClientConfig
from sealstream import (
    BrokerError,
    Envelope,
    IntegrityError,
    Notice,
    SessionError,
    Subjects,
    TrustError,
    WireError,
)
from sealstream.crypto import (
    Batch,
    ConsumerKey,
    ConsumerSession,
    End,
    GroupMember,
    TrustStore,
)
from sealstream.ids import check_cluster_id, check_stream
from sealstream.nats import connect, release, settle
from sealstream.resource import AsyncResource
from sealstream.wire import VERSION, OpenRequest, decode_map, encode_map

__all__ = ["DEFAULT_RETRY_S", "Client", "Resumed", "Stats", "Subscription"]

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
    #: sessions used (more than 1 after a resume)
    sessions: int = 1


@dataclass(frozen=True, slots=True)
class Resumed:
    """Yielded by a ``resume=True`` subscription when a new session replaced one that ended:
    rows sealed between the two were lost and are NOT counted in ``lost``."""

    previous: str
    session: str
    reason: str
    #: open attempts it took (busy or unavailable refusals are retried with backoff)
    attempts: int


_T = TypeVar("_T", "Batch", "Batch | Resumed")
#: backoff between open attempts: exponential from 0.2 s to 5 s, with full jitter
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0
#: how long a first open retries busy or unavailable refusals by default (0: fail at once)
DEFAULT_RETRY_S = 30.0


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
        self.closed = True  # until entered

    async def __aenter__(self) -> Self:
        self.closed = False
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
        self.closed = True
        nc, self._nc = self._nc, None
        await release(nc)

    @property
    def nc(self) -> Any:
        if self._nc is None:
            raise RuntimeError("use the client inside 'async with'")
        return self._nc

    @overload
    def subscribe(
        self,
        cluster: str,
        streams: Sequence[str],
        *,
        key: ConsumerKey | None = None,
        resume: Literal[False] = False,
        retry_s: float = DEFAULT_RETRY_S,
        resume_timeout_s: float = 120.0,
    ) -> Subscription[Batch]: ...

    @overload
    def subscribe(
        self,
        cluster: str,
        streams: Sequence[str],
        *,
        key: ConsumerKey | None = None,
        resume: bool,
        retry_s: float = DEFAULT_RETRY_S,
        resume_timeout_s: float = 120.0,
    ) -> Subscription[Batch | Resumed]: ...

    def subscribe(
        self,
        cluster: str,
        streams: Sequence[str],
        *,
        key: ConsumerKey | None = None,
        resume: bool = False,
        retry_s: float = DEFAULT_RETRY_S,
        resume_timeout_s: float = 120.0,
    ) -> Subscription[Any]:
        """A session on ``cluster`` for ``streams``; enter it with ``async with``.

        ``key`` is the first session's key (default: a fresh one). An open refused as passing
        (the proxy busy, the cluster unavailable, no proxy answering) is retried with backoff
        and jitter for ``retry_s`` seconds (30 by default; 0 fails at once). With ``resume``,
        a session that ends for an infrastructure reason is replaced by a new one (retried
        for up to ``resume_timeout_s``), and the iterator yields a :class:`Resumed` marker
        between them.
        """
        if retry_s < 0 or resume_timeout_s < 0:
            raise ValueError("retry_s and resume_timeout_s must not be negative")
        return Subscription(
            self,
            check_cluster_id(cluster),
            [check_stream(s) for s in streams],
            key,
            resume=resume,
            retry_s=retry_s,
            resume_timeout_s=resume_timeout_s,
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
            code = str(error.get("code", "bad_request"))
            message = str(error.get("message", ""))
            if error.get("retry") is True:  # the proxy is busy: the same request may pass later
                raise SessionError(code, message, retriable=True)
            raise SessionError(code, message)
        return reply


@dataclass(frozen=True, slots=True)
class _Lost:
    """A session is over without an authenticated end; ``resumable`` if a new one may
    replace it (not when the token was refused, or the client closed)."""

    reason: str
    resumable: bool


class _Session(AsyncResource):
    """One live session: key pair, inbox subscription, the open, keepalives, and a bounded
    queue of what arrives on the inbox."""

    def __init__(
        self, client: Client, cluster: str, streams: list[str], key: ConsumerKey | None
    ) -> None:
        super().__init__()
        self._client = client
        self.cluster = cluster
        self.streams = streams
        self._key = key
        self.crypto: ConsumerSession | None = None
        cfg = client.config
        self.queue: asyncio.Queue[bytes | _Lost | BaseException] = asyncio.Queue(cfg.queue_size)
        self._sub: Any = None
        self._stop = asyncio.Event()
        self.received = 0
        self.dropped = 0
        self._last_drop_log = 0.0
        self.keepalive_s = 10.0
        #: (event loop time) a key envelope signed by a pinned key is due by then
        self.key_deadline = float("inf")
        self._closed = False
        #: a control item that met a full queue
        self.ending: _Lost | BaseException | None = None
        self._own_nc: Any = None  # the session's own connection (auth callout)
        self._login: _Login | None = None

    async def _start(self) -> None:
        cfg = self._client.config
        key = self._key or await ConsumerKey.agenerate(cfg.key_kind)
        self.crypto = (
            GroupMember(
                key,
                cluster=self.cluster,
                streams=self.streams,
                trust=self._client.trust,
                policy=cfg.policy,
            )
            if cfg.key_mode == "group"
            else ConsumerSession(
                key,
                cluster=self.cluster,
                trust=self._client.trust,
                key_mode=cfg.key_mode,
                allow_zip=cfg.allow_zip,
                policy=cfg.policy,
            )
        )
        subjects = self._client.subjects
        own = await _session_connection(self._client, key.session_id, on_closed=self._on_closed)
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
            # the cluster's own check of who reads (the relay forwards it untouched)
            proof=cfg.identity.prove(
                cluster=self.cluster,
                session=key.session_id,
                streams=self.streams,
                key_mode=cfg.key_mode,
                zip=cfg.allow_zip,
            )
            if cfg.identity is not None
            else None,
            authz=cfg.authz,
        )
        reply = await self._client.request(subjects.api_open, req.to_map(), nc=nc)
        if reply.get("session") != key.session_id:
            raise BrokerError("the proxy answered for another session")
        self._stack.push_async_callback(self.close)
        ka = reply.get("keepalive_s")
        if isinstance(ka, int | float) and not isinstance(ka, bool) and ka > 0:
            self.keepalive_s = float(ka)
        self.key_deadline = asyncio.get_running_loop().time() + cfg.request_timeout_s
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

    async def close(self) -> None:
        """Tell the proxy the session is over (once; best effort: it expires it anyway)."""
        self._stop.set()  # no keepalive after this
        if self._closed or self.crypto is None or self._conn is None or self._conn.is_closed:
            return
        self._closed = True
        try:
            body = {"v": VERSION, "token": self._client.token(), "session": self.crypto.session}
            # short: on shutdown the proxy may be going away too; it expires the session anyway
            await self._client.request(
                self._client.subjects.api_close, body, timeout_s=2.0, nc=self._conn
            )
        except (BrokerError, SessionError) as exc:
            log.info("session.close_failed", session=self.crypto.session, error=str(exc))

    async def _keepalive(self) -> None:
        assert self.crypto is not None
        session = self.crypto.session
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.keepalive_s)
            if self._stop.is_set():
                return
            if self._conn is None or self._client.closed:  # closed under the subscription
                self.push(_Lost("the client is closed", resumable=False))
                return
            try:
                # read each time: a TokenFile renewed on disk keeps the session going
                token = self._client.token()
            except SessionError as exc:
                # a file caught mid-rewrite reads empty: try again at the next interval (the
                # proxy's expiry bounds how long)
                log.warning("session.token_unreadable", session=session, error=exc.detail)
                continue
            if self._login is not None and self._login.renew_due(token):
                # renewed: log in again with it (the broker ends the old login after its exp)
                await self._own_nc.force_reconnect()
            try:
                body = {"v": VERSION, "token": token, "session": session}
                await self._client.request(self._client.subjects.api_keepalive, body, nc=self._conn)
            except SessionError as exc:
                if exc.retriable or exc.code == "limit_exceeded":  # busy: the session stays
                    log.warning("session.keepalive_refused", session=session, code=exc.code)
                    continue
                # the proxy no longer knows it (resumable), or refuses our token (not)
                resumable = exc.code == "bad_request"
                self.push(_Lost(f"session lost: {exc.detail}", resumable=resumable))
                return
            except BrokerError as exc:
                nc = self._conn
                if nc is None or nc.is_closed:  # no connection will come back: say so
                    self.push(_Lost("the NATS connection is closed", resumable=self._resumable()))
                    return
                log.warning("session.keepalive_failed", session=session, error=str(exc))

    def _resumable(self) -> bool:
        """A session whose own connection closed (the broker ended its login) may be
        replaced by one on a new connection; not when the client itself was closed."""
        return self._own_nc is not None and not self._client.closed

    async def _on_closed(self) -> None:
        if not self._stop.is_set():  # not our own close: the broker ended the connection
            self.push(_Lost("the NATS connection was closed", resumable=self._resumable()))

    def push(self, item: bytes | _Lost | BaseException) -> None:
        """Queue an inbox message, or drop and count it when the queue is full. A control
        item (the session is over) is never dropped: on a full queue it waits in ``ending``,
        which the iterator takes once it has drained the queue."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if not isinstance(item, bytes):
                self.ending = self.ending or item
                return
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 1.0:
                self._last_drop_log = now
                log.warning("inbox.overflow", dropped=self.dropped, queue=self.queue.maxsize)

    async def _on_msg(self, msg: Any) -> None:
        self.received += 1
        self.push(msg.data)


class Subscription(AsyncResource, Generic[_T]):
    """A live subscription: an async iterator of :class:`Batch` (and, with ``resume``,
    :class:`Resumed` markers) until the producer ends it."""

    def __init__(
        self,
        client: Client,
        cluster: str,
        streams: list[str],
        key: ConsumerKey | None,
        *,
        resume: bool = False,
        retry_s: float = DEFAULT_RETRY_S,
        resume_timeout_s: float = 120.0,
    ) -> None:
        super().__init__()
        self._client = client
        self.cluster = cluster
        self.streams = streams
        self._key = key
        self._resume = resume
        self._retry_s = retry_s
        self._resume_timeout_s = resume_timeout_s
        self._live: _Session | None = None
        self.end_reason: str | None = None
        #: every resume so far, oldest first
        self.resumes: list[Resumed] = []
        self._batches = 0
        self._rows = 0
        self._past = Stats(0, 0, 0, {}, 0, 0, 0, 0)  # what ended sessions received

    @property
    def session(self) -> ConsumerSession | None:
        """The current session's verification state (None before the start)."""
        return self._live.crypto if self._live is not None else None

    @property
    def session_id(self) -> str:
        if self.session is None:
            raise RuntimeError("subscription not started")
        return self.session.session

    @property
    def keepalive_s(self) -> float:
        return self._live.keepalive_s if self._live is not None else 10.0

    def stats(self) -> Stats:
        """Counters over every session of this subscription."""
        live, past = self._live, self._past
        s = live.crypto if live is not None else None
        rejected: Counter[str] = Counter(past.rejected)
        rejected.update(s.rejected if s else {})
        return Stats(
            received=past.received + (live.received if live else 0),
            batches=self._batches,
            rows=self._rows,
            rejected=dict(rejected),
            dropped=past.dropped + (live.dropped if live else 0),
            gaps=past.gaps + (s.gaps if s else 0),
            lost=past.lost + (s.lost if s else 0),
            sessions=past.sessions + (1 if live else 0),
        )

    async def _start(self) -> None:
        self._live, _ = await self._open(self._key, self._retry_s)
        self._stack.push_async_callback(self._close_live)

    async def _close_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            self._past = self._stats_with(live)
            await live.aclose()

    def _stats_with(self, live: _Session) -> Stats:
        """``_past`` with an ending session's counters added."""
        past, s = self._past, live.crypto
        rejected: Counter[str] = Counter(past.rejected)
        rejected.update(s.rejected if s else {})
        return Stats(
            received=past.received + live.received,
            batches=0,
            rows=0,
            rejected=dict(rejected),
            dropped=past.dropped + live.dropped,
            gaps=past.gaps + (s.gaps if s else 0),
            lost=past.lost + (s.lost if s else 0),
            sessions=past.sessions + 1,
        )

    async def _open(self, key: ConsumerKey | None, budget_s: float) -> tuple[_Session, int]:
        """Open a session, retrying passing refusals with backoff and jitter for
        ``budget_s`` seconds; the session and the attempts it took."""
        deadline = time.monotonic() + budget_s
        delay = _BACKOFF_FIRST
        attempts = 0
        while True:
            attempts += 1
            live = _Session(self._client, self.cluster, self.streams, key)
            try:
                await live.__aenter__()
            except (BrokerError, SessionError) as exc:
                if not self._passing(exc):
                    raise
                wait = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not a secret
                if time.monotonic() + wait > deadline:
                    raise
                log.info(
                    "session.open_retry",
                    cluster=self.cluster,
                    attempt=attempts,
                    error=str(exc),
                    wait_s=round(wait, 3),
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, _BACKOFF_MAX)
                key = None  # a key is single-use: the proxy may have registered it
                continue
            return live, attempts

    def _passing(self, exc: BrokerError | SessionError) -> bool:
        """A refusal the same open may get past later: the proxy busy or restarting, the
        cluster unavailable (a producer restarting); not one about the request itself."""
        if self._client.closed:
            return False
        if isinstance(exc, SessionError):
            return exc.code == "cluster_unavailable" or exc.retriable
        return exc.retriable

    async def _resume_after(self, reason: str) -> Resumed:
        """Replace the current session by a new one (fresh key)."""
        previous = self.session_id
        log.warning("session.resuming", cluster=self.cluster, session=previous, reason=reason)
        await self._close_live()
        self._live, attempts = await self._open(None, self._resume_timeout_s)
        marker = Resumed(previous, self.session_id, reason, attempts)
        self.resumes.append(marker)
        log.info(
            "session.resumed",
            cluster=self.cluster,
            previous=previous,
            session=marker.session,
            attempts=attempts,
        )
        return marker

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _T:
        while True:
            live = self._live
            if live is None or live.crypto is None:
                raise RuntimeError("use the subscription inside 'async with'")
            if self.end_reason is not None:
                raise StopAsyncIteration
            item = await self._next_item(live)
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Lost):
                if self._resume and item.resumable:
                    return await self._resume_after(item.reason)  # type: ignore[return-value]
                raise SessionError("ended", item.reason)
            session = live.crypto
            try:
                result = await self._open_one(session, item)
            except IntegrityError:  # policy "fail": the session ends here
                if not session.keyed and session.rejected["untrusted_key"]:
                    raise self._untrusted(session) from None  # it says more
                raise
            if isinstance(result, Batch):
                self._batches += 1
                self._rows += len(result.rows)
                return result
            if isinstance(result, End):
                self.end_reason = result.reason
                log.info("session.ended", session=session.session, reason=result.reason)
                # the proxy cannot tell a genuine end from a forged one: the consumer, which
                # verified it, stops its keepalives and lets the proxy's session go now
                await live.close()
                raise StopAsyncIteration
            if isinstance(result, Notice):
                log.info("session.notice", session=session.session, code=result.code)
                if result.code in ("expired", "ended"):
                    # unauthenticated, but a relay able to send it could drop everything anyway
                    reason = f"the proxy ended this session: {result.message}"
                    if self._resume:
                        return await self._resume_after(reason)  # type: ignore[return-value]
                    raise SessionError("ended", reason)

    async def _open_one(
        self, session: ConsumerSession, payload: bytes
    ) -> Batch | End | Notice | None:
        item = session.parse(payload)
        if isinstance(item, Envelope):
            if item.kind == "key" or session.key_mode == "per-message":
                # public-key decryption (RSA: milliseconds) stays off the event loop
                return await asyncio.to_thread(session.open, item)
            return session.open(item)
        return item

    async def _next_item(self, live: _Session) -> bytes | _Lost | BaseException:
        """The next inbox item (the session's end after those queued). A key envelope whose
        signer is not pinned is counted and ignored (a relay can forge one): while no key is
        installed and some were refused, waiting ends at the session's key deadline (the
        request timeout after the open) with the trust error."""
        if not live.queue.empty():
            return live.queue.get_nowait()
        if live.ending is not None:
            return live.ending
        session = live.crypto
        assert session is not None
        if session.keyed or not session.rejected["untrusted_key"]:
            return await live.queue.get()
        try:
            async with asyncio.timeout_at(live.key_deadline):
                return await live.queue.get()
        except TimeoutError:
            raise self._untrusted(session) from None

    def _untrusted(self, session: ConsumerSession) -> TrustError:
        store = self._client.trust.path or "(in memory)"
        return TrustError(
            f"no key envelope signed by a key pinned for cluster {self.cluster!r} arrived; "
            f"{session.rejected['untrusted_key']} refused, "
            f"signed by keys the trust store {store} does not pin (a relay can forge those: "
            "never pin a key a session offers). Check the cluster's key out of band: its "
            "operator's 'sealstream-producer key' prints it; 'sealstream-consume trust list' "
            "shows the fingerprints this store pins"
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


async def _session_connection(
    client: Client, session_id: str, *, on_closed: Callable[[], Awaitable[None]]
) -> tuple[Any, _Login] | None:
    """A connection logged in as ``session_id`` with the token (``docs/protocol.md``, consumer
    connections), or None when the client's shared connection serves (NATS credentials).
    ``on_closed`` runs when the connection is closed, by us or by the broker."""
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
            closed_cb=on_closed,
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
