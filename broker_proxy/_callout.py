"""The NATS auth callout: consumers log in to the broker with their access token.

nats-server (>= 2.10, ``authorization { auth_callout { ... } }``) sends every connection that
is not one of its configured users to ``$SYS.REQ.USER.AUTH`` as an ``authorization_request``
JWT. This service answers with an ``authorization_response`` JWT signed by the callout issuer
(an account nkey): either a user JWT confining the connection to one session, or an ``error``.

The connection convention (``docs/protocol.md``, "Consumer connections"): NATS ``user`` = the
session id the connection will open, ``password`` = the consumer's access token. The user JWT
allows publishing only to the session API and subscribing only to ``P.inbox.<sid>`` and
``_INBOX.<sid>.>`` (the client's own request replies), expires at most ``grace_s`` after the
token, and carries subscription and payload limits.

Refusals are counted by reason (``sealstream_auth_refused_total{reason}``) and logged without
the token. A request that cannot be read at all (oversize, not a signed request) gets no
answer: the server then refuses the connection when its authorization timeout ends.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import nats.errors
import structlog

from broker_proxy._config import CalloutConfig, ProxyConfig
from sealstream import SessionError, Subjects, TokenVerifier, WireError
from sealstream.ids import is_session_id
from sealstream.metrics import MetricsServer, Sample, collector_registry
from sealstream.nats import connect, redact_url, release, settle
from sealstream.natsjwt import decode_jwt, encode_jwt, is_public_key
from sealstream.resource import AsyncResource

__all__ = ["AUTH_SUBJECT", "AuthResponder", "AuthService", "consumer_permissions"]

log = structlog.get_logger(__name__)

AUTH_SUBJECT: Final = "$SYS.REQ.USER.AUTH"
_MAX_TOKEN: Final = 8192  # as TokenVerifier's cap

#: TokenVerifier's messages -> stable counter labels
_REASONS: Final = {
    "token expired": "expired",
    "token not yet valid": "not_yet_valid",
    "invalid token": "invalid_token",
    "missing or oversized token": "invalid_token",
}


def consumer_permissions(session: str, *, prefix: str = "sealstream") -> dict[str, Any]:
    """What a connection declared for ``session`` may do: the session API and its inbox."""
    s = Subjects(prefix)
    return {
        "pub": {"allow": [s.api_open, s.api_keepalive, s.api_close, s.api_resume, s.api_grants]},
        "sub": {"allow": [s.inbox(session), f"_INBOX.{session}.>"]},
    }


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class AuthResponder:
    """Answers authorization requests; ``on_request`` is a nats-py subscription callback.

    Counters: ``issued`` user JWTs, ``refused`` by reason.
    """

    def __init__(
        self,
        config: CalloutConfig,
        verifier: TokenVerifier,
        *,
        prefix: str = "sealstream",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._verifier = verifier
        self._prefix = prefix
        self._clock = clock
        self.issued = 0
        self.refused: Counter[str] = Counter()
        self._nc: Any = None

    async def subscribe(self, nc: Any) -> Any:
        """Serve requests arriving on ``nc`` (a queue group: several instances share them)."""
        self._nc = nc
        sub = await nc.subscribe(AUTH_SUBJECT, queue=self.config.queue_group, cb=self.on_request)
        log.info("auth.serving", issuer=self.config.issuer.public_key, account=self.config.account)
        return sub

    def samples(self) -> list[Sample]:
        return [
            Sample(
                "sealstream_auth_issued", "consumer connections authorized", "counter", self.issued
            ),
            Sample(
                "sealstream_auth_refused",
                "consumer connections refused, by reason",
                "counter",
                self.refused,
            ),
        ]

    async def on_request(self, msg: Any) -> None:
        answer = self.answer(msg.data)
        if answer is None or not msg.reply or self._nc is None:
            return
        try:
            # publish, not respond(): the reply must not carry the request's headers
            await self._nc.publish(msg.reply, answer)
        except nats.errors.Error as exc:
            log.warning("auth.reply_lost", error=repr(exc))

    def answer(self, payload: bytes) -> bytes | None:
        """The signed ``authorization_response`` to one request, or None when the request
        cannot be answered (oversize or not a valid request: counted and logged)."""
        try:
            request = self._read(payload)
        except _Refused as exc:
            self._count(exc.reason, exc.message, None)
            return None
        user_nkey, server_id, opts = request
        session = opts.get("user")
        try:
            user_jwt = self._authorize(session, opts.get("pass"), user_nkey)
        except _Refused as exc:
            self._count(exc.reason, exc.message, session if is_session_id(session) else None)
            body = {"error": exc.message}
        else:
            self.issued += 1
            body = {"jwt": user_jwt}
        response = {
            "sub": user_nkey,
            "aud": server_id,
            "nats": {**body, "type": "authorization_response", "version": 2},
        }
        return encode_jwt(response, self.config.issuer, now=self._clock()).encode("ascii")

    def _count(self, reason: str, message: str, session: str | None) -> None:
        self.refused[reason] += 1
        log.info("auth.refused", reason=reason, detail=message, session=session)

    def _read(self, payload: bytes) -> tuple[str, str, dict[str, Any]]:
        limit = self.config.max_request_bytes
        if len(payload) > limit:
            raise _Refused("oversize_request", f"authorization request over {limit} bytes")
        try:
            claims = decode_jwt(payload, issuer_kind="server", max_size=limit)
        except WireError as exc:
            raise _Refused("malformed_request", f"unreadable request: {exc}") from None
        nats_part = claims.get("nats")
        if not isinstance(nats_part, dict) or nats_part.get("type") != "authorization_request":
            raise _Refused("malformed_request", "not an authorization request")
        user_nkey = nats_part.get("user_nkey")
        server = nats_part.get("server_id")
        opts = nats_part.get("connect_opts")
        server_id = server.get("id") if isinstance(server, dict) else None
        if not is_public_key(user_nkey, "user") or not is_public_key(server_id, "server"):
            raise _Refused("malformed_request", "request lacks the user or server key")
        if not isinstance(opts, dict):
            raise _Refused("malformed_request", "request lacks connect options")
        assert isinstance(user_nkey, str)
        assert isinstance(server_id, str)
        return user_nkey, server_id, opts

    def _authorize(self, session: object, password: object, user_nkey: str) -> str:
        if not is_session_id(session):
            raise _Refused("bad_user", "NATS user must be the session id (43 base64url characters)")
        assert isinstance(session, str)
        if not isinstance(password, str) or not password:
            raise _Refused("missing_token", "NATS password must be the access token")
        if len(password) > _MAX_TOKEN:
            raise _Refused("oversize_token", f"access token over {_MAX_TOKEN} bytes")
        try:
            claims = self._verifier.verify(password)
        except SessionError as exc:
            raise _Refused(_REASONS.get(exc.detail, "invalid_claims"), exc.detail) from None
        if not claims.clusters:
            raise _Refused("no_cluster", "token allows no cluster")
        now = self._clock()
        expires = int(claims.exp + self.config.grace_s)
        if expires <= now:
            raise _Refused("expired", "token expired")
        log.info("auth.authorized", session=session, user=claims.sub)
        cfg = self.config
        user = {
            "sub": user_nkey,
            "aud": cfg.account,
            "name": session,
            "exp": expires,
            "nats": {
                **consumer_permissions(session, prefix=self._prefix),
                "subs": cfg.max_subscriptions,
                "data": -1,
                "payload": cfg.max_payload,
                "type": "user",
                "version": 2,
            },
        }
        return encode_jwt(user, cfg.issuer, now=now)


class AuthService(AsyncResource):
    """The callout alone (``sealstream-proxy auth``): its own NATS connection (a user with
    subscribe permission on ``$SYS.REQ.USER.AUTH`` and ``allow_responses``, listed in the
    server's ``auth_users``), and ``/metrics`` when a port is configured."""

    def __init__(self, config: ProxyConfig) -> None:
        if config.callout is None:
            raise ValueError("the auth service needs a callout configuration (issuer seed)")
        super().__init__()
        self.config = config
        self.responder = AuthResponder(config.callout, config.verifier(), prefix=config.prefix)
        self._nc: Any = None
        self.metrics: MetricsServer | None = None

    async def _start(self) -> None:
        auth = self.config.nats_auth
        self._nc = await connect(
            self.config.nats_url, name="sealstream-auth", user=auth.user, password=auth.password
        )
        self._stack.push_async_callback(release, self._nc)
        await self.responder.subscribe(self._nc)
        await settle(self._nc)
        if self.config.metrics_port is not None:
            self.metrics = MetricsServer(
                collector_registry(self.responder.samples),
                lambda: bool(self._nc is not None and self._nc.is_connected),
                host=self.config.metrics_host,
                port=self.config.metrics_port,
            )
            await self._stack.enter_async_context(self.metrics)
        log.info("auth.started", url=redact_url(self.config.nats_url))
