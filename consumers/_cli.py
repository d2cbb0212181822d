"""``sealstream-consume``: subscribe to a cluster's streams and show decrypted rows live (or
as JSON lines); ``sealstream-consume trust ...`` manages the trust store, ``sealstream-consume
identity ...`` the user's identity key (which a cluster authorizes), ``sealstream-consume
web`` serves the browser view, which decrypts in the page, and ``sealstream-consume export``
re-exports the OTLP streams to an OTLP endpoint."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from consumers._client import Client
from consumers._config import ClientConfig, TokenFile, default_identity_file
from consumers._otlp import ExportConfig, OtlpExporter
from consumers._subscription import DEFAULT_RETRY_S, Resumed, Subscription
from consumers._view import JsonLinesWriter, LiveTable, summary
from consumers._web import WebConfig, WebServer
from sealstream import SealstreamError, SessionError, configure_logging
from sealstream.crypto import Batch, TrustStore, UserIdentity
from sealstream.otlp import OTLP_STREAMS
from sealstream.run import run

__all__ = ["main"]

_HINTS = {
    "unauthorized": "the token is missing, invalid or expired",
    "forbidden": "the token does not allow this cluster, or the cluster has not authorized "
    "your identity for these streams ('sealstream-consume identity show' prints what to give "
    "its operator)",
    "cluster_unavailable": "no producer serves this cluster (unknown cluster, or it is down)",
    "limit_exceeded": "a proxy limit was reached",
    "bad_request": "the proxy or the cluster refused the request",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealstream-consume", description=__doc__)
    p.add_argument("--cluster", help="cluster id to subscribe to")
    p.add_argument("--stream", action="append", help="stream name (repeatable)")
    p.add_argument("--nats-url", help="NATS server (env NATS_URL)")
    p.add_argument("--prefix", help="subject prefix (env SEALSTREAM_PREFIX)")
    p.add_argument("--token", help="access token (env SEALSTREAM_TOKEN)")
    p.add_argument(
        "--token-file", type=Path, help="file holding the token (env SEALSTREAM_TOKEN_FILE)"
    )
    p.add_argument("--trust-store", type=Path, help="trust store file (env SEALSTREAM_TRUST_STORE)")
    p.add_argument("--tofu", action="store_true", help="pin an unknown cluster's key on first use")
    p.add_argument(
        "--identity",
        type=Path,
        help="identity key file (env SEALSTREAM_IDENTITY_FILE; default "
        "~/.config/sealstream/identity.jwk if it exists)",
    )
    p.add_argument(
        "--authz-file",
        type=Path,
        help="an issuer token naming your identity, if the cluster uses one",
    )
    p.add_argument(
        "--key", choices=["rsa", "x25519", "p256"], help="ephemeral key type (default rsa)"
    )
    p.add_argument(
        "--key-mode",
        choices=["session", "group"],
        help="session (default: signed session keys) or group (one batch sealed and signed "
        "once for every reader of a stream, group keys sent to each member)",
    )
    p.add_argument("--output", choices=["table", "jsonl"], default="table")
    p.add_argument(
        "--policy",
        choices=["fail", "discard"],
        default="discard",
        help="on a rejected envelope: discard and count (default) or stop",
    )
    p.add_argument("--limit", type=int, help="stop after this many rows")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--retry",
        type=float,
        default=DEFAULT_RETRY_S,
        help="keep retrying the first open for this many seconds while the proxy is busy or "
        f"the cluster unavailable (default {DEFAULT_RETRY_S:g} s; 0 fails at once)",
    )
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="stop when the session ends for an infrastructure reason (expired, lost, "
        "cluster gone) instead of opening a new one",
    )
    p.add_argument(
        "--resume-timeout",
        type=float,
        default=300.0,
        help="how long a resume keeps retrying a busy or unavailable open (default 300 s)",
    )
    p.add_argument("--log-level", default="warning")
    sub = p.add_subparsers(dest="command")
    trust = sub.add_parser("trust", help="manage the trust store")
    trust.add_argument("action", choices=["add", "list"])
    trust.add_argument("--cluster")
    trust.add_argument(
        "--jwk-file", type=Path, help="public JWK (sealstream-producer key prints it)"
    )
    trust.add_argument("--trust-store", type=Path, dest="trust_store_sub")
    ident = sub.add_parser("identity", help="your identity key, which clusters authorize")
    ident.add_argument("action", choices=["create", "show"])
    ident.add_argument(
        "--file", type=Path, help="key file (default ~/.config/sealstream/identity.jwk)"
    )
    web = sub.add_parser(
        "web", help="serve the browser view (verifies and decrypts in the page) on this machine"
    )
    web.add_argument("--port", type=int, default=8470, help="HTTP port (default 8470)")
    web.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    web.add_argument(
        "--nats-ws-url", help="NATS WebSocket URL for the page (env SEALSTREAM_NATS_WS_URL)"
    )
    # the main options again, so they may follow 'web' too
    keep = argparse.SUPPRESS
    web.add_argument("--cluster", default=keep)
    web.add_argument("--stream", action="append", default=keep)
    web.add_argument("--prefix", default=keep)
    web.add_argument("--token-file", type=Path, default=keep)
    web.add_argument("--trust-store", type=Path, default=keep)
    web.add_argument("--key", choices=["rsa", "x25519", "p256"], default=keep)
    web.add_argument("--log-level", default=keep)
    _export_parser(sub)
    return p


def _export_parser(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="re-export what the OTLP streams carry, decrypted, to an OTLP endpoint",
    )
    export.add_argument(
        "--otlp-endpoint",
        required=True,
        help="OTLP base URL, e.g. http://127.0.0.1:4318 (/v1/traces etc. appended) or "
        "http://127.0.0.1:4317 with --protocol grpc",
    )
    export.add_argument(
        "--protocol",
        choices=["http/protobuf", "grpc"],
        default="http/protobuf",
        help="OTLP/HTTP (default; POST to the endpoint's /v1/<signal>) or OTLP/gRPC (the "
        "endpoint's host and port; https:// for TLS)",
    )
    export.add_argument(
        "--header", action="append", default=[], help="K=V sent with every request (repeatable)"
    )
    keep = argparse.SUPPRESS
    export.add_argument("--cluster", default=keep)
    export.add_argument("--stream", action="append", default=keep)
    export.add_argument("--duration", type=float, default=keep)
    export.add_argument("--log-level", default=keep)


def _export_config(args: argparse.Namespace) -> ExportConfig:
    headers = {}
    for header in args.header:
        name, sep, value = header.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--header {header!r}: use K=V")
        headers[name.strip()] = value.strip()
    return ExportConfig(endpoint=args.otlp_endpoint, protocol=args.protocol, headers=headers)


async def export(config: ClientConfig, args: argparse.Namespace) -> int:
    """``export``: subscribe to the OTLP streams and re-export every request (until
    ``--duration`` or Ctrl-C; then a summary on stderr)."""
    streams = args.stream or list(OTLP_STREAMS)
    exporter = OtlpExporter(_export_config(args))
    sub: Subscription[Batch | Resumed] | None = None
    try:
        async with Client(config) as client, exporter:
            sub = client.subscribe(args.cluster, streams, resume=args.resume, retry_s=args.retry)
            async with sub:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.duration):
                        async for batch in sub:
                            if isinstance(batch, Resumed):
                                _resumed(batch)
                            else:
                                await exporter.put(batch)
    finally:
        stats = sub.stats() if sub is not None else None
        print(
            f"exported {sum(exporter.exported.values())} OTLP requests, undelivered "
            f"{sum(exporter.failed.values())} {dict(exporter.failed) or ''}".rstrip()
            + (f"; lost {stats.lost}, dropped {stats.dropped} in the session" if stats else ""),
            file=sys.stderr,
        )
    return 0


def _identity(args: argparse.Namespace) -> int:
    path = args.file or args.identity or default_identity_file()
    if args.action == "create":
        if path.exists():
            print(f"error: {path} exists (use 'identity show')", file=sys.stderr)
            return 1
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity = (UserIdentity.load_or_create if args.action == "create" else UserIdentity.load)(path)
    print(json.dumps(identity.public_jwk))
    print(
        f"thumbprint {identity.kid} ({path}); give the cluster's operator the line above for "
        "'sealstream-producer authorize add --jwk-file'",
        file=sys.stderr,
    )
    return 0


def _trust(args: argparse.Namespace) -> int:
    path = args.trust_store_sub or args.trust_store or ClientConfig.from_env().trust_store
    store = TrustStore.load(path)
    if args.action == "list":
        for cluster, kids in store.clusters().items():
            for kid in kids:
                print(f"{cluster}\t{kid}")
        return 0
    if not args.cluster or not args.jwk_file:
        print("error: trust add needs --cluster and --jwk-file", file=sys.stderr)
        return 2
    kid = store.add(args.cluster, json.loads(args.jwk_file.read_text(encoding="utf-8")))
    print(f"pinned {args.cluster} {kid} in {path}")
    return 0


async def consume(config: ClientConfig, args: argparse.Namespace) -> int:
    streams = args.stream or ["http_events"]
    async with Client(config) as client:
        sub = client.subscribe(
            args.cluster,
            streams,
            resume=args.resume,
            retry_s=args.retry,
            resume_timeout_s=args.resume_timeout,
        )
        try:
            await sub.__aenter__()
        except SessionError as exc:
            raise SessionError(exc.code, f"{exc.detail} ({_HINTS.get(exc.code, '')})") from None
        try:
            return await _show(sub, args)
        finally:
            await sub.aclose()


def _upto(batch: Batch, room: int | None) -> Batch:
    """``batch`` cut to ``room`` rows: ``--limit`` counts rows, not batches."""
    if room is None or len(batch.rows) <= room:
        return batch
    return dataclasses.replace(batch, rows=batch.rows[:room])


def _resumed(marker: Resumed) -> None:
    print(
        f"resumed: session {marker.previous[:12]}… ended ({marker.reason}); rows until "
        f"{marker.session[:12]}… opened are lost",
        file=sys.stderr,
    )


async def _show(sub: Subscription[Batch | Resumed], args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.duration if args.duration else None
    rows = 0

    async def batches() -> None:
        nonlocal rows
        if args.output == "jsonl":
            writer = JsonLinesWriter()
            async for batch in sub:
                if isinstance(batch, Resumed):
                    _resumed(batch)
                    continue
                shown = _upto(batch, args.limit - rows if args.limit else None)
                writer.add(shown)
                rows += len(shown.rows)
                if args.limit and rows >= args.limit:
                    return
            return
        view = LiveTable(sub.cluster, sub.session_id, stats=sub.stats)
        with view.live(Console()):
            async for batch in sub:
                if isinstance(batch, Resumed):
                    view.session = batch.session
                    continue
                shown = _upto(batch, args.limit - rows if args.limit else None)
                view.add(shown)
                rows += len(shown.rows)
                if args.limit and rows >= args.limit:
                    return

    try:
        if deadline is None:
            await batches()
        else:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await batches()
    except TimeoutError:
        pass
    if sub.end_reason is not None:
        print(f"session ended by the cluster: {sub.end_reason}", file=sys.stderr)
    if (said := summary(sub.stats())) is not None:
        print(said, file=sys.stderr)
    return 0


def _web(args: argparse.Namespace) -> int:
    ws_url = args.nats_ws_url or os.environ.get("SEALSTREAM_NATS_WS_URL")
    token_path = args.token_file or os.environ.get("SEALSTREAM_TOKEN_FILE")
    if not ws_url or not token_path:
        print("error: web needs --nats-ws-url and --token-file", file=sys.stderr)
        return 2
    base = ClientConfig.from_env(prefix=args.prefix, trust_store=args.trust_store)
    try:
        config = WebConfig(
            nats_ws_url=ws_url,
            cluster=args.cluster,
            streams=args.stream or ["http_events"],
            token=TokenFile(Path(token_path)),
            trust=TrustStore.load(base.trust_store),
            prefix=base.prefix,
            key_kind=args.key or "x25519",
            # static NATS credentials, for a server without the auth callout
            nats_user=base.nats_auth.user,
            nats_password=base.nats_auth.password,
        )
        server = WebServer(config, host=args.host, port=args.port)
    except (OSError, ValueError, SealstreamError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with server:
        print(f"the sealstream page: {server.url} (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "trust":
        return _trust(args)
    if args.command == "identity":
        try:
            return _identity(args)
        except (OSError, SealstreamError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if not args.cluster:
        print("error: --cluster is required", file=sys.stderr)
        return 2
    configure_logging(level=args.log_level)
    if args.command == "web":
        return _web(args)
    token: str | TokenFile | None = args.token
    if args.token_file:
        try:
            token = TokenFile(args.token_file)
        except (OSError, ValueError) as exc:
            print(f"error: cannot read the token: {exc}", file=sys.stderr)
            return 2

    async def go() -> int:
        identity = UserIdentity.load(args.identity) if args.identity else None
        authz = args.authz_file.read_text(encoding="utf-8").strip() if args.authz_file else None
        config = ClientConfig.from_env(
            identity=identity,
            authz=authz,
            nats_url=args.nats_url,
            prefix=args.prefix,
            token=token,
            trust_store=args.trust_store,
            tofu=args.tofu or None,
            key_kind=args.key,
            key_mode=args.key_mode,
            policy=args.policy,
        )
        if args.command == "export":
            return await export(config, args)
        return await consume(config, args)

    return run(go)


if __name__ == "__main__":
    sys.exit(main())
