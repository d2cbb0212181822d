"""High availability: proxy instances share the load (queue group) and the session registry
(JetStream key-value), so a killed instance loses no session and a restarted one knows them
all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from consumers import Client, ClientConfig
from producers import Agent, HttpEvents, ProducerConfig
from sealstream import mint_token
from sealstream.crypto import ClusterIdentity, TrustStore
from tests.support.pipeline import FAST_BATCHING, collect_rows, eventually

SECRET = b"h" * 32


class ProxyProcess:
    def __init__(self, nats_url: str, prefix: str, tmp: Path, name: str) -> None:
        self.log = tmp / f"{name}.log"
        secret = tmp / "secret"
        secret.write_bytes(SECRET)
        self.env = {
            **os.environ,
            "NATS_URL": nats_url,
            "SEALSTREAM_PREFIX": prefix,
            "SEALSTREAM_TOKEN_SECRET_FILE": str(secret),
            "SEALSTREAM_KEEPALIVE_S": "1",
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "broker_proxy",
                "--log-level",
                "info",
                env=self.env,
                stdout=out,
                stderr=out,
            )
        await eventually(lambda: "proxy.started" in self.log.read_text(), timeout=15)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


@pytest_asyncio.fixture
async def proxies(nats_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    prefix = f"ha{os.getpid()}"
    made: list[ProxyProcess] = []

    def make(name: str) -> ProxyProcess:
        p = ProxyProcess(nats_url, prefix, tmp_path, name)
        made.append(p)
        return p

    yield prefix, make
    for p in made:
        await p.stop()


async def test_killing_one_of_two_proxies_mid_stream(nats_url: str, proxies: Any) -> None:
    prefix, make = proxies
    a, b = make("a"), make("b")
    await asyncio.gather(a.start(), b.start())
    identity = ClusterIdentity.generate()
    # about proxies, not authorization: this cluster takes the relay's word
    config = ProducerConfig(
        cluster="c1",
        nats_url=nats_url,
        prefix=prefix,
        batching=FAST_BATCHING,
        trust_relay_authorization=True,
    )
    client_config = ClientConfig(
        nats_url=nats_url,
        prefix=prefix,
        token=mint_token(sub="u", clusters=["c1"], secret=SECRET),
        key_kind="x25519",
        policy="fail",  # a replay or a forgery would raise
    )
    async with (
        Agent(config, identity=identity, sources=[HttpEvents(rate=300, seed=3)]) as agent,
        Client(client_config, trust=TrustStore({"c1": [identity.public_jwk]})) as client,
        client.subscribe("c1", ["http_events"]) as sub,
    ):
        await collect_rows(sub, 20)
        await a.kill()
        rows, _ = await collect_rows(sub, 150, timeout=10)  # the stream continues through b
        assert len(rows) >= 150
        # a restarted instance loads every session from the shared registry...
        a2 = make("a2")
        await a2.start()
        await b.kill()
        # ...and serves it alone: data, and keepalives well past 3 intervals of 1 s
        rows, _ = await collect_rows(sub, 600, timeout=15)
        assert len(rows) >= 600
        assert sub.session_id in agent.sessions
        stats = sub.stats()
        assert stats.rejected == {}  # no replay, no forgery
        assert stats.lost <= 10  # only what was in flight in a killed instance
        assert "registry.loaded" in a2.log.read_text()
