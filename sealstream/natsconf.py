"""Least-privilege NATS server configuration: one user per role (pure: returns text).

Every role lives in one account (``SEALSTREAM``, with JetStream), so they see each other's
subjects:

- a producer (one user per cluster) may publish only its own cluster's data and group
  subjects, answer requests, and subscribe only to its control subject and its own request
  inbox (``_INBOX.producer.<cluster>``); of JetStream it may only create, update and read its own
  store's stream (``sealstream.store``);
- the proxy gets the session API, all data and group subjects, the control subjects, the inboxes,
  JetStream for its session registry, and the auth callout subject (it answers the callout);
- consumers have no configured user: the server's auth callout sends each of their connects
  to the proxy's callout service (``broker_proxy._callout``), which admits a connection whose
  user is a session id and whose password a valid access token, confined to that session's
  inbox. Proxy and producers are the callout's ``auth_users``: they bypass it.

Passwords are literal values (the embedded server, ``sealstream up``) or ``$ENV_VAR``
references that nats-server resolves from its environment (``compose.yaml``).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sealstream.ids import Subjects, check_cluster_id
from sealstream.store import stream_name

__all__ = [
    "ACCOUNT",
    "AUTH_SUBJECT",
    "WEBSOCKET_LOOPBACK",
    "Credentials",
    "RoleUser",
    "producer_user",
    "proxy_user",
    "server_config",
    "users_for",
]

#: the one account every role is in (consumers are placed there by the callout's user JWT)
ACCOUNT = "SEALSTREAM"
AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"


@dataclass(frozen=True, slots=True)
class RoleUser:
    user: str
    password: str = field(repr=False)

    def url(self, base: str) -> str:
        """``nats://user:password@host:port`` from ``nats://host:port``."""
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{self.user}:{self.password}@{rest}"


@dataclass(frozen=True, slots=True)
class Credentials:
    proxy: RoleUser
    producers: Mapping[str, RoleUser]

    @classmethod
    def generate(cls, clusters: Sequence[str]) -> Credentials:
        def pw() -> str:
            return secrets.token_urlsafe(24)

        return cls(
            RoleUser("proxy", pw()),
            {check_cluster_id(c): RoleUser(f"producer-{c}", pw()) for c in clusters},
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "proxy": [self.proxy.user, self.proxy.password],
                "producers": {c: [u.user, u.password] for c, u in self.producers.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Credentials:
        data = json.loads(text)
        return cls(
            RoleUser(*data["proxy"]),
            {c: RoleUser(*u) for c, u in data["producers"].items()},
        )


def proxy_user(
    role: RoleUser, *, prefix: str = "sealstream", site_stores: bool = False
) -> dict[str, Any]:
    """The proxy's ``users`` entry: the session API, every cluster's data and group subjects,
    the control subjects, consumers' inboxes, JetStream (its registry, the stores) and the
    auth callout; with ``site_stores`` (a hub), the reads of the stores in the sites'
    JetStream domains."""
    s = Subjects(prefix)
    p = prefix
    sites = ["$JS.*.API.STREAM.INFO.*", "$JS.*.API.STREAM.MSG.GET.*", "$JS.*.API.DIRECT.GET.*"]
    return {
        "user": role.user,
        "password": role.password,
        "permissions": {
            "publish": {
                "allow": [
                    f"{p}.inbox.*",
                    f"{p}.cluster.*.control",
                    "$JS.API.>",
                    "$KV.>",
                    *(sites if site_stores else []),
                ]
            },
            "subscribe": {"allow": [s.api_all, s.data_all, s.relay_all, "_INBOX.>", AUTH_SUBJECT]},
            "allow_responses": True,
        },
    }


def producer_user(cluster: str, role: RoleUser, prefix: str = "sealstream") -> dict[str, Any]:
    """A producer's ``users`` entry: its own cluster's data and group subjects, answers to its
    control subject, its cluster's presence subject (one producer serves a cluster), its own
    request inbox and, of JetStream, its own store's stream (the store's acknowledgements)."""
    s = Subjects(prefix)
    return {
        "user": role.user,
        "password": role.password,
        "permissions": {
            "publish": {
                "allow": [
                    s.data(cluster, "*"),
                    s.group(cluster, "*"),
                    s.producer(cluster),
                    *_store_api(prefix, cluster),
                ]
            },
            "subscribe": {
                "allow": [
                    s.control(cluster),
                    s.producer(cluster),
                    # its own request inbox: the presence request's reply, the store's acks
                    f"{s.producer_inbox(cluster)}.>",
                ]
            },
            "allow_responses": True,
        },
    }


def users_for(creds: Credentials, *, prefix: str = "sealstream") -> list[dict[str, Any]]:
    """The ``authorization.users`` entries, one per role."""
    return [
        proxy_user(creds.proxy, prefix=prefix),
        *(producer_user(c, r, prefix) for c, r in sorted(creds.producers.items())),
    ]


def _store_api(prefix: str, cluster: str) -> list[str]:
    """What a producer may ask of JetStream: its own store's stream, nothing else (the last
    message of a subject: where its groups go on from after a restart)."""
    name = stream_name(prefix, cluster)
    return [f"$JS.API.STREAM.{op}.{name}" for op in ("INFO", "CREATE", "UPDATE", "MSG.GET")]


_ENV_REF = re.compile(r"\$[A-Z_][A-Z0-9_]*")


def _value(v: Any) -> str:
    if isinstance(v, str) and _ENV_REF.fullmatch(v):
        return v  # an environment variable reference, resolved by nats-server
    return json.dumps(v)


def _render(obj: Any, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(obj, dict):
        inner = "\n".join(f"{pad}  {k}: {_render(v, indent + 1)}" for k, v in obj.items())
        return "{\n" + inner + f"\n{pad}}}"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        inner = "\n".join(f"{pad}  {_render(v, indent + 1)}" for v in obj)
        return "[\n" + inner + f"\n{pad}]"
    if isinstance(obj, list):
        return "[" + ", ".join(_value(v) for v in obj) + "]"
    return _value(obj)


#: a WebSocket listener for browser consumers on loopback, port chosen by the server (it is
#: in the ports file); plain ws:// is only for 127.0.0.1, a deployment serves wss://
WEBSOCKET_LOOPBACK = 'websocket {\n  host: "127.0.0.1"\n  port: -1\n  no_tls: true\n}\n'


def server_config(
    creds: Credentials, *, issuer: str, prefix: str = "sealstream", websocket: bool = False
) -> str:
    """A nats-server configuration fragment (``accounts`` and ``authorization`` blocks) for
    these roles, with consumers admitted by the auth callout whose issuer account public key
    (``A...``, or a ``$ENV_VAR`` reference) is ``issuer``; with ``websocket`` a loopback
    WebSocket listener for the browser view (its logins go through the same callout)."""
    users = users_for(creds, prefix=prefix)
    accounts = {ACCOUNT: {"jetstream": "enabled", "users": users}}
    callout = {
        "issuer": issuer,
        "account": ACCOUNT,
        "auth_users": [u["user"] for u in users],
    }
    return (
        "# sealstream: one user per role, least privilege; consumers through the auth callout\n"
        "# (generated)\n"
        f"accounts: {_render(accounts)}\n"
        f"authorization: {_render({'auth_callout': callout})}\n"
        + (WEBSOCKET_LOOPBACK if websocket else "")
    )
