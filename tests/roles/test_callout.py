"""Consumers log in to NATS through the auth callout (user = session id, password = token), and
the broker itself confines each connection to its session: a real nats-server configured as
``sealstream up`` configures it, the real proxy answering the callout."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import nats
import nats.errors
import nkeys
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk as _jwk
from jwcrypto import jws as _jws

from broker_proxy import Proxy, ProxyConfig
from broker_proxy._callout import AuthResponder, consumer_permissions
from broker_proxy._config import CalloutConfig
from consumers import Client, ClientConfig, TokenFile
from producers import Agent, HttpEvents, ProducerConfig
from sealstream import BrokerError, SessionError, TokenVerifier, WireError, mint_token
from sealstream.crypto import ClusterIdentity, TrustStore
from sealstream.jwk import b64u_encode
from sealstream.nats import connect
from sealstream.natsconf import Credentials, server_config
from sealstream.natsjwt import AccountKey, decode_jwt, encode_jwt
from sealstream.server import EmbeddedServer, ServerOptions
from tests.support.pipeline import FAST_BATCHING, collect_rows, eventually

ISSUER = AccountKey.generate()
SECRET = secrets.token_bytes(32)
IDENTITIES = {c: ClusterIdentity.generate() for c in ("c1", "c2")}
P = "sealstream"


@dataclass
class Secured:
    url: str
    creds: Credentials
    dir: Path


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    creds = Credentials.generate(["c1", "c2"])
    conf = tmp_path / "nats.conf"
    conf.write_text(server_config(creds, issuer=ISSUER.public_key))
    with EmbeddedServer(ServerOptions(config_file=conf)) as server:
        yield Secured(server.url, creds, tmp_path)


@contextlib.asynccontextmanager
async def backend(
    sec: Secured, *, clusters: tuple[str, ...] = ("c1",), callout: bool = True
) -> AsyncIterator[Proxy]:
    """The proxy (answering the callout unless told not to) and a producer per cluster."""
    config = ProxyConfig(
        nats_url=sec.creds.proxy.url(sec.url),
        token_secret=SECRET,
        control_timeout_s=2.0,
        callout=CalloutConfig(issuer=ISSUER) if callout else None,
    )
    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(Proxy(config))
        for i, cluster in enumerate(clusters):
            producer = ProducerConfig(
                cluster=cluster,
                nats_url=sec.creds.producers[cluster].url(sec.url),
                batching=FAST_BATCHING,
                trust_relay_authorization=True,  # these tests are about the NATS login
            )
            source = HttpEvents(rate=200, seed=i)
            await stack.enter_async_context(
                Agent(producer, identity=IDENTITIES[cluster], sources=[source])
            )
        yield proxy


def token(*clusters: str, sub: str = "alice", ttl_s: int = 3600) -> str:
    return mint_token(sub=sub, clusters=list(clusters), ttl_s=ttl_s, secret=SECRET)


def client(sec: Secured, tok: str) -> Client:
    config = ClientConfig(nats_url=sec.url, token=tok, key_kind="x25519", request_timeout_s=5.0)
    trust = TrustStore({c: [i.public_jwk] for c, i in IDENTITIES.items()})
    return Client(config, trust=trust)


def signed(claims: dict[str, Any], *, alg: str = "HS256", key: bytes = SECRET) -> str:
    """A token with any claims and algorithm (what mint_token will not make)."""
    obj = _jws.JWS(json.dumps(claims).encode())
    jwk = _jwk.JWK(kty="oct", k=b64u_encode(key))
    obj.add_signature(jwk, alg=alg, protected=json.dumps({"alg": alg, "typ": "JWT"}))
    return str(obj.serialize(compact=True))


class Watched:
    """A raw NATS connection and the errors the server sent it."""

    def __init__(self, nc: Any, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    @classmethod
    async def connect(cls, url: str, user: str, password: str) -> Watched:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await connect(
            url,
            name="watched",
            user=user,
            password=password,
            inbox_prefix=f"_INBOX.{user}",
            error_cb=on_error,
            fail_fast=True,
        )
        return cls(nc, errors)

    async def refused(self, action: str, subject: str) -> bool:
        """Try to publish or subscribe; True if the server refused it."""
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


def session_id() -> str:
    return b64u_encode(secrets.token_bytes(32))


# --- confinement ------------------------------------------------------------------------------


async def test_a_connection_is_confined_to_its_session(secured: Secured) -> None:
    async with (
        backend(secured) as proxy,
        client(secured, token("c1")) as c,
        c.subscribe("c1", ["http_events"]) as live,
    ):
        await collect_rows(live, 5)
        a = live.session_id
        b = session_id()
        other = await Watched.connect(secured.url, b, token("c1"))
        forbidden = [
            ("sub", f"{P}.inbox.{a}"),  # another session's inbox
            ("sub", f"{P}.inbox.*"),
            ("sub", ">"),
            ("sub", "_INBOX.>"),  # others' request replies
            ("sub", f"_INBOX.{a}.>"),
            ("sub", f"{P}.cluster.c1.control"),  # a producer's subjects
            ("sub", f"{P}.cluster.*.data.*"),
            ("sub", f"{P}.api.session.*"),
            ("pub", f"{P}.inbox.{a}"),  # inject into an inbox, its own included
            ("pub", f"{P}.inbox.{b}"),
            ("pub", f"{P}.cluster.c1.data.{b}"),  # forge data
            ("pub", f"{P}.cluster.c1.control"),  # bypass the proxy
            ("pub", "$SYS.REQ.USER.AUTH"),
            ("pub", "$JS.API.INFO"),
        ]
        for action, subject in forbidden:
            assert await other.refused(action, subject), (action, subject)
        # what it may do still works: its own inbox, and the session API with replies
        await other.nc.subscribe(f"{P}.inbox.{b}")
        reply = await other.nc.request(f"{P}.api.session.keepalive", b"\x80", timeout=5)
        assert b"bad_request" in reply.data
        await other.nc.flush()
        assert len(other.errors) == len(forbidden)
        await other.nc.close()
        # the live session went on unaffected
        before = live.stats().rows
        await collect_rows(live, 5)
        assert live.stats().rows > before
        assert live.stats().rejected == {}
        assert proxy.callout is not None
        assert proxy.callout.issued == 2


async def test_two_tenants_each_see_only_their_own_inbox(secured: Secured) -> None:
    async with (
        backend(secured, clusters=("c1", "c2")),
        client(secured, token("c1", sub="alice")) as alice,
        client(secured, token("c2", sub="bob")) as bob,
        alice.subscribe("c1", ["http_events"]) as sa,
        bob.subscribe("c2", ["http_events"]) as sb,
    ):
        seen: dict[str, set[str]] = {"a": set(), "b": set()}
        # a tap on each consumer's own connection: the widest subscription it is allowed
        for name, sub in (("a", sa), ("b", sb)):

            async def tap(msg: Any, name: str = name) -> None:
                seen[name].add(msg.subject)

            assert sub._live is not None
            nc = sub._live._own_nc
            assert nc is not None, "each session has its own connection"
            await nc.subscribe(f"{P}.inbox.{sub.session_id}", cb=tap)
        await asyncio.gather(collect_rows(sa, 10), collect_rows(sb, 10))
        assert seen == {"a": {f"{P}.inbox.{sa.session_id}"}, "b": {f"{P}.inbox.{sb.session_id}"}}
        assert sa.stats().rejected == sb.stats().rejected == {}


# --- refusals ---------------------------------------------------------------------------------

NOW = int(time.time())
REFUSALS = [
    # (case, user, password, reason counted)
    (
        "bad signature",
        None,
        signed({"sub": "a", "clusters": ["c1"], "exp": NOW + 600}, key=b"k" * 32),
        "invalid_token",
    ),
    ("expired", None, token("c1", ttl_s=-3600), "expired"),
    (
        "nbf in the future",
        None,
        signed({"sub": "a", "clusters": ["c1"], "exp": NOW + 7200, "nbf": NOW + 3600}),
        "not_yet_valid",
    ),
    (
        "wrong algorithm",
        None,
        signed(
            {"sub": "a", "clusters": ["c1"], "exp": NOW + 600},
            alg="HS384",
            key=SECRET + SECRET[:16],
        ),
        "invalid_token",
    ),
    ("no cluster", None, token(), "no_cluster"),
    ("garbage user", "not-a-session-id", token("c1"), "bad_user"),
    ("user with a dot", "a" * 42 + ".", token("c1"), "bad_user"),
    ("garbage password", None, "garbage", "invalid_token"),
]


@pytest.mark.parametrize(
    ("case", "user", "password", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
async def test_refused_with_a_reason(
    secured: Secured, case: str, user: str | None, password: str, reason: str
) -> None:
    async with backend(secured) as proxy:
        assert proxy.callout is not None
        with pytest.raises(BrokerError, match="Authorization Violation"):
            await Watched.connect(secured.url, user or session_id(), password)
        assert proxy.callout.refused == {reason: 1}
        assert proxy.callout.issued == 0
        samples = {s.name: s.value for s in proxy.samples()}
        assert samples["sealstream_auth_refused"] == {reason: 1}


async def test_refusal_is_one_line_for_the_client(secured: Secured) -> None:
    async with backend(secured):
        async with client(secured, token("c1", ttl_s=-3600)) as c:
            with pytest.raises(SessionError) as err:
                await c.subscribe("c1", ["http_events"]).__aenter__()
        assert err.value.code == "unauthorized"
        assert "token expired" in err.value.detail
        assert "\n" not in str(err.value)
        huge = "x" * 65536  # the server's CONNECT line cap refuses it before the callout
        with pytest.raises(BrokerError):  # "maximum control line exceeded", or just closed
            await Watched.connect(secured.url, session_id(), huge)
        async with client(secured, huge) as c:
            with pytest.raises(SessionError, match="too large"):
                await c.subscribe("c1", ["http_events"]).__aenter__()


async def test_survives_500_bad_connects_then_admits(secured: Secured) -> None:
    async with backend(secured) as proxy:
        assert proxy.callout is not None
        for i in range(500):
            _, user, password, _ = REFUSALS[i % len(REFUSALS)]
            with contextlib.suppress(BrokerError):
                nc = await connect(
                    secured.url,
                    name="bad",
                    user=user or session_id(),
                    password=password,
                    fail_fast=True,
                )
                await nc.close()
                pytest.fail(f"a bad login was admitted: {i}")
        assert sum(proxy.callout.refused.values()) == 500
        async with client(secured, token("c1")) as c, c.subscribe("c1", ["http_events"]) as sub:
            await collect_rows(sub, 3)
        assert proxy.callout.issued == 1


# --- token renewal ---------------------------------------------------------------------------


async def test_a_renewed_token_logs_the_connection_in_again(secured: Secured) -> None:
    """The broker ends a login when its user JWT expires (here: with the token, no grace);
    once the token file holds a new token, the client logs in again with it, and the session
    streams on past the first token's expiry."""
    config = ProxyConfig(
        nats_url=secured.creds.proxy.url(secured.url),
        token_secret=SECRET,
        control_timeout_s=2.0,
        keepalive_s=1.0,
        callout=CalloutConfig(issuer=ISSUER, grace_s=0),
    )
    file = secured.dir / "token"
    first = token("c1", ttl_s=3)
    first_exp = TokenVerifier(secret=SECRET).verify(first).exp
    file.write_text(first)
    producer = ProducerConfig(
        cluster="c1",
        nats_url=secured.creds.producers["c1"].url(secured.url),
        batching=FAST_BATCHING,
        trust_relay_authorization=True,  # this test is about the NATS login
    )
    async with (
        Proxy(config, verifier=TokenVerifier(secret=SECRET, leeway_s=0)) as proxy,
        Agent(producer, identity=IDENTITIES["c1"], sources=[HttpEvents(rate=200, seed=3)]),
    ):
        cfg = ClientConfig(
            nats_url=secured.url, token=TokenFile(file), key_kind="x25519", request_timeout_s=5.0
        )
        trust = TrustStore({"c1": [IDENTITIES["c1"].public_jwk]})
        async with Client(cfg, trust=trust) as c, c.subscribe("c1", ["http_events"]) as sub:
            await collect_rows(sub, 3)
            file.write_text(token("c1", ttl_s=3600))  # renewed before the first one expires
            assert proxy.callout is not None
            await eventually(
                lambda: proxy.callout is not None and proxy.callout.issued == 2, timeout=15
            )
            # past the first token's (and so the first login's) expiry
            await eventually(lambda: time.time() > first_exp + 1, timeout=10, interval=0.1)
            before = sub.stats().rows
            await collect_rows(sub, 5)
            assert sub.stats().rows > before
            assert proxy.callout.refused == {}
            assert sub._live is not None
            assert sub._live._own_nc is not None
            assert sub._live._own_nc.is_connected


# --- the callout service as a process: killed and restarted -----------------------------------


class AuthProcess:
    def __init__(self, sec: Secured) -> None:
        self.sec = sec
        self.log = sec.dir / f"auth-{secrets.token_hex(2)}.log"
        seed = sec.dir / "issuer.nk"
        seed.write_bytes(ISSUER.seed)
        secret = sec.dir / "secret"
        secret.write_bytes(SECRET)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SEALSTREAM_", "NATS_"))}
        env |= {
            "NATS_URL": sec.creds.proxy.url(sec.url),
            "SEALSTREAM_TOKEN_SECRET_FILE": str(secret),
            "SEALSTREAM_CALLOUT_ISSUER_SEED_FILE": str(seed),
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker_proxy", "auth"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

    async def started(self) -> None:
        await eventually(lambda: "auth.started" in self.log.read_text(), timeout=20)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


async def test_callout_down_refuses_new_connections_and_spares_live_ones(
    secured: Secured,
) -> None:
    auth = AuthProcess(secured)
    try:
        await auth.started()
        async with (
            backend(secured, callout=False),
            client(secured, token("c1")) as c,
            c.subscribe("c1", ["http_events"]) as live,
        ):
            await collect_rows(live, 3)
            auth.kill()
            # a new connection is refused with a clear error, not left hanging (retry_s=0: by
            # default the client retries this passing refusal for 30 s)
            async with asyncio.timeout(15), client(secured, token("c1")) as late:
                with pytest.raises(SessionError) as err:
                    await late.subscribe("c1", ["http_events"], retry_s=0).__aenter__()
            assert err.value.code == "unauthorized"
            assert "not running" in err.value.detail
            # the live session keeps streaming
            before = live.stats().rows
            await collect_rows(live, 5)
            assert live.stats().rows > before
            # restarted: new connections work again
            auth = AuthProcess(secured)
            await auth.started()
            async with client(secured, token("c1")) as again:
                async with again.subscribe("c1", ["http_events"]) as sub:
                    await collect_rows(sub, 3)
        assert "Traceback" not in auth.log.read_text()
        assert "auth.authorized" in auth.log.read_text()
        assert token("c1") not in auth.log.read_text()  # tokens never logged
    finally:
        if auth.proc.poll() is None:
            auth.proc.terminate()
            auth.proc.wait(timeout=10)


# --- an outside client ------------------------------------------------------------------------


async def test_an_outside_client_connects_by_the_contract(secured: Secured) -> None:
    """Raw nats-py, msgpack and cryptography, following docs/protocol.md only."""
    async with backend(secured):
        private = X25519PrivateKey.generate()
        x = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {
            "kty": "OKP",
            "crv": "X25519",
            "x": base64.urlsafe_b64encode(x).rstrip(b"=").decode(),
        }
        canonical = json.dumps(
            {k: jwk[k] for k in ("crv", "kty", "x")}, separators=(",", ":"), sort_keys=True
        )
        sid = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
        session = sid.decode()
        tok = token("c1")
        nc = await nats.connect(
            secured.url, user=session, password=tok, inbox_prefix=f"_INBOX.{session}"
        )
        try:
            inbox: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_msg(msg: Any) -> None:
                await inbox.put(msg.data)

            await nc.subscribe(f"{P}.inbox.{session}", cb=on_msg)
            await nc.flush()
            body = {
                "v": 1,
                "token": tok,
                "cluster": "c1",
                "streams": ["http_events"],
                "jwk": jwk,
            }
            reply = await nc.request(f"{P}.api.session.open", msgpack.packb(body), timeout=5)
            answer = msgpack.unpackb(reply.data)
            assert answer["ok"] is True
            assert answer["session"] == session
            async with asyncio.timeout(10):
                first = msgpack.unpackb(await inbox.get())
            assert (first["kind"], first["session"], first["seq"]) == ("key", session, 0)
        finally:
            await nc.close()


# --- the responder's answers, request by request ----------------------------------------------


@dataclass(frozen=True)
class ServerKey:
    """A server nkey, as nats-server signs its authorization requests with."""

    seed: bytes

    @property
    def public_key(self) -> str:
        return bytes(nkeys.from_seed(bytearray(self.seed)).public_key).decode()

    def sign(self, data: bytes) -> bytes:
        signature: bytes = nkeys.from_seed(bytearray(self.seed)).sign(data)
        return signature


SERVER = ServerKey(bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_SERVER)))
USER_NKEY = bytes(
    nkeys.from_seed(
        bytearray(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))
    ).public_key
).decode()


def request(user: Any, password: Any, *, kind: str = "authorization_request") -> bytes:
    claims = {
        "sub": ISSUER.public_key,
        "aud": "nats-authorization-request",
        "nats": {
            "server_id": {"name": "n", "host": "127.0.0.1", "id": SERVER.public_key},
            "user_nkey": USER_NKEY,
            "client_info": {"host": "127.0.0.1", "id": 7, "user": user},
            "connect_opts": {"user": user, "pass": password, "protocol": 1},
            "type": kind,
            "version": 2,
        },
    }
    return encode_jwt(claims, SERVER).encode()


def _tampered_signature(jwt: bytes) -> bytes:
    """``jwt`` with its signature's first character changed (to one it is not: a random
    signature may already end with whatever a fixed suffix would write)."""
    head, _, sig = jwt.rpartition(b".")
    first = b"B" if sig[:1] == b"A" else b"A"
    return head + b"." + first + sig[1:]


def responder() -> AuthResponder:
    return AuthResponder(CalloutConfig(issuer=ISSUER), TokenVerifier(secret=SECRET))


def test_issued_user_jwt() -> None:
    r = responder()
    sid = session_id()
    tok = token("c1", ttl_s=600)
    answer = r.answer(request(sid, tok))
    assert answer is not None
    response = decode_jwt(answer, issuer_kind="account", max_size=1 << 16)
    assert response["iss"] == ISSUER.public_key
    assert (response["sub"], response["aud"]) == (USER_NKEY, SERVER.public_key)
    assert response["nats"]["type"] == "authorization_response"
    user = decode_jwt(response["nats"]["jwt"], issuer_kind="account", max_size=1 << 16)
    assert (user["sub"], user["aud"], user["name"]) == (USER_NKEY, "SEALSTREAM", sid)
    assert user["nats"]["pub"] == {
        "allow": [
            f"{P}.api.session.open",
            f"{P}.api.session.keepalive",
            f"{P}.api.session.close",
            f"{P}.api.session.resume",
            f"{P}.api.session.grants",
        ]
    }
    assert user["nats"]["sub"] == {"allow": [f"{P}.inbox.{sid}", f"_INBOX.{sid}.>"]}
    assert set(user["nats"]) == {"pub", "sub", "subs", "data", "payload", "type", "version"}
    assert user["nats"]["subs"] > 0
    assert user["nats"]["payload"] > 0
    claims = TokenVerifier(secret=SECRET).verify(tok)
    assert user["exp"] <= claims.exp + CalloutConfig(issuer=ISSUER).grace_s
    assert user["nats"] | consumer_permissions(sid) == user["nats"]
    # jti is nats-io/jwt's hash of the standard claims
    standard = {k: user[k] for k in ("aud", "exp", "iat", "iss", "name", "sub")}
    digest = hashlib.new("sha512_256", json.dumps(standard, separators=(",", ":")).encode())
    assert user["jti"] == base64.b32encode(digest.digest()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [
        (None, "t", "bad_user"),
        (7, "t", "bad_user"),
        ("a" * 43, None, "missing_token"),
        ("a" * 43, "", "missing_token"),
        ("a" * 43, ["list"], "missing_token"),
        ("a" * 43, "x" * 9000, "oversize_token"),
        ("a" * 43, "x" * 65536, "oversize_token"),
    ],
)
def test_refusal_answers(user: Any, password: Any, reason: str) -> None:
    r = responder()
    answer = r.answer(request(user, password))
    assert answer is not None
    response = decode_jwt(answer, issuer_kind="account", max_size=1 << 16)
    assert response["nats"]["error"]
    assert "jwt" not in response["nats"]
    assert "\n" not in response["nats"]["error"]
    assert r.refused == {reason: 1}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"a.b.c",
        b"\xff" * 100,
        b"x" * (300 * 1024),
        request("a" * 43, "t", kind="user"),
        _tampered_signature(request("a" * 43, "t")),
        encode_jwt({"sub": "x", "nats": {"type": "authorization_request"}}, ISSUER).encode(),
    ],
)
def test_unreadable_requests_are_not_answered(payload: bytes) -> None:
    r = responder()
    assert r.answer(payload) is None
    assert sum(r.refused.values()) == 1
    assert set(r.refused) <= {"malformed_request", "oversize_request"}


def test_decode_jwt_refuses_other_algorithms() -> None:
    good = request("a" * 43, "t").decode()
    _, claims, sig = good.split(".")
    header = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"HS256"}').rstrip(b"=").decode()
    with pytest.raises(WireError) as err:
        decode_jwt(f"{header}.{claims}.{sig}", issuer_kind="server", max_size=1 << 16)
    assert err.value.reason == "bad_algorithm"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user=st.one_of(st.none(), st.text(max_size=60), st.integers(), st.lists(st.text(), max_size=2)),
    password=st.one_of(st.none(), st.text(max_size=300), st.integers(), st.booleans()),
)
def test_any_connect_options_get_an_answer(user: Any, password: Any) -> None:
    r = responder()
    answer = r.answer(request(user, password))
    assert answer is not None
    response = decode_jwt(answer, issuer_kind="account", max_size=1 << 16)
    assert ("error" in response["nats"]) != ("jwt" in response["nats"])


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=2048))
def test_any_bytes_are_refused_without_a_crash(payload: bytes) -> None:
    r = responder()
    assert r.answer(payload) is None
    assert sum(r.refused.values()) == 1


def test_a_new_login_only_near_the_old_tokens_expiry() -> None:
    """A token function that mints a fresh token per call must not reconnect every keepalive."""
    from consumers._session import Login as _Login

    tokens = iter([token("c1", ttl_s=3600), token("c1", ttl_s=30)])
    c = Client(ClientConfig(token=lambda: next(tokens)), trust=TrustStore({}))
    login = _Login(c)
    assert not login.renew_due(login.sent)
    assert not login.renew_due(token("c1", ttl_s=7200))  # the login's token has an hour left
    login.sent = token("c1", ttl_s=30)
    assert login.renew_due(token("c1", ttl_s=7200))  # 30 s left: log in again now
    login.sent = "not-a-jws"
    assert login.renew_due(token("c1"))
