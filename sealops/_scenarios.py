"""The bench's scenarios: what runs against the roles and what each run measures.

Each scenario starts its processes through :class:`~sealops._procs.Launcher`, drives the
workers by their JSON-lines protocol and returns the figures of ``report.json``:

- :func:`matrix`: every mode, body size and fan-out, at maximum rate and paced at half of it;
- :func:`rounds`: the modes of the ratio targets, alternating, fresh processes each round;
- :func:`soak`: RSS of proxy and consumer after warm-up against at the end;
- :func:`first_row`: the time from subscribe to the first decrypted row;
- :func:`logins`: consumers logging in at once through the NATS auth callout;
- :func:`api`, :func:`fanout_api`: rows/s through the public API (``Agent.emit`` ->
  proxy -> ``Client.subscribe``), against plain nats-py, and at the largest fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rich.progress import Progress, TaskID

from sealops._api import BATCH_ROWS as API_BATCH_ROWS
from sealops._api import CALLERS as API_CALLERS
from sealops._api import STORED as API_STORED
from sealops._api import STORED_ALONE as API_STORED_ALONE
from sealops._api import STREAM as API_STREAM
from sealops._api import api_rounds, authorize
from sealops._procs import Child, Launcher, Proc, proxy_counts
from sealops._report import Histogram, Mode, Plan, split_sessions, window_for
from sealstream.natsconf import Credentials, server_config
from sealstream.natsjwt import AccountKey
from sealstream.server import EmbeddedServer, ServerOptions
from sealstream.tokens import mint_token

__all__ = [
    "CLUSTER",
    "Ctx",
    "api",
    "fanout_api",
    "first_row",
    "logins",
    "matrix",
    "rounds",
    "soak",
]

CLUSTER: Final = "bench"
#: a consumer stops waiting for a phase's last envelopes after this long with nothing new
_IDLE_S: Final = 5.0
#: a paced producer wakes at most every 2 ms and sends what is due (as a producer flushes
#: what it has): sleeping between single messages would measure timer wake-ups, not sealstream
PACE_TICK_S: Final = 0.002


@dataclass
class Ctx:
    """What every scenario of a run shares: the plan, the process launcher, the secrets the
    workers are given, the progress display and the groups' final counters."""

    plan: Plan
    procs: Launcher
    run_id: str
    secret: bytes
    identity_file: Path
    trust_jwk: dict[str, Any]
    server: Proc | None
    progress: Progress
    overall: TaskID
    phase: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.procs.state

    @property
    def ack_subject(self) -> str:
        return f"_bench.{self.run_id}.ack"

    def next_phase(self) -> int:
        self.phase += 1
        return self.phase

    def token(self, sub: str) -> str:
        return mint_token(sub=sub, clusters=[CLUSTER], ttl_s=24 * 3600, secret=self.secret)

    def say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)


@dataclass
class _Group:
    """One (mode, fan-out): proxy, producer and consumer processes, sessions open."""

    mode: Mode
    fanout: int
    split: list[int]
    producer: Child
    consumers: list[Child]
    proxy: Child | None

    def procs(self, server: Proc | None) -> list[Proc]:
        out = [self.producer.sampled()]
        if self.proxy is not None:
            out.append(self.proxy.sampled())
        out += [c.sampled() for c in self.consumers]
        if server is not None:
            out.append(server)
        return out


@contextlib.asynccontextmanager
async def _group(
    ctx: Ctx, mode: Mode, fanout: int, *, procs: int | None = None
) -> AsyncIterator[_Group]:
    split = split_sessions(fanout, procs or ctx.plan.consumer_procs)
    info: dict[str, Any] = {"mode": mode, "fanout": fanout, "sessions_per_process": split}
    async with contextlib.AsyncExitStack() as stack:
        proxy = await ctx.procs.proxy(stack) if mode != "raw" else None
        producer = await ctx.procs.worker(
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
                await ctx.procs.worker(
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
            info["proxy"] = proxy_counts(proxy.log)
    ctx.groups.append(info)


async def _phase(
    ctx: Ctx,
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


async def matrix(ctx: Ctx) -> list[dict[str, Any]]:
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


async def rounds(ctx: Ctx) -> list[dict[str, Any]]:
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


async def soak(ctx: Ctx) -> dict[str, Any]:
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


async def first_row(ctx: Ctx) -> dict[str, Any]:
    plan = ctx.plan
    samples: list[str] = []
    for i in range(max(plan.first_row_rsa, plan.first_row_x25519)):
        if i < plan.first_row_rsa:
            samples.append("rsa")
        if i < plan.first_row_x25519:
            samples.append("x25519")
    got: dict[str, list[dict[str, float]]] = {"rsa": [], "x25519": []}
    async with contextlib.AsyncExitStack() as stack:
        await ctx.procs.proxy(stack)
        producer = await ctx.procs.worker(
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
        worker = await ctx.procs.worker(
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


async def logins(ctx: Ctx) -> dict[str, Any]:
    """``plan.logins`` consumers at once log in through the NATS auth callout and open a
    session: a server configured as ``sealstream up`` configures it (its own, with the proxy
    answering the callout), the real proxy and a bench producer with their own users."""
    n = ctx.plan.logins
    creds = Credentials.generate([CLUSTER])
    issuer = AccountKey.generate()
    seed = ctx.state / "callout-issuer.nk"
    conf = ctx.state / "callout-nats.conf"
    config = server_config(creds, issuer=issuer.public_key, prefix=ctx.procs.prefix)
    for path, data in ((seed, issuer.seed), (conf, config.encode("utf-8"))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            EmbeddedServer(
                ServerOptions(config_file=conf, log_file=ctx.procs.log_path("callout-nats"))
            )
        )
        await ctx.procs.proxy(stack, nats_url=creds.proxy.url(server.url), callout_seed=seed)
        producer = await ctx.procs.worker(
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
        worker = await ctx.procs.worker(
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


async def api(ctx: Ctx) -> dict[str, Any]:
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
        for pipeline in ("plain", "sealstream", API_STORED, API_STORED_ALONE):
            async with contextlib.AsyncExitStack() as stack:
                if pipeline != "plain":
                    relay = await ctx.procs.proxy(stack)
                    producer = await ctx.procs.worker(
                        stack,
                        "api-producer",
                        "api-producer",
                        {
                            **common,
                            "identity_file": str(ctx.identity_file),
                            "policy_file": str(policy_file),
                            "store": pipeline in (API_STORED, API_STORED_ALONE),
                            "callers": 1 if pipeline == API_STORED_ALONE else API_CALLERS,
                        },
                    )
                    await producer.expect("ready", timeout_s=60)
                    consumer = await ctx.procs.worker(
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
                    relay = await ctx.procs.worker(stack, "plain-relay", "plain-relay", common)
                    await relay.expect("ready", timeout_s=60)
                    producer = await ctx.procs.worker(
                        stack, "plain-producer", "plain-producer", common
                    )
                    await producer.expect("ready", timeout_s=60)
                    consumer = await ctx.procs.worker(
                        stack, "plain-consumer", "plain-consumer", common
                    )
                await consumer.expect("ready", timeout_s=60)
                procs = [
                    producer.sampled("producer"),
                    relay.sampled("relay"),
                    consumer.sampled("consumer"),
                ]
                cpu0 = {p.role: p.cpu() for p in procs}
                await producer.send({"cmd": "go"})
                done = await consumer.expect("done", timeout_s=600)
                cpu = {p.role: round(p.cpu() - cpu0[p.role], 2) for p in procs}
                sent = await producer.expect("sent", timeout_s=60)
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
                    | (
                        {"stored_bytes_per_row": round(sent["stored_bytes"] / sent["rows"], 1)}
                        if "stored_bytes" in sent
                        else {}
                    )
                )
                ctx.say(f"api {pipeline:<18} round {n + 1}: {rows_per_s:,.0f} rows/s, cpu {cpu}")
        ctx.progress.advance(ctx.overall)
    return {**api_rounds(results), "runs": results, "batch_rows": API_BATCH_ROWS}


async def fanout_api(ctx: Ctx) -> dict[str, Any]:
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
            await ctx.procs.proxy(stack)
            producer = await ctx.procs.worker(
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
                    await ctx.procs.worker(
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
            sampled = producer.sampled()
            cpu0 = sampled.cpu()
            await producer.send({"cmd": "go"})
            done = [await c.expect("done", timeout_s=600) for c in consumers]
            producer_cpu = sampled.cpu() - cpu0
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
