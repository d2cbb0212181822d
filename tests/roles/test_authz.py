"""Authorization held by the cluster (docs/protocol.md): whoever runs the relay cannot open a
session of its own. The tests play the relay's operator on the cluster's control subject, and
replay, alter and re-use genuine proofs captured on the wire; every refusal is ``forbidden``
with its reason, and no envelope is ever published for a refused session."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from joserfc import jwk as jose_jwk
from joserfc import jws
from structlog.testing import capture_logs

from consumers import Client
from producers import Agent, Authorized, Authorizer, AuthzPolicy, ProducerConfig
from sealstream import SessionError, WireError
from sealstream.control import MAX_PROOF, ControlOpen, decode_open
from sealstream.crypto import PROOF_TYP, ClusterIdentity, ConsumerKey, UserIdentity
from sealstream.crypto._jose import sign_claims
from sealstream.jwk import b64u_encode
from tests.support.pipeline import (
    Stack,
    Tap,
    collect_rows,
    eventually,
    fresh_key,
    identity_whose_id_begins_with,
    make_stack,
)

BIN = Path(sys.executable).parent
ROWS = [{"n": 1, "s": "one"}, {"n": 2, "s": "two"}]
#: no inherited configuration may steer the commands: no context, no default identity or trust
#: store (a configuration directory that does not exist)
_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SEALSTREAM_", "NATS_", "XDG_"))}
_ENV["XDG_CONFIG_HOME"] = "/nonexistent/sealstream-test-config"


class Clock:
    """The producer's clock (Unix seconds), moved by the test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _cli(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=30,
        env=_ENV,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def _ask(nc: Any, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(subject, msgpack.packb(body), timeout=5)
    reply = msgpack.unpackb(msg.data, raw=False)
    assert isinstance(reply, dict)
    return reply


def _forbidden(reason: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": "forbidden", "message": reason}}


def _open_op(key: ConsumerKey, **extra: Any) -> dict[str, Any]:
    """A control ``open`` as a relay sends it, for ``key``."""
    return {
        "v": 1,
        "op": "open",
        "session": key.session_id,
        "streams": ["records"],
        "jwk": key.public_jwk,
        "key_mode": "session",
        "zip": False,
        "user": "mallory",
        **extra,
    }


def _write_policy(st: Stack, policy: AuthzPolicy) -> None:
    policy.save(st.policy_file)


async def _capture_open(
    st: Stack, client: Client, streams: list[str]
) -> tuple[Any, dict[str, Any]]:
    """Open a genuine session while tapping the control subject; the live subscription's
    context and the control ``open`` the relay forwarded for it (proof included)."""
    async with Tap(st.nats_url, st.subjects.control(st.cluster)) as tap:
        sub = client.subscribe(st.cluster, streams)
        await sub.__aenter__()
        await tap.flush()
    forwarded = [msgpack.unpackb(m.data, raw=False) for m in tap.messages]
    opens = [m for m in forwarded if m.get("op") == "open"]
    assert len(opens) == 1
    assert isinstance(opens[0].get("proof"), str), "the relay did not forward the proof"
    return sub, opens[0]


# --- the relay's own key ----------------------------------------------------------------------


async def test_the_relay_cannot_open_a_session_of_its_own(nats_url: str, nc: Any) -> None:
    """The attack of issue 15: the relay's operator sends the cluster an open with a key of
    its own, without a proof or with a proof made for something else."""
    async with make_stack(nats_url) as st:
        control = st.subjects.control(st.cluster)
        keys = [fresh_key() for _ in range(4)]
        other = fresh_key()
        stranger = UserIdentity.generate()  # a valid key the cluster never authorized
        cases: list[tuple[ConsumerKey, dict[str, Any], str]] = [
            (keys[0], {}, "no proof"),
            (
                keys[1],  # a genuine proof, for another session
                {"proof": st.proof(other.public_jwk, ["records"])},
                "proof is for another session",
            ),
            (
                keys[2],  # a genuine proof for this key, made for another cluster
                {
                    "proof": st.user.prove(
                        cluster="c2",
                        session=keys[2].session_id,
                        streams=["records"],
                        key_mode="session",
                    )
                },
                "proof is for another cluster",
            ),
            (
                keys[3],
                {"proof": st.proof(keys[3].public_jwk, ["records"], user=stranger)},
                "key not authorized",
            ),
        ]
        async with Tap(nats_url, st.subjects.data_all) as tap:
            for key, extra, reason in cases:
                assert await _ask(nc, control, _open_op(key, **extra)) == _forbidden(reason)
            assert st.agent.sessions == {}
            await st.agent.emit("records", ROWS * 20)
            # a genuine consumer next: its envelopes reach the tap, so the tap was listening
            async with st.client() as client, client.subscribe(st.cluster, ["records"]) as sub:
                await st.agent.emit("records", ROWS)
                await collect_rows(sub, len(ROWS))
            await tap.flush()
        refused = {k.session_id for k in keys}
        assert tap.messages, "the tap saw nothing at all"
        assert [m for m in tap.messages if m.subject.rsplit(".", 1)[1] in refused] == []
        assert st.agent.refused == {"forbidden": len(cases)}


async def test_a_captured_proof_is_refused_whatever_is_done_with_it(nats_url: str, nc: Any) -> None:
    """A genuine proof taken off the wire: replayed with the relay's key, replayed as is,
    replayed after the window, with other streams, another key mode or compression turned on:
    each refused."""
    clock = Clock()
    async with (
        make_stack(nats_url, streams=["records", "extra"], clock=clock) as st,
        st.client() as client,
    ):
        control = st.subjects.control(st.cluster)
        sub, captured = await _capture_open(st, client, ["records"])
        try:
            relay = fresh_key()
            cases = [
                (
                    {**captured, "session": relay.session_id, "jwk": relay.public_jwk},
                    "proof is for another session",
                ),
                ({**captured, "streams": ["records", "extra"]}, "proof is for other streams"),
                ({**captured, "key_mode": "per-message"}, "proof is for another key mode"),
                # compression makes sizes follow the contents: the relay cannot turn it on
                ({**captured, "zip": True}, "proof is for another zip"),
                (captured, "proof replayed"),
            ]
            async with Tap(nats_url, st.subjects.data(st.cluster, relay.session_id)) as tap:
                for body, reason in cases:
                    assert await _ask(nc, control, body) == _forbidden(reason), reason
                clock.offset = 121.0  # just out of the 120 s window
                assert await _ask(nc, control, captured) == _forbidden("proof expired")
                clock.offset = 0.0
                await st.agent.emit("records", ROWS)
                rows, _ = await collect_rows(sub, len(ROWS))  # the genuine session goes on
                assert rows == ROWS
                await tap.flush()
            assert tap.messages == []
            assert list(st.agent.sessions) == [sub.session_id]
            assert st.agent.refused == {"forbidden": len(cases) + 1}
        finally:
            await sub.aclose()


async def test_a_proof_from_the_future_is_refused(nats_url: str, nc: Any) -> None:
    async with make_stack(nats_url) as st:
        key = fresh_key()
        proof = st.user.prove(
            cluster=st.cluster,
            session=key.session_id,
            streams=["records"],
            key_mode="session",
            now=time.time() + 300,
        )
        reply = await _ask(nc, st.subjects.control(st.cluster), _open_op(key, proof=proof))
        assert reply == _forbidden("proof from the future")


# --- what a key may read ----------------------------------------------------------------------


async def test_a_key_authorized_for_one_stream_cannot_open_another(nats_url: str) -> None:
    async with make_stack(nats_url, streams=["alpha", "beta"]) as st:
        _write_policy(st, AuthzPolicy().with_key(st.user.public_jwk, ["alpha"])[0])
        async with st.client() as client:
            for streams in (["beta"], ["alpha", "beta"]):
                with pytest.raises(SessionError) as err:
                    async with client.subscribe(st.cluster, streams):
                        pass
                assert err.value.code == "forbidden"  # passed on by the proxy, with its reason
                assert err.value.detail == "stream 'beta' not authorized"
            async with client.subscribe(st.cluster, ["alpha"]) as sub:
                await st.agent.emit("alpha", ROWS)
                await st.agent.emit("beta", [{"secret": 1}])
                rows, _ = await collect_rows(sub, len(ROWS))
                assert rows == ROWS
        assert st.agent.refused == {"forbidden": 2}
        assert st.proxy.refused == {"forbidden": 2}


async def test_an_expired_authorization_opens_nothing(nats_url: str) -> None:
    async with make_stack(nats_url) as st:
        until = int(time.time()) - 1
        _write_policy(st, AuthzPolicy().with_key(st.user.public_jwk, ["records"], until=until)[0])
        async with st.client() as client:
            with pytest.raises(SessionError) as err:
                async with client.subscribe(st.cluster, ["records"]):
                    pass
        assert (err.value.code, err.value.detail) == ("forbidden", "authorization expired")
        assert st.agent.sessions == {}


async def test_without_an_identity_a_consumer_is_refused(nats_url: str) -> None:
    async with make_stack(nats_url) as st:
        config = dataclasses.replace(st.config(), identity=None)
        async with Client(config, trust=st.trust()) as client:
            with pytest.raises(SessionError) as err:
                async with client.subscribe(st.cluster, ["records"]):
                    pass
        assert (err.value.code, err.value.detail) == ("forbidden", "no proof")


# --- revocation -------------------------------------------------------------------------------


async def test_revoke_ends_a_live_session_with_an_authenticated_end(nats_url: str) -> None:
    """``sealstream-producer authorize revoke`` on the policy file: the live session ends with
    an ``end`` envelope whose reason is "revoked" (at the next ping), and no new open works.
    The reader's id begins with ``-`` on purpose (one in 64 does): the command takes it as
    the value of ``--thumbprint``, not as an option."""
    async with (
        make_stack(nats_url, keepalive_s=1.0, user=identity_whose_id_begins_with("-")) as st,
        st.client() as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        await st.agent.emit("records", ROWS)
        await collect_rows(sub, len(ROWS))
        done = await asyncio.to_thread(
            _cli,
            "sealstream-producer",
            "authorize",
            "revoke",
            "--policy-file",
            st.policy_file,
            "--thumbprint",
            st.user.kid,
        )
        assert done.returncode == 0, done.stderr
        async with asyncio.timeout(20):
            async for _batch in sub:
                pass
        assert sub.end_reason == "revoked"
        assert st.agent.sessions == {}
        with pytest.raises(SessionError) as err:
            async with client.subscribe(st.cluster, ["records"]):
                pass
        assert (err.value.code, err.value.detail) == ("forbidden", "key not authorized")


async def test_revocation_does_not_wait_for_the_relay(nats_url: str) -> None:
    """A relay that never pings (keepalive 60 s: no ping during the test) cannot keep a
    revoked reader's session served: the agent re-reads its policy by itself."""
    async with (
        make_stack(nats_url, keepalive_s=60.0) as st,
        st.client() as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        await st.agent.emit("records", ROWS)
        await collect_rows(sub, len(ROWS))
        _write_policy(st, AuthzPolicy())  # the reader's key revoked
        async with asyncio.timeout(15):
            async for _batch in sub:
                pass
        assert sub.end_reason == "revoked"
        assert st.agent.sessions == {}


async def test_an_authorization_that_expires_ends_its_live_session(nats_url: str) -> None:
    clock = Clock()
    async with make_stack(nats_url, keepalive_s=1.0, clock=clock) as st:
        until = int(time.time()) + 60
        _write_policy(st, AuthzPolicy().with_key(st.user.public_jwk, ["records"], until=until)[0])
        async with st.client() as client, client.subscribe(st.cluster, ["records"]) as sub:
            await st.agent.emit("records", ROWS)
            await collect_rows(sub, len(ROWS))
            clock.offset = 61.0
            async with asyncio.timeout(20):
                async for _batch in sub:
                    pass
            assert sub.end_reason == "revoked"


# --- the issuer path --------------------------------------------------------------------------


def _issuer_token(issuer: jose_jwk.OKPKey, claims: dict[str, Any]) -> str:
    header = {"alg": "Ed25519", "typ": "JWT", "kid": issuer.thumbprint()}
    payload = json.dumps(claims).encode("utf-8")
    return str(jws.serialize_compact(header, payload, issuer, algorithms=["Ed25519"]))


async def test_an_issuer_token_authorizes_only_the_key_it_names(nats_url: str) -> None:
    """A team's own issuer vouches for user key K (``cnf.jkt``): K reads; K' with K's token
    does not, nor does K without a token; when the issuer is revoked, K's session ends."""
    async with make_stack(nats_url, keepalive_s=1.0) as st:
        issuer = jose_jwk.OKPKey.generate_key("Ed25519")
        policy, _ = AuthzPolicy().with_issuer(issuer.as_dict(private=False), name="team")
        _write_policy(st, policy)
        k, k2 = UserIdentity.generate(), UserIdentity.generate()
        token = _issuer_token(
            issuer,
            {
                "cnf": {"jkt": k.kid},
                "streams": ["records"],
                "exp": int(time.time()) + 600,
                "aud": st.cluster,
            },
        )
        for identity, authz, reason in (
            (k2, token, "issuer token is for another key"),
            (k, None, "key not authorized"),
        ):
            config = dataclasses.replace(st.config(identity=identity), authz=authz)
            async with Client(config, trust=st.trust()) as client:
                with pytest.raises(SessionError) as err:
                    async with client.subscribe(st.cluster, ["records"]):
                        pass
            assert (err.value.code, err.value.detail) == ("forbidden", reason)
        config = dataclasses.replace(st.config(identity=k), authz=token)
        async with (
            Client(config, trust=st.trust()) as client,
            client.subscribe(st.cluster, ["records"]) as sub,
        ):
            await st.agent.emit("records", ROWS)
            rows, _ = await collect_rows(sub, len(ROWS))
            assert rows == ROWS
            _write_policy(st, AuthzPolicy())  # the issuer is no longer trusted
            async with asyncio.timeout(20):
                async for _batch in sub:
                    pass
            assert sub.end_reason == "revoked"


# --- an outside implementation ----------------------------------------------------------------


async def test_a_proof_made_with_joserfc_from_the_contract_opens_a_session(
    nats_url: str, nc: Any, tmp_path: Path
) -> None:
    """An independent client: its identity key and proof made with joserfc from
    docs/protocol.md alone, the key authorized through the CLI; the open is served and the
    cluster's key envelope arrives on the inbox."""
    async with make_stack(nats_url) as st:
        identity = jose_jwk.OKPKey.generate_key("Ed25519")
        public = identity.as_dict(private=False)
        jwk_file = tmp_path / "user.pub.jwk"
        jwk_file.write_text(json.dumps(public), encoding="utf-8")
        added = await asyncio.to_thread(
            _cli,
            "sealstream-producer",
            "authorize",
            "add",
            "--policy-file",
            st.policy_file,
            "--jwk-file",
            jwk_file,
            "--stream",
            "records",
        )
        assert added.returncode == 0, added.stderr
        session_key = jose_jwk.OKPKey.generate_key("X25519")
        session_jwk = session_key.as_dict(private=False)
        session = session_key.thumbprint()  # RFC 7638, as the contract says
        header = {
            "alg": "Ed25519",
            "typ": "sealstream-open+jwt",
            "kid": identity.thumbprint(),
            "jwk": public,
        }
        claims = {
            "cluster": st.cluster,
            "session": session,
            "streams": ["records"],
            "key_mode": "session",
            "iat": int(time.time()),
            "jti": b64u_encode(os.urandom(16)),
        }
        proof = jws.serialize_compact(
            header, json.dumps(claims).encode(), identity, algorithms=["Ed25519"]
        )
        inbox = await nc.subscribe(st.subjects.inbox(session))
        await nc.flush()
        body = {
            "v": 1,
            "token": st.token(),
            "cluster": st.cluster,
            "streams": ["records"],
            "jwk": session_jwk,
            "key_mode": "session",
            "proof": proof,
        }
        msg = await nc.request(st.subjects.api_open, msgpack.packb(body), timeout=5)
        reply = msgpack.unpackb(msg.data, raw=False)
        assert reply["ok"] is True, reply
        assert reply["session"] == session
        first = msgpack.unpackb((await inbox.next_msg(timeout=5)).data, raw=False)
        assert (first["kind"], first["session"], first["seq"]) == ("key", session, 0)


# --- the commands and the producer's start --------------------------------------------------


def test_identity_create_and_authorize_add_list_revoke(tmp_path: Path) -> None:
    identity_file = tmp_path / "me" / "identity.jwk"
    made = _cli("sealstream-consume", "identity", "create", "--file", identity_file)
    assert made.returncode == 0, made.stderr
    public = json.loads(made.stdout)
    assert set(public) == {"crv", "kty", "x"}  # the public key only
    assert stat.S_IMODE(identity_file.stat().st_mode) == 0o600
    kid = UserIdentity.load(identity_file).kid
    assert kid in made.stderr
    again = _cli("sealstream-consume", "identity", "create", "--file", identity_file)
    assert again.returncode == 2, "an identity is never overwritten"
    shown = _cli("sealstream-consume", "identity", "show", "--file", identity_file)
    assert json.loads(shown.stdout) == public

    key_file = tmp_path / "cluster-key.jwk"
    ClusterIdentity.load_or_create(key_file)
    public_file = tmp_path / "me.pub.jwk"
    public_file.write_text(made.stdout, encoding="utf-8")
    added = _cli(
        "sealstream-producer",
        "authorize",
        "add",
        "--key-file",
        key_file,
        "--jwk-file",
        public_file,
        "--stream",
        "http_events",
        "--stream",
        "host_metrics",
        "--until",
        "2099-01-01T00:00:00Z",
        "--name",
        "alice",
    )
    assert added.returncode == 0, added.stderr
    policy_file = tmp_path / "authorized.json"  # beside the cluster key
    assert stat.S_IMODE(policy_file.stat().st_mode) == 0o600
    grant = AuthzPolicy.load(policy_file).keys[kid]
    assert grant.streams == {"http_events", "host_metrics"}
    assert grant.until == 4070908800
    listed = _cli("sealstream-producer", "authorize", "list", "--key-file", key_file)
    assert listed.stdout.split("\t")[:4] == ["key", kid, "alice", "host_metrics,http_events"]
    private = _cli(
        "sealstream-producer",
        "authorize",
        "add",
        "--key-file",
        key_file,
        "--jwk-file",
        identity_file,  # the private key: refused
        "--stream",
        "http_events",
    )
    assert private.returncode == 2
    assert "private" in private.stderr
    revoked = _cli(
        "sealstream-producer",
        "authorize",
        "revoke",
        "--key-file",
        key_file,
        "--jwk-file",
        public_file,
    )
    assert revoked.returncode == 0, revoked.stderr
    assert AuthzPolicy.load(policy_file).keys == {}
    unknown = _cli(
        "sealstream-producer", "authorize", "revoke", "--key-file", key_file, "--thumbprint", kid
    )
    assert unknown.returncode == 2
    issuer = jose_jwk.OKPKey.generate_key("Ed25519")
    issuer_file = tmp_path / "issuer.pub.jwk"
    issuer_file.write_text(json.dumps(issuer.as_dict(private=False)), encoding="utf-8")
    trusted = _cli(
        "sealstream-producer",
        "authorize",
        "add-issuer",
        "--key-file",
        key_file,
        "--jwk-file",
        issuer_file,
        "--name",
        "team",
        "--until",
        "4070908800",
    )
    assert trusted.returncode == 0, trusted.stderr
    assert AuthzPolicy.load(policy_file).issuers[issuer.thumbprint()].until == 4070908800
    listed = _cli("sealstream-producer", "authorize", "list", "--key-file", key_file)
    assert listed.stdout.split("\t")[:3] == ["issuer", issuer.thumbprint(), "team"]


def test_authorize_add_adds_streams_and_set_replaces_them(tmp_path: Path) -> None:
    """Granting more never revokes: ``add`` keeps the grant's streams, expiry and name and
    says what it now holds; ``set`` replaces them."""
    key_file = tmp_path / "cluster-key.jwk"
    ClusterIdentity.load_or_create(key_file)
    reader = UserIdentity.generate()
    public_file = tmp_path / "reader.pub.jwk"
    public_file.write_text(json.dumps(reader.public_jwk), encoding="utf-8")
    policy_file = tmp_path / "authorized.json"

    def authorize(action: str, *more: str) -> subprocess.CompletedProcess[str]:
        args = ["--key-file", str(key_file), "--jwk-file", str(public_file), *more]
        return _cli("sealstream-producer", "authorize", action, *args)

    first = authorize("add", "--stream", "http_events", "--name", "k", "--until", "4070908800")
    assert first.returncode == 0, first.stderr
    more = authorize("add", "--stream", "orders", "--stream", "host_metrics")
    assert more.stdout == (
        f"authorized {reader.kid} for host_metrics, orders "
        f"(now: host_metrics, http_events, orders) in {policy_file}\n"
    )
    grant = AuthzPolicy.load(policy_file).keys[reader.kid]
    assert (set(grant.streams), grant.until, grant.name) == (
        {"http_events", "host_metrics", "orders"},
        4070908800,
        "k",
    )
    replaced = authorize("set", "--stream", "orders")
    assert replaced.stdout.endswith(f"(now: orders) in {policy_file}\n"), replaced.stdout
    grant = AuthzPolicy.load(policy_file).keys[reader.kid]
    assert (set(grant.streams), grant.until, grant.name) == ({"orders"}, None, "k")


async def test_a_producer_without_a_policy_refuses_to_start(nats_url: str, tmp_path: Path) -> None:
    config = ProducerConfig(cluster="c9", nats_url=nats_url, key_file=tmp_path / "k.jwk")
    ClusterIdentity.load_or_create(config.key_file)
    with pytest.raises(ValueError, match="--trust-relay-authorization"):
        async with Agent(config, streams=["records"]):
            pass
    done = await asyncio.to_thread(
        _cli,
        "sealstream-producer",
        "--cluster",
        "c9",
        "--nats-url",
        nats_url,
        "--key-file",
        tmp_path / "k.jwk",
    )
    assert done.returncode == 2
    assert "error: no authorization policy" in done.stderr
    assert "Traceback" not in done.stderr


async def test_trusting_the_relay_is_explicit_and_warned(nats_url: str, nc: Any) -> None:
    async with make_stack(nats_url) as st:
        config = ProducerConfig(
            cluster="c8",
            nats_url=nats_url,
            prefix=st.prefix,
            trust_relay_authorization=True,
        )
        with capture_logs() as logs:
            async with Agent(config, identity=ClusterIdentity.generate(), streams=["records"]):
                key = fresh_key()
                reply = await _ask(nc, st.subjects.control("c8"), _open_op(key))
                assert reply == {"ok": True}  # Pixie's model: the relay's word is enough
        assert any(e["event"] == "producer.trusting_relay" for e in logs)
        assert any(e["log_level"] == "warning" for e in logs if e["event"].endswith("relay"))


async def test_the_policy_is_read_again_when_it_changes(nats_url: str) -> None:
    """A key added while the producer runs opens at once; a policy file that is no longer
    valid JSON authorizes nothing."""
    async with make_stack(nats_url) as st:
        newcomer = UserIdentity.generate()
        policy = AuthzPolicy.load(st.policy_file)
        _write_policy(st, policy.with_key(newcomer.public_jwk, ["records"])[0])
        async with (
            st.client(identity=newcomer) as client,
            client.subscribe(st.cluster, ["records"]),
        ):
            pass
        st.policy_file.write_text("{not json", encoding="utf-8")
        async with st.client() as client:
            with pytest.raises(SessionError) as err:
                async with client.subscribe(st.cluster, ["records"]):
                    pass
        assert (err.value.code, err.value.detail) == ("forbidden", "key not authorized")
        await eventually(lambda: st.agent.sessions == {})


def test_the_open_request_carries_proof_and_authz_as_capped_strings() -> None:
    key = fresh_key()
    base = {
        "v": 1,
        "token": "t",
        "cluster": "c1",
        "streams": ["records"],
        "jwk": key.public_jwk,
        "key_mode": "session",
    }
    req = decode_open({**base, "proof": "p.r.f", "authz": "a.b.c"})
    assert (req.proof, req.authz) == ("p.r.f", "a.b.c")
    assert req.forwarded() == {"proof": "p.r.f", "authz": "a.b.c"}
    assert decode_open(req.to_map()) == req
    assert decode_open(base).forwarded() == {}
    for bad in (b"p.r.f", 5, None, "", "x" * (MAX_PROOF + 1)):
        with pytest.raises(WireError):
            decode_open({**base, "proof": bad})
        with pytest.raises(WireError):
            decode_open({**base, "authz": bad})


# --- the checks one by one (the pure part) ----------------------------------------------------


def _forged(claims: dict[str, Any], kid: str, signer: jose_jwk.OKPKey, **header: Any) -> str:
    protected = {"alg": "Ed25519", "typ": "sealstream-open+jwt", "kid": kid, **header}
    payload = json.dumps(claims).encode("utf-8")
    return str(jws.serialize_compact(protected, payload, signer, algorithms=["Ed25519"]))


def test_each_check_of_a_proof_refuses_with_its_reason(tmp_path: Path) -> None:
    user = UserIdentity.generate()
    policy_file = tmp_path / "authorized.json"
    AuthzPolicy().with_key(user.public_jwk, ["records"])[0].save(policy_file)
    authz = Authorizer(policy_file, cluster="c1", max_jti=3)
    assert authz.refresh()
    assert not authz.refresh()  # unchanged: not read again
    now = time.time()
    key = fresh_key()
    good = {
        "cluster": "c1",
        "session": key.session_id,
        "streams": ["records"],
        "key_mode": "session",
        "iat": int(now),
        "jti": b64u_encode(os.urandom(16)),
    }
    mallory = jose_jwk.OKPKey.generate_key("Ed25519")

    def check(proof: str | None, at: float = now) -> object:
        """What the open is answered: Authorized, or the reason it is refused."""
        request = ControlOpen(
            key.session_id, ("records",), key.public_jwk, "session", False, "u", proof
        )
        try:
            return authz.check(request, now=at)
        except SessionError as exc:
            return exc.detail if exc.code == "forbidden" else exc

    cases = {
        "bad signature": _forged(good, user.kid, mallory),  # the authorized kid, another key
        "malformed proof": _forged(good, user.kid, mallory, typ="JWT"),
        "malformed claims": user.prove(
            cluster="c1",
            session=key.session_id,
            streams=["records"],
            key_mode="session",
            jti="short",
        ),
    }
    for reason, proof in cases.items():
        assert check(proof) == reason
    assert check("not a jws") == "malformed proof"
    extra = sign_claims(user, {**good, "admin": True}, typ=PROOF_TYP).decode("ascii")
    assert check(extra) == "malformed claims"  # exactly the six claims
    assert check(_forged(good, mallory.thumbprint(), mallory)) == "key not authorized"
    accepted = check(
        user.prove(cluster="c1", session=key.session_id, streams=["records"], key_mode="session")
    )
    assert isinstance(accepted, Authorized)
    assert accepted.identity == user.kid
    assert authz.allows(accepted, frozenset({"records"}), now)
    assert not authz.allows(accepted, frozenset({"records", "other"}), now)
    # a full replay cache refuses rather than forgets
    for _ in range(2):
        proof = user.prove(
            cluster="c1", session=key.session_id, streams=["records"], key_mode="session"
        )
        assert isinstance(check(proof), Authorized)
    last = user.prove(cluster="c1", session=key.session_id, streams=["records"], key_mode="session")
    assert check(last) == "too many opens"
    assert isinstance(check(last, at=now + 121), str)  # out of the window: expired anyway
    # the policy file gone: nothing is authorized, live sessions included
    policy_file.unlink()
    assert authz.refresh()
    assert not authz.allows(accepted, frozenset({"records"}), now)
    fresh = user.prove(
        cluster="c1", session=key.session_id, streams=["records"], key_mode="session"
    )
    assert check(fresh) == "key not authorized"
