"""The one error tree of sealstream.

::

    SealstreamError                 root; every error carries ``retriable``
    ├── WireError                   malformed payload, id or request (never a msgpack exception)
    ├── IntegrityError              ONE opaque class for every parse/verify/decrypt failure of
    │                               an encrypted envelope; the reason goes to a counter + DEBUG log
    ├── TrustError                  a cluster key is not in the trust store, or the store is bad
    ├── BrokerError                 NATS unreachable, request timed out, server failed (retriable)
    └── SessionError                the proxy refused a session (``code`` per the contract)

Misuse of an API (wrong type, impossible option) stays ``ValueError``/``TypeError``.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "IntegrityError",
    "SealstreamError",
    "SessionError",
    "TrustError",
    "WireError",
]


class SealstreamError(Exception):
    """Root of every error sealstream raises on purpose."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class WireError(SealstreamError):
    """A payload, identifier or request does not follow the wire contract.

    ``reason`` is a short stable token (``bad_type``, ``missing_key``, ``oversize``...) used as a
    counter label; the message is for humans.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IntegrityError(SealstreamError):
    """An encrypted envelope was rejected.

    Deliberately opaque: the same class and message whatever failed (signature, tag, key,
    header binding, replay, size), so that no caller-visible behaviour tells them apart.
    """

    def __init__(self) -> None:
        super().__init__("envelope rejected")


class TrustError(SealstreamError):
    """A cluster signing key is not trusted, or the trust store cannot be used."""


class BrokerError(SealstreamError):
    """The NATS server could not be reached, timed out or failed to start."""

    retriable = True


class SessionError(SealstreamError):
    """The proxy (or a cluster) refused or ended a session.

    ``code`` is one of ``bad_request``, ``unauthorized``, ``forbidden``, ``cluster_unavailable``,
    ``limit_exceeded`` (from the contract) or ``ended`` when a live session is over.
    It is the one form of a refusal in the code (the proxy's, a cluster's, the cluster's
    authorization): :class:`sealstream.control.Refusal` is its form on the wire. ``retry`` is
    the wire's mark of a passing refusal (the proxy is busy); ``retriable`` defaults by code,
    and to True with ``retry``.
    """

    def __init__(
        self, code: str, message: str, *, retry: bool = False, retriable: bool | None = None
    ) -> None:
        if retriable is None:
            retriable = retry or code in {"cluster_unavailable", "ended"}
        super().__init__(f"{code}: {message}", retriable=retriable)
        self.code = code
        self.detail = message
        self.retry = retry
