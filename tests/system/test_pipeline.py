"""End to end on a real nats-server: producer -> blind proxy -> consumer, in one process.

Rows the consumer decrypts must be the rows the producer emitted, for every source, key kind
and key mode; sessions fan out, close, expire and end as the contract says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from structlog.testing import capture_logs

from consumers import Batch, Client, Subscription, TokenFile
from producers import HostMetrics, HttpEvents, JsonLines, Records, Source
from sealstream import IntegrityError, SessionError, mint_token
from sealstream.crypto import ConsumerKey, ProducerSession, encode_rows
from tests.support.pipeline import (
    Gate,
    Recording,
    Stack,
    Tap,
    collect_rows,
    eventually,
    fresh_key,
    make_stack,
)

ROWS: list[dict[str, Any]] = [
    {"i": 0, "name": "alpha", "ok": True, "ratio": 0.5, "missing": None},
    {"i": 1, "name": "βeta ✓", "ok": False, "ratio": -1.25e-9, "missing": None},
    {"i": 2, "name": "", "big": 2**63 - 1, "neg": -(2**63), "u64": 2**64 - 1},
]


@pytest.fixture(scope="module")
def rsa_key() -> ConsumerKey:
    """One RSA-4096 consumer key (the default size; ~1 s to make) for the module's RSA cases.
    Each test runs its own proxy and agent on a fresh prefix, so no two sessions share it."""
    return ConsumerKey.generate("rsa")


def _key(kind: str, rsa_key: ConsumerKey) -> ConsumerKey:
    return rsa_key if kind == "rsa" else fresh_key("x25519")


def _check_batches(sub: Subscription[Batch], batches: list[Batch], stream: str) -> None:
    seqs = [b.seq for b in batches]
    assert seqs == sorted(set(seqs))
    assert all(b.stream == stream and b.lost_before == 0 for b in batches)
    stats = sub.stats()
    assert stats.rejected == {}
    assert stats.gaps == 0
    assert stats.lost == 0
    assert stats.dropped == 0


# --- 1. rows out == rows in, per source, key kind and key mode -------------------------------


@pytest.mark.parametrize("mode", ["session", "per-message"])
@pytest.mark.parametrize("kind", ["x25519", "rsa"])
@pytest.mark.parametrize("api", ["emit", "records"])
async def test_python_api_rows_round_trip(
    nats_url: str, rsa_key: ConsumerKey, api: str, kind: str, mode: str
) -> None:
    records = Records("records")
    sources: list[Source] = [records] if api == "records" else []
    async with (
        make_stack(nats_url, sources=sources) as st,
        st.client(key_kind=kind, key_mode=mode) as client,
        client.subscribe(st.cluster, ["records"], key=_key(kind, rsa_key)) as sub,
    ):
        assert sub.session_id in st.agent.sessions
        expected = [dict(r, batch=b) for b in range(3) for r in ROWS]
        for b in range(3):
            chunk = [dict(r, batch=b) for r in ROWS]
            if api == "records":
                await records.put(chunk)
            else:
                await st.agent.emit("records", chunk)
        records.close()
        rows, batches = await collect_rows(sub, len(expected))
        assert rows == expected
        _check_batches(sub, batches, "records")


async def test_a_compressed_session_carries_its_choice_in_the_proof(nats_url: str) -> None:
    """A consumer that asks for compressed bodies says so in its proof too (a relay must not
    turn compression on); the cluster accepts it and the rows arrive deflated and whole."""
    async with make_stack(nats_url) as st:
        config = dataclasses.replace(st.config(), allow_zip=True)
        async with (
            Client(config, trust=st.trust()) as client,
            client.subscribe(st.cluster, ["records"]) as sub,
        ):
            await st.agent.emit("records", ROWS)
            rows, _ = await collect_rows(sub, len(ROWS))
            assert rows == ROWS
            crypto = st.agent.sessions[sub.session_id].crypto
            assert isinstance(crypto, ProducerSession)
            assert crypto._zip


async def test_emit_keeps_the_valid_rows_of_a_list_with_one_msgpack_cannot_carry(
    nats_url: str,
) -> None:
    """A list of plain rows is packed in one call; an int beyond 64 bits (or a str that is
    not UTF-8) makes that fail, and the rows are then checked one by one: the bad row is
    counted, the others arrive, in order."""
    async with (
        make_stack(nats_url) as st,
        st.client() as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        rows = [{"i": i} for i in range(5)]
        await st.agent.emit("records", [*rows[:2], {"i": 2**64}, {"s": "\udcff"}, *rows[2:]])
        got, _ = await collect_rows(sub, 5)
        assert got == rows
        assert st.agent.rejected_rows == {"bad_value": 2}
        assert st.agent.rows_in == 5


@pytest.mark.parametrize("mode", ["session", "per-message"])
@pytest.mark.parametrize("kind", ["x25519", "rsa"])
async def test_http_events_rows_round_trip(
    nats_url: str, rsa_key: ConsumerKey, kind: str, mode: str
) -> None:
    recording = Recording(HttpEvents(rate=400, seed=3))
    gate = Gate(recording)
    async with (
        make_stack(nats_url, sources=[gate]) as st,
        st.client(key_kind=kind, key_mode=mode) as client,
        client.subscribe(st.cluster, ["http_events"], key=_key(kind, rsa_key)) as sub,
    ):
        gate.open()
        rows, batches = await collect_rows(sub, 60)
        assert len(rows) >= 60
        # everything the source yielded since the gate opened, in order (it may be ahead)
        assert rows == recording.rows_seen[: len(rows)]
        assert {r["req_method"] for r in rows} <= {"GET", "POST", "PUT", "DELETE"}
        _check_batches(sub, batches, "http_events")


@pytest.mark.parametrize("mode", ["session", "per-message"])
@pytest.mark.parametrize("kind", ["x25519", "rsa"])
async def test_host_metrics_rows_round_trip(
    nats_url: str, rsa_key: ConsumerKey, kind: str, mode: str
) -> None:
    recording = Recording(HostMetrics(interval=0.05))
    gate = Gate(recording)
    async with (
        make_stack(nats_url, sources=[gate]) as st,
        st.client(key_kind=kind, key_mode=mode) as client,
        client.subscribe(st.cluster, ["host_metrics"], key=_key(kind, rsa_key)) as sub,
    ):
        gate.open()
        rows, batches = await collect_rows(sub, 3)
        assert rows == recording.rows_seen[: len(rows)]
        assert all(r["mem_total"] > 0 and r["procs"] > 0 for r in rows)
        _check_batches(sub, batches, "host_metrics")


@pytest.mark.parametrize("mode", ["session", "per-message"])
@pytest.mark.parametrize("kind", ["x25519", "rsa"])
async def test_json_lines_rows_round_trip(
    nats_url: str, rsa_key: ConsumerKey, tmp_path: Path, kind: str, mode: str
) -> None:
    expected = [
        {"line": i, "msg": f"event {i} ✓", "level": ["info", "warn"][i % 2], "v": i / 7}
        for i in range(120)
    ]
    lines = [json.dumps(r) for r in expected]
    lines.insert(50, '{"nested": {"no": 1}}')  # rejected by the source, never sent
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = JsonLines(path, stream="app_log", batch_rows=32)
    gate = Gate(source)
    async with (
        make_stack(nats_url, sources=[gate]) as st,
        st.client(key_kind=kind, key_mode=mode) as client,
        client.subscribe(st.cluster, ["app_log"], key=_key(kind, rsa_key)) as sub,
    ):
        gate.open()
        rows, batches = await collect_rows(sub, len(expected))
        assert rows == expected
        assert source.rejected == {"nested_value": 1}
        _check_batches(sub, batches, "app_log")


# --- 2. fan-out -----------------------------------------------------------------------------


async def test_fan_out_three_consumers_get_every_row(nats_url: str) -> None:
    """Three consumers (X25519, P-256, and RSA-4096 made by the subscription itself), one
    cluster and stream: each gets every row, in the same order, under its own key."""
    async with (
        make_stack(nats_url) as st,
        st.client(key_kind="x25519") as c1,
        st.client(key_kind="p256") as c2,
        st.client(key_kind="rsa") as c3,
        c1.subscribe(st.cluster, ["records"]) as s1,
        c2.subscribe(st.cluster, ["records"]) as s2,
        c3.subscribe(st.cluster, ["records"]) as s3,
    ):
        subs = [s1, s2, s3]
        assert len({s.session_id for s in subs}) == 3
        assert set(st.agent.sessions) == {s.session_id for s in subs}
        assert len(st.proxy.registry) == 3
        expected = [{"n": i, "payload": f"row-{i}"} for i in range(250)]
        for i in range(0, 250, 25):
            await st.agent.emit("records", expected[i : i + 25])
        results = await asyncio.gather(*(collect_rows(s, len(expected)) for s in subs))
        for sub, (rows, batches) in zip(subs, results, strict=True):
            assert rows == expected
            _check_batches(sub, batches, "records")


# --- 6. a consumer that vanishes --------------------------------------------------------------


async def test_vanished_consumer_expires_and_producer_stops(nats_url: str) -> None:
    keepalive = 1.0  # the least a proxy offers
    source = HttpEvents(rate=200, seed=1)
    async with (
        make_stack(nats_url, sources=[source], keepalive_s=keepalive) as st,
        Tap(nats_url, f"{st.prefix}.cluster.*.data.*") as tap,
        st.client() as stays,
        stays.subscribe(st.cluster, ["http_events"]) as kept,
    ):
        with capture_logs() as logs:
            client = st.client()
            gone = await client.__aenter__()
            sub = gone.subscribe(st.cluster, ["http_events"])
            await sub.__aenter__()
            sid = sub.session_id
            assert sub.keepalive_s == keepalive
            await collect_rows(sub, 1)
            data_subject = st.subjects.data(st.cluster, sid)
            await eventually(lambda: len(tap.on(data_subject)) >= 3)
            # the consumer vanishes: its connection is gone, it never closes the session
            await gone.nc.close()
            vanished = time.monotonic()
            await eventually(lambda: sid not in st.agent.sessions, timeout=5 * keepalive + 2)
            elapsed = time.monotonic() - vanished
            assert sid not in st.proxy.registry
            # not before ~3 keepalive intervals without a keepalive (the last one may have
            # left just before the connection closed)
            assert elapsed >= 1.5 * keepalive
            sent = len(tap.on(data_subject))
            await asyncio.sleep(6 * st.agent.config.batching.max_delay_s)
            assert len(tap.on(data_subject)) == sent
            # the other session is untouched and still served
            rows, _ = await collect_rows(kept, 20)
            assert len(rows) >= 20
            assert kept.session_id in st.agent.sessions
            await sub.aclose()
            await client.__aexit__(None, None, None)
        expired = [e for e in logs if e["event"] == "session.expired"]
        assert [e["session"] for e in expired] == [sid]
        assert kept.stats().rejected == {}


# --- 8. close -------------------------------------------------------------------------------


async def test_closed_subscription_is_forgotten_everywhere(nats_url: str) -> None:
    source = HttpEvents(rate=200, seed=2)
    async with (
        make_stack(nats_url, sources=[source]) as st,
        Tap(nats_url, f"{st.prefix}.cluster.*.data.*") as tap,
        st.client() as client,
    ):
        async with client.subscribe(st.cluster, ["http_events"]) as sub:
            sid = sub.session_id
            assert sid in st.proxy.registry
            assert sid in st.agent.sessions
            await collect_rows(sub, 10)
        # closing waits for the proxy, which waits for the cluster: both forgot it already
        assert sid not in st.proxy.registry
        assert sid not in st.agent.sessions
        assert st.proxy.refused == {}
        subject = st.subjects.data(st.cluster, sid)
        sent = len(tap.on(subject))
        assert sent >= 2
        await asyncio.sleep(6 * st.agent.config.batching.max_delay_s)
        assert len(tap.on(subject)) == sent


# --- 8b. token renewal -----------------------------------------------------------------------


async def test_a_renewed_token_file_keeps_a_session_past_the_first_tokens_expiry(
    nats_url: str, tmp_path: Path
) -> None:
    """Keepalives carry the token read now: a session whose token file is renewed outlives
    the token that opened it, even if a keepalive found the file empty mid-rewrite; one
    opened with the same token as a string ends with it."""
    async with make_stack(nats_url, keepalive_s=1.0, token_leeway_s=0) as st:
        short = mint_token(sub="alice", clusters=[st.cluster], ttl_s=2, secret=st.secret)
        path = tmp_path / "token"
        path.write_text(short + "\n")
        renewed = dataclasses.replace(st.config(), token=TokenFile(path))
        async with (
            Client(renewed, trust=st.trust()) as client,
            client.subscribe(st.cluster, ["records"]) as sub,
            st.client(token=short) as fixed_client,
            fixed_client.subscribe(st.cluster, ["records"]) as fixed,
        ):
            with capture_logs() as logs:
                path.write_text("")  # caught mid-rewrite by the next keepalive: retried
                await eventually(
                    lambda: any(e["event"] == "session.token_unreadable" for e in logs),
                    timeout=2.5,  # before the session's expiry (3 keepalive intervals)
                )
                path.write_text(st.token(sub="alice"))  # a fresh token, same user
                await asyncio.sleep(3.5)  # the first token has expired
            with pytest.raises(SessionError) as err:
                async with asyncio.timeout(5):
                    await anext(fixed)
            assert err.value.code == "ended"
            assert "token expired" in err.value.detail
            await st.agent.emit("records", ROWS)
            rows, _ = await collect_rows(sub, len(ROWS))
            assert rows == ROWS
            assert sub.session_id in st.proxy.registry


# --- 9. producer shutdown -------------------------------------------------------------------


async def test_producer_shutdown_ends_iteration_cleanly(nats_url: str) -> None:
    async with make_stack(nats_url) as st, st.client() as client:
        async with client.subscribe(st.cluster, ["records"]) as sub:
            await st.agent.emit("records", ROWS[:2])
            rows, _ = await collect_rows(sub, 2)
            # rows still in the batcher when the agent stops are flushed before the end
            await st.agent.emit("records", ROWS[2:])
            await st.agent.aclose()
            rest: list[dict[str, Any]] = []
            async with asyncio.timeout(5):
                async for batch in sub:
                    rest.extend(batch.rows)
            assert rows + rest == ROWS
            assert sub.end_reason == "producer stopping"
            assert sub.stats().rejected == {}
            assert st.agent.sessions == {}
            # the consumer, which verified the end, closed the session at once: the proxy,
            # which cannot tell a genuine end, no longer counts it for the user
            assert sub.session_id not in st.proxy.registry
            assert st.proxy.registry.sessions_of("alice") == 0


# --- 4b. a hostile relay writing straight to the inbox -----------------------------------------


def _tamper_ciphertext(envelope: bytes) -> bytes:
    m = msgpack.unpackb(envelope, raw=False)
    parts = m["body"].split(b".")
    ct = bytearray(parts[3])
    ct[0] = ord("A") if ct[0] != ord("A") else ord("B")
    parts[3] = bytes(ct)
    m["body"] = b".".join(parts)
    packed: bytes = msgpack.packb(m, use_bin_type=True)
    return packed


def _forge_next(st: Stack, sid: str) -> bytes:
    """The producer's genuine next envelope for ``sid`` (never published), with its
    ciphertext changed: what a relay that edits traffic in flight would deliver."""
    crypto = st.agent.sessions[sid].crypto
    assert isinstance(crypto, ProducerSession)
    (envelope,) = crypto.seal("records", encode_rows([{"forged": True}]))
    return _tamper_ciphertext(envelope)


async def test_tampered_envelope_on_inbox_is_discarded(nats_url: str) -> None:
    async with (
        make_stack(nats_url) as st,
        st.client(policy="discard") as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        await st.agent.emit("records", ROWS[:1])
        first, _ = await collect_rows(sub, 1)
        forged = _forge_next(st, sub.session_id)
        await client.nc.publish(st.subjects.inbox(sub.session_id), forged)
        await st.agent.emit("records", ROWS[1:])
        rest, batches = await collect_rows(sub, 2)
        assert first + rest == ROWS
        stats = sub.stats()
        assert sum(stats.rejected.values()) == 1
        # the forged envelope took a seq the genuine stream never delivered: one gap
        assert stats.lost == 1
        assert batches[0].lost_before == 1


async def test_tampered_envelope_on_inbox_raises_under_fail_policy(nats_url: str) -> None:
    async with (
        make_stack(nats_url) as st,
        st.client(policy="fail") as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        await st.agent.emit("records", ROWS[:1])
        await collect_rows(sub, 1)
        forged = _forge_next(st, sub.session_id)
        await client.nc.publish(st.subjects.inbox(sub.session_id), forged)
        with pytest.raises(IntegrityError) as err:
            await collect_rows(sub, 1, timeout=5)
        assert type(err.value) is IntegrityError
        assert str(err.value) == "envelope rejected"
        assert sum(sub.stats().rejected.values()) == 1
