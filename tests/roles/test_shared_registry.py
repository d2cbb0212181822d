"""The shared session registry on a real nats-server (JetStream key-value): a session one
proxy instance ended is kept, marked ended, for its owner's last resume on every instance."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from broker_proxy._registry import SessionRegistry
from broker_proxy._shared import SharedRegistry
from sealstream.nats import connect
from tests.support.pipeline import eventually

SESSION = "-" + "Q" * 41 + "_"  # the edges of base64url on purpose


async def _instance(url: str, bucket: str) -> tuple[Any, SharedRegistry, asyncio.Task[None]]:
    nc = await connect(url, name="test-registry")
    shared = SharedRegistry(
        SessionRegistry(ttl_s=3.0, max_grace_s=120.0, ended_keep_s=600.0), bucket=bucket
    )
    await shared.open(nc)
    watching = asyncio.create_task(shared.watch())
    await asyncio.wait_for(shared.ready.wait(), 5)
    return nc, shared, watching


async def test_an_ended_session_is_kept_marked_on_every_instance(nats_url: str) -> None:
    bucket = f"t{secrets.token_hex(4)}_sessions"
    a_nc, a, a_watch = await _instance(nats_url, bucket)
    b_nc, b, b_watch = await _instance(nats_url, bucket)
    try:
        now = time.monotonic()
        entry = a.local.add(
            SESSION, cluster="c1", user="alice", streams=("s",), now=now, grace_s=120.0
        )
        assert await a.create(entry)
        await eventually(lambda: b.local.get(SESSION) is not None, timeout=5)
        assert a.local.end(SESSION, now=now) is entry  # the liveness check ends it on a
        assert await a.claim(SESSION, entry)  # and a wins the announcement
        await eventually(lambda: b.local.get(SESSION) is None, timeout=5)
        kept = b.local.ended(SESSION, now=time.monotonic())
        assert kept is not None  # b serves the owner's last resume too
        assert (kept.user, kept.cluster, kept.grace_s) == ("alice", "c1", 120.0)
        assert b.local.end(SESSION, now=time.monotonic()) is None  # nothing live to end
        assert b.local.ended(SESSION, now=time.monotonic() + 601) is None
        assert b.local.ended(SESSION, now=time.monotonic()) is not None
        await a.delete(SESSION)  # its owner closed it: gone everywhere
        await eventually(lambda: b.local.ended(SESSION, now=time.monotonic()) is None, timeout=5)
        info = await a_nc.jetstream().stream_info(f"KV_{bucket}")
        assert info.config.max_age >= 600  # the bucket keeps the mark as long
    finally:
        for task in (a_watch, b_watch):
            task.cancel()
        await asyncio.gather(a_watch, b_watch, return_exceptions=True)
        await a_nc.close()
        await b_nc.close()
