"""The local back end that ``sealstream up``, ``demo`` and ``chaos`` run: its state directory
(NATS configuration, passwords, token, keys, policy) and the nats-server, proxy and producer
processes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from producers import POLICY_FILE_NAME, AuthzPolicy, otlp_config, page_registration
from sealstream.crypto import ClusterIdentity, TrustStore, UserIdentity
from sealstream.natsconf import Credentials, server_config
from sealstream.natsjwt import AccountKey
from sealstream.otlp import OTLP_STREAMS
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.tokens import mint_token

if TYPE_CHECKING:
    from consumers import WebServer

__all__ = [
    "Backend",
    "backend",
    "issuer_seed_file",
    "otlp_ports",
    "page_server",
    "prepare_state",
    "reads_stdin",
    "source_streams",
    "state_lock",
]


@dataclass(frozen=True, slots=True)
class Backend:
    nats_url: str
    cluster: str
    state: Path
    #: the embedded server's WebSocket listener, for the browser view
    websocket_url: str | None = None
    #: the producer's OTLP receiver, ``http://HOST:PORT`` (OTLP/HTTP), when a source is otlp
    otlp_endpoint: str | None = None
    #: its OTLP/gRPC port (None: HTTP only)
    otlp_grpc_port: int | None = None

    @property
    def token_file(self) -> Path:
        return self.state / "token"

    @property
    def trust_store(self) -> Path:
        return self.state / "trust.json"

    @property
    def identity_file(self) -> Path:
        return self.state / "identity.jwk"

    @property
    def policy_file(self) -> Path:
        return self.state / POLICY_FILE_NAME


def issuer_seed_file(state: Path) -> Path:
    """The auth callout issuer's account nkey seed (mode 0600) in a state directory."""
    return state / "callout-issuer.nk"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def state_lock(state: Path, command: str) -> Iterator[None]:
    """Hold the state directory for this process (``state/lock``, an advisory lock the
    system releases when the process ends, however it ends); a ValueError names the process
    that holds it."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise ValueError(
                f"{state} is in use by {holder}: stop it, or give another --dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({command})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _is_otlp(spec: str) -> bool:
    return spec == "otlp" or spec.startswith("otlp:")


def source_streams(sources: str) -> list[str]:
    """The streams of a ``--sources`` list (``jsonl:PATH[:STREAM]`` is ``STREAM``, default
    ``records``; ``otlp[:...]`` the three OTLP streams)."""
    streams = []
    for spec in filter(None, (s.strip() for s in sources.split(","))):
        if spec.startswith("jsonl:"):  # as sealstream-producer reads it
            streams.append(spec[len("jsonl:") :].partition(":")[2] or "records")
        elif _is_otlp(spec):
            streams.extend(OTLP_STREAMS)
        else:
            streams.append(spec)
    return streams


def _free(held: contextlib.ExitStack, host: str, port: int) -> int:
    """``port`` if nothing listens on it at ``host``, else a port the system picks; bound in
    ``held`` until it closes (so that two picks never get the same port)."""
    for wanted in (port, 0):
        s = held.enter_context(socket.socket())
        try:
            s.bind((host, wanted))
        except OSError:
            continue
        return int(s.getsockname()[1])
    raise ValueError(f"no free port on {host}")


def otlp_ports(sources: str) -> tuple[str, str | None, int | None]:
    """``sources`` with its otlp source given fixed ports, the OTLP/HTTP endpoint and the
    OTLP/gRPC port: the ports asked for (4318 and 4317 by default), or free ones when
    those are taken (the sources unchanged and None, None without an otlp source)."""
    specs = [s.strip() for s in sources.split(",") if s.strip()]
    asked = otlp_config(specs)
    if asked is None:
        return sources, None, None
    host = asked.host
    with contextlib.ExitStack() as held:  # released for the producer to bind
        http_port = _free(held, host, asked.port)
        grpc_port = None if asked.grpc_port is None else _free(held, host, asked.grpc_port)
    spec = f"otlp:{host}:{http_port}:{'off' if grpc_port is None else grpc_port}"
    fixed = [spec if _is_otlp(s) else s for s in specs]
    return ",".join(fixed), f"http://{host}:{http_port}", grpc_port


def prepare_state(
    state: Path, cluster: str, streams: Sequence[str] = ("http_events", "host_metrics")
) -> Credentials:
    """Development credentials: token secret, cluster key, trust store pin, a user token, the
    user's identity key and the cluster's policy authorizing it for ``streams``, one NATS user
    for the proxy and each producer, the auth callout issuer key (consumers log in to NATS with
    their token), and the server configuration."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret_file = state / "token-secret"
    if not secret_file.exists():
        _write_private(secret_file, secrets.token_hex(32).encode("ascii"))
    identity = ClusterIdentity.load_or_create(state / "cluster-key.jwk")
    store = TrustStore.load(state / "trust.json")
    if store.get(cluster, identity.kid) is None:
        store.add(cluster, identity.public_jwk)
    token = mint_token(
        sub="demo-user", clusters=[cluster], ttl_s=7 * 24 * 3600, secret=secret_file.read_bytes()
    )
    _write_private(state / "token", token.encode("ascii"))
    # who may read: the demo user's identity, authorized by the cluster (not by the relay)
    reader = UserIdentity.load_or_create(state / "identity.jwk")
    policy_file = state / POLICY_FILE_NAME
    policy = AuthzPolicy.load_or_empty(policy_file)
    granted = policy.keys.get(reader.kid)
    wanted = set(streams) | (granted.streams if granted else set())
    if granted is None or wanted != granted.streams:
        policy.with_key(reader.public_jwk, sorted(wanted), name="demo user")[0].save(policy_file)
    creds_file = state / "nats-credentials.json"
    creds = Credentials.from_json(creds_file.read_text()) if creds_file.exists() else None
    if creds is None or cluster not in creds.producers:
        creds = Credentials.generate([cluster])
        _write_private(creds_file, creds.to_json().encode("utf-8"))
    seed_file = issuer_seed_file(state)
    if not seed_file.exists():
        _write_private(seed_file, AccountKey.generate().seed + b"\n")
    issuer = AccountKey.from_text(seed_file.read_bytes())
    config = server_config(creds, issuer=issuer.public_key, websocket=True)
    _write_private(state / "nats.conf", config.encode("utf-8"))
    roles = {"proxy": creds.proxy}
    roles |= {f"producer-{c}": u for c, u in creds.producers.items()}
    for role, user in roles.items():  # for deployments that mount them (compose.yaml)
        _write_private(state / f"nats-{role}.password", user.password.encode("utf-8"))
    return creds


def reads_stdin(sources: str) -> bool:
    """Whether a ``--sources`` list reads stdin (``jsonl:-``, as sealstream-producer reads
    it)."""
    specs = (s.strip() for s in sources.split(","))
    return any(s.startswith("jsonl:") and s[6:].partition(":")[0] == "-" for s in specs)


@contextlib.contextmanager
def page_server(be: Backend, streams: Sequence[str], *, port: int) -> Iterator[WebServer]:
    """The browser page for this back end, served from this machine, able to register its
    identity key in the cluster's policy (the page asks for it when it loads)."""
    from consumers import TokenFile, WebConfig, WebServer

    assert be.websocket_url is not None
    config = WebConfig(
        nats_ws_url=be.websocket_url,
        cluster=be.cluster,
        streams=streams,
        token=TokenFile(be.token_file),
        trust=TrustStore.load(be.trust_store),
        authorize=page_registration(be.policy_file, name="browser page on this machine"),
        policy_file=str(be.policy_file.resolve()),
    )
    with WebServer(config, port=port) as web:
        yield web


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def backend(
    *,
    state: Path,
    cluster: str,
    nats_url: str | None,
    sources: str,
    rate: float,
    nats_port: int | None = None,
    store: bool = False,
) -> AsyncIterator[Backend]:
    """nats-server (embedded unless ``nats_url``; on ``nats_port`` if given), proxy and
    producer as child processes; with ``store``, the producer keeps what it seals in the
    broker's JetStream store (docs/protocol.md, "Lossless delivery"). The producer reads
    this process's stdin if a source is ``jsonl:-``; its OTLP receiver (an ``otlp`` source)
    listens on the ports asked for, or on free ones if those are taken."""
    sources, otlp_endpoint, otlp_grpc_port = otlp_ports(sources)
    creds = prepare_state(state, cluster, source_streams(sources))
    async with contextlib.AsyncExitStack() as stack:
        callout: dict[str, str] = {}
        websocket_url = None
        if nats_url is None:
            # secure by default: one NATS user per role, least privilege; consumers log in
            # with their token through the auth callout, which the proxy answers
            options = ServerOptions(config_file=state / "nats.conf", port=nats_port)
            server = await stack.enter_async_context(EmbeddedServer(options))
            websocket_url = server.websocket_url
            urls = {
                "proxy": creds.proxy.url(server.url),
                "producer": creds.producers[cluster].url(server.url),
                "consumer": server.url,
            }
            callout["SEALSTREAM_CALLOUT_ISSUER_SEED_FILE"] = str(issuer_seed_file(state))
        else:
            urls = dict.fromkeys(("proxy", "producer", "consumer"), nats_url)
        _write_private(state / "consumer.url", urls["consumer"].encode("utf-8"))
        env = {
            **os.environ,
            **callout,
            "SEALSTREAM_TOKEN_SECRET_FILE": str(state / "token-secret"),
            "SEALSTREAM_CLUSTER": cluster,
            "SEALSTREAM_KEY_FILE": str(state / "cluster-key.jwk"),
            "SEALSTREAM_POLICY_FILE": str(state / POLICY_FILE_NAME),
            "SEALSTREAM_SOURCES": sources,
            "SEALSTREAM_STORE": "1" if store else "0",
        }
        roles = {
            "proxy": ["broker_proxy", "--log-level", "info"],
            "producer": ["producers", "--rate", str(rate), "--log-level", "info"],
        }
        started: list[tuple[str, asyncio.subprocess.Process, Path, int]] = []
        for role, args in roles.items():
            log_path = state / f"{role}.log"
            log = log_path.open("ab")
            stack.callback(log.close)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                *args,
                env={**env, "NATS_URL": urls[role]},
                stdin=(
                    None  # the records piped into this command
                    if role == "producer" and reads_stdin(sources)
                    else asyncio.subprocess.DEVNULL
                ),
                stdout=log,
                stderr=log,
            )
            stack.push_async_callback(_stop, proc)
            started.append((role, proc, log_path, log.tell()))
        for role, proc, log_path, offset in started:
            await _started(role, proc, log_path, offset)
        yield Backend(
            urls["consumer"], cluster, state, websocket_url, otlp_endpoint, otlp_grpc_port
        )


#: how long a role may take to start (a loaded machine)
_START_S = 60.0


async def _started(role: str, proc: asyncio.subprocess.Process, log: Path, offset: int) -> None:
    """Wait until a role's log (past ``offset``) says it started (``proxy.started``: its
    auth callout answers too; ``producer.started``), so that what ``up`` prints works at
    once; a role that exits first is an error that quotes its last log line."""
    needle = f"{role}.started".encode()
    async with asyncio.timeout(_START_S):
        while True:
            with log.open("rb") as f:
                f.seek(offset)
                said = f.read()
            if needle in said:
                return
            if proc.returncode is not None:
                last = said.decode("utf-8", "replace").strip().splitlines()[-1:] or ["-"]
                raise ValueError(f"the {role} did not start ({log}): {last[0][:300]}")
            await asyncio.sleep(0.05)  # another process's file: nothing to await
