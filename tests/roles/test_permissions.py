"""Least privilege on the broker: each role's forbidden actions are refused by a real server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import pytest_asyncio

from broker_proxy._callout import AuthResponder
from broker_proxy._config import CalloutConfig
from sealstream import Subjects, TokenVerifier, mint_token
from sealstream.nats import connect, settle
from sealstream.natsconf import Credentials, RoleUser, server_config
from sealstream.natsjwt import AccountKey
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.store import Store, ensure_stream

SESSION = "S" * 43
ISSUER = AccountKey.generate()
SECRET = b"s" * 32


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return Credentials.generate(["c1", "c2"])


@pytest.fixture(scope="module")
def secure_url(creds: Credentials, tmp_path_factory: pytest.TempPathFactory) -> Any:
    conf = tmp_path_factory.mktemp("nats") / "nats.conf"
    conf.write_text(server_config(creds, issuer=ISSUER.public_key))
    with EmbeddedServer(ServerOptions(config_file=conf)) as server:
        yield server.url


class Client:
    def __init__(self, nc: Any, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def violation(self, action: str, subject: str) -> bool:
        """Try to publish or subscribe; True if the server refused it."""
        before = len(self.errors)
        if action == "pub":
            await self.nc.publish(subject, b"x")
        else:
            await self.nc.subscribe(subject)
        await self.nc.flush()
        async with asyncio.timeout(2):
            while len(self.errors) == before:
                await asyncio.sleep(0.01)
        return "permissions violation" in self.errors[-1].lower()


@pytest_asyncio.fixture
async def as_role(secure_url: str) -> AsyncIterator[Any]:
    clients: list[Any] = []

    async def make(role: RoleUser) -> Client:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await connect(role.url(secure_url), name=role.user, error_cb=on_error)
        clients.append(nc)
        return Client(nc, errors)

    yield make
    for nc in clients:
        await nc.close()


async def test_anonymous_and_wrong_password_are_refused(secure_url: str) -> None:
    from sealstream import BrokerError

    with pytest.raises(BrokerError):
        await connect(secure_url, name="anon", connect_timeout=1)
    with pytest.raises(BrokerError):
        await connect(RoleUser("proxy", "wrong").url(secure_url), name="bad", connect_timeout=1)


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("pub", f"sealstream.cluster.c2.data.{SESSION}"),  # another cluster's data
        ("pub", "sealstream.cluster.c2.group.records"),  # another cluster's group batches
        ("pub", f"sealstream.inbox.{SESSION}"),  # straight to a consumer
        ("pub", "sealstream.api.session.open"),
        ("pub", "sealstream.cluster.c1.control"),
        ("sub", "sealstream.cluster.c2.control"),
        ("sub", "sealstream.cluster.*.data.*"),
        ("sub", "sealstream.cluster.*.group.*"),
        ("sub", f"sealstream.inbox.{SESSION}"),
        ("sub", ">"),
        ("sub", "_INBOX.c2.>"),  # another producer's request replies (store acknowledgements)
        ("pub", "$JS.API.STREAM.CREATE.sealstream_store_c2"),  # another cluster's store
        ("pub", "$JS.API.STREAM.DELETE.sealstream_store_c1"),  # nor delete its own
        ("pub", "$JS.API.CONSUMER.CREATE.sealstream_store_c1"),  # nor read it
    ],
)
async def test_producer_forbidden(
    as_role: Any, creds: Credentials, action: str, subject: str
) -> None:
    producer = await as_role(creds.producers["c1"])
    assert await producer.violation(action, subject)


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("pub", f"sealstream.cluster.c1.data.{SESSION}"),  # the proxy cannot forge cluster data
        ("pub", "sealstream.cluster.c1.group.records"),  # nor group batches
        ("pub", "sealstream.api.session.open"),
        ("sub", "sealstream.cluster.c1.control"),  # nor read another's control traffic
        ("sub", "sealstream.inbox.*"),
    ],
)
async def test_proxy_forbidden(as_role: Any, creds: Credentials, action: str, subject: str) -> None:
    proxy = await as_role(creds.proxy)
    assert await proxy.violation(action, subject)


async def test_allowed_paths_work(as_role: Any, creds: Credentials, secure_url: str) -> None:
    """What each role needs still flows: producer -> proxy -> consumer (admitted by the auth
    callout, which the proxy's user may answer), and control requests. The consumer's own
    confinement is tested in test_callout.py."""
    proxy = await as_role(creds.proxy)
    producer = await as_role(creds.producers["c1"])
    responder = AuthResponder(CalloutConfig(issuer=ISSUER), TokenVerifier(secret=SECRET))
    await responder.subscribe(proxy.nc)
    await settle(proxy.nc)
    consumer = await as_role(
        RoleUser(SESSION, mint_token(sub="alice", clusters=["c1"], secret=SECRET))
    )
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def relay(msg: Any) -> None:
        await proxy.nc.publish(f"sealstream.inbox.{SESSION}", msg.data)

    async def deliver(msg: Any) -> None:
        await got.put(msg.data)

    async def control(msg: Any) -> None:
        await msg.respond(b"ok")

    await proxy.nc.subscribe("sealstream.cluster.*.*.*", cb=relay)  # data and group subjects
    await consumer.nc.subscribe(f"sealstream.inbox.{SESSION}", cb=deliver)
    await producer.nc.subscribe("sealstream.cluster.c1.control", cb=control)
    for c in (proxy, producer, consumer):
        await settle(c.nc)
    await producer.nc.publish(f"sealstream.cluster.c1.data.{SESSION}", b"sealed")
    await producer.nc.publish("sealstream.cluster.c1.group.records", b"sealed once")
    async with asyncio.timeout(5):
        assert await got.get() == b"sealed"
        assert await got.get() == b"sealed once"
    reply = await proxy.nc.request("sealstream.cluster.c1.control", b"ping", timeout=5)
    assert reply.data == b"ok"
    kv = await proxy.nc.jetstream().create_key_value(bucket="perm_test")
    await kv.put("k", b"v")
    assert (await kv.get("k")).value == b"v"
    assert proxy.errors == producer.errors == consumer.errors == []


async def test_a_producer_keeps_its_store(creds: Credentials, secure_url: str) -> None:
    """A producer creates its own cluster's store and publishes into it with acknowledgement
    (replies on its own inbox prefix); the proxy may read it."""
    producer = await connect(
        creds.producers["c1"].url(secure_url),
        name="producer",
        inbox_prefix=Subjects.producer_inbox("c1"),
    )
    proxy = await connect(creds.proxy.url(secure_url), name="proxy")
    try:
        name = await ensure_stream(producer.jetstream(), Store(), prefix="sealstream", cluster="c1")
        ack = await producer.jetstream().publish(f"sealstream.cluster.c1.data.{SESSION}", b"x")
        assert (ack.stream, name) == ("sealstream_store_c1", "sealstream_store_c1")
        info = await proxy.jetstream().stream_info(name)
        assert info.state.messages == 1
        # a subject's last message: where a restarted producer's groups go on from
        last = await producer.jetstream().get_last_msg(
            name, f"sealstream.cluster.c1.data.{SESSION}"
        )
        assert last.data == b"x"
        with pytest.raises(nats.errors.TimeoutError):  # no other stream's: refused, unanswered
            await producer.jetstream(timeout=1).get_last_msg(
                "sealstream_store_c2", "sealstream.cluster.c2.data.x"
            )
    finally:
        await producer.close()
        await proxy.close()


def test_env_references_for_deployments() -> None:
    creds = Credentials(
        RoleUser("proxy", "$PROXY_PASSWORD"),
        {"demo": RoleUser("producer-demo", "$PRODUCER_PASSWORD")},
    )
    text = server_config(creds, issuer="$ISSUER")
    assert "password: $PROXY_PASSWORD" in text
    assert "issuer: $ISSUER" in text
    assert '"$JS.API.>"' in text  # subjects stay quoted
    assert 'user: "consumer"' not in text  # no shared consumer user: the callout admits them


def test_generated_file_round_trip(tmp_path: Path) -> None:
    creds = Credentials.generate(["a"])
    assert Credentials.from_json(creds.to_json()) == creds
    assert creds.proxy.password not in repr(creds)


SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nats.conf"
SHIPPED_CREDS = Credentials(
    RoleUser("proxy", "$SEALSTREAM_PROXY_PASSWORD"),
    {"demo": RoleUser("producer-demo", "$SEALSTREAM_PRODUCER_PASSWORD")},
)


def test_shipped_config_is_the_generated_one() -> None:
    text = SHIPPED.read_text()
    assert text.endswith(server_config(SHIPPED_CREDS, issuer="$SEALSTREAM_CALLOUT_ISSUER"))


async def test_shipped_config_runs_in_nats_server(tmp_path: Path) -> None:
    """The shipped file, with passwords and the callout issuer from the server's environment,
    enforces the roles and admits consumers through the callout."""
    env = {
        "SEALSTREAM_PROXY_PASSWORD": "p" * 20,
        "SEALSTREAM_PRODUCER_PASSWORD": "d" * 20,
        "SEALSTREAM_CALLOUT_ISSUER": ISSUER.public_key,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # nats-server inherits them
    try:
        server = EmbeddedServer(ServerOptions(config_file=SHIPPED))
        url = await asyncio.to_thread(server.start)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await connect(
            RoleUser("producer-demo", "d" * 20).url(url), name="p", error_cb=on_error
        )
        await nc.publish(f"sealstream.cluster.other.data.{SESSION}", b"x")
        await nc.flush()
        async with asyncio.timeout(2):
            while not errors:
                await asyncio.sleep(0.01)
        assert "permissions violation" in errors[0].lower()
        await nc.close()
        proxy = await connect(RoleUser("proxy", "p" * 20).url(url), name="proxy")
        await AuthResponder(CalloutConfig(issuer=ISSUER), TokenVerifier(secret=SECRET)).subscribe(
            proxy
        )
        await settle(proxy)
        token = mint_token(sub="alice", clusters=["demo"], secret=SECRET)
        consumer = await connect(RoleUser(SESSION, token).url(url), name="consumer")
        await consumer.close()
        await proxy.close()
    finally:
        await asyncio.to_thread(server.stop)
