"""``sealstream``: ``up`` (the back end: nats-server, proxy, one producer cluster, and the
browser page), ``demo`` (``up`` plus a live decrypted view) and ``bench``. The one module
that imports every role; nothing imports it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from sealops._stack import Backend, backend, page_server, source_streams
from sealstream.crypto import UserIdentity
from sealstream.log import configure_logging
from sealstream.run import run

__all__ = ["main"]


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
    b.add_argument("--only", choices=["otlp"], help="run this scenario alone")
    f = sub.add_parser(
        "bench-fanout", help="producer CPU per batch at fan-out 1/10/50, group vs session mode"
    )
    f.add_argument("--out", type=Path, default=Path("build/bench"), help="report directory")
    f.add_argument("--batches", type=int, default=200, help="batches per measurement")
    w = sub.add_parser(
        "bench-web", help="the browser consumer in Chromium: first row, decrypted envelopes/s"
    )
    w.add_argument("--out", type=Path, default=Path("build/web-bench"), help="report directory")
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
        from sealops._bench import bench_main

        return bench_main(args)
    if args.command == "bench-fanout":
        from sealops._fanout import fanout_main

        return fanout_main(args)
    if args.command == "bench-web":
        from sealops._webbench import web_bench_main

        return web_bench_main(args)
    if args.command == "chaos":
        from sealops._chaos import chaos_main

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
    from consumers import ClientConfig, consume

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
