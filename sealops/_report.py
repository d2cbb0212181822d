"""The pure parts of ``sealstream bench`` (no I/O): fixed-size bodies, a constant-memory
latency histogram, the plan of a run, the targets of issue 4 and the Markdown report.

The orchestrator (:mod:`sealops._bench`) and the worker processes
(:mod:`sealops._worker`) share these; tests can use them without processes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sealstream.crypto import encode_rows

__all__ = [
    "MODES",
    "SCHEMA",
    "Histogram",
    "Mode",
    "Plan",
    "evaluate_targets",
    "make_rows",
    "render_costs",
    "render_markdown",
    "render_matrix",
    "render_targets",
    "split_sessions",
    "verdict",
    "window_for",
]

SCHEMA: Final = 1
Mode = Literal["raw", "plain-relay", "session", "per-message"]
MODES: Final[tuple[Mode, ...]] = ("raw", "plain-relay", "session", "per-message")
#: about how big one telemetry row is once packed
_ROW_BYTES: Final = 128
_MIN_PATH: Final = 32  # every path is a msgpack str8, so padding grows the body linearly


# --- bodies ---------------------------------------------------------------------------------


def make_rows(size: int, phase: int) -> list[dict[str, Any]]:
    """Rows whose data plaintext (:func:`encode_rows`) is exactly ``size`` bytes; the first
    row carries the phase number ``p``, so a consumer can tell stragglers of an earlier phase.
    """
    n = max(1, size // _ROW_BYTES)
    rows: list[dict[str, Any]] = [
        {
            "p": phase,
            "ts": 1_700_000_000_000_000_000 + i,
            "host": "node-01",
            "metric": "http.request",
            "status": 200,
            "latency_ms": 12.5,
            "path": "/" * _MIN_PATH,
        }
        for i in range(n)
    ]
    missing = size - len(encode_rows(rows))
    if missing < 0:
        raise ValueError(f"a body of {size} bytes cannot hold {n} rows")
    for i, row in enumerate(rows):
        extra = missing // n + (1 if i < missing % n else 0)
        if _MIN_PATH + extra > 255:
            raise ValueError(f"cannot pad a body to {size} bytes")
        row["path"] = "/api/" + "x" * (_MIN_PATH - 5 + extra)
    if len(encode_rows(rows)) != size:  # pragma: no cover - guarded by a test
        raise AssertionError("body sizing is off")
    return rows


def window_for(mode: Mode, body: int, fanout: int) -> int:
    """Messages a producer may have in flight per session before it waits for consumers'
    acknowledgements: about 4 MiB of envelopes over all sessions, at most 1000. In
    per-message mode every envelope costs an RSA decryption (milliseconds), so about 32 over
    all sessions."""
    if mode == "per-message":
        return max(2, 32 // fanout)
    wire = body * 4 // 3 + 700
    return max(16, min(1000, (4 << 20) // (wire * fanout)))


# --- latency --------------------------------------------------------------------------------


class Histogram:
    """Latencies in log-scale buckets 1 % wide: constant memory whatever the count (under
    2,000 buckets from 1 us to 100 s).

    Bucket ``b`` >= 1 holds ``[1.01**(b-1), 1.01**b)`` microseconds; bucket 0 anything under
    1 us. Quantiles report a bucket's upper edge (so they err at most 1 % high).
    """

    BASE: Final = 1.01
    _LOG: Final = math.log(1.01)

    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    def add_ns(self, ns: int) -> None:
        us = ns / 1000.0
        b = 0 if us < 1.0 else int(math.log(us) / self._LOG) + 1
        self.counts[b] = self.counts.get(b, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: Histogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n

    def quantile_ms(self, q: float) -> float | None:
        total = self.total
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return (self.BASE**b if b else 1.0) / 1000.0
        return None  # pragma: no cover

    def summary(self) -> dict[str, float | None]:
        return {
            "p50": _round(self.quantile_ms(0.50)),
            "p90": _round(self.quantile_ms(0.90)),
            "p99": _round(self.quantile_ms(0.99)),
            "max": _round(self.quantile_ms(1.0)),
        }

    def to_json(self) -> dict[str, int]:
        return {str(b): n for b, n in sorted(self.counts.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> Histogram:
        return cls({int(b): int(n) for b, n in data.items()})


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --- plan -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What one ``sealstream bench`` run measures, and for how long."""

    name: Literal["quick", "full"]
    modes: tuple[Mode, ...] = MODES
    sizes: tuple[int, ...] = (256, 1024, 16 * 1024)
    fanouts: tuple[int, ...] = (1, 10, 50)
    #: seconds of the maximum-rate phase (the producer stops earlier at ``max_messages``)
    max_s: float = 3.0
    #: seconds of the paced phase at half the maximum rate
    paced_s: float = 2.0
    max_messages: int = 200_000
    #: consumer sessions are spread over at most this many processes
    consumer_procs: int = 4
    soak_messages: int = 1_000_000
    soak_warmup: float = 0.1
    first_row_rsa: int = 5
    first_row_x25519: int = 10
    #: messages/s the producer streams while first-row samples subscribe
    first_row_rate: float = 200.0
    #: rounds of plain-relay, session and per-message (1 KiB, 1 consumer, maximum rate), one
    #: after the other: the ratio targets take the median of the rounds' ratios, so that a
    #: busy spell of a shared machine during one run does not decide them
    ratio_rounds: int = 3
    #: consumers that log in through the NATS auth callout and open a session all at once
    logins: int = 200
    #: the api scenario: rounds of (plain, sealstream), rows per run, rows in flight at most
    api_rounds: int = 3
    api_rows: int = 500_000
    api_window: int = 50_000
    #: rows each reader receives in the fan-out runs through the public API (group vs session),
    #: and rows at most in flight ahead of the slowest reader (in session mode each batch is
    #: one envelope per reader through the proxy: a wide window would overrun it)
    fanout_rows: int = 20_000
    fanout_window: int = 2_000
    #: the otlp scenario: rounds of (plain, sealstream); export requests of 512 spans at
    #: maximum rate, at most ``otlp_window`` of them not yet at the sink; seconds paced at half
    #: the maximum rate, and at twice it (the overload)
    otlp_rounds: int = 3
    otlp_requests: int = 2_000
    otlp_window: int = 8
    otlp_paced_s: float = 10.0
    otlp_overload_s: float = 15.0
    #: the overload's rate, times sealstream's maximum; None: a flood, as fast as the load
    #: generator goes (the quick run: an overload whatever a busy machine let the maximum be)
    otlp_overload_x: float | None = 2.0

    @classmethod
    def full(cls) -> Plan:
        return cls(name="full")

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            name="quick",
            sizes=(256, 1024),
            fanouts=(1, 2),
            max_s=0.5,
            paced_s=0.4,
            max_messages=5_000,
            consumer_procs=2,
            soak_messages=20_000,
            first_row_rsa=1,
            first_row_x25519=2,
            ratio_rounds=1,
            logins=20,
            api_rounds=1,
            api_rows=20_000,
            api_window=10_000,
            fanout_rows=2_000,
            otlp_rounds=1,
            otlp_requests=100,
            otlp_paced_s=1.0,
            otlp_overload_s=4.0,
            otlp_overload_x=None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modes": list(self.modes),
            "sizes": list(self.sizes),
            "fanouts": list(self.fanouts),
            "max_s": self.max_s,
            "paced_s": self.paced_s,
            "max_messages": self.max_messages,
            "consumer_procs": self.consumer_procs,
            "soak_messages": self.soak_messages,
            "soak_warmup": self.soak_warmup,
            "first_row_rsa": self.first_row_rsa,
            "first_row_x25519": self.first_row_x25519,
            "first_row_rate": self.first_row_rate,
            "logins": self.logins,
            "ratio_rounds": self.ratio_rounds,
            "api_rounds": self.api_rounds,
            "api_rows": self.api_rows,
            "api_window": self.api_window,
            "fanout_rows": self.fanout_rows,
            "fanout_window": self.fanout_window,
            "otlp_rounds": self.otlp_rounds,
            "otlp_requests": self.otlp_requests,
            "otlp_window": self.otlp_window,
            "otlp_paced_s": self.otlp_paced_s,
            "otlp_overload_s": self.otlp_overload_s,
            "otlp_overload_x": self.otlp_overload_x,
        }


def split_sessions(fanout: int, procs: int) -> list[int]:
    """Sessions per consumer process: ``fanout`` spread evenly over at most ``procs``."""
    k = max(1, min(fanout, procs))
    return [fanout // k + (1 if i < fanout % k else 0) for i in range(k)]


# --- targets --------------------------------------------------------------------------------


def problems(s: Mapping[str, Any]) -> list[str]:
    """What makes a run's figures doubtful: anything not delivered, a producer stalled by its
    window, a session the producer no longer served, a slow-consumer error in NATS."""
    out = []
    if s.get("delivered") != s.get("sent"):
        out.append(f"delivered {s.get('delivered')} of {s.get('sent')}")
    for key in ("lost", "rejected", "stale", "slow_consumer_errors"):
        if s.get(key):
            out.append(f"{key.replace('_', ' ')} {s[key]}")
    if s.get("sessions_missing_at_producer"):
        out.append(f"{s['sessions_missing_at_producer']} sessions gone at the producer")
    if s.get("producer_stalled"):
        out.append("producer stalled waiting for acknowledgements")
    return out


def _doubt(target: dict[str, Any], used: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """A target measured on a degraded run has no verdict: its figures are not trusted."""
    found = [p for s in used if s is not None for p in problems(s)]
    if found and target.get("pass") is not None:
        target["pass"] = None
        target["note"] = "degraded run: " + "; ".join(found)
    return target


def _find(
    scenarios: Iterable[Mapping[str, Any]], mode: str, body: int, fanout: int, phase: str
) -> Mapping[str, Any] | None:
    for s in scenarios:
        if (
            s["mode"] == mode
            and s["body_bytes"] == body
            and s["fanout"] == fanout
            and s["phase"] == phase
        ):
            return s
    return None


def _ratio_target(
    tid: str,
    text: str,
    num: Mapping[str, Any] | None,
    den: Mapping[str, Any] | None,
    key: str,
    minimum: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {"id": tid, "target": text, "required": f">= {minimum:g}"}
    if num is None or den is None or not den.get(key):
        return {**out, "measured": None, "pass": None, "note": "not measured in this run"}
    ratio = float(num[key]) / float(den[key])
    return {
        **out,
        "measured": round(ratio, 2),
        "detail": f"{num[key]:,.0f} / {den[key]:,.0f} {key.replace('_per_s', '/s')}",
        "pass": ratio >= minimum,
    }


def _rounds_target(
    tid: str, text: str, rounds: Sequence[Mapping[str, Any]], other: str, minimum: float
) -> dict[str, Any]:
    """A messages/s ratio to session, as the median of the rounds' ratios."""
    out: dict[str, Any] = {"id": tid, "target": text, "required": f">= {minimum:g}"}
    ratios = []
    details = []
    for r in sorted({int(x["round"]) for x in rounds}):
        mine = [x for x in rounds if x["round"] == r and x["phase"] == "round"]
        num = next((x for x in mine if x["mode"] == "session"), None)
        den = next((x for x in mine if x["mode"] == other), None)
        if num is None or den is None or not den["messages_per_s"]:
            continue
        ratios.append(num["messages_per_s"] / den["messages_per_s"])
        details.append(f"{num['messages_per_s']:,.0f} / {den['messages_per_s']:,.0f}")
    if not ratios:
        return {**out, "measured": None, "pass": None, "note": "not measured in this run"}
    ratio = statistics.median(ratios)
    return {
        **out,
        "measured": round(ratio, 2),
        "detail": f"median of {len(ratios)} rounds; msg/s {'; '.join(details)}",
        "rounds": [round(x, 3) for x in ratios],
        "pass": ratio >= minimum,
    }


def evaluate_targets(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 4, from one run's report (ratios within the run). The two
    messages/s ratios come from the alternating rounds when the run has them."""
    sc: list[Mapping[str, Any]] = report["scenarios"]
    fanouts = sorted({int(s["fanout"]) for s in sc}) or [1]
    big = max(fanouts)
    session = _find(sc, "session", 1024, 1, "max")
    rounds: list[Mapping[str, Any]] = report.get("rounds") or []
    texts = (
        ("session_vs_plain", "session >= 0.8 x plain-relay messages/s (1 KiB, 1 consumer)"),
        ("session_vs_per_message", "session >= 50 x per-message messages/s (1 KiB, 1 consumer)"),
    )
    if rounds:
        maxima = [x for x in rounds if x["phase"] == "round"]
        targets = [
            _doubt(_rounds_target(texts[0][0], texts[0][1], rounds, "plain-relay", 0.8), maxima),
            _doubt(_rounds_target(texts[1][0], texts[1][1], rounds, "per-message", 50.0), maxima),
        ]
    else:
        plain = _find(sc, "plain-relay", 1024, 1, "max")
        per = _find(sc, "per-message", 1024, 1, "max")
        targets = [
            _doubt(
                _ratio_target(texts[0][0], texts[0][1], session, plain, "messages_per_s", 0.8),
                (session, plain),
            ),
            _doubt(
                _ratio_target(texts[1][0], texts[1][1], session, per, "messages_per_s", 50.0),
                (session, per),
            ),
        ]
    lat: dict[str, Any] = {
        "id": "session_p99",
        "target": "session p99 latency <= 10 ms at half of its maximum rate (1 KiB, 1 consumer)",
        "required": "<= 10 ms",
    }
    paced_rounds = [x for x in rounds if x["phase"] == "round-paced"]
    paced = _find(sc, "session", 1024, 1, "paced")
    if paced_rounds:
        p99s = [x["latency_ms"]["p99"] for x in paced_rounds if x["latency_ms"]["p99"]]
        p99 = round(statistics.median(p99s), 2) if p99s else None
        detail = "median of rounds; " + "; ".join(
            f"p99 {x['latency_ms']['p99']} ms at {x['rate_target']:,.0f} msg/s"
            for x in paced_rounds
        )
    elif paced is not None:
        p99 = paced["latency_ms"].get("p99")
        detail = f"p99 {p99} ms at {paced['rate_target']:,.0f} msg/s"
    else:
        p99, detail = None, ""
    lat["measured"] = p99
    # the machine's own noise: plain-relay's p99 at half its rate in the same run
    plain_paced = _find(sc, "plain-relay", 1024, 1, "paced")
    plain_p99 = plain_paced["latency_ms"].get("p99") if plain_paced else None
    if plain_p99 is not None and p99 is not None:
        detail += f"; plain-relay's own p99 at half its rate {plain_p99} ms"
        detail += f" (session - plain-relay: {p99 - plain_p99:+.2f} ms)"
    if p99 is None:
        lat.update({"pass": None, "note": "not measured in this run"})
    else:
        lat.update({"detail": detail, "pass": p99 <= 10.0})
    used: list[Mapping[str, Any] | None] = [*paced_rounds] if paced_rounds else [paced]
    targets.append(_doubt(lat, used))
    wide = _find(sc, "session", 1024, big, "max")
    fan = _ratio_target(
        "fanout",
        f"fan-out to {big} consumers: aggregate rows/s >= 0.5 x the 1-consumer figure "
        "(session, 1 KiB)",
        wide,
        session,
        "rows_per_s",
        0.5,
    )
    _doubt(fan, (wide, session))
    if big != 50:
        fan["note"] = f"this run's largest fan-out is {big}, not 50"
    targets.append(fan)
    soak = report.get("soak") or {}
    for role in ("proxy", "consumer"):
        growth = soak.get("rss_growth_mb", {}).get(role)
        msgs = soak.get("sent", 0)
        t: dict[str, Any] = {
            "id": f"rss_growth_{role}",
            "target": f"{role} RSS grows by <= 20 MB over 1,000,000 messages",
            "required": "<= 20 MB",
            "measured": growth,
        }
        if growth is None:
            t.update({"pass": None, "note": "not measured in this run"})
        else:
            t["detail"] = f"{growth} MB from warm-up to the end of {msgs:,} messages"
            t["pass"] = growth <= 20.0
            if msgs < 1_000_000:
                t["note"] = f"only {msgs:,} messages in this run"
        targets.append(_doubt(t, [soak] if soak else []))
    first = report.get("first_row") or {}
    for kind, limit in (("rsa", 1.5), ("x25519", 0.1)):
        stats = first.get(kind) or {}
        median = stats.get("median_s")
        label = "RSA-4096" if kind == "rsa" else "X25519"
        t = {
            "id": f"first_row_{kind}",
            "target": f"first decrypted row after subscribe <= {limit:g} s with {label}",
            "required": f"<= {limit:g} s (median)",
            "measured": median,
        }
        if median is None:
            t.update({"pass": None, "note": "not measured in this run"})
        else:
            t["detail"] = (
                f"median {median} s, max {stats.get('max_s')} s over {stats.get('n')} samples"
            )
            t["pass"] = median <= limit
        targets.append(t)
    api = report.get("api") or {}
    api_rounds = len(api.get("rounds") or [])
    for tid, text, key, least in (
        (
            "api_vs_plain",
            "api: sealstream >= 0.9 x a plain pipeline's rows/s (public API, default batching)",
            "median_ratio",
            0.9,
        ),
        (
            "api_store_vs_off",
            "api: sealstream with the cluster's store >= 0.7 x without it, rows/s (public API, "
            "emit returns once stored, concurrent callers)",
            "median_store_ratio",
            0.7,
        ),
    ):
        ratio = api.get(key)
        t = {"id": tid, "target": text, "required": f">= {least}", "measured": ratio}
        if ratio is None:
            t.update({"pass": None, "note": "not measured in this run"})
        else:
            t["detail"] = f"median of {api_rounds} alternating rounds"
            t["pass"] = ratio >= least
        targets.append(t)
    return [*targets, *otlp_targets(report.get("otlp") or {})]


#: the otlp scenario's bound on memory under overload: a process's RSS peak in the overload's
#: second half may exceed its first half's by this much (bounded memory stops growing)
OTLP_RSS_GROWTH_MB: Final = 16.0


def otlp_problems(run: Mapping[str, Any]) -> list[str]:
    """What makes an otlp run's figures doubtful: a request acknowledged and not delivered,
    delivered twice, or altered on the way."""
    out = []
    for phase in ("max", "paced", "overload"):
        f = run.get(phase)
        if not f:
            continue
        if f["delivered"] != f["accepted"]:
            out.append(f"{phase}: delivered {f['delivered']} of {f['accepted']} acknowledged")
        for key in ("duplicates", "corrupt"):
            if f.get(key):
                out.append(f"{phase}: {key} {f[key]}")
    return out


def otlp_targets(otlp: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The benchmark targets of issue 20: spans/s against the plain pipeline, the p99 latency
    sealstream adds at half its rate (medians over the rounds), memory under overload."""
    rounds = otlp.get("rounds") or []
    runs = otlp.get("runs") or []
    found = [p for r in runs for p in otlp_problems(r)]
    ratios = [r["ratio"] for r in rounds if r.get("ratio") is not None]
    added = [r["added_p99_ms"] for r in rounds if r.get("added_p99_ms") is not None]
    stored = [r["store_ratio"] for r in rounds if r.get("store_ratio") is not None]
    targets: list[dict[str, Any]] = []
    for tid, text, required, values, least, most in (
        (
            "otlp_vs_plain",
            "otlp: sealstream >= 0.8 x a plain pipeline's spans/s (OTLP/HTTP, 512-span requests)",
            ">= 0.8",
            ratios,
            0.8,
            None,
        ),
        (
            "otlp_p99_added",
            "otlp: p99 latency added at half the maximum rate <= 20 ms (against plain at the "
            "same rate)",
            "<= 20 ms",
            added,
            None,
            20.0,
        ),
        (
            "otlp_store_vs_off",
            "otlp: sealstream with the cluster's store >= 0.7 x without it, spans/s (every 200 "
            "waits for the store's acknowledgement)",
            ">= 0.7",
            stored,
            0.7,
            None,
        ),
    ):
        t: dict[str, Any] = {"id": tid, "target": text, "required": required}
        if not values:
            t.update({"measured": None, "pass": None, "note": "not measured in this run"})
        else:
            median = round(statistics.median(values), 2)
            t["measured"] = median
            t["detail"] = f"median of {len(values)} rounds: {', '.join(map(str, values))}"
            t["pass"] = (least is None or median >= least) and (most is None or median <= most)
        targets.append(t)
    overloads = [r["overload"] for r in runs if r.get("overload")]
    t = {
        "id": "otlp_overload",
        "target": "otlp: producer and consumer RSS bounded under a 2x overload, refused with "
        "503 and Retry-After, every acknowledged request delivered",
        "required": f"growth <= {OTLP_RSS_GROWTH_MB:g} MB, 503s seen",
    }
    if not overloads:
        t.update({"measured": None, "pass": None, "note": "not measured in this run"})
    else:
        growth = [
            o["rss"][role]["growth_mb"]
            for o in overloads
            for role in ("producer", "consumer")
            if o["rss"][role]["growth_mb"] is not None
        ]
        refused = sum(o["retry_after"] for o in overloads)
        worst = max(growth) if growth else None
        t["measured"] = worst
        t["detail"] = (
            f"largest growth {worst} MB; {refused:,} refusals with Retry-After; "
            f"{sum(o['delivered'] for o in overloads):,} of "
            f"{sum(o['accepted'] for o in overloads):,} acknowledged requests delivered"
        )
        t["pass"] = worst is not None and worst <= OTLP_RSS_GROWTH_MB and refused > 0
        if any("overload" in p for p in found):
            t["pass"] = False  # an acknowledged request lost is this target's own failure
    targets.append(t)
    if found:
        for t in targets[:3]:
            if t["pass"] is not None:
                t["pass"] = None
                t["note"] = "degraded run: " + "; ".join(found)
    return targets


def render_otlp(otlp: Mapping[str, Any]) -> list[str]:
    """The otlp scenario: a row per round, the per-run figures, CPU per 1,000 spans."""
    out = [
        "## otlp: OpenTelemetry spans through sealstream (OTLP/HTTP in, OTLP/HTTP out)",
        "",
        "| round | sealstream spans/s | plain spans/s | sealstream / plain "
        "| p99 ms at half sealstream's rate, sealstream | plain | added "
        "| CPU per span, plain / sealstream |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in otlp.get("rounds") or []:
        out.append(
            f"| {r['round'] + 1} | {_fmt(r.get('sealstream_spans_per_s'))} "
            f"| {_fmt(r.get('plain_spans_per_s'))} | {_fmt(r.get('ratio'), 2)} "
            f"| {_fmt(r.get('sealstream_p99_ms'), 1)} | {_fmt(r.get('plain_p99_ms'), 1)} "
            f"| {_fmt(r.get('added_p99_ms'), 1)} | {_fmt(r.get('cpu_ratio'), 2)} |"
        )
    stored = [r for r in otlp.get("rounds") or [] if r.get("store_ratio") is not None]
    if stored:
        out += [
            "",
            "With the cluster's store (each 200 once the envelope is stored), spans/s and the "
            "ratio to sealstream without it, per round: "
            + "; ".join(
                f"{_fmt(r['store_spans_per_s'])} ({_fmt(r['store_ratio'], 2)})" for r in stored
            )
            + ".",
        ]
    out += [
        "",
        "| pipeline | round | phase | spans/s target | spans/s delivered | latency p50 / p90 / p99 "
        "ms | acknowledged | delivered | answers |",
        "|---|--:|---|--:|--:|--:|--:|--:|---|",
    ]
    cpu: dict[str, dict[str, list[float]]] = {}
    spans = int(otlp.get("spans_per_request") or 512)
    for run in otlp.get("runs") or []:
        for phase in ("max", "paced", "overload"):
            f = run.get(phase)
            if not f:
                continue
            answers = ", ".join(f"{n:,} x {s}" for s, n in f["statuses"].items())
            out.append(
                f"| {run['pipeline']} | {run['round'] + 1} | {phase} | {_fmt(f['rate_target'])} "
                f"| {_fmt(f['spans_per_s'])} | {_lat(f['latency_ms'])} | {_fmt(f['accepted'])} "
                f"| {_fmt(f['delivered'])} | {answers} |"
            )
        requests = max(1, int(run["max"]["delivered"]))
        for role, sec in run["cpu_s"].items():
            per_k = 1000 * sec / (requests * spans) * 1000  # ms per 1,000 spans
            cpu.setdefault(run["pipeline"], {}).setdefault(role, []).append(per_k)
    if cpu:
        roles = next(iter(cpu.values())).keys()
        out += [
            "",
            f"CPU ms per 1,000 spans at maximum rate (median over rounds), "
            f"{' / '.join(roles)}: "
            + "; ".join(
                f"{p} " + " / ".join(f"{statistics.median(v):.2f}" for v in by.values())
                for p, by in sorted(cpu.items())
            )
            + ".",
        ]
    for run in otlp.get("runs") or []:
        o = run.get("overload")
        if not o:
            continue
        rss = o["rss"]
        out += [
            "",
            f"Overload, round {run['round'] + 1} ("
            + (
                "a flood"
                if o["rate_target"] is None
                else f"{_fmt(o['rate_target'])} spans/s offered"
            )
            + f" for {o['seconds']} s): RSS peak first half / second half, producer "
            f"{_fmt(rss['producer']['peak_first_half_mb'], 1)} / "
            f"{_fmt(rss['producer']['peak_second_half_mb'], 1)} MB, consumer "
            f"{_fmt(rss['consumer']['peak_first_half_mb'], 1)} / "
            f"{_fmt(rss['consumer']['peak_second_half_mb'], 1)} MB (at the end of the "
            f"maximum-rate run: {run['peak_rss_mb'].get('producer')} / "
            f"{run['peak_rss_mb'].get('consumer')} MB); {o['retry_after']:,} refusals carried "
            f"Retry-After; producer refusals by reason {run['producer'].get('refused', {})}.",
        ]
    out += [
        "",
        "sealstream: OTLP/HTTP load generator -> `producers.OtlpReceiver` (the agent seals each "
        "request into its outbox before answering 200) -> the proxy -> "
        "`consumers.Client.subscribe` -> `consumers.OtlpExporter` -> an OTLP/HTTP sink. plain: "
        "the same request bytes POSTed to an aiohttp server publishing each in a msgpack "
        "envelope -> a nats-py relay routing on the envelope's `session` -> a nats-py "
        "consumer POSTing each body to the same sink. Each request is one protobuf "
        "`ExportTraceServiceRequest` of 512 spans built once and replayed with a 16-byte stamp "
        "(sequence, send time); latency is the generator's POST to the sink's receipt. At "
        "maximum rate at most a window of requests is not yet at the sink; both pipelines are "
        "then paced at half sealstream's maximum rate of the round (the same offered load), "
        "and the overload at twice it, no window, refused requests not retried. Each round "
        "runs sealstream, then sealstream with the store, then plain.",
    ]
    return out


# --- Markdown -------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def _lat(lat: Mapping[str, Any] | None) -> str:
    if not lat or lat.get("p50") is None:
        return "-"
    return " / ".join(_fmt(lat.get(k), 2) for k in ("p50", "p90", "p99"))


def _proc(s: Mapping[str, Any], role: str, key: str, digits: int) -> str:
    procs = [p for p in s["processes"] if p["role"] == role]
    if not procs:
        return "-"
    values = [float(p[key]) for p in procs]
    value = sum(values) if key == "cpu_s" else max(values)
    return _fmt(value, digits)


def verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def render_targets(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| target | required | measured | detail | verdict |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        detail = t.get("detail", "")
        if t.get("note"):
            detail = f"{detail} ({t['note']})" if detail else t["note"]
        lines.append(
            f"| {t['target']} | {t['required']} | {_fmt(t.get('measured'), 2)} | {detail} "
            f"| **{verdict(t.get('pass'))}** |"
        )
    return lines


def render_matrix(scenarios: Sequence[Mapping[str, Any]], body: int) -> list[str]:
    """One table per body size: a row per mode and fan-out, the maximum-rate figures beside
    the latency of the paced run."""
    lines = [
        "| mode | consumers | msg/s | rows/s | MB/s | latency p50 / p90 / p99 ms at 50 % "
        "| p99 ms at max | CPU s producer / proxy / consumers / nats | peak RSS MB "
        "producer / proxy / consumer | sent | lost | rejected |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in scenarios:
        if s["body_bytes"] != body or s["phase"] != "max":
            continue
        paced = _find(scenarios, s["mode"], body, s["fanout"], "paced")
        cpu = " / ".join(
            _proc(s, r, "cpu_s", 1) for r in ("producer", "proxy", "consumer", "nats-server")
        )
        rss = " / ".join(_proc(s, r, "peak_rss_mb", 0) for r in ("producer", "proxy", "consumer"))
        sent = s["sent"] + (paced["sent"] if paced else 0)
        lost = s["lost"] + (paced["lost"] if paced else 0)
        rejected = s["rejected"] + (paced["rejected"] if paced else 0)
        lines.append(
            f"| {s['mode']} | {s['fanout']} | {_fmt(s['messages_per_s'])} "
            f"| {_fmt(s['rows_per_s'])} | {_fmt(s['mb_per_s'], 1)} "
            f"| {_lat(paced['latency_ms'] if paced else None)} "
            f"| {_fmt(s['latency_ms'].get('p99'), 1)} | {cpu} | {rss} "
            f"| {_fmt(sent)} | {_fmt(lost)} | {_fmt(rejected)} |"
        )
    return lines


def render_costs(scenarios: Sequence[Mapping[str, Any]], body: int = 1024) -> list[str]:
    """CPU microseconds per delivered message and process role, one consumer, maximum rate:
    where the time goes (all processes share the machine's cores)."""
    lines = [
        f"### CPU per delivered message, {body:,} B bodies, 1 consumer (us)",
        "",
        "| mode | producer | proxy | consumer | nats-server | total |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for s in scenarios:
        if s["body_bytes"] != body or s["fanout"] != 1 or s["phase"] != "max":
            continue
        n = max(1, int(s["delivered"]))
        cells = []
        total = 0.0
        for role in ("producer", "proxy", "consumer", "nats-server"):
            cpu = [float(p["cpu_s"]) for p in s["processes"] if p["role"] == role]
            if cpu:
                us = sum(cpu) / n * 1e6
                total += us
                cells.append(f"{us:,.0f}")
            else:
                cells.append("-")
        lines.append(f"| {s['mode']} | {' | '.join(cells)} | {total:,.0f} |")
    return lines


def render_health(report: Mapping[str, Any]) -> list[str]:
    """Every run whose figures are doubtful, and why; the targets using one have no verdict."""
    runs: list[Mapping[str, Any]] = [*report["scenarios"], *(report.get("rounds") or [])]
    if report.get("soak"):
        runs.append({**report["soak"], "phase": "soak"})
    bad = [(s, problems(s)) for s in runs]
    bad = [(s, p) for s, p in bad if p]
    lines = ["## Run health", ""]
    if not bad:
        return [
            *lines,
            f"All {len(runs)} runs delivered every message: none lost, rejected "
            "or stale, no producer stalled, no slow-consumer error.",
        ]
    lines += ["| run | problems |", "|---|---|"]
    for s, p in bad:
        name = f"{s['mode']} {s['body_bytes']} B x{s['fanout']} {s['phase']}"
        lines.append(f"| {name} | {'; '.join(p)} |")
    return lines


def _machine_line(m: Mapping[str, Any]) -> str:
    v = m.get("versions", {})
    return (
        f"{m.get('cpu_count')} CPUs ({m.get('cpu_model', '?')}), {m.get('platform')}, "
        f"Python {m.get('python')}, nats-server {v.get('nats-server', '?')}, "
        f"nats-py {v.get('nats-py', '?')}, jwcrypto {v.get('jwcrypto', '?')}, "
        f"cryptography {v.get('cryptography', '?')}, msgpack {v.get('msgpack', '?')}"
        f"{', uvloop ' + v['uvloop'] if v.get('uvloop') else ''}"
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: targets, one matrix per body size, soak, first row, counts."""
    sc: list[Mapping[str, Any]] = report["scenarios"]
    m = report["machine"]
    out = [
        "# sealstream bench",
        "",
        f"`{report['command']}` ({report['plan']['name']} run), {report['date']}, "
        f"{report['duration_s']:.0f} s.",
        "",
        f"Machine: {_machine_line(m)}; load average at start {m.get('loadavg')}.",
        "",
        "## Targets (1 KiB bodies, ratios within this run)",
        "",
        *render_targets(report["targets"]),
    ]
    for body in report["plan"]["sizes"] if sc else ():
        out += [
            "",
            f"## {body:,} B bodies",
            "",
            *render_matrix(sc, body),
        ]
    if sc:
        out += [
            "",
            "msg/s, rows/s and MB/s (plaintext) are delivered to all consumers together, first to "
            "last message, at the maximum rate the producer sustains with a bounded in-flight "
            "window. Latency is producer timestamp to decrypted row: p50/p90/p99 from a second "
            "run paced at half that rate, and p99 at the maximum rate (where the window queues). "
            "CPU seconds are those of the maximum-rate run; consumers sum over their processes; "
            "peak RSS is each process's high-water mark since it started (consumer: the largest "
            "process). sent / lost / rejected add both runs: lost is what never reached a "
            "consumer, rejected what arrived and was refused.",
        ]
    rounds = report.get("rounds") or []
    if rounds:
        out += [
            "",
            "## Alternating rounds (1 KiB, 1 consumer, maximum rate)",
            "",
            "| round | plain-relay msg/s | session msg/s | per-message msg/s "
            "| session / plain-relay | session / per-message "
            "| session p50 / p90 / p99 ms at half its rate |",
            "|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in sorted({int(x["round"]) for x in rounds}):
            mine = [x for x in rounds if x["round"] == r]
            by = {x["mode"]: x["messages_per_s"] for x in mine if x["phase"] == "round"}
            lat = next((x for x in mine if x["phase"] == "round-paced"), None)
            plain, sess, per = by.get("plain-relay"), by.get("session"), by.get("per-message")
            out.append(
                f"| {r + 1} | {_fmt(plain)} | {_fmt(sess)} | {_fmt(per)} "
                f"| {_fmt(sess / plain if sess and plain else None, 2)} "
                f"| {_fmt(sess / per if sess and per else None, 1)} "
                f"| {_lat(lat['latency_ms'] if lat else None)} |"
            )
        out += [
            "",
            "Each round runs the three modes one after the other, each with fresh processes; "
            "the targets above take the median of the rounds' ratios.",
        ]
    out += ["", *render_costs(sc), "", *render_health(report)] if sc else []
    groups = report.get("groups") or []
    published = sum(g.get("producer_published") or 0 for g in groups if g.get("proxy"))
    relayed = sum(g["proxy"].get("relayed") or 0 for g in groups if g.get("proxy"))
    dropped = sum(g["proxy"].get("rejected") or 0 for g in groups if g.get("proxy"))
    reasons: dict[str, int] = {}
    for g in groups:
        for reason, n in ((g.get("proxy") or {}).get("rejected_by_reason") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    if published:
        why = ", ".join(f"{n:,} {r}" for r, n in sorted(reasons.items()))
        out += [
            "",
            f"The proxies relayed {relayed:,} of the {published:,} envelopes their producers "
            f"published (key envelopes included) and dropped {dropped:,}"
            f"{f' ({why})' if why else ''}.",
        ]
    soak = report.get("soak")
    if soak:
        g = soak.get("rss_growth_mb", {})
        w = soak.get("rss_warm_mb", {})
        e = soak.get("rss_end_mb", {})
        out += [
            "",
            "## Memory soak (session, 1 KiB, 1 consumer)",
            "",
            "| process | RSS after warm-up MB | RSS at end MB | growth MB |",
            "|---|--:|--:|--:|",
        ]
        for role in ("proxy", "consumer", "producer"):
            out.append(
                f"| {role} | {_fmt(w.get(role), 1)} | {_fmt(e.get(role), 1)} "
                f"| {_fmt(g.get(role), 1)} |"
            )
        out += [
            "",
            f"{soak['sent']:,} messages at {_fmt(soak.get('messages_per_s'))} msg/s; warm-up "
            f"ends after {soak.get('warmup_messages', 0):,} messages; delivered "
            f"{soak['delivered']:,}, lost {soak['lost']:,}, rejected {soak['rejected']:,}.",
        ]
    first = report.get("first_row")
    if first:
        out += [
            "",
            "## First decrypted row after subscribe",
            "",
            "| key | samples | median s | max s | key generation median s |",
            "|---|--:|--:|--:|--:|",
        ]
        for kind, label in (("rsa", "RSA-4096 (RSA-OAEP-256)"), ("x25519", "X25519")):
            st = first.get(kind) or {}
            out.append(
                f"| {label} | {st.get('n', 0)} | {_fmt(st.get('median_s'), 3)} "
                f"| {_fmt(st.get('max_s'), 3)} | {_fmt(st.get('keygen_median_s'), 3)} |"
            )
        out += [
            "",
            f"From `Client.subscribe` (key generation included) to the first decrypted row, "
            f"while the producer streams {_fmt(first.get('rate'))} messages/s.",
        ]
    logins = report.get("logins")
    if logins:
        out += [
            "",
            "## Consumer logins through the NATS auth callout",
            "",
            "| consumers at once | admitted | refused | connect p50 / p99 ms "
            "| connect + open p50 / p99 ms | all done s |",
            "|--:|--:|--:|--:|--:|--:|",
            f"| {logins.get('consumers')} | {logins.get('admitted')} | {logins.get('refused')} "
            f"| {_fmt(logins.get('connect_p50_ms'), 1)} / {_fmt(logins.get('connect_p99_ms'), 1)} "
            f"| {_fmt(logins.get('open_p50_ms'), 1)} / {_fmt(logins.get('open_p99_ms'), 1)} "
            f"| {_fmt(logins.get('wall_s'), 2)} |",
            "",
            "Each consumer makes its X25519 key first (not timed), then connects to NATS as "
            "user = session id, password = token (the server asks the proxy's callout service, "
            "which verifies the token and issues a user confined to the session), subscribes "
            "its inbox and opens the session; all start together.",
        ]
    api = report.get("api")
    if api:
        out += [
            "",
            "## api: rows/s through the public API",
            "",
            "| round | sealstream rows/s | plain rows/s | sealstream / plain "
            "| with the store rows/s | with / without the store "
            "| the store, one caller rows/s | one caller / without the store |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for row in api["rounds"]:
            out.append(
                f"| {row['round'] + 1} | {_fmt(row['sealstream_rows_per_s'])} "
                f"| {_fmt(row['plain_rows_per_s'])} | {_fmt(row['ratio'], 2)} "
                f"| {_fmt(row.get('store_rows_per_s'))} | {_fmt(row.get('store_ratio'), 2)} "
                f"| {_fmt(row.get('store_alone_rows_per_s'))} "
                f"| {_fmt(row.get('store_alone_ratio'), 2)} |"
            )
        per_row: dict[str, list[float]] = {}
        for r in api.get("runs") or []:
            if "stored_bytes_per_row" in r:
                per_row.setdefault(r["pipeline"], []).append(r["stored_bytes_per_row"])
        if per_row:
            kept = ", ".join(f"{p} {statistics.median(v):,.1f}" for p, v in sorted(per_row.items()))
            out += [
                "",
                f"Store: bytes kept per row (median over rounds; the sealed envelopes of the "
                f"run as JetStream keeps them, message overhead included): {kept}.",
            ]
        cpu: dict[str, dict[str, list[float]]] = {}
        for run in api.get("runs") or []:
            for role, sec in run["cpu_s"].items():
                per_krow = 1e6 * sec / max(run["rows"], 1)  # ms per 1,000 rows
                cpu.setdefault(run["pipeline"], {}).setdefault(role, []).append(per_krow)
        out += [
            "",
            "CPU ms per 1,000 rows (median over rounds), producer / relay / consumer: "
            + "; ".join(
                f"{p} " + " / ".join(f"{statistics.median(v):.2f}" for v in roles.values())
                for p, roles in sorted(cpu.items())
            )
            + ".",
            "",
            f"sealstream: `producers.Agent.emit` (100 rows a call from "
            f"{api.get('callers', 4)} concurrent callers, default batching of "
            f"{api.get('batch_rows', 1000):,} rows) -> the proxy -> `consumers.Client.subscribe` "
            "(X25519, the user's proof at open). plain: the same rows, handed over the same "
            "way, packed 1,000 to a msgpack "
            "envelope by a nats-py producer, relayed by a nats-py process routing on the "
            "envelope's `session` field, unpacked by a nats-py consumer. Both with the same "
            "in-flight window, in separate processes, the rounds alternating; rows/s is first "
            "row to last at the consumer. sealstream-store: the same with the cluster's store; "
            "there `emit` returns once its rows are stored: it seals at once, and the calls "
            "made while a commit is being stored share the next one (group commit). "
            "sealstream-store-1: one caller emitting in sequence, so each call seals its 100 "
            "rows as a batch of their own and waits one acknowledgement round trip: ten times "
            "the envelopes (sealed, stored, relayed, opened) per row, which the CPU per 1,000 "
            "rows above shows.",
        ]
    if report.get("otlp"):
        out += ["", *render_otlp(report["otlp"])]
    fan = report.get("fanout_api")
    if fan:
        by = {r["mode"]: r for r in fan["runs"]}
        out += [
            "",
            f"## Fan-out {fan['fanout']} through the public API: group mode against session mode",
            "",
            "| key mode | readers | rows delivered | rows lost | rows/s delivered (all readers) "
            "| producer CPU s |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for mode in ("session", "group"):
            run = by.get(mode)
            if run is not None:
                out.append(
                    f"| {mode} | {run['readers']} | {_fmt(run['rows'])} "
                    f"| {_fmt(run.get('lost_rows', 0))} "
                    f"| {_fmt(run['rows_per_s'])} | {_fmt(run['producer_cpu_s'], 2)} |"
                )
        if "session" in by and "group" in by and by["session"]["rows_per_s"]:
            ratio = by["group"]["rows_per_s"] / by["session"]["rows_per_s"]
            out += ["", f"group / session rows/s delivered: {ratio:.2f}."]
        out += [
            "",
            f"One `producers.Agent` (`emit`, default batching) -> the proxy -> "
            f"{fan['fanout']} `consumers.Client.subscribe` sessions spread over the consumer "
            f"processes, each reading {_fmt(fan['rows_per_reader'])} rows; rows/s is every "
            "reader's rows over the time from the first row any reader got to the last; the "
            "producer keeps the api scenario's window ahead of the slowest reader. In group "
            "mode the producer seals and signs each batch once for all readers; in session "
            "mode once per reader.",
        ]
    if sc:
        out += [
            "",
            "## Messages per scenario",
            "",
            "| mode | body B | consumers | consumer processes | window | max-rate msgs "
            "| paced msgs | paced rate msg/s per consumer |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
    for s in sc:
        if s["phase"] != "max":
            continue
        paced = _find(sc, s["mode"], s["body_bytes"], s["fanout"], "paced")
        out.append(
            f"| {s['mode']} | {s['body_bytes']} | {s['fanout']} "
            f"| {len(s['sessions_per_process'])} | {s['window']} | {_fmt(s['sent'])} "
            f"| {_fmt(paced['sent'] if paced else None)} "
            f"| {_fmt(paced['rate_target'] if paced else None)} |"
        )
    out.append("")
    return "\n".join(out)
