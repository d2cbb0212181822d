"""``sealstream-producer``: run a cluster agent, show its public signing key, or manage who
may read it (``authorize``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import socket
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nats.errors

from producers._agent import Agent
from producers._authz import POLICY_FILE_NAME, AuthzPolicy, public_ed25519
from producers._config import ProducerConfig, otlp_config
from producers._otlp import OtlpConfig, OtlpReceiver
from producers.sources import HostMetrics, HttpEvents, JsonLines, Row, Source
from sealstream import SealstreamError, configure_logging
from sealstream.crypto import ClusterIdentity
from sealstream.ids import Subjects
from sealstream.jwk import thumbprint
from sealstream.nats import connect, release
from sealstream.otlp import OTLP_STREAMS
from sealstream.run import (
    add_service_options,
    glue_values,
    keep,
    quiet_broken_pipe,
    read_option_file,
    run,
    suppress,
)

__all__ = ["main", "parse_source"]


def parse_source(
    spec: str, *, rate: float, interval: float, read: Callable[[str], bool] | None = None
) -> Source:
    """``http_events``, ``host_metrics``, or ``jsonl:PATH[:STREAM]`` (PATH ``-`` is stdin);
    given ``read`` (whether a stream has a reader), a file's records wait for the first reader
    of their stream (:class:`FirstReader`)."""
    if spec == "http_events":
        return HttpEvents(rate=rate)
    if spec == "host_metrics":
        return HostMetrics(interval=interval)
    if spec.startswith("jsonl:"):
        path, _, stream = spec[len("jsonl:") :].partition(":")
        if path == "-":  # read as it comes, as a pipe is
            return JsonLines(None, stream=stream or "records")
        lines = JsonLines(Path(path), stream=stream or "records")
        return lines if read is None else FirstReader(lines, read)
    raise ValueError(
        f"unknown source {spec!r}: use http_events, host_metrics, jsonl:PATH[:STREAM] or "
        "otlp[:HOST[:HTTP_PORT[:GRPC_PORT]]]"
    )


@dataclass(frozen=True, slots=True)
class FirstReader:
    """A file's records held until their stream has a reader: a file is read once, and rows
    emitted before any session is open would be sealed to no one. The first readers get them
    from the start; later ones, what comes after they open."""

    source: Source
    #: whether a stream has a reader now
    read: Callable[[str], bool]
    poll_s: float = 0.1

    @property
    def stream(self) -> str:
        return self.source.stream

    async def rows(self) -> AsyncGenerator[list[Row], None]:
        # the agent has no event for an open (its control path is not this module's): look
        while not self.read(self.stream):  # noqa: ASYNC110
            await asyncio.sleep(self.poll_s)
        async with contextlib.aclosing(self.source.rows()) as batches:
            async for batch in batches:
                yield batch


@contextlib.asynccontextmanager
async def _sole_producer(config: ProducerConfig) -> AsyncIterator[None]:
    """Refuse to start beside another producer of the cluster, then answer for this one while
    it runs (docs/protocol.md, "Identifiers and subjects": one producer serves a cluster)."""
    subjects = Subjects(config.prefix)
    nc = await connect(
        config.nats_url,
        name=f"sealstream-producer.{config.cluster}.presence",
        user=config.nats_auth.user,
        password=config.nats_auth.password,
        inbox_prefix=subjects.producer_inbox(config.cluster),
    )
    try:
        subject = subjects.producer(config.cluster)
        try:
            other = await nc.request(subject, b"", timeout=1.0)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            pass  # nobody serves it (a server that forbids the subject: no reply either)
        else:
            who = other.data.decode("utf-8", "replace")[:200]
            raise ValueError(
                f"cluster {config.cluster!r} already has a producer ({who}): stop it, or give "
                "this one another --cluster"
            )
        me = f"process {os.getpid()} on {socket.gethostname()}".encode()

        async def answer(msg: Any) -> None:
            await msg.respond(me)

        await nc.subscribe(subject, cb=answer)
        yield
    finally:
        await release(nc)


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
    p = argparse.ArgumentParser(prog="sealstream-producer", description=__doc__.replace("``", ""))
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
            help="http_events | host_metrics | jsonl:PATH[:STREAM] (a file's records wait for "
            "the stream's first reader; PATH - is stdin, read as it comes) | "
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
    k = sub.add_parser(
        "key",
        help="create the signing key if needed; print its public JWK",
        description="Create the cluster's signing key (if the file does not exist) and print "
        "its public JWK, which consumers pin ('sealstream-consume trust add').",
    )
    k.add_argument("--key-file", type=Path, required=True, help="the signing key file")
    _authorize_parser(sub)
    return p


#: what each ``authorize`` action does (its help), and whether it may create the policy file
_ACTIONS: Final = {
    "add": ("authorize a reader's identity for more streams (keeps what it had)", True),
    "set": ("authorize a reader's identity for exactly these streams (replaces its grant)", True),
    "list": ("print the policy: key or issuer, id, name, streams, until", False),
    "revoke": ("remove a reader's identity or an issuer: its live sessions end", False),
    "add-issuer": ("trust an issuer key whose tokens authorize identities", True),
}
#: options whose value is an id (base64url: it may begin with '-')
ID_OPTIONS: Final = ("--thumbprint",)


def _authorize_parser(sub: Any) -> None:
    a = sub.add_parser(
        "authorize",
        help="manage who may read this cluster (its policy file)",
        description="Manage who may read this cluster: the policy file (authorized.json beside "
        "the cluster key, or --policy-file) that the producer re-reads when it changes.",
    )
    actions = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, (text, creates) in _ACTIONS.items():
        c = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        c.add_argument(
            "--key-file",
            type=Path,
            dest="authz_key_file",
            help="the cluster's signing key: the policy is authorized.json beside it (env "
            "SEALSTREAM_KEY_FILE)",
        )
        c.add_argument(
            "--policy-file",
            type=Path,
            dest="authz_policy_file",
            help="the policy file itself (env SEALSTREAM_POLICY_FILE)"
            + ("" if creates else "; it must exist"),
        )
        if action == "list":
            continue
        c.add_argument(
            "--jwk-file",
            type=Path,
            required=action != "revoke",
            help="an issuer's public JWK"
            if action == "add-issuer"
            else "the reader's public JWK (what 'sealstream-consume identity create' prints)",
        )
        if action == "revoke":
            c.add_argument(
                "--thumbprint",
                help="the id of the key or issuer to revoke (as 'list' prints it), instead of "
                "--jwk-file; write --thumbprint=ID",
            )
            continue
        if action != "add-issuer":
            c.add_argument(
                "--stream",
                action="append",
                required=True,
                help="a stream it may read (repeatable)",
            )
        c.add_argument(
            "--until",
            help="expiry, in the future: ISO 8601 (UTC unless it says) or Unix seconds "
            "(default: never; 'add' keeps the grant's)",
        )
        c.add_argument("--name", help="who this is, shown by 'list'")


def parse_until(text: str, *, now: float | None = None) -> int:
    """``--until``: Unix seconds, or an ISO 8601 date-time (UTC unless it names a zone); it
    must be in the future."""
    if text.isdigit():
        until = int(text)
    else:
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"--until {text}: use ISO 8601 or Unix seconds") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        until = int(when.timestamp())
    if until <= (time.time() if now is None else now):
        raise ValueError(f"--until {text}: that is in the past")
    return until


def _when(until: int | None) -> str:
    if until is None:
        return "never"
    return datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat()


def policy_path(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    """The policy file an ``authorize`` action works on: it exists, or (for an action that
    creates it) the cluster's key file beside which it goes does. Never a stray file in the
    working directory."""
    key_file = (
        args.authz_key_file
        or args.key_file
        or (Path(env["SEALSTREAM_KEY_FILE"]) if env.get("SEALSTREAM_KEY_FILE") else None)
    )
    given = args.authz_policy_file or (
        Path(env["SEALSTREAM_POLICY_FILE"]) if env.get("SEALSTREAM_POLICY_FILE") else None
    )
    if given is None and key_file is None:
        raise ValueError(
            f"authorize {args.action} needs the cluster's policy: give --key-file (the policy "
            "is beside it) or --policy-file"
        )
    path = given or key_file.parent / POLICY_FILE_NAME  # type: ignore[union-attr]
    if path.exists():
        return path
    flag = "--policy-file" if given else "--key-file"
    if not _ACTIONS[args.action][1]:
        raise ValueError(f"{flag}: there is no policy at {path}")
    if key_file is None or not key_file.exists():
        where = f"no cluster key at {key_file}" if key_file else "no --key-file"
        raise ValueError(
            f"{flag}: there is no policy at {path} and {where}: give the cluster's --key-file "
            "('sealstream-producer key' creates it)"
        )
    return path


def _authorize(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    policy_file = policy_path(args, env)
    policy = AuthzPolicy.load_or_empty(policy_file)
    if args.action == "list":
        for kid, grant in policy.keys.items():
            streams = ",".join(sorted(grant.streams))
            print(f"key\t{kid}\t{grant.name or '-'}\t{streams}\t{_when(grant.until)}")
        for kid, issuer in policy.issuers.items():
            print(f"issuer\t{kid}\t{issuer.name or '-'}\t*\t{_when(issuer.until)}")
        return 0
    jwk = (
        public_ed25519(_json_file("--jwk-file", args.jwk_file))
        if args.jwk_file is not None
        else None
    )
    if args.action == "revoke":
        if (args.thumbprint is None) == (jwk is None):
            raise ValueError("authorize revoke needs --thumbprint=ID or --jwk-file (one of them)")
        gone = args.thumbprint or thumbprint(jwk)  # type: ignore[arg-type]
        try:
            policy = policy.without(gone)
        except KeyError:
            raise ValueError(f"{gone} is not in {policy_file}") from None
        policy.save(policy_file)
        print(f"revoked {gone} in {policy_file}")
        return 0
    assert jwk is not None  # required by the parser
    until = parse_until(args.until) if args.until else None
    if args.action == "add-issuer":
        policy, kid = policy.with_issuer(jwk, until=until, name=args.name)
        policy.save(policy_file)
        print(f"trusted issuer {kid} in {policy_file}")
        return 0
    wanted = set(args.stream)
    granted = policy.keys.get(thumbprint(jwk))
    if args.action == "add" and granted is not None:
        wanted |= granted.streams
        until = granted.until if until is None else until
    name = args.name or (granted.name if granted else None)
    policy, kid = policy.with_key(jwk, sorted(wanted), until=until, name=name)
    policy.save(policy_file)
    added = ", ".join(sorted(set(args.stream)))
    print(f"authorized {kid} for {added} (now: {', '.join(sorted(wanted))}) in {policy_file}")
    return 0


def _json_file(flag: str, path: Path) -> object:
    try:
        return json.loads(read_option_file(flag, path))
    except json.JSONDecodeError:
        raise ValueError(f"{flag} {path}: not JSON") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(glue_values(sys.argv[1:] if argv is None else argv, ID_OPTIONS))
    if args.command == "key":
        identity = ClusterIdentity.load_or_create(args.key_file)
        print(json.dumps(identity.public_jwk))
        return 0
    if args.command == "authorize":
        try:
            return _authorize(args, os.environ)
        except BrokenPipeError:
            return quiet_broken_pipe()
        except (OSError, ValueError, SealstreamError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, SealstreamError) else 2
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
        if not config.key_file.exists():  # a mistyped path must not make a key nobody pins
            raise ValueError(
                f"--key-file {config.key_file}: no such file (create the cluster's signing key "
                f"once with 'sealstream-producer key --key-file {config.key_file}')"
            )
        specs = [s.strip() for s in source_specs(args, os.environ) if s.strip()]
        otlp = otlp_config(specs, token=os.environ.get("SEALSTREAM_OTLP_TOKEN") or None)
        running: list[Agent] = []  # the agent, once it runs

        def read(stream: str) -> bool:
            live = (served for agent in running for served in agent.sessions.values())
            return any(stream in served.streams for served in live)

        sources = [
            parse_source(s, rate=args.rate, interval=args.interval, read=read)
            for s in specs
            if otlp is None or not s.startswith("otlp")
        ]
        streams = OTLP_STREAMS if otlp is not None else ()
        async with (
            _sole_producer(config),
            Agent(config, sources=sources, streams=streams) as agent,
            otlp_receiver(agent, otlp),
        ):
            running.append(agent)
            await asyncio.Event().wait()
        return 0

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
