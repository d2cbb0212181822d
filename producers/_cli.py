"""``sealstream-producer``: run a cluster agent, show its public signing key, or manage who
may read it (``authorize``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from producers._agent import Agent
from producers._authz import POLICY_FILE_NAME, AuthzPolicy, public_ed25519
from producers._config import ProducerConfig
from producers._otlp import OtlpConfig, OtlpReceiver
from producers.sources import HostMetrics, HttpEvents, JsonLines, Source
from sealstream import SealstreamError, configure_logging
from sealstream.crypto import ClusterIdentity
from sealstream.jwk import thumbprint
from sealstream.otlp import OTLP_STREAMS
from sealstream.run import add_service_options, keep, run, suppress

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
        f"unknown source {spec!r}: use http_events, host_metrics, jsonl:PATH[:STREAM] or "
        "otlp[:HOST[:HTTP_PORT[:GRPC_PORT]]]"
    )


def otlp_config(specs: list[str], *, token: str | None = None) -> OtlpConfig | None:
    """The OTLP receiver asked for by ``otlp[:HOST[:HTTP_PORT[:GRPC_PORT]]]`` among ``specs``
    (127.0.0.1, 4318 and 4317 by default; port 0: any free port; GRPC_PORT ``off``: HTTP
    only), requiring the bearer ``token`` when one is given."""
    given = [s for s in specs if s == "otlp" or s.startswith("otlp:")]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError("give one otlp source")
    host, http, grpc, *rest = [*given[0].split(":")[1:], "", "", ""]
    if any(rest) or not (http or "0").isdigit() or not (grpc in ("", "off") or grpc.isdigit()):
        raise ValueError(f"source {given[0]!r}: use otlp[:HOST[:HTTP_PORT[:GRPC_PORT|off]]]")
    return OtlpConfig(
        host=host or "127.0.0.1",
        port=int(http or 4318),
        grpc_port=None if grpc == "off" else int(grpc or 4317),
        token=token,
    )


@contextlib.asynccontextmanager
async def otlp_receiver(agent: Agent, config: OtlpConfig | None) -> AsyncIterator[None]:
    """Serve OTLP/HTTP into ``agent`` (which declares the OTLP streams) when asked."""
    if config is None:
        yield
        return
    async with OtlpReceiver(agent, config=config) as receiver:
        agent.more_samples.append(receiver.samples)
        yield


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
            help="http_events | host_metrics | jsonl:PATH[:STREAM] | "
            "otlp[:HOST[:HTTP_PORT[:GRPC_PORT|off]]] (the OTLP receiver: HTTP on 4318 and gRPC on "
            "4317 of 127.0.0.1 by default; env SEALSTREAM_OTLP_TOKEN: the bearer token it "
            "requires) (repeatable; env "
            "SEALSTREAM_SOURCES, comma-separated; default http_events,host_metrics)",
        )
        parser.add_argument(
            "--policy-file",
            type=Path,
            default=d(None),
            help="who may read (env SEALSTREAM_POLICY_FILE; default authorized.json beside the "
            "key file)",
        )
        parser.add_argument(
            "--trust-relay-authorization",
            action="store_true",
            default=d(False),
            help="run without a policy: serve every open the relay forwards, so whoever runs "
            "the relay can read this cluster (Pixie's model)",
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
    a = sub.add_parser("authorize", help="manage who may read this cluster (its policy file)")
    a.add_argument("action", choices=["add", "list", "revoke", "add-issuer"])
    a.add_argument(
        "--key-file",
        type=Path,
        dest="authz_key_file",
        help="cluster key file: the policy is authorized.json beside it (env SEALSTREAM_KEY_FILE)",
    )
    a.add_argument(
        "--policy-file",
        type=Path,
        dest="authz_policy_file",
        help="the policy file itself (env SEALSTREAM_POLICY_FILE)",
    )
    a.add_argument(
        "--jwk-file",
        type=Path,
        help="the reader's public JWK ('sealstream-consume identity create' prints it), or an "
        "issuer's",
    )
    a.add_argument("--stream", action="append", help="a stream it may read (repeatable)")
    a.add_argument("--until", help="expiry: ISO 8601 (UTC unless it says) or Unix seconds")
    a.add_argument("--name", help="who this is, for 'list'")
    a.add_argument("--thumbprint", help="the key to revoke (or give --jwk-file)")
    return p


def parse_until(text: str) -> int:
    """``--until``: Unix seconds, or an ISO 8601 date-time (UTC unless it names a zone)."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--until {text!r}: use ISO 8601 or Unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


def _when(until: int | None) -> str:
    if until is None:
        return "never"
    return datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat()


def _authorize(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    policy_file = args.authz_policy_file or (
        Path(env["SEALSTREAM_POLICY_FILE"]) if env.get("SEALSTREAM_POLICY_FILE") else None
    )
    if policy_file is None:
        key_file = (
            args.authz_key_file
            or args.key_file
            or Path(env.get("SEALSTREAM_KEY_FILE") or "cluster-key.jwk")
        )
        policy_file = key_file.parent / POLICY_FILE_NAME
    policy = AuthzPolicy.load_or_empty(policy_file)
    if args.action == "list":
        for kid, grant in policy.keys.items():
            streams = ",".join(sorted(grant.streams))
            print(f"key\t{kid}\t{grant.name or '-'}\t{streams}\t{_when(grant.until)}")
        for kid, issuer in policy.issuers.items():
            print(f"issuer\t{kid}\t{issuer.name or '-'}\t*\t{_when(issuer.until)}")
        return 0
    jwk = json.loads(args.jwk_file.read_text(encoding="utf-8")) if args.jwk_file else None
    if args.action == "revoke":
        gone = args.thumbprint or (thumbprint(public_ed25519(jwk)) if jwk else None)
        if gone is None:
            print("error: revoke needs --thumbprint or --jwk-file", file=sys.stderr)
            return 2
        try:
            policy = policy.without(gone)
        except KeyError:
            print(f"error: {gone} is not in {policy_file}", file=sys.stderr)
            return 1
        policy.save(policy_file)
        print(f"revoked {gone} in {policy_file}")
        return 0
    if jwk is None:
        print(f"error: authorize {args.action} needs --jwk-file", file=sys.stderr)
        return 2
    until = parse_until(args.until) if args.until else None
    if args.action == "add-issuer":
        policy, kid = policy.with_issuer(jwk, until=until, name=args.name)
        policy.save(policy_file)
        print(f"trusted issuer {kid} in {policy_file}")
        return 0
    if not args.stream:
        print("error: authorize add needs at least one --stream", file=sys.stderr)
        return 2
    policy, kid = policy.with_key(jwk, args.stream, until=until, name=args.name)
    policy.save(policy_file)
    print(f"authorized {kid} for {', '.join(sorted(set(args.stream)))} in {policy_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "key":
        identity = ClusterIdentity.load_or_create(args.key_file)
        print(json.dumps(identity.public_jwk))
        return 0
    if args.command == "authorize":
        try:
            return _authorize(args, os.environ)
        except (OSError, ValueError, SealstreamError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    configure_logging(level=args.log_level, json=args.log_json)

    async def serve() -> int:
        config = ProducerConfig.from_env(
            cluster=args.cluster,
            nats_url=args.nats_url,
            prefix=args.prefix,
            key_file=args.key_file,
            buffer_bytes=args.buffer_bytes,
            policy_file=args.policy_file,
            trust_relay_authorization=args.trust_relay_authorization or None,
        )
        specs = [s.strip() for s in source_specs(args, os.environ) if s.strip()]
        otlp = otlp_config(specs, token=os.environ.get("SEALSTREAM_OTLP_TOKEN") or None)
        sources = [
            parse_source(s, rate=args.rate, interval=args.interval)
            for s in specs
            if otlp is None or not s.startswith("otlp")
        ]
        streams = OTLP_STREAMS if otlp is not None else ()
        async with (
            Agent(config, sources=sources, streams=streams) as agent,
            otlp_receiver(agent, otlp),
        ):
            await asyncio.Event().wait()
        return 0

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
