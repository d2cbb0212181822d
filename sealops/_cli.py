"""``sealstream``: ``up`` (the back end: nats-server, proxy, one producer cluster, and the
browser page), ``demo`` (``up`` plus a live decrypted view), the benches and chaos. The one
module that imports every role; nothing imports it."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

from consumers import Context
from sealops._stack import Backend, backend, page_server, source_streams, state_lock
from sealstream.crypto import UserIdentity
from sealstream.log import configure_logging
from sealstream.run import run

__all__ = ["main"]


_DESCRIPTION = (
    "sealstream on this machine: 'up' runs the back end (nats-server, proxy, one producer "
    "cluster and the browser page), 'demo' the same with a live decrypted view; 'bench', "
    "'bench-fanout' and 'chaos' measure it."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealstream", description=_DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("up", "run the back end; write a context for sealstream-consume"),
        ("demo", "the back end and a live decrypted view of its rows"),
    ):
        c = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        c.add_argument(
            "--dir",
            type=Path,
            default=Path(".sealstream"),
            help="state directory: keys, token, policy, logs (default .sealstream; one run "
            "at a time)",
        )
        c.add_argument("--cluster", default="demo", help="the cluster's id (default demo)")
        c.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
        c.add_argument(
            "--store",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="keep the sealed envelopes in the broker's JetStream store, so that faults "
            "and slow consumers lose nothing (default: on with the embedded NATS server, "
            "which has JetStream; off with --nats-url)",
        )
        c.add_argument(
            "--nats-port", type=int, help="the embedded NATS server's port (default: any free)"
        )
        c.add_argument(
            "--sources",
            default="http_events,host_metrics",
            help="comma-separated: http_events, host_metrics, jsonl:PATH[:STREAM] (PATH - "
            "reads this command's stdin; STREAM default records), "
            "otlp[:HOST[:HTTP_PORT[:GRPC_PORT|off]]] (as --otlp)",
        )
        c.add_argument(
            "--otlp",
            action="store_true",
            help="also an OpenTelemetry receiver: add the otlp source (OTLP/HTTP on 4318 and "
            "gRPC on 4317 of 127.0.0.1, free ports if those are taken; streams otlp_traces, "
            "otlp_metrics, otlp_logs)",
        )
        c.add_argument("--rate", type=float, default=20.0, help="http_events rows/s (default 20)")
        if name == "up":
            _topology_option(c)
            c.add_argument(
                "--context",
                help="the name of the context it writes and selects (default: the cluster id)",
            )
        else:
            c.add_argument(
                "--output",
                choices=["table", "jsonl"],
                help="live table (default on a terminal) or JSON lines (default otherwise)",
            )
            c.add_argument("--duration", type=float, help="stop after this many seconds")
            c.add_argument("--limit", type=int, help="stop after this many rows")
            c.add_argument(
                "--key",
                choices=["rsa", "x25519", "p256"],
                default="rsa",
                help="the view's ephemeral key type (default rsa)",
            )
        c.add_argument(
            "--web-port", type=int, default=0, help="port of the browser view (default: any)"
        )
    b = sub.add_parser("bench", help="load test: raw, plain-relay, session, per-message")
    b.add_argument("--quick", action="store_true", help="a smoke run")
    b.add_argument("--out", type=Path, default=Path("build/bench"), help="report directory")
    b.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
    b.add_argument("--only", choices=["otlp", "api"], help="run this scenario alone")
    f = sub.add_parser(
        "bench-fanout", help="producer CPU per batch at fan-out 1/10/50, group vs session mode"
    )
    f.add_argument("--out", type=Path, default=Path("build/bench"), help="report directory")
    f.add_argument("--batches", type=int, default=200, help="batches per measurement")
    w = sub.add_parser(
        "bench-web", help="the browser consumer in Chromium: first row, decrypted envelopes/s"
    )
    w.add_argument("--out", type=Path, default=Path("build/web-bench"), help="report directory")
    _bench_hub_parser(sub)
    c = sub.add_parser("chaos", help="kill and restart the broker, a proxy, the producer")
    c.add_argument("--duration", type=float, default=180.0, help="seconds (default 180)")
    c.add_argument("--seed", type=int, default=1, help="the fault schedule's random seed")
    c.add_argument("--consumers", type=int, default=3, help="consumers reading (default 3)")
    c.add_argument("--rate", type=float, default=200.0, help="rows/s from the producer")
    c.add_argument(
        "--store",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the producer keeps what it seals in the broker's JetStream store (default on)",
    )
    c.add_argument("--min-outage", type=float, default=1.0, help="nats-server outage, s")
    c.add_argument("--max-outage", type=float, default=60.0, help="nats-server outage, s")
    c.add_argument(
        "--faults",
        help="fault kinds in this order, cycled (nats,proxy-a,proxy-b,producer; and slow: the "
        "first consumer reads ten times slower than the stream)",
    )
    c.add_argument("--slow", type=float, default=60.0, help="a slow fault's length, s")
    c.add_argument(
        "--queue", type=int, help="each consumer's inbox queue, envelopes (the client's default)"
    )
    c.add_argument(
        "--key-mode",
        choices=["session", "group"],
        default="session",
        help="the consumers' key mode (group: one batch sealed for all, held and replayed by gseq)",
    )
    c.add_argument("--out", type=Path, default=Path("build/chaos"), help="report directory")
    _hub_chaos_options(c)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        from sealops._bench import bench_main

        return bench_main(args)
    if args.command == "bench-fanout":
        from sealops._fanout import fanout_main

        return fanout_main(args)
    if args.command == "bench-web":
        from sealops._webbench import web_bench_main

        return web_bench_main(args)
    if args.command == "bench-hub":
        from sealops._hubbench import bench_hub_main

        return bench_hub_main(args)
    if args.command == "chaos":
        from sealops._chaos import chaos_main

        args.words = shlex.join((sys.argv[1:] if argv is None else argv)[1:])  # the report's

        if args.topology == "hub":
            from sealops._hubchaos import hub_run

            return chaos_main(args, hub_run)
        return chaos_main(args)
    configure_logging(level="warning")
    if (
        args.command in ("up", "demo")
        and args.otlp
        and "otlp_traces" not in source_streams(args.sources)
    ):
        args.sources = f"{args.sources},otlp"  # unless --sources has one already

    async def go() -> int:
        with state_lock(args.dir, f"sealstream {args.command}"):
            if getattr(args, "topology", "single") == "hub":
                return await _up_hub(args)
            async with backend(
                state=args.dir,
                cluster=args.cluster,
                nats_url=args.nats_url,
                sources=args.sources,
                rate=args.rate,
                nats_port=args.nats_port,
                store=args.nats_url is None if args.store is None else args.store,
            ) as be:
                if args.command == "up":
                    return await _up(be, args)
                return await _demo_view(be, args)

    return run(go)


def _command(name: str) -> str:
    """How to run one of our commands from a shell: its name if that is what the shell finds
    (an active virtualenv), else its path."""
    ours = Path(sys.executable).parent / name
    found = shutil.which(name)
    return name if found and Path(found).resolve() == ours.resolve() else str(ours)


async def _up(be: Backend, args: argparse.Namespace) -> int:
    streams = source_streams(args.sources)
    context = Context(
        name=args.context or be.cluster,
        nats_url=be.nats_url,
        nats_ws_url=be.websocket_url,
        token_file=str(be.token_file.resolve()),
        trust_store=str(be.trust_store.resolve()),
        identity=str(be.identity_file.resolve()),
        cluster=be.cluster,
        streams=tuple(streams),
    )
    saved = context.save(select=True)
    print(f"sealstream is up: cluster {be.cluster!r}, logs in {be.state}/")
    print(f"context {context.name!r} written and selected ({saved}); read the rows with:")
    print(f"  {_command('sealstream-consume')} {' '.join(f'--stream {s}' for s in streams)}")
    _print_otlp(be, sys.stdout)
    if be.websocket_url is None:
        print("Ctrl-C stops everything.", flush=True)
        await asyncio.Event().wait()
        return 0
    with page_server(be, streams, port=args.web_port) as web:
        print(
            "or watch them decrypted in your browser (the page registers its key with this "
            f"cluster): {web.url}"
        )
        print(f"  (browsers reach NATS at {be.websocket_url})")
        print("Ctrl-C stops everything.", flush=True)
        await asyncio.Event().wait()
    return 0


def _topology_option(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--topology",
        choices=["single", "hub"],
        default="single",
        help="one nats-server, or a 3-node hub cluster with two proxies and two customer "
        "sites behind leaf nodes (state in DIR/hub/)",
    )


def _bench_hub_parser(sub: Any) -> None:
    h = sub.add_parser(
        "bench-hub", help="sessions, rows/s, proxy cost and a node kill on the hub topology"
    )
    h.add_argument("--clusters", type=int, default=20, help="customer clusters (leaf nodes)")
    h.add_argument("--sessions", type=int, default=1000, help="sessions over all clusters")
    h.add_argument(
        "--proxies", type=int, choices=[1, 2, 3], default=2, help="proxies on the hub (default 2)"
    )
    h.add_argument("--rate", type=float, default=5.0, help="rows/s a cluster")
    h.add_argument("--concurrency", type=int, default=50, help="opens in flight at once")
    h.add_argument(
        "--readers", type=int, default=2, help="processes the consumers run in (default 2)"
    )
    h.add_argument(
        "--key-mode",
        choices=["session", "group"],
        default="session",
        help="the consumers' key mode (group: one seal a batch for all of a cluster's readers)",
    )
    h.add_argument("--window", type=float, default=20.0, help="steady-state window, s")
    h.add_argument("--timeout", type=float, default=300.0, help="bound of each phase, s")
    h.add_argument("--out", type=Path, default=Path("build/bench"), help="report directory")


def _hub_chaos_options(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--topology",
        choices=["single", "hub"],
        default="single",
        help="hub: the 3-node hub with two sites behind leaf nodes (faults hub-node,proxy,leaf,"
        "link; --consumers a cluster)",
    )
    c.add_argument(
        "--leaf-outage", type=float, default=30.0, help="a leaf node's or link's outage (hub), s"
    )


async def _up_hub(args: argparse.Namespace) -> int:
    from sealops._hub import up_hub

    return await up_hub(state=args.dir / "hub", sources=args.sources, rate=args.rate)


def _print_otlp(be: Backend, out: TextIO) -> None:
    """Where applications export OpenTelemetry data to, as the SDK's variable says it."""
    if be.otlp_endpoint is None:
        return
    grpc = f" (gRPC on port {be.otlp_grpc_port})" if be.otlp_grpc_port is not None else ""
    print(f"OpenTelemetry applications export to the producer{grpc}:", file=out)
    print(f"  export OTEL_EXPORTER_OTLP_ENDPOINT={be.otlp_endpoint}", file=out, flush=True)


async def _demo_view(be: Backend, args: argparse.Namespace) -> int:
    from consumers import ClientConfig, consume

    config = ClientConfig(
        nats_url=be.nats_url,
        token=be.token_file.read_text(encoding="ascii").strip(),
        trust_store=be.trust_store,
        identity=UserIdentity.load(be.identity_file),
        key_kind=args.key,
        policy="discard",
    )
    streams = source_streams(args.sources)
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
    _print_otlp(be, sys.stdout if output == "table" else sys.stderr)
    if be.websocket_url is None or output != "table":
        return await consume(config, view_args)
    with page_server(be, streams, port=args.web_port) as web:
        print(f"the same rows, decrypted in your browser: {web.url}", flush=True)
        return await consume(config, view_args)


if __name__ == "__main__":
    sys.exit(main())
