"""Hostile input (issue 5): malformed and random payloads on every subject the proxy and the
producer listen on, and on a consumer's inbox, while a legitimate stream runs (the corpus and
the storm are in ``tests/support/hostile.py``). Nothing crashes or hangs; every request gets a
contract error in bounded time; every published input is dropped and counted with a reason, by
the proxy, or by the consumer when the blind proxy had to relay it; the legitimate stream
arrives whole and in order; and the proxy and the producer go on serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jws as jc_jws
from structlog.testing import capture_logs

from consumers import Batch, Subscription
from sealstream import SESSION_STREAM
from sealstream.control import KeptAlive
from sealstream.crypto import ClusterIdentity, ConsumerKey, ConsumerSession, TrustStore
from sealstream.crypto._jose import seal_to_key
from sealstream.jwk import b64u_encode
from tests.support.hostile import (
    ALL_TARGETS,
    API_OPS,
    DATA_TARGETS,
    JSON_VALUES,
    PER_TARGET,
    Outcome,
    Sender,
    Shot,
    Storm,
    check_reply,
    fire,
    hostile_corpus,
    storm,
)
from tests.support.pipeline import Stack, Tap, collect_rows, eventually, fresh_key, make_stack

#: why the proxy drops an envelope (``malformed.<reason>`` for one it cannot decode)
PROXY_REASONS: Final = frozenset(
    {"oversize", "bad_subject", "subject_mismatch", "unknown_session", "wrong_cluster"}
    | {"rate_limited"}  # all at once: the legit session's relay budget runs out
)
#: the attacks on the data subjects that only the proxy's routing can catch, each of which the
#: corpus holds many times: an envelope for another session than its subject's, for a session
#: nobody opened, for the legit session under another cluster, and one that is not msgpack
PROXY_MUST_SEE: Final = ("subject_mismatch", "unknown_session", "wrong_cluster")
#: what the consumer must have refused among what the blind proxy relayed and what was
#: injected on its inbox: key envelopes signed by the attacker (``untrusted_key``), data under
#: a key id it was never given (``unknown_kid``), data encrypted straight to its public key in a
#: session (a downgrade: ``bad_alg``), and payloads that are not envelopes (``malformed``)
CONSUMER_MUST_SEE: Final = ("untrusted_key", "unknown_kid", "bad_alg", "malformed")


def check_storm(run: Storm, stack: Stack, sub: Subscription[Batch], *, at_once: bool) -> None:
    outcome, d, stats = run.outcome, run.delta, run.stats
    n_api, n_control = outcome.count(*API_OPS), outcome.count("control")
    n_data, n_inbox = outcome.count(*DATA_TARGETS), outcome.count("inbox")
    # the whole legitimate stream, in order, nothing lost, dropped or out of place
    assert run.received == run.sent
    assert (stats.lost, stats.gaps, stats.dropped) == (0, 0, 0)
    # every request was answered, refused with a contract code, and counted
    assert len(outcome.replies) == n_api + n_control
    for shot, reply in outcome.replies:
        check_reply(shot, reply)
    assert d.refused == n_api, stack.proxy.refused
    # the opens for streams only the producer knows were forwarded to it (a few in the corpus;
    # all at once, the proxy's pending request limit may refuse them first), and it refused
    # them as it refused every hostile control message
    assert at_once or run.forwarded_opens > 0
    assert d.agent_refused == n_control + run.forwarded_opens, stack.agent.refused
    # every published input was dropped by the proxy with a reason, or relayed...
    assert d.rejected + d.hostile_relayed == n_data
    assert d.rejected == sum(run.proxy_rejected.values())
    reasons = {r.split(".")[0] if r.startswith("malformed.") else r for r in run.proxy_rejected}
    assert reasons <= PROXY_REASONS | {"malformed"}, run.proxy_rejected
    assert {*PROXY_MUST_SEE, "malformed"} <= reasons, run.proxy_rejected
    # ...because it was well formed for the legit session: the relay is blind, so forged
    # envelopes reached the consumer, which refused each of them and everything injected on
    # its inbox, and counted each with its reason
    assert d.hostile_relayed > 0
    assert d.received == d.relayed + n_inbox
    assert sum(stats.rejected.values()) == n_inbox + d.hostile_relayed, stats.rejected
    assert set(CONSUMER_MUST_SEE) <= set(stats.rejected), stats.rejected
    # the legit session is still registered and served
    assert sub.session_id in stack.proxy.registry
    assert list(stack.agent.sessions) == [sub.session_id]


async def still_serving(stack: Stack) -> None:
    """A NEW session opens and receives rows (the producer's batches are flushed on time),
    and the proxy still checks with the cluster that it knows the session (its expiry loop
    runs)."""
    control = stack.subjects.control(stack.cluster)
    async with (
        Tap(stack.nats_url, control) as tap,
        stack.client() as client,
        client.subscribe(stack.cluster, ["records"]) as sub,
    ):
        rows = [{"after": i} for i in range(25)]
        await stack.agent.emit("records", rows)
        got, _ = await collect_rows(sub, 25)
        assert got == rows
        assert sub.stats().rejected == {}

        def pinged() -> bool:
            ops = (msgpack.unpackb(m.data, raw=False) for m in tap.messages)
            return any(op.get("op") == "ping" and sub.session_id in op["sessions"] for op in ops)

        # a session is pinged once it is older than the control timeout (2 s), every 2 s
        await eventually(pinged, timeout=10)


# --- the tests --------------------------------------------------------------------------------

on_the_module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True, slots=True)
class Arena:
    """One stack for the module, the legit consumer's key, and the hostile corpus drawn for
    them (drawing it is the slow part: once per module)."""

    stack: Stack
    legit: ConsumerKey
    shots: list[Shot]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def arena(nats_url: str) -> AsyncIterator[Arena]:
    legit = fresh_key()
    # keepalive every 2 s: the consumer's keepalives and the proxy's expiry loop and cluster
    # pings run during the storms too
    async with make_stack(nats_url, keepalive_s=2.0) as stack:
        shots = hostile_corpus(stack, legit)
        per_target = Counter(s.target for s in shots)
        assert all(per_target[t] >= 0.8 * PER_TARGET for t in ALL_TARGETS), per_target
        yield Arena(stack, legit, shots)


async def _one_by_one(nc: Any, shots: Sequence[Shot], outcome: Outcome) -> None:
    for shot in shots:
        await fire(nc, shot, outcome)


async def _all_at_once(nc: Any, shots: Sequence[Shot], outcome: Outcome) -> None:
    async with asyncio.TaskGroup() as tg:
        for shot in shots:
            tg.create_task(fire(nc, shot, outcome))


async def _survive(arena: Arena, send: Sender, caplog: pytest.LogCaptureFixture) -> None:
    at_once = send is _all_at_once
    stack = arena.stack
    with capture_logs() as events:
        async with (
            stack.client(policy="discard") as client,
            client.subscribe(stack.cluster, ["records"], key=arena.legit) as sub,
        ):
            check_storm(await storm(stack, sub, arena.shots, send), stack, sub, at_once=at_once)
            # the legit session can still be kept alive
            body = {"v": 1, "token": client.token(), "session": sub.session_id}
            kept = await client.request(stack.subjects.api_keepalive, body, KeptAlive)
            assert kept.keepalive_s == stack.proxy.config.keepalive_s
        await still_serving(stack)
    # no exception escaped a NATS callback (nats-py hands those to the error callback, which
    # logs nats.error), and no task died unretrieved (asyncio logs those as errors, and so
    # does a task group whose task fails after its owner's task is done)
    assert [e for e in events if e["event"] == "nats.error"] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@on_the_module_loop
async def test_hostile_inputs_one_by_one_are_refused_and_counted(
    arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    """Each input in turn (each request answered within REPLY_TIMEOUT), while the legit
    stream runs."""
    await _survive(arena, _one_by_one, caplog)


@on_the_module_loop
async def test_hostile_inputs_all_at_once_are_refused_and_counted(
    arena: Arena, caplog: pytest.LogCaptureFixture
) -> None:
    """Every input in flight at once, while the legit stream runs: the proxy's pending
    request limit may refuse some (``limit_exceeded``), none goes unanswered."""
    await _survive(arena, _all_at_once, caplog)


# --- a trust-on-first-use consumer ------------------------------------------------------------


@pytest.fixture(scope="module")
def tofu_parts() -> tuple[ConsumerKey, ClusterIdentity]:
    return fresh_key(), ClusterIdentity.generate()


EMBEDDED_JWKS: Final = st.one_of(
    JSON_VALUES,
    st.dictionaries(st.sampled_from(["kty", "crv", "x", "y", "n", "e"]), JSON_VALUES, max_size=5),
    st.fixed_dictionaries(
        {"kty": st.sampled_from(["OKP", "EC", "RSA", "oct"])},
        optional={"crv": st.sampled_from(["Ed25519", "X25519", "P-256"]), "x": JSON_VALUES},
    ),
)


@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(embedded=EMBEDDED_JWKS)
def test_a_tofu_consumer_rejects_forged_keys_whatever_jwk_they_embed(
    tofu_parts: tuple[ConsumerKey, ClusterIdentity], embedded: Any
) -> None:
    """Before it knows a cluster, a consumer that opted into trust-on-first-use looks at the
    ``jwk`` a key envelope's signature embeds. Anyone holding the consumer's PUBLIC key can
    make such an envelope (a relay can inject it on the inbox): whatever that ``jwk`` is, the
    envelope is rejected and counted, never an exception of another kind."""
    key, attacker = tofu_parts
    consumer = ConsumerSession(key, cluster="c1", trust=TrustStore({}, tofu=True), policy="discard")
    claims = {
        "cluster": "c1",
        "session": key.session_id,
        "kid": "k1",
        "k": b64u_encode(b"k" * 32),
        "iat": 1,
        "epoch": 0,
    }
    header = {"alg": "Ed25519", "kid": "not-its-thumbprint", "jwk": embedded}
    jws = jc_jws.JWS(json.dumps(claims).encode())
    jws.add_signature(attacker._key, alg="Ed25519", protected=json.dumps(header))
    routing = {
        "cluster": "c1",
        "session": key.session_id,
        "stream": SESSION_STREAM,
        "seq": 0,
        "kind": "key",
        "ts": 1,
    }
    body = seal_to_key(
        key.public_jwk,
        {"kid": key.session_id, "cty": "JWT", **routing},
        str(jws.serialize(compact=True)).encode("ascii"),
    )
    envelope = msgpack.packb({"v": 1, **routing, "body": body}, use_bin_type=True)
    assert consumer.accept(envelope) is None
    assert consumer.rejected == {"untrusted_key": 1}
    assert not consumer.keyed
