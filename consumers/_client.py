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

from collections.abc import Sequence
from typing import Any, Literal, overload

from consumers._endpoint import Endpoint
from consumers._grants import Grants, ask_grants
from consumers._subscription import DEFAULT_RETRY_S, Resumed, Subscription
from sealstream.crypto import Batch, ConsumerKey
from sealstream.ids import check_cluster_id, check_stream

__all__ = ["Client"]


class Client(Endpoint):
    """A connection to NATS from which sessions are opened."""

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

    async def grants(self, cluster: str) -> Grants:
        """What ``cluster`` offers and grants this client's identity, asked of the cluster
        (its producer answers from its policy, signed; no session is opened). A refusal
        raises :class:`SessionError`, an answer not signed by a pinned key
        :class:`TrustError`."""
        return await ask_grants(self, cluster)
