"""``sealstream-proxy``: run the blind relay, or mint a development token."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from broker_proxy._callout import AuthService
from broker_proxy._config import CalloutConfig, ProxyConfig, read_secret
from broker_proxy._proxy import Proxy
from sealstream import configure_logging, mint_token
from sealstream.run import add_service_options, keep, run, suppress

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealstream-proxy", description=__doc__.replace("``", ""))
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="serve session control and relay envelopes (default)")
    a = sub.add_parser("auth", help="answer the NATS auth callout only (consumer logins)")
    for parser, d in ((p, keep), (r, suppress), (a, suppress)):
        add_service_options(parser, d)
        parser.add_argument(
            "--token-secret-file",
            type=Path,
            default=d(None),
            help="HS256 secret file (env SEALSTREAM_TOKEN_SECRET_FILE)",
        )
        parser.add_argument(
            "--keepalive",
            type=float,
            default=d(None),
            help="keepalive interval in s (env SEALSTREAM_KEEPALIVE_S)",
        )
        parser.add_argument(
            "--store-grace",
            type=float,
            default=d(None),
            help="how long a session of a cluster with a store outlives its last keepalive, "
            "in s (default 120; env SEALSTREAM_STORE_GRACE_S)",
        )
        parser.add_argument(
            "--ended-keep",
            type=float,
            default=d(None),
            help="how long a session the proxy ended stays known for its owner's last resume "
            "(reading what the store kept of it), in s (default 600; env "
            "SEALSTREAM_ENDED_KEEP_S)",
        )
        parser.add_argument(
            "--store-domain",
            default=d(None),
            help="the JetStream domain of each cluster's store, with {cluster} (e.g. "
            "site-{cluster}: each site's leaf node); default: this server's JetStream "
            "(env SEALSTREAM_STORE_DOMAIN)",
        )
        parser.add_argument(
            "--callout-issuer-seed-file",
            type=Path,
            default=d(None),
            help="answer the NATS auth callout, signing with this account nkey seed "
            "(env SEALSTREAM_CALLOUT_ISSUER_SEED_FILE)",
        )
    t = sub.add_parser("token", help="mint a development token (HS256)")
    t.add_argument(
        "--token-secret-file",
        "--secret-file",
        dest="secret_file",
        type=Path,
        required=True,
        help="the HS256 secret file, as the relay's --token-secret-file",
    )
    t.add_argument("--sub", required=True, help="user name")
    t.add_argument(
        "--cluster", action="append", required=True, help="allowed cluster id, or '*' (repeatable)"
    )
    t.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    return p


def _secret(path: Path) -> bytes:
    """The token secret file's bytes; a missing file is named with its option."""
    try:
        return read_secret(path)
    except FileNotFoundError:
        raise ValueError(f"--token-secret-file {path}: no such file") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        try:
            secret = _secret(args.secret_file)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(mint_token(sub=args.sub, clusters=args.cluster, ttl_s=args.ttl, secret=secret))
        return 0
    configure_logging(level=args.log_level, json=args.log_json)

    async def serve() -> int:
        config = ProxyConfig.from_env(
            nats_url=args.nats_url,
            prefix=args.prefix,
            keepalive_s=args.keepalive,
            store_grace_s=args.store_grace,
            ended_keep_s=args.ended_keep,
            store_domain=args.store_domain,
            token_secret=_secret(args.token_secret_file) if args.token_secret_file else None,
            callout=(
                CalloutConfig.from_seed_file(args.callout_issuer_seed_file)
                if args.callout_issuer_seed_file
                else None
            ),
        )
        if args.command == "auth":
            async with AuthService(config):
                await asyncio.Event().wait()
            return 0
        async with Proxy(config):
            await asyncio.Event().wait()
        return 0

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
