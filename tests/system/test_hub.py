"""The hub-and-leaves topology on real nats-servers: a 3-node hub cluster with JetStream, a leaf
node per customer site, an account per customer cluster. Tenant isolation is tried at the
broker, with the producers' and the links' own credentials and with a leaf node its site's
operator reconfigured at will; faults are real processes killed and restarted.

An absence is asserted after a sentinel: a message that took the same path after the one
that must not arrive, so that its arrival proves the other had its chance."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio

from broker_proxy._callout import AuthResponder
from broker_proxy._config import CalloutConfig
from sealops._hub import HubServers, prepare_hub
from sealops._stack import issuer_seed_file
from sealstream import BrokerError, TokenVerifier, mint_token
from sealstream.ids import Subjects
from sealstream.nats import connect, settle
from sealstream.natsconf import RoleUser
from sealstream.natsjwt import AccountKey
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.store import Store, ensure_stream
from sealstream.topology import HubCredentials, account_name

A, B = "acme", "globex"
SESSION = "-" + "S" * 41 + "_"  # a session id at the edges of its alphabet


@pytest.fixture(scope="module")
def hub_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def servers(hub_state: Path) -> Iterator[HubServers]:
    _, nodes = prepare_hub(hub_state, (A, B), ["records"])
    hub = HubServers(hub_state, nodes, (A, B))
    asyncio.run(hub.start())
    try:
        yield hub
    finally:
        asyncio.run(hub.stop())


@pytest.fixture(scope="module")
def creds(hub_state: Path, servers: HubServers) -> HubCredentials:
    return HubCredentials.from_json((hub_state / "hub-credentials.json").read_text())


class Conn:
    """A client connection that records the server's errors (permission violations)."""

    def __init__(self, nc: Any, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors
        self.got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def collect(self, subject: str) -> None:
        async def keep(msg: Any) -> None:
            await self.got.put((msg.subject, msg.data))

        await self.nc.subscribe(subject, cb=keep)
        await settle(self.nc)

    async def until(self, subject: str, *, timeout: float = 10.0) -> list[tuple[str, bytes]]:  # noqa: ASYNC109
        """Everything received up to and including the first message on ``subject``."""
        seen: list[tuple[str, bytes]] = []
        async with asyncio.timeout(timeout):
            while True:
                seen.append(await self.got.get())
                if seen[-1][0] == subject:
                    return seen

    async def violation(self, action: str, subject: str) -> bool:
        before = len(self.errors)
        if action == "pub":
            await self.nc.publish(subject, b"x")
        else:
            await self.nc.subscribe(subject)
        await self.nc.flush()
        async with asyncio.timeout(5):
            while len(self.errors) == before:
                await asyncio.sleep(0.01)
        return "permissions violation" in self.errors[-1].lower()


@pytest_asyncio.fixture
async def conn() -> AsyncIterator[Any]:
    made: list[Any] = []

    async def make(url: str, role: RoleUser | None = None) -> Conn:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await connect(
            role.url(url) if role else url, name="test", error_cb=on_error, fail_fast=True
        )
        made.append(nc)
        return Conn(nc, errors)

    yield make
    for nc in made:
        await nc.close()


@pytest_asyncio.fixture
async def callout(conn: Any, servers: HubServers, creds: HubCredentials, hub_state: Path) -> Conn:
    """A proxy connection on the hub that answers the auth callout, as the proxies do."""
    proxy: Conn = await conn(servers.hub_urls[2], creds.roles.proxy)
    issuer = AccountKey.from_text(issuer_seed_file(hub_state).read_bytes())
    verifier = TokenVerifier(secret=(hub_state / "token-secret").read_bytes())
    await AuthResponder(CalloutConfig(issuer=issuer), verifier).subscribe(proxy.nc)
    await settle(proxy.nc)
    return proxy


async def _link_up(conn: Any, servers: HubServers, creds: HubCredentials, cluster: str) -> Conn:
    """The proxy's view of the hub, once ``cluster``'s link carries its data (interest crosses
    the link a moment after the leaf connects)."""
    proxy: Conn = await conn(servers.hub_urls[0], creds.roles.proxy)
    await proxy.collect("sealstream.cluster.*.*.*")
    producer = await conn(servers.leaves[cluster].url, creds.roles.producers[cluster])
    probe = f"sealstream.cluster.{cluster}.data.{SESSION}"
    async with asyncio.timeout(15):
        while True:
            await producer.nc.publish(probe, b"probe")
            with contextlib.suppress(TimeoutError):
                await proxy.until(probe, timeout=0.2)
                return proxy


# --- tenant isolation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("pub", f"sealstream.cluster.{B}.data.{SESSION}"),  # as cluster B
        ("pub", f"sealstream.cluster.{B}.group.records"),
        ("pub", f"sealstream.inbox.{SESSION}"),
        ("pub", "sealstream.api.session.open"),
        ("sub", f"sealstream.cluster.{B}.control"),  # B's control requests
        ("sub", f"sealstream.cluster.{B}.data.*"),  # B's data
        ("sub", "sealstream.cluster.*.group.*"),
        ("sub", ">"),
    ],
)
async def test_producer_at_site_a_cannot_act_as_b_or_read_b(
    conn: Any, servers: HubServers, creds: HubCredentials, action: str, subject: str
) -> None:
    producer = await conn(servers.leaves[A].url, creds.roles.producers[A])
    assert await producer.violation(action, subject)


async def test_credentials_work_only_where_they_belong(
    servers: HubServers, creds: HubCredentials, callout: Conn
) -> None:
    attempts = [
        (servers.leaves[B].url, creds.roles.producers[A]),  # A's producer at B's site
        (servers.hub_urls[0], creds.roles.producers[A]),  # at the hub (goes to the callout)
        (servers.hub_urls[1], creds.links[A]),  # a leaf link's user as a client
        (servers.leaves[A].url, creds.links[A]),
    ]
    for url, role in attempts:
        with pytest.raises(BrokerError):
            await connect(role.url(url), name="intruder", connect_timeout=2, fail_fast=True)


async def test_a_rogue_leaf_carries_nothing_outside_its_account(
    conn: Any, servers: HubServers, creds: HubCredentials, callout: Conn, hub_state: Path
) -> None:
    """Site A's operator runs their leaf node with no permissions at all: still only A's data
    and group subjects reach the hub, and only A's control requests reach the site."""
    link = creds.links[A]
    rogue_conf = hub_state / "rogue.conf"
    remote = ", ".join(f'"{n.leaf_url(link)}"' for n in servers.nodes)
    rogue_conf.write_text(
        'server_name: "rogue"\n'
        f'accounts: {{ "{account_name(A)}": {{ users: [{{user: "any", password: "any"}}] }} }}\n'
        f'leafnodes {{ remotes: [{{ urls: [{remote}], account: "{account_name(A)}" }}] }}\n'
    )
    rogue_server = EmbeddedServer(ServerOptions(config_file=rogue_conf, jetstream=False))
    await asyncio.to_thread(rogue_server.start)
    try:
        rogue = await conn(RoleUser("any", "any").url(rogue_server.url))
        await rogue.collect(">")
        proxy = callout
        for subject in ("sealstream.api.session.*", "sealstream.cluster.*.*.*", "_INBOX.>"):
            await proxy.collect(subject)
        secret = (hub_state / "token-secret").read_bytes()
        token = mint_token(sub="u", clusters=[B], secret=secret)
        consumer = await conn(servers.hub_urls[1], RoleUser(SESSION, token))
        await consumer.collect(f"sealstream.inbox.{SESSION}")

        sentinel = f"sealstream.cluster.{A}.data.{SESSION}"
        async with asyncio.timeout(15):  # until the rogue link is up
            while True:
                await rogue.nc.publish(sentinel, b"ok")
                with contextlib.suppress(TimeoutError):
                    await proxy.until(sentinel, timeout=0.2)
                    break
        forbidden_out = [
            f"sealstream.cluster.{B}.data.{SESSION}",  # as cluster B
            f"sealstream.cluster.{B}.group.records",
            f"sealstream.cluster.{A}.secret.x",  # A's, but not exported
            f"sealstream.inbox.{SESSION}",  # straight to a consumer
            "sealstream.api.session.open",  # as a consumer
            "_INBOX.x.y",
        ]
        for subject in forbidden_out:
            await rogue.nc.publish(subject, b"forged")
        await rogue.nc.publish(sentinel, b"last")
        seen = await proxy.until(sentinel)
        assert [s for s, d in seen if d == b"forged"] == []
        # consumers and B's site hear nothing of it either
        await proxy.nc.publish(f"sealstream.inbox.{SESSION}", b"relayed")
        assert await consumer.until(f"sealstream.inbox.{SESSION}") == [
            (f"sealstream.inbox.{SESSION}", b"relayed")
        ]

        # into the site: only A's control requests; B's, the inboxes, the API are not carried
        b_site = await conn(servers.leaves[B].url, creds.roles.producers[B])
        await b_site.collect(f"sealstream.cluster.{B}.control")
        a_control = f"sealstream.cluster.{A}.control"
        seen = []
        b_seen: list[tuple[str, bytes]] = []
        # the hub learns each site's interest over its link a moment after the subscription:
        # send until A's request reached the rogue site and B's reached B's, keeping
        # everything the rogue site received meanwhile
        async with asyncio.timeout(15):
            while not (any(s == a_control for s, _ in seen) and b_seen):
                await proxy.nc.publish(f"sealstream.cluster.{B}.control", b"for-b")
                await proxy.nc.publish(f"sealstream.inbox.{SESSION}", b"for-consumer")
                await proxy.nc.publish(a_control, b"for-a")
                await asyncio.sleep(0.2)
                while not rogue.got.empty():
                    seen.append(rogue.got.get_nowait())
                while not b_site.got.empty():
                    b_seen.append(b_site.got.get_nowait())
        assert [d for _, d in seen if d in (b"for-b", b"for-consumer")] == []
        assert {d for _, d in b_seen} == {b"for-b"}
    finally:
        await asyncio.to_thread(rogue_server.stop)


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("pub", f"sealstream.cluster.{A}.data.{SESSION}"),  # forge a cluster's data
        ("pub", f"sealstream.cluster.{A}.group.records"),
        ("pub", "sealstream.api.session.open"),
        ("sub", f"sealstream.cluster.{A}.control"),  # read a cluster's control traffic
        ("sub", "sealstream.inbox.*"),
        ("sub", ">"),
    ],
)
async def test_hub_proxy_user_sees_only_what_it_relays(
    conn: Any, servers: HubServers, creds: HubCredentials, action: str, subject: str
) -> None:
    proxy = await conn(servers.hub_urls[0], creds.roles.proxy)
    assert await proxy.violation(action, subject)


async def test_control_requests_cross_the_link_and_are_answered(
    conn: Any, servers: HubServers, creds: HubCredentials
) -> None:
    proxy = await _link_up(conn, servers, creds, A)
    producer = await conn(servers.leaves[A].url, creds.roles.producers[A])

    async def answer(msg: Any) -> None:
        await msg.respond(b"pong:" + msg.data)

    await producer.nc.subscribe(f"sealstream.cluster.{A}.control", cb=answer)
    await settle(producer.nc)
    async with asyncio.timeout(15):
        while True:  # the subscription's interest crosses the link a moment later
            with contextlib.suppress(Exception):
                reply = await proxy.nc.request(f"sealstream.cluster.{A}.control", b"1", timeout=0.5)
                break
    assert reply.data == b"pong:1"


async def test_the_hub_reads_a_sites_store_across_its_link_and_changes_nothing(
    conn: Any, servers: HubServers, creds: HubCredentials
) -> None:
    """A site's store is its leaf node's JetStream (domain ``site-<id>``): the producer keeps
    its envelopes there; the hub's proxy user reads them across the link (the stream's info,
    a direct read of its messages) and can neither change the store nor read another site's
    through it."""
    proxy = await _link_up(conn, servers, creds, A)
    producer = await connect(
        creds.roles.producers[A].url(servers.leaves[A].url),
        name="test-producer",
        inbox_prefix=Subjects.producer_inbox(A),  # its replies, as the agent's
    )
    try:
        js = producer.jetstream(timeout=5)
        name = await ensure_stream(js, Store(), prefix="sealstream", cluster=A)
        subject = f"sealstream.cluster.{A}.data.{SESSION}"
        stored = await js.publish(subject, b"sealed bytes")
    finally:
        await producer.close()
    site = proxy.nc.jetstream(domain=f"site-{A}", timeout=2)
    async with asyncio.timeout(15):
        while True:  # the store's interest crosses the link a moment after it is made
            with contextlib.suppress(nats.errors.NoRespondersError, TimeoutError):
                info = await site.stream_info(name)
                break
            await asyncio.sleep(0.2)
    assert info.state.messages >= 1
    msg = await site.get_msg(name, seq=stored.seq, direct=True)
    assert (msg.subject, msg.data) == (subject, b"sealed bytes")
    # nothing but those two reads: no purge, delete or consumer, not another site's store
    for api in ("STREAM.PURGE", "STREAM.DELETE", "CONSUMER.CREATE"):
        assert await proxy.violation("pub", f"$JS.site-{A}.API.{api}.{name}")
    # (no responders: nothing answers A's stream name in B's domain on the hub)
    with pytest.raises(nats.js.errors.ServiceUnavailableError):
        await proxy.nc.jetstream(domain=f"site-{B}", timeout=2).stream_info(name)
    assert (await site.stream_info(name)).state.messages == info.state.messages
