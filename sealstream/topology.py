"""Past one server: a NATS hub cluster and a leaf node per customer site (pure: returns text).

The hub (``hub_config``, one per node) is a cluster of nats-servers (full mesh of routes,
JetStream on every node, so the session registry keeps 3 replicas). Its accounts:

- ``SEALSTREAM``: the proxies (a configured user, least privilege as on one server) and the
  consumers (placed there by the auth callout's user JWT, on whichever node they log in);
- ``CLUSTER-<id>``, one per customer cluster: no client users at all; the only connection in it
  is that site's leaf link (a user of the hub's leafnode port, bound to the account). It
  exports to ``SEALSTREAM`` alone its data and group subjects (streams) and its control
  subject (a service); ``SEALSTREAM`` imports exactly those. Nothing else of the account is
  visible outside it, and nothing of another account enters it.

The leaf link user's permissions (the hub's view of the link) say the same again: the link may
carry into the hub only the cluster's data and group subjects and the replies to its control
requests, and receive only its control subject.

A site (``leaf_config``) runs a nats-server that dials out to every hub node's leafnode port
(it listens for no leaf node or route itself) with the cluster's producer as its one user,
with today's producer permissions, and keeps the cluster's store: JetStream of its own, in the
domain ``site-<id>`` (``STORE_DOMAIN``), so the producer's envelopes are stored at the site
while its link is down. The hub reaches that store only to read it: ``CLUSTER-<id>`` exports
to ``SEALSTREAM`` the three read requests of the store's stream in the site's domain (its
info, one message's read, the direct read of its messages), which the link carries to the
site; nothing else of its JetStream.

Passwords are literal values in the generated text (``sealstream up --topology hub`` writes
them to files of mode 0600); names and ports come from :class:`HubNode`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sealstream.ids import Subjects, check_cluster_id
from sealstream.natsconf import ACCOUNT, Credentials, RoleUser, _render, producer_user, proxy_user
from sealstream.store import stream_name

__all__ = [
    "HUB_CLUSTER",
    "REPLY_PREFIX",
    "STORE_DOMAIN",
    "HubCredentials",
    "HubNode",
    "account_name",
    "hub_config",
    "leaf_config",
    "site_domain",
    "store_reads",
]

#: the hub's cluster name (routes join only servers of the same name)
HUB_CLUSTER = "sealstream-hub"
#: the subjects nats-server gives the replies to a request crossing a service import
REPLY_PREFIX = "_R_"
#: the JetStream domain of a site's store (its leaf node's JetStream), per cluster: the
#: proxies' ``store_domain``
STORE_DOMAIN = "site-{cluster}"


def account_name(cluster: str) -> str:
    """The hub account of a customer cluster (and its leaf node's local account)."""
    return f"CLUSTER-{check_cluster_id(cluster)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HubNode:
    """One hub server: its name, host and ports (clients, routes, leaf nodes)."""

    name: str
    host: str = "127.0.0.1"
    client_port: int = 4222
    cluster_port: int = 6222
    leaf_port: int = 7422

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"

    def leaf_url(self, link: RoleUser) -> str:
        return link.url(f"nats-leaf://{self.host}:{self.leaf_port}")


@dataclass(frozen=True, slots=True)
class HubCredentials:
    """The roles' NATS users (proxy on the hub, a producer per site) and one leaf link user
    per customer cluster (on the hub's leafnode port)."""

    roles: Credentials
    links: Mapping[str, RoleUser]

    def __post_init__(self) -> None:
        if set(self.links) != set(self.roles.producers):
            raise ValueError("one leaf link per producer cluster")

    @property
    def clusters(self) -> list[str]:
        return sorted(self.roles.producers)

    @classmethod
    def generate(cls, clusters: Sequence[str]) -> HubCredentials:
        links = {
            check_cluster_id(c): RoleUser(f"leaf-{c}", secrets.token_urlsafe(24)) for c in clusters
        }
        return cls(Credentials.generate(clusters), links)

    def to_json(self) -> str:
        links = {c: [u.user, u.password] for c, u in self.links.items()}
        return json.dumps({"roles": json.loads(self.roles.to_json()), "links": links})

    @classmethod
    def from_json(cls, text: str) -> HubCredentials:
        data = json.loads(text)
        links = {c: RoleUser(*u) for c, u in data["links"].items()}
        return cls(Credentials.from_json(json.dumps(data["roles"])), links)


def site_domain(cluster: str) -> str:
    """The JetStream domain of a cluster's site (its leaf node's, holding the store)."""
    return STORE_DOMAIN.replace("{cluster}", check_cluster_id(cluster))


def store_reads(cluster: str, prefix: str = "sealstream") -> list[str]:
    """The JetStream requests the hub may send to a site's store, in the site's domain: the
    info of the cluster's stream, the read of one message (a subject's last), and the direct
    read of its stored messages (a replay's batched read, answered with several replies)."""
    api = f"$JS.{site_domain(cluster)}.API"
    name = stream_name(prefix, cluster)
    return [f"{api}.STREAM.INFO.{name}", f"{api}.STREAM.MSG.GET.{name}", f"{api}.DIRECT.GET.{name}"]


def _cluster_account(cluster: str, link: RoleUser, prefix: str) -> dict[str, Any]:
    s = Subjects(prefix)
    return {
        "users": [_link_user(cluster, link, prefix)],
        "exports": [
            {"stream": s.data(cluster, "*"), "accounts": [ACCOUNT]},
            {"stream": s.group(cluster, "*"), "accounts": [ACCOUNT]},
            {"service": s.control(cluster), "accounts": [ACCOUNT]},
            *(
                # several replies to one request: a batched read
                {"service": read, "accounts": [ACCOUNT], "response_type": "stream"}
                for read in store_reads(cluster, prefix)
            ),
        ],
    }


def _hub_imports(clusters: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    s = Subjects(prefix)
    imports: list[dict[str, Any]] = []
    for c in clusters:
        account = account_name(c)
        imports += [
            {"stream": {"account": account, "subject": s.data(c, "*")}},
            {"stream": {"account": account, "subject": s.group(c, "*")}},
            {"service": {"account": account, "subject": s.control(c)}},
            *({"service": {"account": account, "subject": r}} for r in store_reads(c, prefix)),
        ]
    return imports


def _link_user(cluster: str, link: RoleUser, prefix: str) -> dict[str, Any]:
    """The hub's view of a leaf link: what it may carry in (publish: envelopes, replies) and
    out (subscribe: control requests, reads of the site's store)."""
    s = Subjects(prefix)
    return {
        "user": link.user,
        "password": link.password,
        "allowed_connection_types": ["LEAFNODE"],
        "permissions": {
            "publish": {
                "allow": [s.data(cluster, "*"), s.group(cluster, "*"), f"{REPLY_PREFIX}.>"]
            },
            "subscribe": {"allow": [s.control(cluster), *store_reads(cluster, prefix)]},
        },
    }


def hub_config(
    nodes: Sequence[HubNode],
    index: int,
    creds: HubCredentials,
    *,
    issuer: str,
    store_dir: str,
    prefix: str = "sealstream",
) -> str:
    """The configuration of hub node ``nodes[index]`` (its client port is given on the command
    line or is 4222): routes to the other nodes, JetStream in ``store_dir``, the accounts and
    leaf link users of every customer cluster, and the auth callout for consumers (issuer
    account public key ``issuer``, answered by the proxies)."""
    if len(nodes) < 1 or not 0 <= index < len(nodes):
        raise ValueError(f"no hub node {index} among {len(nodes)}")
    me = nodes[index]
    clusters = creds.clusters
    accounts: dict[str, Any] = {
        ACCOUNT: {
            "jetstream": "enabled",
            "users": [proxy_user(creds.roles.proxy, prefix=prefix, site_stores=True)],
            "imports": _hub_imports(clusters, prefix),
        },
        **{account_name(c): _cluster_account(c, creds.links[c], prefix) for c in clusters},
    }
    cluster = {
        "name": HUB_CLUSTER,
        "listen": f"{me.host}:{me.cluster_port}",
        "routes": [n.route_url for n in nodes if n is not me],
    }
    # not advertised: a site dials the hub addresses its configuration lists (those its
    # firewall lets out), never the nodes' own addresses gossiped to it
    leafnodes = {"listen": f"{me.host}:{me.leaf_port}", "no_advertise": True}
    bypass = [creds.roles.proxy.user, *(creds.links[c].user for c in clusters)]
    callout = {"issuer": issuer, "account": ACCOUNT, "auth_users": bypass}
    return (
        "# sealstream hub node: routes, JetStream, an account per customer cluster bound to its\n"
        "# leaf link; consumers through the auth callout (generated)\n"
        f"server_name: {json.dumps(me.name)}\n"
        f"jetstream: {_render({'store_dir': store_dir})}\n"
        f"cluster: {_render(cluster)}\n"
        f"leafnodes: {_render(leafnodes)}\n"
        f"accounts: {_render(accounts)}\n"
        f"authorization: {_render({'auth_callout': callout})}\n"
    )


def leaf_config(
    cluster: str,
    creds: HubCredentials,
    hub: Sequence[HubNode],
    *,
    store_dir: str,
    prefix: str = "sealstream",
    name: str | None = None,
) -> str:
    """The configuration of a customer site's leaf node: its producer as the one user, the
    cluster's store (JetStream in ``store_dir``, domain ``site-<id>``), and one outbound
    remote to every hub node (it reconnects to another when one goes), bound to the
    producer's account. ``name`` must stay the same across restarts (the store's identity)."""
    account = account_name(cluster)
    remote = {"urls": [n.leaf_url(creds.links[cluster]) for n in hub], "account": account}
    accounts = {
        account: {
            "jetstream": "enabled",
            "users": [producer_user(cluster, creds.roles.producers[cluster], prefix)],
        }
    }
    jetstream = {"store_dir": store_dir, "domain": site_domain(cluster)}
    return (
        "# sealstream site leaf node: the producer's user, the cluster's store, one outbound\n"
        "# link to the hub (generated)\n"
        f"server_name: {json.dumps(name or f'site-{cluster}')}\n"
        f"jetstream: {_render(jetstream)}\n"
        f"accounts: {_render(accounts)}\n"
        f"leafnodes: {_render({'remotes': [remote]})}\n"
    )
