"""Identifiers and NATS subjects of the wire contract (pure, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sealstream.errors import WireError

__all__ = [
    "SESSION_STREAM",
    "Subjects",
    "check_cluster_id",
    "check_session_id",
    "check_stream",
    "is_cluster_id",
    "is_session_id",
    "is_stream",
]

_CLUSTER = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STREAM = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")
_SESSION = re.compile(r"[A-Za-z0-9_-]{43}")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

#: The ``stream`` of key and end envelopes, which belong to the session, not to a stream.
#: User streams cannot start with ``_``, so it never collides with one.
SESSION_STREAM = "_session"


def is_cluster_id(value: object) -> bool:
    return isinstance(value, str) and _CLUSTER.fullmatch(value) is not None


def is_stream(value: object) -> bool:
    return isinstance(value, str) and _STREAM.fullmatch(value) is not None


def is_session_id(value: object) -> bool:
    return isinstance(value, str) and _SESSION.fullmatch(value) is not None


def check_cluster_id(value: object) -> str:
    if not is_cluster_id(value):
        raise WireError(
            "bad_cluster", f"cluster id must match [A-Za-z0-9_-]{{1,64}}: {value!r:.80}"
        )
    assert isinstance(value, str)
    return value


def check_stream(value: object) -> str:
    if not is_stream(value):
        raise WireError("bad_stream", f"stream must match [a-z0-9][a-z0-9_]{{0,63}}: {value!r:.80}")
    assert isinstance(value, str)
    return value


def check_session_id(value: object) -> str:
    if not is_session_id(value):
        raise WireError("bad_session", "session id must be a 43-character JWK thumbprint")
    assert isinstance(value, str)
    return value


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject builders for one deployment prefix (default ``sealstream``)."""

    prefix: str = "sealstream"

    def __post_init__(self) -> None:
        if _PREFIX.fullmatch(self.prefix) is None:
            raise ValueError(f"invalid subject prefix {self.prefix!r}")

    @property
    def api_open(self) -> str:
        return f"{self.prefix}.api.session.open"

    @property
    def api_close(self) -> str:
        return f"{self.prefix}.api.session.close"

    @property
    def api_keepalive(self) -> str:
        return f"{self.prefix}.api.session.keepalive"

    @property
    def api_resume(self) -> str:
        return f"{self.prefix}.api.session.resume"

    @property
    def api_grants(self) -> str:
        return f"{self.prefix}.api.session.grants"

    @property
    def api_all(self) -> str:
        return f"{self.prefix}.api.session.*"

    def control(self, cluster: str) -> str:
        return f"{self.prefix}.cluster.{check_cluster_id(cluster)}.control"

    def producer(self, cluster: str) -> str:
        """Where a cluster's producer answers whether it runs (one producer per cluster)."""
        return f"{self.prefix}.cluster.{check_cluster_id(cluster)}.producer"

    @staticmethod
    def producer_inbox(cluster: str) -> str:
        """The reply inbox prefix of a producer's requests (its presence request, the store's
        acknowledgements): ``_INBOX.producer.<id>``
        (a session's inboxes are ``_INBOX.<session id>``, 43 characters: never "producer")."""
        return f"_INBOX.producer.{check_cluster_id(cluster)}"

    def data(self, cluster: str, session: str) -> str:
        return f"{self.prefix}.cluster.{cluster}.data.{session}"

    @property
    def data_all(self) -> str:
        return f"{self.prefix}.cluster.*.data.*"

    def group(self, cluster: str, stream: str) -> str:
        """Where a producer publishes a stream's group envelopes (group mode)."""
        return f"{self.prefix}.cluster.{cluster}.group.{stream}"

    @property
    def relay_all(self) -> str:
        """Data and group subjects of every cluster, in one subscription (so the proxy relays
        a member's key envelope and the group batch after it in the order they came)."""
        return f"{self.prefix}.cluster.*.*.*"

    def parse_group(self, subject: str) -> tuple[str, str] | None:
        """``(cluster, stream)`` of a group subject, or None if it is not one."""
        head = self.prefix + ".cluster."
        if not subject.startswith(head):
            return None
        parts = subject[len(head) :].split(".")
        if len(parts) != 3 or parts[1] != "group":
            return None
        cluster, _, stream = parts
        if not (is_cluster_id(cluster) and is_stream(stream)):
            return None
        return cluster, stream

    def inbox(self, session: str) -> str:
        return f"{self.prefix}.inbox.{session}"

    def parse_data(self, subject: str) -> tuple[str, str] | None:
        """``(cluster, session)`` of a data subject, or None if it is not one."""
        head = self.prefix + ".cluster."
        if not subject.startswith(head):
            return None
        parts = subject[len(head) :].split(".")
        if len(parts) != 3 or parts[1] != "data":
            return None
        cluster, _, session = parts
        if not (is_cluster_id(cluster) and is_session_id(session)):
            return None
        return cluster, session
