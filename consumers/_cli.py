"""``sealstream-consume``: subscribe to a cluster's streams and show decrypted rows live (or
as JSON lines). Its defaults come from a context ('sealstream up' writes one); ``trust``
manages the trust store, ``identity`` your identity key (which a cluster authorizes),
``whoami`` shows who you are to a cluster, ``streams`` what a cluster offers and grants you,
``web`` serves the browser view, which decrypts in the page, and ``export`` re-exports the OTLP
streams to an OTLP endpoint."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from consumers._client import Client
from consumers._config import (
    ClientConfig,
    Context,
    TokenFile,
    default_identity_file,
    default_trust_store,
)
from consumers._grants import Grants
from consumers._otlp import ExportConfig, OtlpExporter
from consumers._subscription import DEFAULT_RETRY_S, Resumed, Subscription
from consumers._view import JsonLinesWriter, LiveTable, summary
from consumers._web import WebConfig, WebServer
from sealstream import BrokerError, SealstreamError, SessionError, configure_logging
from sealstream.crypto import Batch, TrustStore, UserIdentity
from sealstream.otlp import OTLP_STREAMS
from sealstream.run import quiet_broken_pipe, read_option_file, run

__all__ = ["consume", "main"]

#: what to do about a refusal, by code and the start of its reason (the first match wins)
_ADVICE = (
    (
        "forbidden",
        "key not authorized",
        "give the cluster's operator your public key ('sealstream-consume identity show' "
        "prints it) for 'sealstream-producer authorize add'",
    ),
    (
        "forbidden",
        "stream ",
        "ask the cluster's operator for it ('sealstream-producer authorize add --key-file "
        "CLUSTER-KEY --jwk-file YOURS.pub.jwk --stream STREAM')",
    ),
    ("forbidden", "authorization expired", "ask the cluster's operator to renew it"),
    ("forbidden", "token does not allow", "check --cluster, or use a token for this cluster"),
    ("unauthorized", "NATS refused the connection: token expired", "get a fresh token"),
    ("unauthorized", "token expired", "get a fresh token"),
    ("cluster_unavailable", "", "check --cluster, or start the cluster's producer"),
    ("limit_exceeded", "", "try again later, or ask the relay's operator"),
)
_NO_IDENTITY = (
    "this cluster checks who reads it and you gave no identity: give --identity FILE "
    "('sealstream-consume identity create' makes one, for its operator to authorize)"
)
_ENVIRONMENT = (
    "environment: SEALSTREAM_CONTEXT, NATS_URL, SEALSTREAM_PREFIX, SEALSTREAM_TOKEN, "
    "SEALSTREAM_TOKEN_FILE, SEALSTREAM_TRUST_STORE, SEALSTREAM_IDENTITY_FILE, "
    "SEALSTREAM_NATS_USER with SEALSTREAM_NATS_PASSWORD_FILE (a NATS without the auth "
    "callout), XDG_CONFIG_HOME; flags win over them, and they over the context"
)


def refusal(exc: SessionError, *, identity: bool) -> SessionError:
    """A refusal whose one line says what to do, its reason said once."""
    detail = exc.detail
    if exc.code == "forbidden" and detail == "no proof" and not identity:
        detail = _NO_IDENTITY
    else:
        for code, reason, advice in _ADVICE:
            if exc.code == code and detail.startswith(reason):
                detail = f"{detail}: {advice}"
                break
    return SessionError(exc.code, detail, retriable=exc.retriable)


def _client_options(p: argparse.ArgumentParser, default: Any = None) -> None:
    """The options that say where and as whom to connect (main command and ``web``)."""
    p.add_argument(
        "--context",
        default=default,
        help="take defaults from this context (env SEALSTREAM_CONTEXT; default the selected "
        "one, which 'sealstream up' writes)",
    )
    p.add_argument("--cluster", default=default, help="cluster id to read (default: the context's)")
    p.add_argument(
        "--stream",
        action="append",
        default=default,
        help="stream to read (repeatable; required: 'whoami' lists the context's)",
    )
    p.add_argument("--prefix", default=default, help="subject prefix (env SEALSTREAM_PREFIX)")
    p.add_argument(
        "--token-file",
        type=Path,
        default=default,
        help="file holding the access token (env SEALSTREAM_TOKEN_FILE)",
    )
    p.add_argument(
        "--trust-store",
        type=Path,
        default=default,
        help="trust store file (env SEALSTREAM_TRUST_STORE; default "
        "~/.config/sealstream/trust.json)",
    )
    p.add_argument(
        "--key",
        choices=["rsa", "x25519", "p256"],
        default=default,
        help="ephemeral key type (default rsa; x25519 for 'web')",
    )
    p.add_argument(
        "--log-level", default=default, help="debug, info, warning or error (default error)"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sealstream-consume", description=__doc__.replace("``", ""), epilog=_ENVIRONMENT
    )
    _client_options(p)
    p.add_argument("--nats-url", help="NATS server (env NATS_URL)")
    p.add_argument("--token", help="access token (env SEALSTREAM_TOKEN; prefer --token-file)")
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
        "--key-mode",
        choices=["session", "group"],
        help="session (default: signed session keys) or group (one batch sealed and signed "
        "once for every reader of a stream, group keys sent to each member)",
    )
    p.add_argument(
        "--output",
        choices=["table", "jsonl"],
        default="table",
        help="a live table (default) or one JSON object per row",
    )
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
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    trust = sub.add_parser(
        "trust",
        help="the trust store: the cluster keys you accept",
        description="The trust store: which signing key each cluster may use.",
    )
    trust_actions = trust.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("add", "pin a cluster's public signing key ('sealstream-producer key' prints it)"),
        ("list", "print the pinned keys: cluster, key id"),
    ):
        t = trust_actions.add_parser(action, help=text, description=text[0].upper() + text[1:])
        t.add_argument(
            "--trust-store",
            type=Path,
            dest="trust_store_sub",
            help="trust store file (env SEALSTREAM_TRUST_STORE)",
        )
        if action == "add":
            t.add_argument("--cluster", dest="cluster_sub", required=True, help="cluster id")
            t.add_argument(
                "--jwk-file",
                type=Path,
                required=True,
                help="the cluster's public JWK ('sealstream-producer key' prints it)",
            )
    ident = sub.add_parser(
        "identity",
        help="your identity key, which clusters authorize",
        description="Your identity key: its public half is what a cluster's operator "
        "authorizes ('sealstream-producer authorize add --key-file CLUSTER-KEY --jwk-file FILE "
        "--stream STREAM').",
    )
    ident_actions = ident.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("create", "create your identity key; print its public JWK (never overwrites)"),
        ("show", "print your identity's public JWK"),
    ):
        i = ident_actions.add_parser(action, help=text, description=text[0].upper() + text[1:])
        i.add_argument(
            "--file",
            type=Path,
            help="key file (default --identity, the context's, or "
            "~/.config/sealstream/identity.jwk)",
        )
    ctx = sub.add_parser(
        "context",
        help="the contexts: named defaults ('sealstream up' writes one)",
        description="The contexts: named defaults for these commands (NATS URL, token, trust "
        "store, identity, cluster, streams), as the nats CLI has them.",
    )
    ctx_actions = ctx.add_subparsers(dest="action", required=True, metavar="ACTION")
    ctx_actions.add_parser("list", help="the saved contexts; * marks the selected one")
    chosen = ctx_actions.add_parser("select", help="make a context the default")
    chosen.add_argument("name", help="the context's name")
    sub.add_parser(
        "whoami",
        help="who you are to a cluster: context, token, identity, pinned key, grants",
        description="Who you are: the context, the token's subject, clusters and expiry, your "
        "identity's id, the pinned cluster keys (local files), and the streams the cluster "
        "grants your identity, asked of the cluster (or why it could not be asked).",
        epilog=_ENVIRONMENT,
    )
    sub.add_parser(
        "streams",
        help="the streams a cluster offers, and which it grants your identity",
        description="The streams the cluster (--cluster, or the context's) offers, each "
        "marked granted (until when) or not granted, as its producer's policy says.",
        epilog=_ENVIRONMENT,
    )
    web = sub.add_parser(
        "web",
        help="serve the browser view (verifies and decrypts in the page) on this machine",
        epilog=_ENVIRONMENT + "; SEALSTREAM_NATS_WS_URL",
    )
    web.add_argument("--port", type=int, default=8470, help="HTTP port (default 8470)")
    web.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    web.add_argument(
        "--nats-ws-url", help="NATS WebSocket URL for the page (env SEALSTREAM_NATS_WS_URL)"
    )
    _client_options(web, argparse.SUPPRESS)  # so they may follow 'web' too
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
    _client_options(export, argparse.SUPPRESS)  # so they may follow 'export' too
    export.add_argument(
        "--duration", type=float, default=argparse.SUPPRESS, help="stop after this many seconds"
    )


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
    streams = args.stream or list(OTLP_STREAMS)  # the OTLP streams, unless told otherwise
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


def _environment(args: argparse.Namespace) -> tuple[Context | None, dict[str, str]]:
    """The context in use and the environment over it (flags are read on top)."""
    ctx = Context.load(args.context)
    return ctx, ctx.under(os.environ) if ctx else dict(os.environ)


def _existing(flag: str, path: Path | str | None) -> Path | None:
    """``path`` if given, and then it must exist: a mistyped name is said as such."""
    if path is None or path == "":
        return None
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file")
    return path


def _trust_store(args: argparse.Namespace, env: Mapping[str, str], *, must_exist: bool) -> Path:
    given = (
        getattr(args, "trust_store_sub", None)
        or args.trust_store
        or env.get("SEALSTREAM_TRUST_STORE")
    )
    path = Path(given) if given else default_trust_store()
    if must_exist and not path.exists():
        raise ValueError(
            f"--trust-store {path}: no such file (pin the cluster's key with "
            "'sealstream-consume trust add', or give --tofu)"
        )
    return path


def _identity_file(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    given = getattr(args, "file", None) or args.identity or env.get("SEALSTREAM_IDENTITY_FILE")
    return Path(given) if given else default_identity_file()


def _identity(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    path = _identity_file(args, env)
    if args.action == "create":
        if path.exists():
            raise ValueError(f"{path} exists (use 'identity show')")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = UserIdentity.load_or_create(path)
    else:
        identity = UserIdentity.load(_existing("--file", path) or path)
    print(json.dumps(identity.public_jwk))
    print(
        f"identity {identity.kid} ({path}); give a cluster's operator the line above, in a "
        "file, for 'sealstream-producer authorize add --key-file CLUSTER-KEY --jwk-file FILE "
        "--stream STREAM'",
        file=sys.stderr,
    )
    return 0


def _trust(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    path = _trust_store(args, env, must_exist=args.action == "list")
    store = TrustStore.load(path)
    if args.action == "list":
        for cluster, kids in store.clusters().items():
            for kid in kids:
                print(f"{cluster}\t{kid}")
        return 0
    kid = store.add(args.cluster_sub, json.loads(read_option_file("--jwk-file", args.jwk_file)))
    print(f"pinned {args.cluster_sub} {kid} in {path}")
    return 0


def _context(args: argparse.Namespace) -> int:
    if args.action == "select":
        Context.select(args.name)
        print(f"context {args.name!r} selected")
        return 0
    selected = os.environ.get("SEALSTREAM_CONTEXT") or Context.selected()
    for name in Context.names():
        ctx = Context.load(name)
        assert ctx is not None
        mark = "*" if name == selected else " "
        print(f"{mark} {name}\t{ctx.cluster or '-'}\t{ctx.nats_url or '-'}")
    return 0


def _claims(token: str) -> dict[str, Any]:
    """A token's claims, unverified (only the proxy can verify it): for display."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        raise ValueError("the token is not a JWT") from None
    if not isinstance(claims, dict):
        raise ValueError("the token is not a JWT")
    return claims


def _whoami(args: argparse.Namespace, ctx: Context | None, env: Mapping[str, str]) -> int:
    lines = [("context", ctx.name if ctx else "none ('sealstream up' writes one)")]
    if ctx is not None:
        lines.append(("nats", env.get("NATS_URL", "-")))
        lines.append(("cluster", args.cluster or ctx.cluster or "-"))
        lines.append(("streams", ", ".join(ctx.streams) or "-"))
    token_file = _existing("--token-file", args.token_file or env.get("SEALSTREAM_TOKEN_FILE"))
    token = args.token or env.get("SEALSTREAM_TOKEN")
    if token_file is not None and not args.token:
        token = TokenFile(token_file)()
    if token:
        claims = _claims(token)
        exp = claims.get("exp")
        left = (
            datetime.datetime.fromtimestamp(exp, datetime.UTC).isoformat()
            if isinstance(exp, int | float)
            else "-"
        )
        lines.append(("token", f"subject {claims.get('sub')!s:.64}, expires {left}"))
        lines.append(("token clusters", ", ".join(map(str, claims.get("clusters") or [])) or "-"))
    else:
        lines.append(("token", "none (--token-file)"))
    path = _identity_file(args, env)
    if path.exists():
        lines.append(("identity", f"{UserIdentity.load(path).kid} ({path})"))
    else:
        lines.append(("identity", f"none ({path} does not exist)"))
    store = _trust_store(args, env, must_exist=False)
    pinned = TrustStore.load(store).clusters() if store.exists() else {}
    lines += [(f"pinned {c}", ", ".join(kids)) for c, kids in pinned.items()]
    cluster = args.cluster or (ctx.cluster if ctx else None)
    if cluster:
        lines.append((f"granted by cluster {cluster}", _granted_line(args, env, cluster)))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def _granted(until: int | None) -> str:
    if until is None:
        return "granted"
    return f"granted until {datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat()}"


def _granted_line(args: argparse.Namespace, env: Mapping[str, str], cluster: str) -> str:
    """What ``cluster`` grants, asked of it; or, in the same one line, why it was not known."""
    try:
        config = _client_config(args, env)
        grants = asyncio.run(_ask_grants(config, cluster))
    except (OSError, ValueError, SealstreamError) as exc:
        return f"unknown ({exc})"
    if not grants.granted:
        return f"nothing (offers {', '.join(grants.offered) or 'nothing'})"
    return f"{', '.join(grants.granted)} ({_granted(grants.until)})"


async def _ask_grants(config: ClientConfig, cluster: str) -> Grants:
    """The cluster's grants; a refusal says what to do, an unreachable NATS where to look."""
    try:
        async with Client(config) as client:
            return await client.grants(cluster)
    except SessionError as exc:
        raise refusal(exc, identity=config.identity is not None) from None
    except BrokerError as exc:
        if not exc.retriable:
            raise
        raise BrokerError(f"{exc}: is it running? (--nats-url, NATS_URL or the context)") from None


async def _streams(config: ClientConfig, cluster: str) -> int:
    grants = await _ask_grants(config, cluster)
    width = max((len(s) for s in grants.offered), default=0)
    for stream in grants.offered:
        said = "not granted" if stream not in grants.granted else _granted(grants.until)
        print(f"{stream:<{width}}  {said}")
    if not grants.offered:
        print(f"cluster {cluster} offers no stream")
    return 0


async def consume(config: ClientConfig, args: argparse.Namespace) -> int:
    """Read ``args.stream`` of ``args.cluster`` and show the rows (the CLI's and the demo's
    view); a refusal raises SessionError, an unreachable NATS BrokerError, with what to do."""
    if not args.stream:
        raise ValueError("--stream is required")
    try:
        async with Client(config) as client:
            sub = client.subscribe(
                args.cluster,
                args.stream,
                resume=args.resume,
                retry_s=args.retry,
                resume_timeout_s=args.resume_timeout,
            )
            try:
                await sub.__aenter__()
            except SessionError as exc:
                raise refusal(exc, identity=config.identity is not None) from None
            try:
                return await _show(sub, args)
            finally:
                await sub.aclose()
    except BrokerError as exc:
        if not exc.retriable:  # NATS refused a login: the session error says why
            raise
        raise BrokerError(f"{exc}: is it running? (--nats-url, NATS_URL or the context)") from None


def _upto(batch: Batch, room: int | None) -> Batch:
    """``batch`` cut to ``room`` rows: ``--limit`` counts rows, not batches."""
    if room is None or len(batch.rows) <= room:
        return batch
    return dataclasses.replace(batch, rows=batch.rows[:room])


def _resumed(marker: Resumed) -> None:
    then = (
        "its groups go on: what they sealed meanwhile is read from the store, what is no "
        "longer there is counted as lost"
        if marker.carried
        else f"rows until {marker.session[:12]}… opened are lost"
    )
    if marker.drained:
        then = f"its last {marker.drained} batches read from the store; {then}"
    print(
        f"resumed: session {marker.previous[:12]}… ended ({marker.reason}); {then}", file=sys.stderr
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


def _web(args: argparse.Namespace, ctx: Context | None, env: Mapping[str, str]) -> int:
    ws_url = args.nats_ws_url or env.get("SEALSTREAM_NATS_WS_URL")
    token_path = _existing("--token-file", args.token_file or env.get("SEALSTREAM_TOKEN_FILE"))
    if not ws_url or token_path is None:
        raise ValueError("web needs --nats-ws-url and --token-file (or a context)")
    base = ClientConfig.from_env(env, prefix=args.prefix, trust_store=args.trust_store)
    streams = args.stream or list(ctx.streams if ctx else ())
    if not streams:
        raise ValueError("--stream is required")
    config = WebConfig(
        nats_ws_url=ws_url,
        cluster=args.cluster,
        streams=streams,
        token=TokenFile(token_path),
        trust=TrustStore.load(_trust_store(args, env, must_exist=True)),
        prefix=base.prefix,
        key_kind=args.key or "x25519",
        # static NATS credentials, for a server without the auth callout
        nats_user=base.nats_auth.user,
        nats_password=base.nats_auth.password,
    )
    with WebServer(config, host=args.host, port=args.port) as server:
        print(f"the sealstream page: {server.url} (Ctrl-C stops)", flush=True)
        threading.Event().wait()  # until Ctrl-C (KeyboardInterrupt, after the server stops)
    return 0


def _client_config(args: argparse.Namespace, env: Mapping[str, str]) -> ClientConfig:
    token: str | TokenFile | None = args.token
    if token is None:  # a file named by the flag, else by the environment or the context
        token_file = _existing("--token-file", args.token_file or env.get("SEALSTREAM_TOKEN_FILE"))
        token = TokenFile(token_file) if token_file is not None else None
    identity_file = _existing("--identity", args.identity or env.get("SEALSTREAM_IDENTITY_FILE"))
    authz_file = _existing("--authz-file", args.authz_file)
    return ClientConfig.from_env(
        env,
        identity=UserIdentity.load(identity_file) if identity_file else None,
        authz=authz_file.read_text(encoding="utf-8").strip() if authz_file else None,
        nats_url=args.nats_url,
        prefix=args.prefix,
        token=token,
        trust_store=_trust_store(args, env, must_exist=not args.tofu),
        tofu=args.tofu or None,
        key_kind=args.key,
        key_mode=args.key_mode,
        policy=args.policy,
    )


def _command(args: argparse.Namespace) -> int:
    if args.command == "context":
        return _context(args)
    ctx, env = _environment(args)
    if args.command == "trust":
        return _trust(args, env)
    if args.command == "identity":
        return _identity(args, env)
    if args.command == "whoami":
        return _whoami(args, ctx, env)
    args.cluster = args.cluster or (ctx.cluster if ctx else None)
    if not args.cluster:
        raise ValueError("--cluster is required (or a context: 'sealstream up' writes one)")
    if args.command == "web":
        return _web(args, ctx, env)
    if args.command == "streams":
        config = _client_config(args, env)
        cluster = args.cluster
        return run(lambda: _streams(config, cluster))
    if args.command == "export":
        config = _client_config(args, env)
        return run(lambda: export(config, args))
    if not args.stream:
        offered = f" ({args.cluster} offers {', '.join(ctx.streams)})" if ctx else ""
        raise ValueError(f"--stream is required{offered}")
    config = _client_config(args, env)
    return run(lambda: consume(config, args))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(level=getattr(args, "log_level", None) or "error")
    try:
        return _command(args)
    except KeyboardInterrupt:  # Ctrl-C outside an event loop ('web', before or after one)
        return 0
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (OSError, ValueError, SealstreamError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, SealstreamError) else 2


if __name__ == "__main__":
    sys.exit(main())
