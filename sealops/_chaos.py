"""``sealstream chaos``: kill and restart nats-server, one of two proxies and the producer at
random seeded moments while consumers stream, then report what each consumer saw. A ``slow``
fault (only when asked for, ``--faults``) makes the first consumer read ten times slower than
the stream for a while (``--slow``, 60 s): with the store it falls behind and reads the store
at its own pace, losing nothing, while the others stream on.

It runs the default deployment of ``sealstream up`` (its credentials, the server configuration
with the auth callout, the cluster's policy) with real processes, as an operator would:
nats-server on a fixed port with its JetStream store kept across restarts, two proxies
sharing the session registry (and answering the consumer logins), and one producer fed JSON
lines on stdin, each row numbered ``{"run": incarnation, "n": i, "t": ns}``.
The consumers are library clients with ``resume=True`` in this process. For each one it
counts rows, sessions, envelopes lost, duplicates (a row seen twice) and rows out of order
(within one producer incarnation, ``n`` going back), and for each fault the time from the
restart to the first row emitted after it. Duplicates and rows out of order must be 0, and no
process may log a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from consumers import Batch, Client, ClientConfig, Resumed, TokenFile
from producers import POLICY_FILE_NAME
from sealops._stack import issuer_seed_file, prepare_state
from sealstream.crypto import UserIdentity
from sealstream.errors import SealstreamError
from sealstream.log import configure_logging
from sealstream.server import EmbeddedServer, ServerOptions, free_port

__all__ = ["chaos_main"]

_CLUSTER = "chaos"
_STREAM = "chaos"


@dataclass
class Fault:
    kind: str  # nats | proxy-a | proxy-b | producer | slow
    at_s: float  # since the start of the run
    down_s: float
    restarted_ns: int = 0
    #: per consumer: seconds from the restart to the first row emitted after it
    recovery_s: list[float] = field(default_factory=list)


@dataclass
class Seen:
    """What one consumer received."""

    rows: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    resumes: int = 0
    resume_reasons: list[str] = field(default_factory=list)
    sessions: int = 0
    lost: int = 0
    #: envelopes let go while it was behind (read again from the store)
    deferred: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    last: dict[int, int] = field(default_factory=dict)
    seen: set[tuple[int, int]] = field(default_factory=set)
    #: (arrival ns, emission ns) of the first row of every batch
    arrivals: list[tuple[int, int]] = field(default_factory=list)
    #: while ``time.monotonic()`` is below it, read at this many rows/s at most
    slow_until: float = 0.0
    slow_rate: float = 0.0

    def add(self, batch: Batch) -> None:
        now = time.time_ns()
        for row in batch.rows:
            run, n, t = row.get("run"), row.get("n"), row.get("t")
            if not (isinstance(run, int) and isinstance(n, int) and isinstance(t, int)):
                continue
            self.rows += 1
            if (run, n) in self.seen:
                self.duplicates += 1
            self.seen.add((run, n))
            if n < self.last.get(run, -1):
                self.out_of_order += 1
            self.last[run] = max(n, self.last.get(run, -1))
        if batch.rows and isinstance(batch.rows[0].get("t"), int):
            self.arrivals.append((now, batch.rows[-1]["t"]))

    @property
    def missing(self) -> int:
        """Rows never seen between the lowest and the highest ``n`` seen, per producer
        incarnation (``n`` counts every row an incarnation emitted; a consumer's first
        session starts somewhere in it)."""
        spans: dict[int, tuple[int, int, int]] = {}  # run -> (lowest, highest, count)
        for run, n in self.seen:
            low, high, count = spans.get(run, (n, n, 0))
            spans[run] = (min(low, n), max(high, n), count + 1)
        return sum(high - low + 1 - count for low, high, count in spans.values())

    def recovery_after(self, restarted_ns: int) -> float | None:
        for arrived, emitted in self.arrivals:
            if emitted >= restarted_ns:
                return (arrived - restarted_ns) / 1e9
        return None


class Deployment:
    """nats-server, two proxies and a producer, each of which can be killed and restarted."""

    def __init__(self, state: Path, logs: Path, rate: float, *, store: bool = True) -> None:
        self.state = state
        self.logs = logs
        self.rate = rate
        #: the producer keeps what it seals in the broker's store (lossless delivery)
        self.store = store
        self.creds = prepare_state(state, _CLUSTER, [_STREAM])
        self.server_options = ServerOptions(
            config_file=state / "nats.conf", port=free_port(), store_dir=state / "js"
        )
        self.server: EmbeddedServer | None = None
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.run = 0
        self._feeder: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"nats://127.0.0.1:{self.server_options.port}"

    def _env(self, role: str) -> dict[str, str]:
        user = self.creds.proxy if role.startswith("proxy") else self.creds.producers[_CLUSTER]
        return {
            **os.environ,
            "NATS_URL": user.url(self.base_url),
            "SEALSTREAM_TOKEN_SECRET_FILE": str(self.state / "token-secret"),
            # the proxies answer the broker's authorization requests (consumer logins)
            "SEALSTREAM_CALLOUT_ISSUER_SEED_FILE": str(issuer_seed_file(self.state)),
            "SEALSTREAM_CLUSTER": _CLUSTER,
            "SEALSTREAM_KEY_FILE": str(self.state / "cluster-key.jwk"),
            "SEALSTREAM_POLICY_FILE": str(self.state / POLICY_FILE_NAME),
            "SEALSTREAM_STORE": "1" if self.store else "0",
        }

    async def start_server(self) -> None:
        """Start nats-server again on its port and store, as an operator would: retried if
        it does not come up at once (the killed one's port or store may be held a moment)."""
        for attempt in range(5):
            self.server = EmbeddedServer(self.server_options)
            try:
                await asyncio.to_thread(self.server.start)
                return
            except SealstreamError:
                if attempt == 4:
                    raise
                await asyncio.sleep(1.0)

    async def kill_server(self) -> None:
        if self.server is not None:
            os.kill(self.server.pid, signal.SIGKILL)
            await asyncio.to_thread(self.server.stop)
            self.server = None

    async def start(self, role: str) -> None:
        log = (self.logs / f"{role}.log").open("ab")
        try:
            if role == "producer":
                self.run += 1
                args = ["producers", "--source", f"jsonl:-:{_STREAM}", "--log-level", "info"]
            else:
                args = ["broker_proxy", "--log-level", "info"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                *args,
                env=self._env(role),
                stdin=asyncio.subprocess.PIPE if role == "producer" else asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        self.procs[role] = proc
        if role == "producer":
            self._feeder = asyncio.create_task(self._feed(proc, self.run))

    async def kill(self, role: str) -> None:
        proc = self.procs.pop(role, None)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if role == "producer" and self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder

    async def _feed(self, proc: asyncio.subprocess.Process, run: int) -> None:
        """Rows at ``rate`` per second on the producer's stdin, numbered per incarnation."""
        assert proc.stdin is not None
        tick = 0.05
        n = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            while proc.returncode is None:
                lines = []
                for _ in range(max(1, round(self.rate * tick))):
                    lines.append(json.dumps({"run": run, "n": n, "t": time.time_ns()}) + "\n")
                    n += 1
                proc.stdin.write("".join(lines).encode())
                async with asyncio.timeout(10):
                    await proc.stdin.drain()
                await asyncio.sleep(tick)

    async def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every process (a clean stop); their exit codes."""
        codes: dict[str, int | None] = {}
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        for role, proc in list(self.procs.items()):
            if proc.returncode is None:
                proc.terminate()
            try:
                async with asyncio.timeout(15):
                    codes[role] = await proc.wait()
            except TimeoutError:
                proc.kill()
                codes[role] = await proc.wait()
        self.procs.clear()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        return codes


async def _consume(
    config: ClientConfig, seen: Seen, *, cluster: str = _CLUSTER, stream: str = _STREAM
) -> None:
    """Stream until cancelled, recording into ``seen`` (at its slow rate while it is slow)."""
    try:
        async with (
            Client(config) as client,
            client.subscribe(
                cluster, [stream], resume=True, retry_s=120, resume_timeout_s=600
            ) as sub,
        ):
            try:
                async for item in sub:
                    if isinstance(item, Resumed):
                        seen.resumes += 1
                        seen.resume_reasons.append(item.reason)
                    else:
                        seen.add(item)
                        if time.monotonic() < seen.slow_until:
                            await asyncio.sleep(len(item.rows) / seen.slow_rate)
            finally:
                stats = sub.stats()
                seen.sessions, seen.lost = stats.sessions, stats.lost
                seen.rejected, seen.deferred = stats.rejected, stats.deferred
    except SealstreamError as exc:
        seen.error = f"{type(exc).__name__}: {exc}"


_KINDS = ("nats", "proxy-a", "proxy-b", "producer")
#: asked for by name only (not in the random schedule)
_ON_REQUEST = ("slow",)


def _plan(
    rng: random.Random,
    duration: float,
    min_outage: float,
    max_outage: float,
    kinds: list[str] | None = None,
    slow_s: float = 60.0,
) -> list[Fault]:
    """Faults at random moments: a warm-up, then each fault followed by time to recover
    (a restarted producer is noticed at the proxy's next ping, up to a keepalive interval).
    ``kinds`` fixes the order of the fault kinds (cycled); default: random."""
    faults: list[Fault] = []
    t = 10.0
    while True:
        kind = kinds[len(faults) % len(kinds)] if kinds else rng.choice(_KINDS)
        if kind == "slow":
            down = slow_s
        elif kind == "nats":
            down = rng.uniform(min_outage, max_outage)
        else:
            down = rng.uniform(1, 5)
        if t + down + 15 > duration:
            return faults
        faults.append(Fault(kind, round(t, 1), round(down, 1)))
        t += down + rng.uniform(15, 20)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _chaos(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)  # noqa: S311 - a reproducible schedule, not a secret
    kinds = [k for k in args.faults.split(",") if k] if args.faults else None
    if kinds and not set(kinds) <= {*_KINDS, *_ON_REQUEST}:
        raise ValueError(f"fault kinds are {', '.join((*_KINDS, *_ON_REQUEST))}")
    if args.slow <= 0 or (args.queue is not None and args.queue < 1):
        raise ValueError("--slow must be positive and --queue at least 1")
    faults = _plan(rng, args.duration, args.min_outage, args.max_outage, kinds, args.slow)
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):  # this run's logs only: their tracebacks are counted
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="sealstream-chaos-") as tmp:
        dep = Deployment(Path(tmp), logs, args.rate, store=args.store)
        await dep.start_server()
        for role in ("proxy-a", "proxy-b", "producer"):
            await dep.start(role)
        config = ClientConfig(  # logs in to NATS with its token, proves its identity
            nats_url=dep.base_url,
            token=TokenFile(dep.state / "token"),
            trust_store=dep.state / "trust.json",
            identity=UserIdentity.load(dep.state / "identity.jwk"),
            key_kind="x25519",
            policy="discard",
            request_timeout_s=3.0,
        )
        config = dataclasses.replace(config, key_mode=args.key_mode)
        if args.queue is not None:
            config = dataclasses.replace(config, queue_size=args.queue)
        seen = [Seen() for _ in range(args.consumers)]
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_consume(config, s)) for s in seen]
            for fault in faults:
                await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
                print(f"chaos: {fault.kind} down for {fault.down_s} s", file=sys.stderr)
                if fault.kind == "slow":  # the first consumer, ten times slower
                    seen[0].slow_rate = args.rate / 10
                    seen[0].slow_until = time.monotonic() + fault.down_s
                    await asyncio.sleep(fault.down_s)
                    fault.restarted_ns = time.time_ns()
                    continue
                if fault.kind == "nats":
                    await dep.kill_server()
                else:
                    await dep.kill(fault.kind)
                await asyncio.sleep(fault.down_s)
                if fault.kind == "nats":
                    await dep.start_server()
                else:
                    await dep.start(fault.kind)
                fault.restarted_ns = time.time_ns()
            await asyncio.sleep(max(0.0, started + args.duration - time.monotonic()))
            # every consumer should have rows emitted after the last restart by now
            last = faults[-1].restarted_ns if faults else 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while not all(s.recovery_after(last) is not None for s in seen):  # noqa: ASYNC110
                        await asyncio.sleep(0.5)
            for task in tasks:
                task.cancel()
        codes = await dep.stop_all()
    for fault in faults:
        fault.recovery_s = [
            r for s in seen if (r := s.recovery_after(fault.restarted_ns)) is not None
        ]
    tracebacks = {
        p.stem: p.read_text(errors="replace").count("Traceback") for p in logs.glob("*.log")
    }
    recoveries = [r for f in faults for r in f.recovery_s]
    return {
        # the command's words as given (``sealstream chaos`` sets them), or the schedule's
        "words": getattr(args, "words", None) or f"--duration {args.duration:g} --seed {args.seed}",
        "seed": args.seed,
        "duration_s": args.duration,
        "rate": args.rate,
        "store": args.store,
        "queue": args.queue,
        "key_mode": args.key_mode,
        "consumers": [
            {k: v for k, v in asdict(s).items() if k not in ("last", "seen", "arrivals")}
            | {"missing": s.missing}
            for s in seen
        ],
        "faults": [asdict(f) for f in faults],
        "unrecovered": sum(len(seen) - len(f.recovery_s) for f in faults),
        "recovery_p50_s": _pct(recoveries, 0.5),
        "recovery_max_s": max(recoveries) if recoveries else None,
        "tracebacks": tracebacks,
        "exit_codes": codes,
    }


def _what(result: dict[str, Any]) -> str:
    kinds = {f["kind"] for f in result["faults"]}
    faults = []
    if kinds - {"slow"}:
        faults.append("nats-server, either of two proxies or the producer killed and restarted")
    if "slow" in kinds:
        faults.append(
            "the first consumer reading at a tenth of the stream's rate for a while (`slow`; "
            "its recovery: from the end of its slowness to the first row emitted after it)"
        )
    store = ", kept in the broker store" if result.get("store") else ", no store"
    queue = result.get("queue")
    group = ", group mode" if result.get("key_mode") == "group" else ""
    return (
        f"`sealstream chaos {result.get('words') or ''}` ({result['rate']:g} rows/s{store}{group}"
        + (f", consumers' inbox queues of {queue:,} envelopes" if queue else "")
        + "): "
        f"{' and '.join(faults) or 'no fault'}, at seeded moments, while library consumers "
        "(`resume=True`) stream."
    )


def _report(result: dict[str, Any]) -> str:
    lines = [
        "# Chaos run",
        "",
        result.get("what") or _what(result),
        "",
        "| consumer | rows | sessions | resumes | lost | missing | deferred | rejected "
        "| duplicates | out of order | error |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for i, c in enumerate(result["consumers"]):
        lines.append(
            f"| {i} | {c['rows']} | {c['sessions']} | {c['resumes']} | {c['lost']} | "
            f"{c.get('missing', '-')} | {c.get('deferred', 0)} | {c['rejected']} | "
            f"{c['duplicates']} | {c['out_of_order']} | {c['error'] or ''} |"
        )
    lines += ["", "| at (s) | fault | down (s) | recovery p50 (s) | recovery max (s) |"]
    lines.append("|--:|---|--:|--:|--:|")
    for f in result["faults"]:
        rec = f["recovery_s"]
        p50 = f"{_pct(rec, 0.5):.2f}" if rec else "none"
        top = f"{max(rec):.2f}" if rec else "none"
        lines.append(f"| {f['at_s']} | {f['kind']} | {f['down_s']} | {p50} | {top} |")
    p50, top = result["recovery_p50_s"], result["recovery_max_s"]
    lines += [
        "",
        f"Recovery after a fault (restart to the first row emitted after it, every consumer): "
        f"p50 {p50 if p50 is None else round(p50, 2)} s, max "
        f"{top if top is None else round(top, 2)} s; consumers that never recovered from a "
        f"fault: {result['unrecovered']}.",
        f"Tracebacks in the logs: {sum(result['tracebacks'].values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result['tracebacks'].items()))}).",
        f"Exit codes at the final SIGTERM: {result['exit_codes']}.",
        "",
    ]
    return "\n".join(lines)


def _verdict(result: dict[str, Any]) -> list[str]:
    """What went wrong, if anything."""
    problems = []
    for i, c in enumerate(result["consumers"]):
        if c["duplicates"] or c["out_of_order"]:
            problems.append(
                f"consumer {i}: {c['duplicates']} duplicates, {c['out_of_order']} out of order"
            )
        if c["error"]:
            problems.append(f"consumer {i} stopped: {c['error']}")
        if not c["rows"]:
            problems.append(f"consumer {i} received nothing")
    if result["unrecovered"]:
        problems.append(f"{result['unrecovered']} recoveries missing")
    if sum(result["tracebacks"].values()):
        problems.append(f"tracebacks in the logs: {result['tracebacks']}")
    if any(code != 0 for code in result["exit_codes"].values()):
        problems.append(f"a process did not stop cleanly: {result['exit_codes']}")
    return problems


def chaos_main(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]] | None = None,
) -> int:
    """Run (the single-server run unless ``run`` is another, e.g. the hub's), write
    ``report.md`` and ``report.json`` to ``args.out``; exit 1 on a problem."""
    configure_logging(level="error")  # the roles' own logs are in OUT/logs
    try:
        result = asyncio.run((run or _chaos)(args))
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # the command's words
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SealstreamError, OSError) as exc:  # the run itself failed: say so in a report
        print(f"error: the chaos run failed: {exc!r}", file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        failed = {"problems": [f"the run failed: {exc!r}"]}
        (args.out / "report.json").write_text(json.dumps(failed, indent=2) + "\n")
        (args.out / "report.md").write_text(f"# Chaos run\n\nThe run failed: {exc!r}\n")
        return 1
    problems = _verdict(result)
    result["problems"] = problems
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    text = _report(result) + ("\nProblems: " + "; ".join(problems) if problems else "No problems.")
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    return 1 if problems else 0
