"""``sealstream up --topology hub``: the hub-and-leaves topology on this machine.

A 3-node hub cluster (real nats-servers with JetStream, routes and a leafnode port each), two
proxies sharing the session registry (3 replicas), and per customer cluster a site: its leaf
node (dialling out to the hub, keeping the cluster's store) and its producer. Configurations
come from :mod:`sealstream.topology`; every port is a free loopback port chosen here, kept
across a node's restart.

State directory::

    token-secret  callout-issuer.nk  hub-credentials.json  nats-<user>.password
    hub-<i>.conf  hub-<i>/ (JetStream)  hub-<i>.log  proxy-<x>.log
    compose/      the servers' configurations for compose.hub.yaml
    site-<cluster>/   as ``sealstream up --dir`` makes it (cluster key, policy, trust store,
                      token, identity), with leaf.conf, leaf.log, producer.log and store/
                      (the site's store: its leaf node's JetStream)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import nats.errors

from producers import POLICY_FILE_NAME
from sealops._link import LinkRelay
from sealops._procs import Child
from sealops._stack import _write_private, issuer_seed_file, prepare_state, source_streams
from sealstream.nats import connect, release
from sealstream.natsconf import Credentials
from sealstream.natsjwt import AccountKey
from sealstream.server import EmbeddedServer, ServerOptions, free_port
from sealstream.topology import STORE_DOMAIN, HubCredentials, HubNode, hub_config, leaf_config

__all__ = ["HUB_CLUSTERS", "HubBackend", "HubServers", "hub_backend", "prepare_hub", "up_hub"]

#: the customer clusters of the local topology
HUB_CLUSTERS = ("acme", "globex")
_NODES = 3
_PROXIES = ("a", "b")


def site_dir(state: Path, cluster: str) -> Path:
    return state / f"site-{cluster}"


def prepare_hub(
    state: Path,
    clusters: Sequence[str] = HUB_CLUSTERS,
    streams: Sequence[str] = ("http_events", "host_metrics"),
) -> tuple[HubCredentials, list[HubNode]]:
    """Credentials (one token secret for the proxies, a site directory per cluster as
    ``sealstream up`` makes one, sharing the user identity), free ports for the hub's nodes,
    and every server's configuration."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    roles = {}
    for cluster in clusters:
        site = site_dir(state, cluster)
        site.mkdir(mode=0o700, exist_ok=True)
        for shared in ("token-secret", "identity.jwk"):  # one secret, one reader
            if (state / shared).exists() and not (site / shared).exists():
                shutil.copy2(state / shared, site / shared)
        roles[cluster] = prepare_state(site, cluster, streams).producers[cluster]
        for shared in ("token-secret", "identity.jwk"):
            if not (state / shared).exists():
                shutil.copy2(site / shared, state / shared)
    creds_file = state / "hub-credentials.json"
    creds = HubCredentials.from_json(creds_file.read_text()) if creds_file.exists() else None
    if creds is None or creds.clusters != sorted(clusters):
        creds = HubCredentials.generate(clusters)
    # the producers' users are the ones their sites' state holds
    creds = HubCredentials(Credentials(creds.roles.proxy, roles), creds.links)
    _write_private(creds_file, creds.to_json().encode("utf-8"))
    _write_private(state / "nats-proxy.password", creds.roles.proxy.password.encode("utf-8"))
    seed_file = issuer_seed_file(state)
    if not seed_file.exists():
        _write_private(seed_file, AccountKey.generate().seed + b"\n")
    issuer = AccountKey.from_text(seed_file.read_bytes()).public_key
    nodes = [
        HubNode(
            name=f"hub-{i}",
            client_port=free_port(),
            cluster_port=free_port(),
            leaf_port=free_port(),
        )
        for i in range(_NODES)
    ]
    for i in range(_NODES):
        text = hub_config(nodes, i, creds, issuer=issuer, store_dir=str(state / f"hub-{i}"))
        _write_private(state / f"hub-{i}.conf", text.encode("utf-8"))
    for cluster in clusters:
        site = site_dir(state, cluster)
        text = leaf_config(cluster, creds, nodes, store_dir=str(site / "store"))
        _write_private(site / "leaf.conf", text.encode("utf-8"))
    _compose_configs(state / "compose", creds, issuer)
    return creds, nodes


def _compose_configs(out: Path, creds: HubCredentials, issuer: str) -> None:
    """The same configurations for compose.hub.yaml: each server is the service of its name,
    on the standard ports, with its JetStream store on the volume at /data."""
    out.mkdir(mode=0o700, exist_ok=True)
    nodes = [HubNode(name=f"hub-{i}", host=f"hub-{i}") for i in range(_NODES)]
    for i in range(_NODES):
        text = hub_config(nodes, i, creds, issuer=issuer, store_dir="/data")
        _write_private(out / f"hub-{i}.conf", text.encode("utf-8"))
    for cluster in creds.clusters:
        text = leaf_config(cluster, creds, nodes, store_dir="/data")
        _write_private(out / f"leaf-{cluster}.conf", text.encode("utf-8"))


class HubServers:
    """The hub's nodes and the sites' leaf nodes as nats-server processes; any of them can be
    stopped and started again on its ports (JetStream data kept)."""

    def __init__(
        self,
        state: Path,
        nodes: Sequence[HubNode],
        clusters: Sequence[str],
        *,
        relay_links: bool = False,
    ) -> None:
        self.state = state
        self.nodes = list(nodes)
        #: with ``relay_links``, each site's leaf link goes through a relay of its own that
        #: can be cut (the site's WAN down, its leaf node up)
        self.links: dict[str, LinkRelay] = {}
        if relay_links:
            creds = HubCredentials.from_json((state / "hub-credentials.json").read_text())
            for c in clusters:
                routes = [(free_port(), n.leaf_port) for n in nodes]
                relayed = [replace(n, leaf_port=p) for n, (p, _) in zip(nodes, routes, strict=True)]
                site = site_dir(state, c)
                text = leaf_config(c, creds, relayed, store_dir=str(site / "store"))
                _write_private(site / "leaf.conf", text.encode("utf-8"))
                self.links[c] = LinkRelay(f"site-{c}", routes)
        self.hub = [
            EmbeddedServer(
                ServerOptions(
                    config_file=state / f"hub-{i}.conf",
                    port=n.client_port,
                    jetstream=False,  # in the configuration, with its store directory
                    log_file=state / f"hub-{i}.log",
                )
            )
            for i, n in enumerate(nodes)
        ]
        self.leaves = {
            c: EmbeddedServer(
                ServerOptions(
                    config_file=site_dir(state, c) / "leaf.conf",
                    port=free_port(),
                    jetstream=False,
                    log_file=site_dir(state, c) / "leaf.log",
                )
            )
            for c in clusters
        }

    @property
    def hub_urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, name: str) -> EmbeddedServer:
        """A hub node by its ``server_name``."""
        return self.hub[[n.name for n in self.nodes].index(name)]

    async def kill(self, server: EmbeddedServer) -> None:
        """SIGKILL: no goodbye to its clients, routes or leaf links."""
        with contextlib.suppress(ProcessLookupError, RuntimeError):
            os.kill(server.pid, signal.SIGKILL)
        await asyncio.to_thread(server.stop)

    async def restart(self, server: EmbeddedServer) -> None:
        """Start a stopped server again on its ports (a hub node keeps its JetStream data)."""
        await asyncio.to_thread(server.start)

    async def start(self) -> None:
        # all at once: a node waits for its routes to form a JetStream cluster
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in self.hub))
        await self.jetstream_ready()
        for link in self.links.values():
            await link.start()
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in self.leaves.values()))

    async def jetstream_ready(self, *, timeout_s: float = 30.0) -> None:
        """Wait until the hub's JetStream has a meta leader (it answers an account info
        request): before that, creating the registry's bucket fails."""
        creds = HubCredentials.from_json((self.state / "hub-credentials.json").read_text())
        urls = ",".join(creds.roles.proxy.url(u) for u in self.hub_urls)
        nc = await connect(urls, name="sealstream-hub-ready")
        js = nc.jetstream(timeout=1.0)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        await js.account_info()
                        return
                    except (nats.errors.Error, TimeoutError):
                        await asyncio.sleep(0.2)
        finally:
            await release(nc)

    async def stop(self) -> None:
        servers = [*self.leaves.values(), *self.hub]
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
        for link in self.links.values():
            await link.cut()

    async def __aenter__(self) -> HubServers:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args, "--log-level", "info"]


class HubBackend:
    """The role processes on the hub's and the sites' servers: two proxies on the hub, a
    producer per site on its leaf node; any of them can be killed and started again."""

    def __init__(
        self,
        state: Path,
        servers: HubServers,
        creds: HubCredentials,
        *,
        sources: str,
        rate: float,
        keepalive_s: float | None = None,
    ) -> None:
        self.state = state
        self.servers = servers
        self.creds = creds
        self.sources = sources
        self.rate = rate
        self.keepalive_s = keepalive_s
        self.proxies: dict[str, Child] = {}
        self.producers: dict[str, Child] = {}

    @property
    def consumer_url(self) -> str:
        """Every hub node: a consumer logs in on any of them (the auth callout answers)."""
        return ",".join(self.servers.hub_urls)

    @property
    def clusters(self) -> list[str]:
        return self.creds.clusters

    def site(self, cluster: str) -> Path:
        return site_dir(self.state, cluster)

    async def start_proxy(self, name: str) -> Child:
        """A proxy process on the hub (its registry in 3 replicas, the callout answered)."""
        env = {
            **os.environ,
            "NATS_URL": ",".join(self.servers.hub_urls),
            "SEALSTREAM_NATS_USER": self.creds.roles.proxy.user,
            "SEALSTREAM_NATS_PASSWORD_FILE": str(self.state / "nats-proxy.password"),
            "SEALSTREAM_TOKEN_SECRET_FILE": str(self.state / "token-secret"),
            "SEALSTREAM_CALLOUT_ISSUER_SEED_FILE": str(issuer_seed_file(self.state)),
            "SEALSTREAM_REGISTRY_REPLICAS": str(min(3, len(self.servers.hub))),
            "SEALSTREAM_STORE_DOMAIN": STORE_DOMAIN,
        }
        if self.keepalive_s is not None:
            env["SEALSTREAM_KEEPALIVE_S"] = str(self.keepalive_s)
        log = self.state / f"proxy-{name}.log"
        child = await Child.spawn(
            f"proxy-{name}", "proxy", _python("broker_proxy"), log=log, config=None, env=env
        )
        self.proxies[name] = child
        return child

    async def start_producer(self, cluster: str) -> Child:
        """A site's producer process, connected to its leaf node only."""
        site = self.site(cluster)
        env = {
            **os.environ,
            "NATS_URL": self.servers.leaves[cluster].url,
            "SEALSTREAM_NATS_USER": self.creds.roles.producers[cluster].user,
            "SEALSTREAM_NATS_PASSWORD_FILE": str(site / f"nats-producer-{cluster}.password"),
            "SEALSTREAM_CLUSTER": cluster,
            "SEALSTREAM_KEY_FILE": str(site / "cluster-key.jwk"),
            "SEALSTREAM_POLICY_FILE": str(site / POLICY_FILE_NAME),
            "SEALSTREAM_SOURCES": self.sources,
            "SEALSTREAM_STORE": "1",  # in its leaf node's JetStream
        }
        argv = _python("producers", "--rate", str(self.rate))
        log = site / "producer.log"
        child = await Child.spawn(
            f"producer-{cluster}", "producer", argv, log=log, config=None, env=env
        )
        self.producers[cluster] = child
        return child

    async def kill(self, child: Child) -> None:
        """SIGKILL a role process (no goodbye), and reap it."""
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await child.proc.wait()

    async def stop(self) -> None:
        children = [*self.producers.values(), *self.proxies.values()]
        await asyncio.gather(*(c.stop() for c in children))


@contextlib.asynccontextmanager
async def hub_backend(
    *,
    state: Path,
    sources: str,
    rate: float,
    clusters: Sequence[str] = HUB_CLUSTERS,
    keepalive_s: float | None = None,
    producers: bool = True,
    relay_links: bool = False,
) -> AsyncIterator[HubBackend]:
    """The whole topology on loopback: hub nodes, leaf nodes, two proxies, a producer per
    site (unless ``producers`` is False: the caller runs its own), the leaf links through
    relays that can be cut with ``relay_links``; the processes stop before the servers."""
    creds, nodes = prepare_hub(state, clusters, source_streams(sources))
    async with HubServers(state, nodes, clusters, relay_links=relay_links) as servers:
        be = HubBackend(state, servers, creds, sources=sources, rate=rate, keepalive_s=keepalive_s)
        try:
            for name in _PROXIES:
                await be.start_proxy(name)
            for cluster in clusters if producers else ():
                await be.start_producer(cluster)
            yield be
        finally:
            await be.stop()


async def up_hub(*, state: Path, sources: str, rate: float) -> int:
    """``sealstream up --topology hub``: run it all until Ctrl-C, saying how to consume."""
    async with hub_backend(state=state, sources=sources, rate=rate) as be:
        print(f"sealstream hub is up: 3 hub nodes, 2 proxies, sites {', '.join(be.producers)}")
        print(f"  hub nodes (consumers log in on any): {be.consumer_url}")
        print(f"  logs in {state}/ and {state}/site-*/")
        streams = " ".join(f"--stream {s}" for s in source_streams(sources))
        for cluster in be.producers:
            site = be.site(cluster)
            print(f"consume cluster {cluster!r} (its producer is behind its leaf node) with:")
            print(
                f'  NATS_URL="{be.consumer_url}" sealstream-consume --cluster {cluster} '
                f"{streams} --token-file {site}/token --trust-store {site}/trust.json "
                f"--identity {site}/identity.jwk"
            )
        print("Ctrl-C stops everything.", flush=True)
        await asyncio.Event().wait()
    return 0
