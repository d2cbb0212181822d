"""Faults on the hub-and-leaves topology, all real processes (``sealstream up --topology
hub``'s): a hub node killed (the one leading the session registry's stream), either proxy
killed, a site's link cut for 30 s (its leaf node up), a site's leaf node killed and
restarted. Every consumer keeps or resumes its stream; the sites' stores lose nothing.

The long runs (30 s link cuts, repeated) are ``sealstream chaos --topology hub``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import pytest_asyncio

from broker_proxy import bucket_name
from consumers import Batch, Client, ClientConfig, Resumed, Subscription
from sealops._hub import HubBackend, hub_backend
from sealstream.crypto import UserIdentity
from sealstream.nats import connect, release
from tests.support.pipeline import eventually


@dataclass
class Reader:
    """What one consumer received: rows, and the sessions that replaced ended ones."""

    rows: int = 0
    resumed: list[Resumed] = field(default_factory=list)

    async def read(self, sub: Subscription[Batch | Resumed]) -> None:
        async for item in sub:
            if isinstance(item, Resumed):
                self.resumed.append(item)
            else:
                self.rows += len(item.rows)

    async def more(self, n: int, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait for ``n`` more rows than now."""
        target = self.rows + n
        await eventually(lambda: self.rows >= target, timeout=timeout)


@contextlib.asynccontextmanager
async def reading(
    be: HubBackend, cluster: str
) -> AsyncIterator[tuple[Reader, Subscription[Batch | Resumed]]]:
    site = be.site(cluster)
    config = ClientConfig(
        nats_url=be.consumer_url,
        token=(site / "token").read_text().strip(),
        trust_store=site / "trust.json",
        identity=UserIdentity.load(site / "identity.jwk"),
        key_kind="x25519",
        policy="discard",
        request_timeout_s=3.0,
    )
    reader = Reader()
    async with (
        Client(config) as client,
        client.subscribe(cluster, ["http_events"], resume=True, retry_s=60) as sub,
        asyncio.TaskGroup() as tg,
    ):
        task = tg.create_task(reader.read(sub))
        try:
            yield reader, sub
        finally:
            task.cancel()


@pytest_asyncio.fixture
async def be(tmp_path: Path) -> AsyncIterator[HubBackend]:
    async with hub_backend(
        state=tmp_path / "hub",
        sources="http_events",
        rate=100,
        keepalive_s=1.0,
        relay_links=True,
    ) as backend:
        yield backend


async def _registry_leader(be: HubBackend, *, not_: str | None = None) -> str:
    """The hub node leading the registry's stream (another than ``not_``: JetStream takes
    a few seconds to elect one after its leader is gone)."""
    urls = ",".join(be.creds.roles.proxy.url(u) for u in be.servers.hub_urls)
    nc = await connect(urls, name="test-leader")
    js = nc.jetstream(timeout=2)
    try:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    info = await js.stream_info("KV_" + bucket_name("sealstream"))
                    leader = info.cluster.leader if info.cluster else None
                    if leader is not None and leader != not_:
                        return str(leader)
                await asyncio.sleep(0.2)
    finally:
        await release(nc)


async def test_losing_the_hub_node_that_leads_the_registry(be: HubBackend) -> None:
    """The registry's stream leader killed: another is elected, new sessions open, and the
    streams go on on their sessions with nothing lost (the sites' stores replay what a
    consumer on the dead node missed while it logged in again elsewhere)."""
    a, b = be.clusters
    async with reading(be, a) as (ra, sub_a), reading(be, b) as (rb, sub_b):
        await ra.more(20)
        await rb.more(20)
        leader = await _registry_leader(be)
        await be.servers.kill(be.servers.node(leader))
        await ra.more(100)
        await rb.more(100)
        # the registry elected another leader and takes new sessions
        assert await _registry_leader(be, not_=leader) != leader
        async with reading(be, a) as (late, _):
            await late.more(20)
        await be.servers.restart(be.servers.node(leader))
        await ra.more(20)
        for reader, sub in ((ra, sub_a), (rb, sub_b)):
            stats = sub.stats()
            assert reader.resumed == [], reader.resumed
            assert (stats.sessions, stats.lost, stats.rejected) == (1, 0, {}), stats


async def test_killing_either_proxy(be: HubBackend) -> None:
    """Either proxy killed (the other relays on): nothing lost, no new session."""
    a, b = be.clusters
    async with reading(be, a) as (ra, sub_a), reading(be, b) as (rb, sub_b):
        await ra.more(20)
        await rb.more(20)
        await be.kill(be.proxies["a"])
        await ra.more(100)
        await rb.more(100)
        await be.start_proxy("a")
        await be.kill(be.proxies["b"])
        await ra.more(100)
        await rb.more(100)
        for reader, sub in ((ra, sub_a), (rb, sub_b)):
            stats = sub.stats()
            assert reader.resumed == [], reader.resumed
            assert (stats.sessions, stats.lost, stats.rejected) == (1, 0, {}), stats


async def test_a_sites_link_cut_for_30_s_loses_nothing(be: HubBackend) -> None:
    """Site A's WAN down for 30 s (its link relay cut; its leaf node and producer stay up):
    the producer goes on sealing into the site's store, the proxies keep A's session through
    the cluster's silence (its store grace), and once the link is back the consumer reads
    what it missed from the site's store, across the link: same session, nothing lost;
    site B's consumer never stops."""
    a, b = be.clusters
    async with reading(be, a) as (ra, sub_a), reading(be, b) as (rb, _):
        await ra.more(20)
        await rb.more(20)
        await be.servers.links[a].cut()
        at_cut = ra.rows
        await rb.more(200)  # ~2 s of B's rows while A's link is down
        await asyncio.sleep(28)  # the outage itself, not a wait for an event
        assert ra.rows - at_cut < 50  # nothing of A crossed (in flight only)
        await be.servers.links[a].start()
        # the rows sealed during the cut (100 rows/s for 30 s) come from the site's store
        await ra.more(2_700, timeout=60)
        await rb.more(100)
        stats = sub_a.stats()
        assert ra.resumed == [], "A's session should have outlived its link's cut"
        assert (stats.sessions, stats.lost, stats.rejected) == (1, 0, {}), stats


async def test_a_sites_leaf_node_killed_and_back(be: HubBackend) -> None:
    """Site A's leaf node (and the store in it) killed for longer than the proxies' liveness
    allows (two pings unanswered, one every 1 s keepalive): the session outlives it (its store
    grace), the producer keeps what it sealed, and A's consumer goes on on the same session
    with nothing counted lost once the leaf is back; site B's consumer never stops."""
    a, b = be.clusters
    leaf = be.servers.leaves[a]
    async with reading(be, a) as (ra, sub_a), reading(be, b) as (rb, _):
        await ra.more(20)
        await rb.more(20)
        await be.servers.kill(leaf)
        await rb.more(200)  # ~2 s of B's rows while A's link is down
        at_cut = ra.rows
        await asyncio.sleep(10)  # the outage itself, not a wait for an event
        assert ra.rows - at_cut < 50  # nothing of A crossed (in flight only)
        await be.servers.restart(leaf)
        await ra.more(100)
        await rb.more(100)
        stats = sub_a.stats()
        assert ra.resumed == [], "A's session should have outlived its leaf node's restart"
        assert (stats.sessions, stats.lost, stats.rejected) == (1, 0, {}), stats
