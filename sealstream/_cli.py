"""``sealstream``: ``up`` (the back end: nats-server, proxy, one producer cluster, and the
browser page), ``demo`` (``up`` plus a live decrypted view) and ``bench``. The one module
that imports every role; nothing imports it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producers._authz import POLICY_FILE_NAME, AuthzPolicy
from sealstream._log import configure_logging
from sealstream._natsconf import Credentials, server_config
from sealstream._natsjwt import AccountKey
from sealstream._run import run
from sealstream._server import EmbeddedServer, ServerOptions
from sealstream._tokens import mint_token
from sealstream.crypto import ClusterIdentity, TrustStore, UserIdentity

if TYPE_CHECKING:
    from consumers._web import WebServer

__all__ = ["main"]


@dataclass(frozen=True, slots=True)
class Backend:
    nats_url: str
    cluster: str
    state: Path
    #: the embedded server's WebSocket listener, for the browser view
    websocket_url: str | None = None

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


def source_streams(sources: str) -> list[str]:
    """The streams of a ``--sources`` list (``jsonl:PATH[:STREAM]`` is ``STREAM``, default
    ``records``)."""
    streams = []
    for spec in filter(None, (s.strip() for s in sources.split(","))):
        if spec.startswith("jsonl:"):  # as sealstream-producer reads it
            streams.append(spec[len("jsonl:") :].partition(":")[2] or "records")
        else:
            streams.append(spec)
    return streams


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


#: how long a page's registration authorizes it (renewed when the page registers again)
REGISTRATION_S = 7 * 24 * 3600


def page_registration(
    policy_file: Path, *, name: str
) -> Callable[[Mapping[str, Any], Sequence[str]], str]:
    """Registration for the browser page served by ``up``/``demo``, which own this cluster's
    policy: authorize a page's public identity key for streams in ``policy_file`` (adding to
    what its entry already allows, keeping its expiry and name); returns the key's id.

    The policy stays the producer's code (``producers._authz``); the page's server
    (``consumers._web``, which may not import it) is handed this function."""

    def authorize(jwk: Mapping[str, Any], streams: Sequence[str]) -> str:
        policy = AuthzPolicy.load_or_empty(policy_file)
        _, kid = policy.with_key(jwk, streams)  # validates the key (ValueError)
        granted = policy.keys.get(kid)
        # a page's registration lasts a week (the demo token's lifetime), renewed as it is used
        horizon = int(time.time()) + REGISTRATION_S
        if granted is None:
            policy.with_key(jwk, streams, until=horizon, name=name)[0].save(policy_file)
        elif not set(streams) <= granted.streams or (
            granted.until is not None and granted.until < horizon - REGISTRATION_S / 2
        ):
            wanted = sorted(set(streams) | granted.streams)
            until = None if granted.until is None else max(int(granted.until), horizon)
            updated, _ = policy.with_key(jwk, wanted, until=until, name=granted.name)
            updated.save(policy_file)
        return kid

    return authorize


@contextlib.contextmanager
def page_server(be: Backend, streams: Sequence[str], *, port: int) -> Iterator[WebServer]:
    """The browser page for this back end, served from this machine, able to register its
    identity key in the cluster's policy (the page asks for it when it loads)."""
    from consumers._config import TokenFile
    from consumers._web import WebConfig, WebServer

    assert be.websocket_url is not None
    config = WebConfig(
        nats_ws_url=be.websocket_url,
        cluster=be.cluster,
        streams=streams,
        token=TokenFile(be.token_file),
        trust=TrustStore.load(be.trust_store),
        authorize=page_registration(be.policy_file, name="browser page on this machine"),
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
    *, state: Path, cluster: str, nats_url: str | None, sources: str, rate: float
) -> AsyncIterator[Backend]:
    """nats-server (embedded unless ``nats_url``), proxy and producer as child processes."""
    creds = prepare_state(state, cluster, source_streams(sources))
    async with contextlib.AsyncExitStack() as stack:
        callout: dict[str, str] = {}
        websocket_url = None
        if nats_url is None:
            # secure by default: one NATS user per role, least privilege; consumers log in
            # with their token through the auth callout, which the proxy answers
            options = ServerOptions(config_file=state / "nats.conf")
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
        }
        roles = {
            "proxy": ["broker_proxy", "--log-level", "info"],
            "producer": ["producers", "--rate", str(rate), "--log-level", "info"],
        }
        for role, args in roles.items():
            log = (state / f"{role}.log").open("ab")
            stack.callback(log.close)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                *args,
                env={**env, "NATS_URL": urls[role]},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            stack.push_async_callback(_stop, proc)
        yield Backend(urls["consumer"], cluster, state, websocket_url)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("up", "run the back end"), ("demo", "back end + live decrypted view")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--dir", type=Path, default=Path(".sealstream"), help="state directory")
        c.add_argument("--cluster", default="demo")
        c.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
        c.add_argument("--sources", default="http_events,host_metrics")
        c.add_argument("--rate", type=float, default=20.0, help="http_events rows/s")
        if name == "demo":
            c.add_argument(
                "--output",
                choices=["table", "jsonl"],
                help="live table (default on a terminal) or JSON lines (default otherwise)",
            )
            c.add_argument("--duration", type=float, help="stop after this many seconds")
            c.add_argument("--limit", type=int, help="stop after this many rows")
            c.add_argument("--key", choices=["rsa", "x25519", "p256"], default="rsa")
        c.add_argument(
            "--web-port", type=int, default=0, help="port of the browser view (default: any)"
        )
    b = sub.add_parser("bench", help="load test: raw, plain-relay, session, per-message")
    b.add_argument("--quick", action="store_true", help="a smoke run")
    b.add_argument("--out", type=Path, default=Path("build/bench"), help="report directory")
    b.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
    f = sub.add_parser(
        "bench-fanout", help="producer CPU per batch at fan-out 1/10/50, group vs session mode"
    )
    f.add_argument("--out", type=Path, default=Path("build/bench"), help="report directory")
    f.add_argument("--batches", type=int, default=200, help="batches per measurement")
    c = sub.add_parser("chaos", help="kill and restart the broker, a proxy, the producer")
    c.add_argument("--duration", type=float, default=180.0, help="seconds (default 180)")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--consumers", type=int, default=3)
    c.add_argument("--rate", type=float, default=200.0, help="rows/s from the producer")
    c.add_argument("--min-outage", type=float, default=1.0, help="nats-server outage, s")
    c.add_argument("--max-outage", type=float, default=60.0, help="nats-server outage, s")
    c.add_argument(
        "--faults", help="fault kinds in this order, cycled (nats,proxy-a,proxy-b,producer)"
    )
    c.add_argument("--out", type=Path, default=Path("build/chaos"), help="report directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        from sealbench._bench import bench_main

        return bench_main(args)
    if args.command == "bench-fanout":
        from sealbench._fanout import fanout_main

        return fanout_main(args)
    if args.command == "chaos":
        from sealbench._chaos import chaos_main

        return chaos_main(args)
    configure_logging(level="warning")

    async def go() -> int:
        sources = args.sources
        async with backend(
            state=args.dir,
            cluster=args.cluster,
            nats_url=args.nats_url,
            sources=sources,
            rate=args.rate,
        ) as be:
            if args.command == "up":
                print(f"sealstream is up: cluster {be.cluster!r}, logs in {be.state}/")
                print("connect a consumer from another terminal with:")
                streams = " ".join(f"--stream {s}" for s in sources.split(",") if ":" not in s)
                print(
                    f'  NATS_URL="$(cat {be.state}/consumer.url)" sealstream-consume '
                    f"--cluster {be.cluster} {streams} --token-file {be.token_file} "
                    f"--trust-store {be.trust_store} --identity {be.identity_file}"
                )
                if be.websocket_url is None:
                    print("Ctrl-C stops everything.")
                    await asyncio.Event().wait()
                    return 0
                with page_server(be, source_streams(sources), port=args.web_port) as web:
                    print(
                        "or watch them decrypted in your browser (the page registers its key "
                        f"with this cluster): {web.url}"
                    )
                    print(f"  (browsers reach NATS at {be.websocket_url})")
                    print("Ctrl-C stops everything.", flush=True)
                    await asyncio.Event().wait()
                return 0
            return await _demo_view(be, args)

    return run(go)


async def _demo_view(be: Backend, args: argparse.Namespace) -> int:
    from consumers._cli import consume
    from consumers._config import ClientConfig

    config = ClientConfig(
        nats_url=be.nats_url,
        token=be.token_file.read_text(encoding="ascii").strip(),
        trust_store=be.trust_store,
        identity=UserIdentity.load(be.identity_file),
        key_kind=args.key,
        policy="discard",
    )
    streams = [s for s in args.sources.split(",") if s in ("http_events", "host_metrics")]
    # a live table needs a terminal; piped or redirected, the rows come as lines
    output = args.output or ("table" if sys.stdout.isatty() else "jsonl")
    view_args = argparse.Namespace(
        cluster=be.cluster,
        stream=streams,
        output=output,
        limit=args.limit,
        duration=args.duration,
        retry=20.0,
        resume=True,
        resume_timeout=300.0,
    )
    if be.websocket_url is None or output != "table":
        return await consume(config, view_args)
    with page_server(be, streams, port=args.web_port) as web:
        print(f"the same rows, decrypted in your browser: {web.url}", flush=True)
        return await consume(config, view_args)


if __name__ == "__main__":
    sys.exit(main())
