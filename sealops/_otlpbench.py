"""The ``otlp`` scenario of ``sealstream bench``: spans/s of OpenTelemetry traces through
sealstream against a plain pipeline carrying the same request bytes, the latency it adds, and
memory under a 2x overload (issue 20).

- sealstream: a load generator POSTs OTLP/HTTP export requests (512 spans each, protobuf) to
  ``producers.OtlpReceiver`` (an ``Agent`` sealing each request into its outbox) -> the real
  proxy -> ``consumers.Client.subscribe`` -> ``consumers.OtlpExporter`` -> an OTLP/HTTP sink.
- sealstream-store: the same with the cluster's store (JetStream): the receiver answers 200
  once the request's envelopes are stored, and a consumer that falls behind reads the store at
  its own pace.
- plain: the same requests POSTed to an aiohttp server that publishes each body in a msgpack
  envelope to NATS -> the ``plain-relay`` of :mod:`sealops._api` (routing by the envelope's
  ``session``) -> a nats-py consumer POSTing each body, one at a time, to the same sink.

The generator builds one request with ``opentelemetry-proto`` and replays it: per request it
only writes a 16-byte stamp (a sequence number and ``time.monotonic_ns()``, one clock for
every process of the machine) over the first span's trace id. The sink checks every other byte
against the same request and takes the latency from the stamp: POST to receipt. Per pipeline,
fresh processes: a maximum-rate run (at most ``window`` requests not yet at the sink), a run
paced at half sealstream's maximum rate of the round, the same offered load for both
(latency), and for sealstream-store (acknowledged means stored: nothing may be lost) the
overload: paced at twice sealstream's maximum rate with no window (``--quick``: a flood, as
fast as 64 connections go, so that it overloads whatever rate a busy machine let the
maximum-rate run reach), producer and consumer RSS sampled throughout; the
receiver must refuse (503 and ``Retry-After``) rather than grow, and every request it
acknowledged must reach the sink.

The worker roles are in :mod:`sealops._otlproles`; this module runs the scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

from sealops._api import STORED, authorize
from sealops._otlproles import SPANS
from sealops._procs import Child, Proc
from sealops._report import Histogram, Plan
from sealops._scenarios import Ctx
from sealstream.otlp import OTLP_STREAMS

__all__ = ["SEALED", "STORED", "otlp", "otlp_summary", "overload_figures"]

#: the sealstream pipelines: at most once, and with the cluster's store (lossless: a slow
#: consumer falls behind and reads the store at its own pace; the overload runs on it)
SEALED: Final = ("sealstream", STORED)

#: RSS samples of producer and consumer during the overload, seconds apart
_SAMPLE_S: Final = 0.25


# --- orchestration ----------------------------------------------------------------------------


def overload_figures(timeline: list[dict[str, float]]) -> dict[str, Any]:
    """Per role, the peak RSS of the overload's first half and of its second: memory that is
    bounded stops growing once the receiver refuses."""
    half = len(timeline) // 2
    out: dict[str, Any] = {}
    for role in ("producer", "consumer"):
        first = [s[role] for s in timeline[: max(half, 1)]]
        second = [s[role] for s in timeline[half:]]
        out[role] = {
            "start_mb": timeline[0][role] if timeline else None,
            "peak_mb": max(first + second) if timeline else None,
            "peak_first_half_mb": round(max(first), 1) if first else None,
            "peak_second_half_mb": round(max(second), 1) if second else None,
            "growth_mb": round(max(second) - max(first), 1) if first and second else None,
        }
    return out


async def _phase(
    gen: Child, sink: Child, cmd: dict[str, Any], *, timeout_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run of the generator; its answers and the sink's figures once every accepted
    request arrived (or the sink gave up waiting)."""
    await sink.send({"cmd": "reset"})
    await sink.expect("ok", timeout_s=10)
    await gen.send({"cmd": "run", **cmd})
    ran = await gen.expect("ran", timeout_s=timeout_s)
    await sink.send({"cmd": "expect", "requests": ran["accepted"]})
    got = await sink.expect("done", timeout_s=timeout_s)
    return ran, got


def _figures(
    phase: str, ran: dict[str, Any], got: dict[str, Any], rate: float | None
) -> dict[str, Any]:
    seconds = max(float(got["last"]) - float(got["first"]), 1e-9)
    latency = Histogram.from_json(got["latency"])
    return {
        "phase": phase,
        "rate_target": None if rate is None else round(rate * SPANS),
        "accepted": ran["accepted"],
        "statuses": ran["statuses"],
        "retry_after": ran["retry_after"],
        "delivered": got["unique"],
        "duplicates": got["duplicates"],
        "corrupt": got["corrupt"],
        "spans_per_s": round(got["requests"] * SPANS / seconds) if got["requests"] > 1 else None,
        "latency_ms": latency.summary(),
    }


async def _pipeline(
    ctx: Ctx,
    stack: contextlib.AsyncExitStack,
    pipeline: str,
    sink_url: str,
    common: dict[str, Any],
) -> tuple[Child, Child, Child]:
    """Producer, relay and consumer of one pipeline, ready."""
    procs = ctx.procs
    if pipeline in SEALED:
        user_file, policy_file = authorize(ctx.state, list(OTLP_STREAMS))
        relay = await procs.proxy(stack)
        producer = await procs.worker(
            stack,
            "otlp-producer",
            "otlp-producer",
            {
                **common,
                "identity_file": str(ctx.identity_file),
                "policy_file": str(policy_file),
                "store": pipeline == STORED,
            },
        )
        consumer = await procs.worker(
            stack,
            "otlp-consumer",
            "otlp-consumer",
            {
                **common,
                "token": ctx.token("bench-otlp"),
                "user_file": str(user_file),
                "trust_jwk": ctx.trust_jwk,
                "sink_url": sink_url,
            },
        )
    else:
        relay = await procs.worker(stack, "plain-relay", "plain-relay", common)
        await relay.expect("ready", timeout_s=60)
        producer = await procs.worker(stack, "otlp-plain-producer", "otlp-plain-producer", common)
        consumer = await procs.worker(
            stack, "otlp-plain-consumer", "otlp-plain-consumer", {**common, "sink_url": sink_url}
        )
    return producer, relay, consumer


async def otlp(ctx: Ctx) -> dict[str, Any]:
    """Rounds of (sealstream, plain), fresh processes each: maximum rate, half of sealstream's
    maximum for both, and for sealstream twice its maximum (the overload); see the module's
    docstring."""
    plan = ctx.plan
    common = {"ack_subject": f"{ctx.ack_subject}.otlp", "window": plan.otlp_window}
    runs: list[dict[str, Any]] = []
    for n in range(plan.otlp_rounds):
        rate = 0.0  # sealstream's maximum this round, requests/s: both are paced at half
        for pipeline in (*SEALED, "plain"):
            async with contextlib.AsyncExitStack() as stack:
                sink = await ctx.procs.worker(stack, "otlp-sink", "otlp-sink", common)
                sink_url = (await sink.expect("ready", timeout_s=60))["url"]
                producer, relay, consumer = await _pipeline(ctx, stack, pipeline, sink_url, common)
                url = (await producer.expect("ready", timeout_s=60))["url"]
                await consumer.expect("ready", timeout_s=60)
                gen = await ctx.procs.worker(stack, "otlp-gen", "otlp-gen", common)
                request_bytes = (await gen.expect("ready", timeout_s=60))["request_bytes"]
                procs = [
                    producer.sampled("producer"),
                    relay.sampled("relay"),
                    consumer.sampled("consumer"),
                    gen.sampled("generator"),
                    sink.sampled("sink"),
                ]
                cpu0 = {p.role: p.cpu() for p in procs}
                ran, got = await _phase(
                    gen,
                    sink,
                    {"url": url, "requests": plan.otlp_requests, "window": plan.otlp_window},
                    timeout_s=600,
                )
                cpu = {p.role: round(p.cpu() - cpu0[p.role], 2) for p in procs}
                peak = {p.role: round(p.peak_mb(), 1) for p in procs[:3]}
                maximum = _figures("max", ran, got, None)
                run: dict[str, Any] = {
                    "pipeline": pipeline,
                    "round": n,
                    "request_bytes": request_bytes,
                    "max": maximum,
                    "cpu_s": cpu,
                    "peak_rss_mb": peak,
                }
                if pipeline == "sealstream":
                    rate = (maximum["spans_per_s"] or SPANS) / SPANS
                ran, got = await _phase(
                    gen,
                    sink,
                    {
                        "url": url,
                        "requests": max(1, int(rate / 2 * plan.otlp_paced_s)),
                        "rate": rate / 2,
                        "window": 4 * plan.otlp_window,
                    },
                    timeout_s=600,
                )
                run["paced"] = _figures("paced", ran, got, rate / 2)
                if pipeline == STORED:  # what the receiver acknowledged is stored: lossless
                    over = None if plan.otlp_overload_x is None else rate * plan.otlp_overload_x
                    run["overload"] = await _overload(gen, sink, url, procs, over, plan)
                ctx.say(
                    f"otlp {pipeline:<10} round {n + 1}: {_fmt_rate(maximum)} spans/s, "
                    f"p99 at half rate {run['paced']['latency_ms']['p99']} ms"
                )
            run["producer"] = producer.result
            run["consumer"] = consumer.result
            runs.append(run)
        ctx.progress.advance(ctx.overall)
    return otlp_summary(runs, spans=SPANS)


def _fmt_rate(figures: dict[str, Any]) -> str:
    value = figures.get("spans_per_s")
    return "-" if value is None else f"{value:,.0f}"


async def _overload(
    gen: Child, sink: Child, url: str, procs: list[Proc], rate: float | None, plan: Plan
) -> dict[str, Any]:
    """``rate`` requests/s (or a flood, None) for ``plan.otlp_overload_s``, no window, no
    retries: RSS of producer and consumer sampled throughout."""
    sampled = {p.role: p for p in procs if p.role in ("producer", "consumer")}
    timeline: list[dict[str, float]] = []
    stop = asyncio.Event()

    async def monitor() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            timeline.append(
                {"t": round(time.monotonic() - t0, 2)}
                | {role: round(p.rss_mb(), 1) for role, p in sampled.items()}
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _SAMPLE_S)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(monitor())
        try:
            ran, got = await _phase(
                gen,
                sink,
                {
                    "url": url,
                    "requests": None if rate is None else max(1, int(rate * plan.otlp_overload_s)),
                    "rate": rate,
                    "duration": plan.otlp_overload_s,
                    "retry": False,
                },
                timeout_s=600,
            )
        finally:
            stop.set()
    return {
        **_figures("overload", ran, got, rate),
        "seconds": round(ran["seconds"], 2),
        "rss": overload_figures(timeline),
        "timeline": timeline,
    }


def _cpu_per_span(run: dict[str, Any], spans: int) -> float | None:
    cpu, n = run.get("cpu_s"), run["max"]["delivered"] * spans
    return sum(cpu.values()) / n if cpu and n else None


def otlp_summary(runs: list[dict[str, Any]], *, spans: int) -> dict[str, Any]:
    """Per round: spans/s of each pipeline and their ratio, the p99 latency sealstream adds
    at half its rate; the median of each."""
    table: list[dict[str, Any]] = []
    for n in sorted({int(r["round"]) for r in runs}):
        by = {r["pipeline"]: r for r in runs if r["round"] == n}
        seal, plain, stored = by.get("sealstream"), by.get("plain"), by.get(STORED)
        row: dict[str, Any] = {"round": n}
        if seal and stored:
            s, k = seal["max"]["spans_per_s"], stored["max"]["spans_per_s"]
            row["store_spans_per_s"] = k
            row["store_ratio"] = round(k / s, 3) if s and k else None
        if seal and plain:
            s, p = seal["max"]["spans_per_s"], plain["max"]["spans_per_s"]
            row["sealstream_spans_per_s"], row["plain_spans_per_s"] = s, p
            row["ratio"] = round(s / p, 3) if s and p else None
            sp, pp = seal["paced"]["latency_ms"]["p99"], plain["paced"]["latency_ms"]["p99"]
            row["sealstream_p99_ms"], row["plain_p99_ms"] = sp, pp
            row["added_p99_ms"] = round(sp - pp, 2) if sp is not None and pp is not None else None
            # CPU seconds of all five processes per span at maximum rate, plain's over
            # sealstream's: the ratio the rates tend to when both are CPU-bound, whatever
            # share of the machine each round got
            cs, cp = _cpu_per_span(seal, spans), _cpu_per_span(plain, spans)
            row["cpu_ratio"] = round(cp / cs, 3) if cs and cp else None
        table.append(row)
    return {"spans_per_request": spans, "rounds": table, "runs": runs}
