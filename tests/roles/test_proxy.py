"""The blind proxy on a real nats-server: it never sees plaintext, keys or tokens in what it
logs, drops what does not belong to a session, refuses what it must, and survives garbage."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from broker_proxy import Limits, Proxy, ProxyConfig
from broker_proxy._core import ProxyCore
from broker_proxy._liveness import Liveness
from consumers import Client, ClientConfig
from producers import Agent, HttpEvents, ProducerConfig
from sealstream import SessionError, Subjects, TrustError, WireError, mint_token
from sealstream.control import KEEPALIVE_MAX_S, KEEPALIVE_MIN_S, MAX_PING, OpenRequest
from sealstream.crypto import ClusterIdentity, ConsumerKey, KeyKind, TrustStore
from sealstream.jwk import b64u_encode, thumbprint
from sealstream.nats import NatsAuth, settle
from sealstream.wire import (
    Envelope,
    Notice,
    decode_inbox,
    encode_envelope,
    encode_map,
)
from tests.support.pipeline import (
    CLUSTER,
    FAST_BATCHING,
    Stack,
    Tap,
    collect_rows,
    contains_marker,
    eventually,
    fresh_key,
    make_stack,
)

ROWS = [{"n": 1, "s": "one"}, {"n": 2, "s": "two"}]


def _private_d(key: ConsumerKey) -> str:
    d = key._key.export_private(as_dict=True)["d"]
    assert isinstance(d, str)
    assert len(d) >= 32
    return d


def _marker_rows(marker: str, n: int) -> list[dict[str, Any]]:
    return [
        {"i": i, "secret": marker, f"col_{marker}": i, "note": f"before {marker} after"}
        for i in range(n)
    ]


# --- 3. blindness ----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "mode"), [("x25519", "session"), ("rsa", "per-message")])
async def test_no_byte_on_the_wire_or_in_the_logs_reveals_rows(
    nats_url: str, kind: KeyKind, mode: str
) -> None:
    """A tap on every subject (api, control, data, inboxes, ``_INBOX.>`` replies) records
    every byte of a session; a unique marker in the rows appears in none of it, nor in any log
    line of the process (the proxy's included), and neither do the token nor the key's ``d``."""
    marker = f"mk{secrets.token_hex(16)}"
    key = fresh_key(kind)
    d = _private_d(key)
    with capture_logs() as logs:
        async with Tap(nats_url) as tap, make_stack(nats_url) as st:
            token = st.token()
            async with (
                st.client(token=token, key_mode=mode) as client,
                client.subscribe(st.cluster, ["records"], key=key) as sub,
            ):
                sent = _marker_rows(marker, 30)
                for i in range(0, 30, 10):
                    await st.agent.emit("records", sent[i : i + 10])
                rows, _ = await collect_rows(sub, 30)
                assert rows == sent  # the consumer, and only it, reads the marker
                sid = sub.session_id
            await tap.flush()
    subjects = {m.subject for m in tap.messages}
    s = st.subjects
    for seen in (s.api_open, s.api_close, s.control(st.cluster), s.data(st.cluster, sid)):
        assert seen in subjects
    assert s.inbox(sid) in subjects
    assert any(subject.startswith("_INBOX.") for subject in subjects)  # replies were tapped
    # the proxy forwarded every envelope byte for byte (key, data and end alike)
    relayed = [m.data for m in tap.on(s.inbox(sid))]
    assert relayed == [m.data for m in tap.on(s.data(st.cluster, sid))]
    assert len(relayed) >= 1
    for m in tap.messages:
        assert not contains_marker(m.data, marker), m.subject
        assert d.encode() not in m.data, m.subject
    lines = [repr(entry) for entry in logs]
    # the proxy logged this session (so its log lines were captured)...
    assert any(e["event"] == "session.opened" and e.get("user") == "alice" for e in logs)
    assert any(e["event"] == "proxy.started" for e in logs)
    # ...and none of the lines of any component holds a secret
    signature = token.rsplit(".", 1)[1]
    for line in lines:
        assert marker not in line
        assert token not in line
        assert signature not in line
        assert d not in line


def _script(name: str) -> Path:
    return Path(sys.executable).parent / name


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


async def _wait_for_line(path: Path, needle: str, proc: Any, within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while needle not in (text := await asyncio.to_thread(_text, path)):
            assert proc.returncode is None, text
            await asyncio.sleep(0.05)


async def test_proxy_subprocess_debug_log_holds_no_secrets(nats_url: str, tmp_path: Path) -> None:
    """The proxy as a real process (``python -m broker_proxy --log-level debug``): its whole
    stderr holds neither the marker, nor the token, nor the consumer's private key."""
    marker = f"mk{secrets.token_hex(16)}"
    prefix = f"t{secrets.token_hex(4)}"
    subjects = Subjects(prefix)
    secret_file = tmp_path / "token-secret"
    secret_file.write_bytes(secrets.token_hex(32).encode("ascii") + b"\n")
    secret = secret_file.read_bytes().rstrip(b"\n")
    log_path = tmp_path / "proxy.log"
    identity = ClusterIdentity.generate()
    key = fresh_key("x25519")
    d = _private_d(key)
    token = mint_token(sub="alice", clusters=[CLUSTER], secret=secret)
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker_proxy",
            "--nats-url",
            nats_url,
            "--prefix",
            prefix,
            "--log-level",
            "debug",
            env={**os.environ, "SEALSTREAM_TOKEN_SECRET_FILE": str(secret_file)},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        await _wait_for_line(log_path, "proxy.started", proc)
        config = ProducerConfig(  # about the proxy's log: the cluster takes the relay's word
            cluster=CLUSTER,
            nats_url=nats_url,
            prefix=prefix,
            batching=FAST_BATCHING,
            trust_relay_authorization=True,
        )
        client_config = ClientConfig(
            nats_url=nats_url,
            nats_auth=NatsAuth("test-consumer", "unused"),  # one shared connection
            prefix=prefix,
            token=token,
            request_timeout_s=5.0,
        )
        trust = TrustStore({CLUSTER: [identity.public_jwk]})
        async with (
            Agent(config, identity=identity, streams=["records"]) as agent,
            Client(client_config, trust=trust) as client,
        ):
            async with client.subscribe(CLUSTER, ["records"], key=key) as sub:
                sent = _marker_rows(marker, 20)
                await agent.emit("records", sent)
                rows, _ = await collect_rows(sub, 20)
                assert rows == sent
                # a forged envelope, so that the proxy's DEBUG path logs too
                await client.nc.publish(subjects.data(CLUSTER, sub.session_id), b"\x00garbage")
                await client.nc.flush()
                await _wait_for_line(log_path, "envelope.rejected", proc)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log_path.read_text(encoding="utf-8")
    assert "session.opened" in text
    assert key.session_id in text
    assert "proxy.stopped" in text
    assert "Traceback" not in text
    assert marker not in text
    assert token not in text
    assert token.rsplit(".", 1)[1] not in text
    assert d not in text
    assert secret.decode("ascii") not in text


# --- 11. blindness is structural ---------------------------------------------------------------


def test_importing_the_proxy_loads_no_decryption_code() -> None:
    code = (
        "import broker_proxy, broker_proxy._cli, sys; "
        "print(sorted(m for m in sys.modules if m.startswith(('jwcrypto', 'sealstream'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    modules = ast.literal_eval(out.stdout.strip())
    assert isinstance(modules, list)
    assert "sealstream.tokens" in modules  # the probe sees sealstream's modules...
    assert "jwcrypto.jws" in modules  # ...and jwcrypto's (tokens are JWS)
    assert "jwcrypto.jwe" not in modules
    assert "jwcrypto.jwt" not in modules
    assert not [
        m for m in modules if m == "sealstream.crypto" or m.startswith("sealstream.crypto.")
    ]


# --- 4a. forged envelopes on cluster data subjects -------------------------------------------


def _repack(payload: bytes, **changes: Any) -> bytes:
    m = msgpack.unpackb(payload, raw=False)
    m.update(changes)
    packed: bytes = msgpack.packb(m, use_bin_type=True)
    return packed


async def test_forged_envelopes_on_data_subjects_are_dropped_and_counted(
    nats_url: str, nc: Any
) -> None:
    async with (
        make_stack(nats_url, limits=Limits(envelope_bytes=64 * 1024)) as st,
        Tap(nats_url, f"{st.prefix}.cluster.*.data.*") as tap,
        st.client(policy="fail") as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        sid = sub.session_id
        s = st.subjects
        await st.agent.emit("records", ROWS[:1])
        first, _ = await collect_rows(sub, 1)
        genuine = tap.on(s.data(st.cluster, sid))[-1].data
        other = fresh_key().session_id  # a well-formed session id the proxy does not know
        relayed = st.proxy.relayed
        forged: list[tuple[str, bytes, str]] = [
            # this session's genuine envelope, on another session's subject
            (s.data(st.cluster, other), genuine, "subject_mismatch"),
            # header names another cluster than the subject
            (s.data(st.cluster, sid), _repack(genuine, cluster="c2"), "subject_mismatch"),
            # header names another session than the subject
            (s.data(st.cluster, sid), _repack(genuine, session=other), "subject_mismatch"),
            # consistent, but for a session nobody opened
            (s.data(st.cluster, other), _repack(genuine, session=other), "unknown_session"),
            # consistent, but from a cluster this session was not opened on
            (s.data("c2", sid), _repack(genuine, cluster="c2"), "wrong_cluster"),
            (s.data(st.cluster, sid), b"\xc1 not msgpack at all", "malformed.not_msgpack"),
            (s.data(st.cluster, sid), msgpack.packb({"v": 1}), "malformed.missing_key"),
            (s.data(st.cluster, sid), b"\x00" * (100 * 1024), "oversize"),
            (f"{st.prefix}.cluster.{st.cluster}.data.not-a-session", genuine, "bad_subject"),
        ]
        for subject, payload, _ in forged:
            await nc.publish(subject, payload)
        await nc.flush()
        expected = Counter(reason for _, _, reason in forged)
        await eventually(lambda: st.proxy.rejected == expected)
        assert st.proxy.relayed == relayed
        # the genuine stream goes on, and the consumer never saw a forgery
        await st.agent.emit("records", ROWS[1:])
        rest, batches = await collect_rows(sub, 1)
        assert first + rest == ROWS
        stats = sub.stats()
        assert stats.rejected == {}
        assert stats.gaps == 0
        assert all(b.lost_before == 0 for b in batches)
        assert st.proxy.rejected == expected


# --- 5. refused sessions ---------------------------------------------------------------------


async def _refused(st: Stack, token: str, cluster: str) -> SessionError:
    async with st.client(token=token) as client:
        with pytest.raises(SessionError) as err:
            async with asyncio.timeout(10), client.subscribe(cluster, ["records"], retry_s=0):
                pass
    assert len(st.proxy.registry) == 0
    assert st.agent.sessions == {}
    return err.value


async def test_bad_token_is_unauthorized(nats_url: str) -> None:
    async with make_stack(nats_url) as st:
        other_secret = secrets.token_bytes(32)
        forged = mint_token(sub="alice", clusters=[st.cluster], secret=other_secret)
        for token in (forged, "not-a-token", ""):
            err = await _refused(st, token, st.cluster)
            assert err.code == "unauthorized"
            assert not err.retriable
        assert st.proxy.refused == {"unauthorized": 3}


async def test_expired_token_is_unauthorized(nats_url: str) -> None:
    async with make_stack(nats_url) as st:
        expired = mint_token(
            sub="alice", clusters=[st.cluster], ttl_s=60, secret=st.secret, now=time.time() - 3600
        )
        err = await _refused(st, expired, st.cluster)
        assert err.code == "unauthorized"
        assert "expired" in err.detail
        assert st.proxy.refused == {"unauthorized": 1}


async def test_token_without_the_cluster_is_forbidden(nats_url: str) -> None:
    async with make_stack(nats_url) as st:
        err = await _refused(st, st.token(clusters=["another"]), st.cluster)
        assert err.code == "forbidden"
        assert st.proxy.refused == {"forbidden": 1}


async def test_a_keepalive_with_a_token_that_lost_the_cluster_is_forbidden(
    nats_url: str, nc: Any
) -> None:
    """A renewed token decides whether the session goes on: without the session's cluster
    its keepalive is refused (and the session expires); the user may still close it."""
    async with (
        make_stack(nats_url) as st,
        st.client() as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        s = st.subjects

        def ref(token: str) -> bytes:
            return encode_map({"v": 1, "token": token, "session": sub.session_id})

        narrowed = st.token(clusters=["another"])
        refused = await _ask(nc, s.api_keepalive, ref(narrowed))
        assert refused["ok"] is False
        assert refused["error"]["code"] == "forbidden"
        assert (await _ask(nc, s.api_keepalive, ref(st.token())))["ok"] is True
        assert (await _ask(nc, s.api_close, ref(narrowed)))["ok"] is True
        assert sub.session_id not in st.proxy.registry
        assert st.proxy.refused == {"forbidden": 1}


async def test_unknown_cluster_is_unavailable(nats_url: str) -> None:
    async with make_stack(nats_url) as st:
        err = await _refused(st, st.token(clusters=["*"]), "nobody-home")
        assert err.code == "cluster_unavailable"
        assert err.retriable
        assert st.proxy.refused == {"cluster_unavailable": 1}


async def test_untrusted_cluster_key_raises_trust_error(nats_url: str) -> None:
    async with (
        make_stack(nats_url) as st,
        st.client(trust=TrustStore()) as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        await st.agent.emit("records", ROWS)
        with pytest.raises(TrustError) as err:
            await collect_rows(sub, 1, timeout=20)  # at the key deadline (5 s here)
        said = str(err.value)
        assert "no key envelope signed by a key pinned" in said
        assert "1 refused" in said
        assert "'sealstream-producer key'" in said
        assert st.identity.kid not in said  # never an invitation to pin what a session offered
        assert sub.stats().rows == 0  # nothing was accepted from an unverified cluster
        # the key ignored, the first batch (policy "fail") cannot be opened: the trust error
        assert sub.stats().rejected == {"untrusted_key": 1, "unknown_kid": 1}


# --- 7. malformed control requests ------------------------------------------------------------


def _rsa_1024_jwk() -> dict[str, str]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pub = numbers.public_numbers()
    return {
        "kty": "RSA",
        "n": b64u_encode(pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")),
        "e": b64u_encode(pub.e.to_bytes(3, "big")),
    }


def _low_order_x25519() -> dict[str, str]:
    """Well-formed, but an all-zero X25519 point: no shared secret can be computed with it."""
    return {"kty": "OKP", "crv": "X25519", "x": b64u_encode(bytes(32))}


def _off_curve_p256() -> dict[str, str]:
    return {"kty": "EC", "crv": "P-256", "x": b64u_encode(bytes(32)), "y": b64u_encode(bytes(32))}


async def _ask(nc: Any, subject: str, payload: bytes) -> dict[str, Any]:
    msg = await nc.request(subject, payload, timeout=5)
    reply = msgpack.unpackb(msg.data, raw=False)
    assert isinstance(reply, dict)
    return reply


def _assert_error(reply: dict[str, Any], code: str, what: str) -> None:
    assert reply.get("ok") is False, what
    error = reply.get("error")
    assert isinstance(error, dict), what
    assert error.get("code") == code, (what, error)
    assert isinstance(error.get("message"), str), what


async def test_malformed_session_requests_get_errors_and_the_proxy_keeps_serving(
    nats_url: str, nc: Any
) -> None:
    async with make_stack(
        nats_url, sources=[HttpEvents(rate=200, seed=5)], streams=["records"]
    ) as st:
        s = st.subjects
        token = st.token()
        public = fresh_key().public_jwk
        private = fresh_key()._key.export_private(as_dict=True)

        def open_req(**changes: Any) -> bytes:
            body: dict[str, Any] = {
                "v": 1,
                "token": token,
                "cluster": st.cluster,
                "streams": ["records"],
                "jwk": public,
                "key_mode": "session",
            }
            body.update(changes)
            return msgpack.packb(body)

        valid_ref = {"v": 1, "token": token, "session": fresh_key().session_id}
        cases: list[tuple[str, bytes, str, str]] = [
            ("open", b"\xc1\xc1 garbage", "bad_request", "garbage bytes"),
            ("open", b"", "bad_request", "empty payload"),
            ("open", msgpack.packb([1, 2, 3]), "bad_request", "msgpack array"),
            ("open", msgpack.packb("open"), "bad_request", "msgpack string"),
            ("open", msgpack.packb({1: "int key"}), "bad_request", "integer keys"),
            ("open", msgpack.packb({"v": 1}), "bad_request", "missing keys"),
            ("open", open_req(v=2), "bad_request", "unknown version"),
            ("open", open_req(v="1"), "bad_request", "version as a string"),
            ("open", open_req(token=12), "bad_request", "token as an int"),
            ("open", open_req(streams="records"), "bad_request", "streams as a string"),
            ("open", open_req(streams=[]), "bad_request", "no stream"),
            ("open", open_req(streams=["Bad.Stream"]), "bad_request", "bad stream name"),
            ("open", open_req(jwk="not a map"), "bad_request", "jwk as a string"),
            ("open", open_req(jwk={"kty": 1}), "bad_request", "jwk member types"),
            ("open", open_req(cluster="bad.cluster"), "bad_request", "bad cluster id"),
            ("open", open_req(key_mode="none"), "bad_request", "bad key mode"),
            ("open", open_req(zip="yes"), "bad_request", "zip as a string"),
            ("open", open_req(jwk=private), "bad_request", "private JWK (with d)"),
            ("open", open_req(jwk=_rsa_1024_jwk()), "bad_request", "RSA-1024 JWK"),
            ("open", open_req(jwk={**public, "alg": "RSA1_5"}), "bad_request", "bad alg"),
            ("open", open_req(jwk={"kty": "oct", "k": "AAAA"}), "bad_request", "symmetric JWK"),
            # keys that only the cluster's crypto refuses: with a genuine proof, so that the
            # cluster's policy lets them that far
            (
                "open",
                open_req(jwk=(low := _low_order_x25519()), proof=st.proof(low, ["records"])),
                "bad_request",
                "low-order X25519",
            ),
            (
                "open",
                open_req(jwk=(curve := _off_curve_p256()), proof=st.proof(curve, ["records"])),
                "bad_request",
                "P-256 point off the curve",
            ),
            (
                "open",
                open_req(streams=[f"s{i}" for i in range(100)]),
                "bad_request",
                "100 streams",
            ),
            (
                "open",
                open_req(streams=[f"s{i}" for i in range(20)]),
                "limit_exceeded",
                "more streams than the proxy allows",
            ),
            ("open", open_req(pad="x" * 70_000), "bad_request", "oversize request"),
            ("open", open_req(token="x.y.z"), "unauthorized", "bad token"),
            ("close", b"\xc1", "bad_request", "garbage close"),
            ("close", msgpack.packb({"v": 1}), "bad_request", "close without keys"),
            ("close", msgpack.packb({**valid_ref, "session": "short"}), "bad_request", "bad id"),
            ("close", msgpack.packb(valid_ref), "bad_request", "close of an unknown session"),
            ("keepalive", b"\xc1", "bad_request", "garbage keepalive"),
            ("keepalive", msgpack.packb([valid_ref]), "bad_request", "keepalive as a list"),
            ("keepalive", msgpack.packb({**valid_ref, "token": None}), "bad_request", "no token"),
            ("keepalive", msgpack.packb(valid_ref), "bad_request", "unknown session"),
            ("bogus", msgpack.packb(valid_ref), "bad_request", "unknown operation"),
        ]
        for op, payload, code, what in cases:
            reply = await _ask(nc, f"{s.prefix}.api.session.{op}", payload)
            _assert_error(reply, code, what)
        expected = Counter(code for _, _, code, _ in cases)
        assert st.proxy.refused == expected
        assert len(st.proxy.registry) == 0
        assert st.agent.sessions == {}
        # the proxy, and the producer behind it, still serve a legitimate session
        async with (
            st.client() as client,
            client.subscribe(st.cluster, ["http_events"]) as sub,
        ):
            rows, _ = await collect_rows(sub, 20)
            assert len(rows) >= 20
            assert sub.stats().rejected == {}


async def test_malformed_control_requests_get_errors_and_the_producer_keeps_serving(
    nats_url: str, nc: Any
) -> None:
    """The test plays a hostile proxy on the cluster's control subject."""
    async with make_stack(nats_url, sources=[HttpEvents(rate=200, seed=6)]) as st:
        control = st.subjects.control(st.cluster)
        key = fresh_key()

        def open_op(**changes: Any) -> bytes:
            body: dict[str, Any] = {
                "v": 1,
                "op": "open",
                "session": key.session_id,
                "streams": ["http_events"],
                "jwk": key.public_jwk,
                "key_mode": "session",
                "user": "mallory",
            }
            body.update(changes)
            # a genuine proof of what the body asks, where the body can be proved at all: the
            # cluster must refuse the request for its form, not for want of authorization
            with contextlib.suppress(WireError, TypeError, AttributeError):
                body["proof"] = st.proof(
                    body["jwk"], list(body["streams"]), key_mode=body["key_mode"]
                )
            return msgpack.packb(body)

        low, curve = _low_order_x25519(), _off_curve_p256()
        cases: list[tuple[bytes, str]] = [
            (b"\xc1 garbage", "garbage bytes"),
            (b"", "empty payload"),
            (msgpack.packb([1, 2]), "msgpack array"),
            (msgpack.packb({"op": "bogus"}), "unknown op"),
            (msgpack.packb({"v": 1}), "no op"),
            (open_op(session=None), "open without a session"),
            (open_op(session="short"), "open with a bad session id"),
            (open_op(session=fresh_key().session_id), "session is not the key's thumbprint"),
            (open_op(streams="http_events"), "streams as a string"),
            (open_op(jwk=fresh_key()._key.export_private(as_dict=True)), "private JWK"),
            (open_op(jwk=_rsa_1024_jwk()), "RSA-1024"),
            (open_op(session=thumbprint(low), jwk=low), "low-order X25519"),
            (open_op(session=thumbprint(curve), jwk=curve), "P-256 point off the curve"),
            (open_op(key_mode="none"), "bad key mode"),
            (open_op(v=2), "unknown version"),
            (msgpack.packb({"op": "close"}), "close without a session"),
            (msgpack.packb({"op": "close", "session": 5}), "close with an int session"),
        ]
        for payload, what in cases:
            _assert_error(await _ask(nc, control, payload), "bad_request", what)
        # a stream the cluster does not carry: not one its policy authorizes either, and a
        # refused open learns nothing of the cluster
        _assert_error(await _ask(nc, control, open_op(streams=["nope"])), "forbidden", "nope")
        assert st.agent.sessions == {}
        # an open that is well formed is served (this one with a spent key: closed at once)
        ok = await _ask(nc, control, open_op())
        assert ok == {"ok": True}
        assert key.session_id in st.agent.sessions
        assert await _ask(
            nc, control, msgpack.packb({"v": 1, "op": "close", "session": key.session_id})
        ) == {"ok": True}
        assert st.agent.sessions == {}
        # the sources still pump, and a legitimate session through the proxy gets rows
        async with (
            st.client() as client,
            client.subscribe(st.cluster, ["http_events"]) as sub,
        ):
            rows, _ = await collect_rows(sub, 20)
            assert len(rows) >= 20
            assert sub.stats().rejected == {}


async def test_a_session_key_can_open_only_one_session(nats_url: str) -> None:
    """The session id is the key's thumbprint: a second open with the same key is refused
    while the first session lives, so nobody can take over another's inbox."""
    key = fresh_key()
    async with (
        make_stack(nats_url) as st,
        st.client() as client,
        client.subscribe(st.cluster, ["records"], key=key),
    ):
        with pytest.raises(SessionError) as err:
            async with asyncio.timeout(10), client.subscribe(st.cluster, ["records"], key=key):
                pass
        assert err.value.code == "bad_request"
        assert key.session_id in st.proxy.registry  # the first session is untouched
        assert key.session_id in st.agent.sessions
        assert st.proxy.refused == {"bad_request": 1}


# --- cluster liveness and slow opens --------------------------------------------------------


async def test_expiry_waits_for_the_reconnected_callback_not_the_connection_status(
    nats_url: str, nc: Any
) -> None:
    """nats-py says connected again before its reconnected callback ran (it resubscribes and
    flushes in between). Expiry in that window would end, for the outage's silence, a session
    nobody could keep alive: it waits for the callback, which gives each session its span
    again; past that span the session does expire."""
    now = [1000.0]
    config = ProxyConfig(
        nats_url=nats_url,
        prefix=f"t{secrets.token_hex(4)}",
        token_secret=b"k" * 32,
        keepalive_s=1.0,
    )
    core = ProxyCore(config, clock=lambda: now[0])
    core.nc = nc  # connected all along: only the callbacks tell the outage
    session = fresh_key("x25519").session_id
    core.registry.add(session, cluster=CLUSTER, user="alice", streams=("s",), now=now[0])
    liveness = Liveness(core)
    async with asyncio.TaskGroup() as tg:
        core.tg = tg
        loop = tg.create_task(liveness.run())
        await liveness.on_disconnected()
        now[0] += 60.0  # the outage: no keepalive for far longer than 3 intervals
        await asyncio.sleep(1.6)  # three expiry ticks with nats-py saying "connected"
        assert session in core.registry
        await liveness.on_reconnected()
        now[0] += 2.0
        await asyncio.sleep(1.1)
        assert session in core.registry  # a full span from the reconnect
        now[0] += 2.0
        await eventually(lambda: session not in core.registry, timeout=5)
        liveness.stop()
        await loop
        core.tg = None


async def test_a_slow_open_is_not_ended_by_a_liveness_ping(nats_url: str, nc: Any) -> None:
    """The proxy registers a session before the cluster hears of it. A ping while the open is
    still on its way must not end it: the cluster would go on to serve a session whose every
    envelope the proxy drops. Once settled, a session the cluster forgets still ends."""
    prefix = f"t{secrets.token_hex(4)}"
    subjects = Subjects(prefix)
    secret = secrets.token_bytes(32)
    served: set[str] = set()
    pings: list[list[str]] = []

    async def open_slowly(msg: Any, session: str) -> None:
        await asyncio.sleep(2.5)
        served.add(session)
        await msg.respond(msgpack.packb({"ok": True}))

    async def cluster(msg: Any) -> None:
        """A cluster that answers pings at once while an open takes it 2.5 s (a ping sent
        while the open is in flight, or overtaking it, finds the session unknown)."""
        m = msgpack.unpackb(msg.data, raw=False)
        if m["op"] == "ping":
            pings.append(list(m["sessions"]))
            unknown = [s for s in m["sessions"] if s not in served]
            await msg.respond(msgpack.packb({"ok": True, "unknown": unknown}))
        elif m["op"] == "open":
            tg.create_task(open_slowly(msg, m["session"]))
        else:
            await msg.respond(msgpack.packb({"ok": True}))

    await nc.subscribe(subjects.control(CLUSTER), cb=cluster)
    key = fresh_key()
    session = key.session_id
    inbox = await nc.subscribe(subjects.inbox(session))
    await settle(nc)
    config = ProxyConfig(
        nats_url=nats_url,
        prefix=prefix,
        token_secret=secret,
        keepalive_s=2.0,  # pings every 2 s: one falls inside the open
        control_timeout_s=3.0,
        shared_registry=False,
    )
    token = mint_token(sub="u", clusters=[CLUSTER], secret=secret)
    async with asyncio.TaskGroup() as tg, Proxy(config) as proxy:
        req = OpenRequest(CLUSTER, ("records",), key.public_jwk, "session", token)
        reply = await _ask(nc, subjects.api_open, encode_map(req.to_map()))
        assert reply["ok"] is True, reply
        ref = encode_map({"v": 1, "token": token, "session": session})
        assert (await _ask(nc, subjects.api_keepalive, ref))["ok"] is True
        envelope = Envelope("data", CLUSTER, session, "records", 1, time.time_ns(), b"x")
        await nc.publish(subjects.data(CLUSTER, session), encode_envelope(envelope))
        got = decode_inbox((await inbox.next_msg(timeout=5)).data)
        assert got == envelope  # relayed: the session outlived the pings during its open
        assert proxy.rejected == {}
        # liveness still works once the session has settled: forgotten by the cluster, ended
        served.clear()
        await eventually(lambda: any(session in p for p in pings), timeout=10)
        ended = decode_inbox((await inbox.next_msg(timeout=5)).data)
        assert isinstance(ended, Notice)
        assert ended.code == "ended"
        assert session not in proxy.registry


def test_the_proxy_offers_only_a_keepalive_interval_the_consumers_keep() -> None:
    """The consumers clamp the interval to [1, 3600] s: a proxy offering less would expire
    sessions kept alive as they should be, so it refuses to start."""
    secret = secrets.token_bytes(32)
    for keepalive_s in (KEEPALIVE_MIN_S, 10.0, KEEPALIVE_MAX_S):
        assert ProxyConfig(token_secret=secret, keepalive_s=keepalive_s).keepalive_s == keepalive_s
    for keepalive_s in (0.3, 1e-9, 0.0, -1.0, 3601.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="keepalive_s"):
            ProxyConfig(token_secret=secret, keepalive_s=keepalive_s)


async def test_a_cluster_with_more_sessions_than_a_ping_holds_is_still_checked(
    nats_url: str,
) -> None:
    """Over MAX_PING sessions, one ping would not fit a control request (the producer refuses
    it): the proxy pings in chunks, and the sessions the producer does not serve end (ids
    starting with ``-`` and ``_`` among them) while the one it serves goes on."""
    count = 3 * MAX_PING // 2
    bogus = ["-" + b64u_encode(os.urandom(32))[1:], "_" + b64u_encode(os.urandom(32))[1:]]
    bogus += [b64u_encode(os.urandom(32)) for _ in range(count - len(bogus))]
    async with (
        make_stack(nats_url, keepalive_s=1.0, shared_registry=False) as st,
        st.client() as client,
        client.subscribe(st.cluster, ["records"]) as sub,
    ):
        registry = st.proxy.registry
        settled = st.proxy._core.clock() - 10  # past the open's timeout: pinged
        for session in bogus:
            entry = registry.add(
                session, cluster=st.cluster, user="u", streams=("records",), now=settled
            )
            entry.expires_at = float("inf")  # only a ping can end it
        with capture_logs() as logs:
            await eventually(lambda: not any(s in registry for s in bogus), timeout=20)
        assert not [e for e in logs if e["event"] == "cluster.ping_refused"]
        assert sub.session_id in registry
        await st.agent.emit("records", ROWS)
        rows, _ = await collect_rows(sub, 2)
        assert rows == ROWS


async def test_the_proxy_answers_only_request_inboxes_and_without_headers(
    nats_url: str, nc: Any
) -> None:
    """A requester chooses the reply subject, and the proxy publishes there with its own
    permissions: a reply subject in the session registry's KV space (with a KV purge header,
    which msg.respond would copy) must not delete another user's session."""
    async with make_stack(nats_url) as st:
        async with st.client() as client, client.subscribe(st.cluster, ["records"]) as sub:
            victim = sub.session_id
            bucket = f"{st.prefix}_sessions"
            kv = await nc.jetstream().key_value(bucket)
            assert (await kv.get(victim)).value
            for op in ("open", "keepalive", "close"):
                await nc.publish(
                    f"{st.prefix}.api.session.{op}",
                    b"\x80",
                    reply=f"$KV.{bucket}.{victim}",
                    headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"},
                )
            await nc.flush()
            await eventually(lambda: st.proxy.refused["bad_reply_subject"] == 3)
            assert (await kv.get(victim)).value  # still there
            assert st.proxy.registry.get(victim) is not None
            await st.agent.emit("records", [{"i": 1}])
            rows, _ = await collect_rows(sub, 1)
            assert rows == [{"i": 1}]
