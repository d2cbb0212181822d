"""Grants (docs/protocol.md, "Grants"): a consumer asks its cluster, through the relay, what
the cluster offers and what its policy grants this identity. Real nats-server, proxy and agent;
the relay's operator is played on the API and control subjects."""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import pytest

from consumers import Client, Grants
from consumers._grants import _checked
from producers import Agent, AuthzPolicy, ProducerConfig
from sealstream import IntegrityError, SessionError, TrustError
from sealstream.crypto import ClusterIdentity, TrustStore, UserIdentity
from sealstream.jwk import b64u_decode, b64u_encode
from tests.support.pipeline import (
    Stack,
    Tap,
    fresh_key,
    identity_whose_id_begins_with,
    make_stack,
)


async def _ask(nc: Any, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(subject, msgpack.packb(body), timeout=5)
    reply = msgpack.unpackb(msg.data, raw=False)
    assert isinstance(reply, dict)
    return reply


def _forbidden(reason: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": "forbidden", "message": reason}}


async def _captured(st: Stack, client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ask for grants while tapping the API and control subjects: the consumer's request and
    the control ``grants`` the relay forwarded."""
    async with Tap(st.nats_url, f"{st.prefix}.>") as tap:
        await client.grants(st.cluster)
        await tap.flush()
    asked = [msgpack.unpackb(m.data, raw=False) for m in tap.on(st.subjects.api_grants)]
    forwarded = [
        msgpack.unpackb(m.data, raw=False) for m in tap.on(st.subjects.control(st.cluster))
    ]
    assert len(asked) == 1
    assert len(forwarded) == 1
    return asked[0], forwarded[0]


async def test_the_cluster_says_what_it_offers_and_grants(nats_url: str) -> None:
    until = int(time.time()) + 3600
    async with make_stack(nats_url, streams=["alpha", "beta", "gamma"]) as st:
        policy, _ = AuthzPolicy().with_key(st.user.public_jwk, ["alpha", "gamma"], until=until)
        policy.save(st.policy_file)
        async with st.client() as client:
            grants = await client.grants(st.cluster)
        assert grants == Grants(
            st.cluster, st.user.kid, ("alpha", "beta", "gamma"), ("alpha", "gamma"), until
        )
        # nothing was opened, on either side
        assert st.agent.sessions == {}
        assert len(st.proxy.registry) == 0


async def test_an_identity_granted_nothing_is_refused_with_the_reason(nats_url: str) -> None:
    async with make_stack(nats_url) as st:
        stranger = UserIdentity.generate()
        async with st.client(identity=stranger) as client:
            with pytest.raises(SessionError) as err:
                await client.grants(st.cluster)
        assert (err.value.code, err.value.detail) == ("forbidden", "key not authorized")
        policy, _ = AuthzPolicy().with_key(st.user.public_jwk, ["records"], until=1)
        policy.save(st.policy_file)
        async with st.client() as client:
            with pytest.raises(SessionError) as err:
                await client.grants(st.cluster)
        assert (err.value.code, err.value.detail) == ("forbidden", "authorization expired")
        assert st.agent.refused == {"forbidden": 2}


async def test_an_identity_id_beginning_with_a_dash_and_a_callout_login(nats_url: str) -> None:
    user = identity_whose_id_begins_with("-")
    async with make_stack(nats_url, user=user) as st, st.client(callout=True) as client:
        grants = await client.grants(st.cluster)
    assert grants.identity == user.kid
    assert grants.identity.startswith("-")
    assert grants.granted == ("records",)


async def test_a_relay_cannot_replay_or_alter_a_grants_request(nats_url: str, nc: Any) -> None:
    """The relay captured a genuine request: replayed (under another user's token, or to the
    control subject directly), altered, or turned into an open, it is refused."""
    async with make_stack(nats_url) as st, st.client() as client:
        asked, forwarded = await _captured(st, client)
        control = st.subjects.control(st.cluster)
        head, body, sig = asked["proof"].split(".")
        claims = json.loads(b64u_decode(body))
        other_cluster = b64u_encode(json.dumps({**claims, "cluster": "c2"}).encode())
        key = fresh_key()
        cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
            # the same request, for another user of the relay: the proof is not theirs
            ({**asked, "token": st.token(sub="bob")}, _forbidden("proof replayed")),
            # the relay's own control request with the captured proof
            ({**forwarded, "user": "mallory"}, _forbidden("proof replayed")),
            ({**forwarded, "proof": f"{head}.{other_cluster}.{sig}"}, _forbidden("bad signature")),
            # a grants proof does not open a session
            (
                {
                    "v": 1,
                    "op": "open",
                    "session": key.session_id,
                    "streams": ["records"],
                    "jwk": key.public_jwk,
                    "key_mode": "session",
                    "zip": False,
                    "user": "mallory",
                    "proof": asked["proof"],
                },
                _forbidden("malformed proof"),
            ),
        ]
        for request, refusal in cases:
            subject = st.subjects.api_grants if "token" in request else control
            assert await _ask(nc, subject, request) == refusal, request
        # an open's proof does not ask for grants
        proof = st.proof(key.public_jwk, ["records"])
        assert await _ask(nc, control, {**forwarded, "proof": proof}) == _forbidden(
            "malformed proof"
        )
        assert st.agent.sessions == {}
        assert st.agent.refused == {"forbidden": len(cases) + 1}


async def test_the_client_checks_the_answer_against_its_request(nats_url: str) -> None:
    """A relay cannot hand back an older answer, nor one signed by a key the store does not
    pin; the answer's claims are bound to the request's jti, cluster and identity."""
    async with make_stack(nats_url) as st, st.client() as client:
        async with Tap(st.nats_url, "_INBOX.>") as tap:
            await client.grants(st.cluster)
            await tap.flush()
        answers = [msgpack.unpackb(m.data, raw=False) for m in tap.messages]
        token = next(a["grants"] for a in answers if isinstance(a, dict) and "grants" in a)
        trust = st.trust()
        jti = json.loads(b64u_decode(token.split(".")[1]))["jti"]
        good = _checked(token, trust, cluster=st.cluster, identity=st.user.kid, jti=jti)
        assert good.granted == ("records",)
        with pytest.raises(IntegrityError):  # an older answer to a newer request
            _checked(token, trust, cluster=st.cluster, identity=st.user.kid, jti="x" * 22)
        with pytest.raises(IntegrityError):  # for another identity
            _checked(token, trust, cluster=st.cluster, identity="-" * 43, jti=jti)
        stranger = TrustStore({st.cluster: [ClusterIdentity.generate().public_jwk]})
        with pytest.raises(TrustError):
            _checked(token, stranger, cluster=st.cluster, identity=st.user.kid, jti=jti)


async def test_a_producer_that_trusts_the_relay_grants_everything_it_offers(
    nats_url: str,
) -> None:
    async with make_stack(nats_url) as st:
        config = ProducerConfig(
            cluster="c8", nats_url=nats_url, prefix=st.prefix, trust_relay_authorization=True
        )
        identity = ClusterIdentity.generate()
        trust = TrustStore({"c8": [identity.public_jwk]})
        async with (
            Agent(config, identity=identity, streams=["b", "a"]),
            st.client(token=st.token(clusters=["c8"]), trust=trust) as client,
        ):
            grants = await client.grants("c8")
    assert grants == Grants("c8", "", ("a", "b"), ("a", "b"), None)
