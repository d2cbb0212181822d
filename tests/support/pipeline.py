"""Shared async helpers of the pipeline tests: a whole stack (proxy + agent) on the session's
real nats-server, consumers made from it, a tap on every subject, and bounded polling.

Every stack gets its own subject prefix, token secret and cluster identity, so that tests never
see each other's traffic or sessions, and a user identity that its cluster's policy authorizes
for all its streams (the clients made from the stack prove it).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from broker_proxy import Limits, Proxy, ProxyConfig
from consumers import Batch, Client, ClientConfig, Subscription
from producers import Agent, AuthzPolicy, Batching, ProducerConfig, Source
from sealstream import Subjects, TokenVerifier, mint_token, thumbprint
from sealstream.crypto import (
    ClusterIdentity,
    ConsumerKey,
    KeyKind,
    Policy,
    TrustStore,
    UserIdentity,
)
from sealstream.nats import NatsAuth, connect, settle
from sealstream.store import Store

__all__ = [
    "CLUSTER",
    "FAST_BATCHING",
    "Gate",
    "Recording",
    "Stack",
    "Tap",
    "Tapped",
    "collect_rows",
    "contains_marker",
    "eventually",
    "fresh_key",
    "make_stack",
]

CLUSTER = "c1"
#: small batching delay: rows reach the consumer within a few tens of milliseconds
FAST_BATCHING = Batching(max_delay_s=0.02)


async def eventually(
    predicate: Callable[[], bool],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a bound for the whole poll, as asyncio.wait_for's
    interval: float = 0.01,
) -> None:
    """Poll ``predicate`` until it holds; fail the test (TimeoutError) after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


@dataclass
class Stack:
    """A proxy and a cluster agent on a private prefix, and what a consumer needs to join."""

    nats_url: str
    prefix: str
    cluster: str
    secret: bytes = field(repr=False)
    identity: ClusterIdentity
    proxy: Proxy
    agent: Agent
    #: the user the cluster's policy authorizes, and that policy's file
    user: UserIdentity
    policy_file: Path

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    def token(
        self, *, clusters: Sequence[str] | None = None, sub: str = "alice", ttl_s: int = 3600
    ) -> str:
        return mint_token(
            sub=sub,
            clusters=list(clusters or [self.cluster]),
            ttl_s=ttl_s,
            secret=self.secret,
        )

    def proof(
        self,
        jwk: Any,
        streams: Any,
        *,
        key_mode: Any = "session",
        user: UserIdentity | None = None,
        session: Any = None,
        zip: bool = False,
    ) -> str:
        """A genuine proof by ``user`` (default: the authorized one) for an open with this
        key (or ``session``, when given), streams, key mode and compression."""
        return (user or self.user).prove(
            cluster=self.cluster,
            session=session if session is not None else thumbprint(jwk),
            streams=streams,
            key_mode=key_mode,
            zip=zip,
        )

    def trust(self) -> TrustStore:
        """An in-memory trust store that pins this stack's cluster key."""
        return TrustStore({self.cluster: [self.identity.public_jwk]})

    def config(
        self,
        *,
        token: str | None = None,
        key_kind: KeyKind = "x25519",
        key_mode: Any = "session",
        policy: Policy = "fail",
        identity: UserIdentity | None = None,
        callout: bool = False,
    ) -> ClientConfig:
        # The session's server has no authorization and ignores credentials: given, the client
        # shares one connection (as with a NATS of plain users); without them (``callout``),
        # each session connects as its id with the token (test_callout.py enforces it)
        return ClientConfig(
            identity=self.user if identity is None else identity,
            nats_auth=NatsAuth() if callout else NatsAuth("test-consumer", "unused"),
            nats_url=self.nats_url,
            prefix=self.prefix,
            token=self.token() if token is None else token,
            key_kind=key_kind,
            key_mode=key_mode,
            unauthenticated_per_message=key_mode == "per-message",
            policy=policy,
            request_timeout_s=5.0,
        )

    @contextlib.asynccontextmanager
    async def client(
        self, *, trust: TrustStore | None = None, **options: Any
    ) -> AsyncIterator[Client]:
        async with Client(self.config(**options), trust=trust or self.trust()) as client:
            yield client


@contextlib.asynccontextmanager
async def make_stack(
    nats_url: str,
    *,
    sources: Sequence[Source] = (),
    streams: Iterable[str] = ("records",),
    keepalive_s: float = 10.0,
    store_grace_s: float = 120.0,
    limits: Limits | None = None,
    batching: Batching = FAST_BATCHING,
    shared_registry: bool = True,
    token_leeway_s: int = 30,
    clock: Callable[[], float] = time.time,
    store: Store | None = None,
    store_domain: str = "",
    user: UserIdentity | None = None,
) -> AsyncIterator[Stack]:
    """Start a proxy, then an agent, on a fresh prefix with a fresh secret and identity; the
    agent's policy (in a temporary directory) authorizes ``user`` (default: a fresh one) for
    all its streams. ``clock`` is the agent's (Unix seconds), against which proofs are checked."""
    prefix = f"t{secrets.token_hex(4)}"
    secret = secrets.token_bytes(32)
    identity = ClusterIdentity.generate()
    user = user or UserIdentity.generate()
    streams = [*streams, *(s.stream for s in sources)]
    policy_dir = tempfile.TemporaryDirectory(prefix="sealstream-policy-")
    policy_file = Path(policy_dir.name) / "authorized.json"
    AuthzPolicy().with_key(user.public_jwk, streams, name="test user")[0].save(policy_file)
    proxy_config = ProxyConfig(
        nats_url=nats_url,
        prefix=prefix,
        token_secret=secret,
        keepalive_s=keepalive_s,
        store_grace_s=store_grace_s,
        store_domain=store_domain,
        control_timeout_s=2.0,
        limits=limits or Limits(),
        shared_registry=shared_registry,
    )
    agent_config = ProducerConfig(
        cluster=CLUSTER,
        nats_url=nats_url,
        prefix=prefix,
        batching=batching,
        policy_file=policy_file,
        store=store,
    )
    with policy_dir:
        async with (
            Proxy(
                proxy_config, verifier=TokenVerifier(secret=secret, leeway_s=token_leeway_s)
            ) as proxy,
            Agent(
                agent_config, identity=identity, sources=sources, streams=streams, clock=clock
            ) as agent,
        ):
            yield Stack(
                nats_url, prefix, CLUSTER, secret, identity, proxy, agent, user, policy_file
            )


async def collect_rows(
    sub: Subscription[Batch],
    n: int,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a bound for the whole collection
) -> tuple[list[dict[str, Any]], list[Batch]]:
    """Iterate ``sub`` until at least ``n`` rows arrived (at most ``timeout`` s); the rows
    and the batches."""
    rows: list[dict[str, Any]] = []
    batches: list[Batch] = []
    async with asyncio.timeout(timeout):
        async for batch in sub:
            batches.append(batch)
            rows.extend(batch.rows)
            if len(rows) >= n:
                break
    return rows, batches


class Gate:
    """A source wrapper that yields nothing until ``open()``: rows made before a consumer's
    session exists would go nowhere, so tests open the gate once the session is up."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self._open = asyncio.Event()

    @property
    def stream(self) -> str:
        return self.inner.stream

    def open(self) -> None:
        self._open.set()

    async def rows(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        await self._open.wait()
        async with contextlib.aclosing(self.inner.rows()) as batches:
            async for batch in batches:
                yield batch


class Recording:
    """A source wrapper that records every row its inner source yielded, in order."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.rows_seen: list[dict[str, Any]] = []

    @property
    def stream(self) -> str:
        return self.inner.stream

    async def rows(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        async with contextlib.aclosing(self.inner.rows()) as batches:
            async for batch in batches:
                self.rows_seen.extend(dict(r) for r in batch)
                yield batch


@dataclass(frozen=True, slots=True)
class Tapped:
    subject: str
    data: bytes
    at: float


class Tap:
    """A client subscribed to ``subject`` (default ``>``: every subject, ``_INBOX.>`` included)
    that records every message it sees."""

    def __init__(self, nats_url: str, subject: str = ">") -> None:
        self.nats_url = nats_url
        self.subject = subject
        self.messages: list[Tapped] = []
        self._nc: Any = None

    async def __aenter__(self) -> Tap:
        self._nc = await connect(self.nats_url, name="test-tap")
        await self._nc.subscribe(self.subject, cb=self._on_msg)
        await settle(self._nc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()

    async def flush(self) -> None:
        """Wait until the server has sent this tap everything published before the call."""
        await self._nc.flush()

    async def _on_msg(self, msg: Any) -> None:
        self.messages.append(Tapped(msg.subject, bytes(msg.data), time.monotonic()))

    def on(self, subject: str) -> list[Tapped]:
        return [m for m in self.messages if m.subject == subject]


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def contains_marker(payload: bytes, marker: str) -> bool:
    """Whether ``marker`` is in ``payload``: as raw bytes, or as (part of) any string of the
    payload decoded as msgpack (keys included, at any depth)."""
    if marker.encode("utf-8") in payload:
        return True
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return False
    return any(marker in s for s in _strings(value))


def identity_whose_id_begins_with(prefix: str) -> UserIdentity:
    """A user identity whose id (RFC 7638 thumbprint, base64url) begins with ``prefix`` (one
    character: 1 in 64 keys), to cover that edge on purpose rather than by chance."""
    while True:
        user = UserIdentity.generate()
        if user.kid.startswith(prefix):
            return user


def fresh_key(kind: KeyKind = "x25519") -> ConsumerKey:
    return ConsumerKey.generate(kind, rsa_bits=2048)
