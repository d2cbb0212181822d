"""``sealstream-producer``: run a cluster agent, or show its public signing key."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from producers._agent import Agent
from producers._config import ProducerConfig
from producers._sources import HostMetrics, HttpEvents, JsonLines, Source
from sealstream import configure_logging
from sealstream._run import add_service_options, keep, run, suppress
from sealstream.crypto import ClusterIdentity

__all__ = ["main", "parse_source"]


def parse_source(spec: str, *, rate: float, interval: float) -> Source:
    """``http_events``, ``host_metrics``, or ``jsonl:PATH[:STREAM]`` (PATH ``-`` is stdin)."""
    if spec == "http_events":
        return HttpEvents(rate=rate)
    if spec == "host_metrics":
        return HostMetrics(interval=interval)
    if spec.startswith("jsonl:"):
        path, _, stream = spec[len("jsonl:") :].partition(":")
        return JsonLines(None if path == "-" else Path(path), stream=stream or "records")
    raise ValueError(
        f"unknown source {spec!r}: use http_events, host_metrics or jsonl:PATH[:STREAM]"
    )


def source_specs(args: argparse.Namespace, env: Mapping[str, str]) -> list[str]:
    """The ``--source`` values given before and after ``run``, else ``SEALSTREAM_SOURCES``."""
    given = [*(args.source or []), *getattr(args, "run_source", [])]
    return given or env.get("SEALSTREAM_SOURCES", "http_events,host_metrics").split(",")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealstream-producer", description=__doc__)
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the agent (default)")
    for parser, d in ((p, keep), (r, suppress)):
        parser.add_argument(
            "--cluster", default=d(None), help="cluster id (env SEALSTREAM_CLUSTER)"
        )
        add_service_options(parser, d)
        parser.add_argument(
            "--key-file",
            type=Path,
            default=d(None),
            help="signing key file (env SEALSTREAM_KEY_FILE)",
        )
        parser.add_argument(
            "--source",
            action="append",
            # after 'run' they go to a list of their own, joined to those given before it
            dest="source" if parser is p else "run_source",
            default=d(None),
            help="http_events | host_metrics | jsonl:PATH[:STREAM] (repeatable; env "
            "SEALSTREAM_SOURCES, comma-separated; default http_events,host_metrics)",
        )
        parser.add_argument("--rate", type=float, default=d(50.0), help="http_events rows/s")
        parser.add_argument("--interval", type=float, default=d(1.0), help="host_metrics period, s")
        parser.add_argument(
            "--buffer-bytes",
            type=int,
            default=d(None),
            help="sealed envelopes kept per session while NATS is unreachable (default 4 MiB; "
            "env SEALSTREAM_BUFFER_BYTES); beyond it the oldest are dropped and counted",
        )
    k = sub.add_parser("key", help="create the signing key if needed; print its public JWK")
    k.add_argument("--key-file", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "key":
        identity = ClusterIdentity.load_or_create(args.key_file)
        print(json.dumps(identity.public_jwk))
        return 0
    configure_logging(level=args.log_level, json=args.log_json)

    async def serve() -> int:
        config = ProducerConfig.from_env(
            cluster=args.cluster,
            nats_url=args.nats_url,
            prefix=args.prefix,
            key_file=args.key_file,
            buffer_bytes=args.buffer_bytes,
        )
        specs = source_specs(args, os.environ)
        sources = [
            parse_source(s.strip(), rate=args.rate, interval=args.interval)
            for s in specs
            if s.strip()
        ]
        async with Agent(config, sources=sources):
            await asyncio.Event().wait()
        return 0

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
