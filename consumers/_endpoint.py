"""The consumer's end of the session API: its configuration and trust store, the
connection it shares between sessions (none in callout mode, where each session logs in on a
connection of its own), the token to send, and requests with their typed replies. Sessions and
subscriptions talk to the proxy through it; :class:`consumers.Client` is one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, overload
from urllib.parse import urlsplit

import nats.errors

from consumers._config import ClientConfig
from sealstream import BrokerError, SessionError, Subjects, WireError
from sealstream.control import (
    Granted,
    KeptAlive,
    Ok,
    Opened,
    Refusal,
    Replayed,
    Request,
    decode_reply,
    encode,
)
from sealstream.crypto import TrustStore
from sealstream.nats import connect, release
from sealstream.resource import AsyncResource
from sealstream.wire import encode_map

__all__ = ["Endpoint"]


_Reply = TypeVar("_Reply", bound=Ok | Opened | KeptAlive | Replayed | Granted)


class Endpoint(AsyncResource):
    """A connection to NATS from which session requests are made."""

    def __init__(self, config: ClientConfig, *, trust: TrustStore | None = None) -> None:
        super().__init__()
        self.config = config
        self.trust = (
            trust if trust is not None else TrustStore.load(config.trust_store, tofu=config.tofu)
        )
        self.subjects = Subjects(config.prefix)
        self._nc: Any = None
        #: no NATS credentials: each session logs in with its id and token (auth callout)
        self.callout = _callout_mode(config)
        self.closed = True  # until entered

    async def _start(self) -> None:
        self.closed = False
        if self.callout:
            return
        auth = self.config.nats_auth
        self._nc = await connect(
            self.config.nats_url,
            name="sealstream-consumer",
            user=auth.user,
            password=auth.password,
        )
        self._stack.push_async_callback(release, self._nc)

    async def aclose(self) -> None:
        """Drain the connection; idempotent. Closed before the drain: a session that sees its
        connection go knows why, and no request starts on a draining connection."""
        self.closed, self._nc = True, None
        await super().aclose()

    @property
    def nc(self) -> Any:
        if self._nc is None:
            raise RuntimeError("use the client inside 'async with'")
        return self._nc

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

    @overload
    async def request(
        self,
        subject: str,
        body: Request | Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        nc: Any = None,
    ) -> Ok: ...

    @overload
    async def request(
        self,
        subject: str,
        body: Request | Mapping[str, Any],
        reply: type[_Reply],
        *,
        timeout_s: float | None = None,
        nc: Any = None,
    ) -> _Reply: ...

    async def request(
        self,
        subject: str,
        body: Request | Mapping[str, Any],
        reply: type[_Reply] | type[Ok] = Ok,
        *,
        timeout_s: float | None = None,
        nc: Any = None,
    ) -> _Reply | Ok:
        """A session API request (on ``nc``, by default the client's connection) and its
        ``reply``; a refusal raises :class:`SessionError`. ``body`` may be a raw map (a test
        that sends what the codec would not)."""
        payload = encode_map(body) if isinstance(body, Mapping) else encode(body)
        try:
            msg = await (nc if nc is not None else self.nc).request(
                subject, payload, timeout=timeout_s or self.config.request_timeout_s
            )
        except nats.errors.NoRespondersError:
            raise BrokerError("no sealstream proxy is serving this NATS server") from None
        except nats.errors.TimeoutError:
            raise BrokerError("the proxy did not answer in time") from None
        except nats.errors.Error as exc:  # closed, draining, reconnecting...
            raise BrokerError(f"cannot send a session request: {exc!r}") from exc
        try:
            answer = decode_reply(msg.data, reply)
        except WireError as exc:
            raise BrokerError(f"malformed reply from the proxy: {exc}") from None
        if isinstance(answer, Refusal):
            raise answer.error()  # retriable when the proxy marks it passing (busy)
        return answer


def _callout_mode(config: ClientConfig) -> bool:
    """True without NATS credentials (neither configured nor in a URL)."""
    auth = config.nats_auth
    if auth.user is not None or auth.password is not None:
        return False
    urls = [u.strip() for u in config.nats_url.split(",")]
    return not any(urlsplit(u if "://" in u else f"nats://{u}").username for u in urls)
