"""``sealstream``: ``up`` (the back end: nats-server, proxy, one producer cluster), ``demo``
(``up`` plus a live decrypted view) and ``bench``. The one module that imports every role;
nothing imports it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from sealstream._log import configure_logging
from sealstream._natsconf import Credentials, server_config
from sealstream._run import run
from sealstream._server import EmbeddedServer, ServerOptions
from sealstream._tokens import mint_token
from sealstream.crypto import ClusterIdentity, TrustStore

__all__ = ["main"]


@dataclass(frozen=True, slots=True)
class Backend:
    nats_url: str
    cluster: str
    state: Path
    #: the embedded server's WebSocket listener, for the browser view
    websocket_url: str | None = None
    consumer_user: tuple[str, str] | None = None

    @property
    def token_file(self) -> Path:
        return self.state / "token"

    @property
    def trust_store(self) -> Path:
        return self.state / "trust.json"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def prepare_state(state: Path, cluster: str) -> Credentials:
    """Development credentials: token secret, cluster key, trust store pin, a user token, and
    one NATS user per role with its server configuration."""
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
    creds_file = state / "nats-credentials.json"
    creds = Credentials.from_json(creds_file.read_text()) if creds_file.exists() else None
    if creds is None or cluster not in creds.producers:
        creds = Credentials.generate([cluster])
        _write_private(creds_file, creds.to_json().encode("utf-8"))
    _write_private(state / "nats.conf", server_config(creds, websocket=True).encode("utf-8"))
    roles = {"proxy": creds.proxy, "consumer": creds.consumer}
    roles |= {f"producer-{c}": u for c, u in creds.producers.items()}
    for role, user in roles.items():  # for deployments that mount them (compose.yaml)
        _write_private(state / f"nats-{role}.password", user.password.encode("utf-8"))
    return creds


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
    creds = prepare_state(state, cluster)
    async with contextlib.AsyncExitStack() as stack:
        websocket_url = None
        if nats_url is None:
            # secure by default: one NATS user per role, least privilege
            options = ServerOptions(config_file=state / "nats.conf")
            server = await stack.enter_async_context(EmbeddedServer(options))
            websocket_url = server.websocket_url
            urls = {
                "proxy": creds.proxy.url(server.url),
                "producer": creds.producers[cluster].url(server.url),
                "consumer": creds.consumer.url(server.url),
            }
        else:
            urls = dict.fromkeys(("proxy", "producer", "consumer"), nats_url)
        _write_private(state / "consumer.url", urls["consumer"].encode("utf-8"))
        env = {
            **os.environ,
            "SEALSTREAM_TOKEN_SECRET_FILE": str(state / "token-secret"),
            "SEALSTREAM_CLUSTER": cluster,
            "SEALSTREAM_KEY_FILE": str(state / "cluster-key.jwk"),
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
        yield Backend(
            urls["consumer"],
            cluster,
            state,
            websocket_url,
            (creds.consumer.user, creds.consumer.password) if nats_url is None else None,
        )


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
            c.add_argument("--output", choices=["table", "jsonl"], default="table")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        from sealstream._bench import bench_main

        return bench_main(args)
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
                    f"--trust-store {be.trust_store}"
                )
                if be.websocket_url is not None and be.consumer_user is not None:
                    print("or watch them decrypted in a browser page served from this machine:")
                    print(
                        f"  SEALSTREAM_NATS_USER={be.consumer_user[0]} "
                        f"SEALSTREAM_NATS_PASSWORD_FILE={be.state}/nats-consumer.password "
                        "sealstream-consume web "
                        f"--nats-ws-url {be.websocket_url} --cluster {be.cluster} {streams} "
                        f"--token-file {be.token_file} --trust-store {be.trust_store}"
                    )
                print("Ctrl-C stops everything.")
                await asyncio.Event().wait()
                return 0
            return await _demo_view(be, args)

    return run(go)


async def _demo_view(be: Backend, args: argparse.Namespace) -> int:
    from consumers._cli import consume
    from consumers._config import ClientConfig, TokenFile
    from consumers._web import WebConfig, WebServer

    config = ClientConfig(
        nats_url=be.nats_url,
        token=be.token_file.read_text(encoding="ascii").strip(),
        trust_store=be.trust_store,
        key_kind=args.key,
        policy="discard",
    )
    streams = [s for s in args.sources.split(",") if s in ("http_events", "host_metrics")]
    view_args = argparse.Namespace(
        cluster=be.cluster,
        stream=streams,
        output=args.output,
        limit=args.limit,
        duration=args.duration,
        retry=20.0,
    )
    if be.websocket_url is None or args.output != "table":
        return await consume(config, view_args)
    user, password = be.consumer_user or (None, None)
    web_config = WebConfig(
        nats_ws_url=be.websocket_url,
        cluster=be.cluster,
        streams=streams,
        token=TokenFile(be.token_file),
        trust=TrustStore.load(be.trust_store),
        # the embedded server has one static user per role (no auth callout)
        nats_user=user,
        nats_password=password,
    )
    with WebServer(web_config, port=args.web_port) as web:
        print(f"the same rows, decrypted in your browser: {web.url}", flush=True)
        return await consume(config, view_args)


if __name__ == "__main__":
    sys.exit(main())
