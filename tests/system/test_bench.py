"""``sealstream bench``: the pure parts, and one ``--quick`` run whose report must account for
every message. Benchmarks are tools, not timed tests: nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sealops._otlpbench import SEALED, STORED, otlp_summary, overload_figures
from sealops._otlproles import SPANS, build_request
from sealops._report import (
    MODES,
    Histogram,
    Plan,
    evaluate_targets,
    make_rows,
    otlp_problems,
    otlp_targets,
    problems,
    render_markdown,
    render_otlp,
    split_sessions,
    window_for,
)
from sealstream.crypto import encode_rows


@pytest.mark.parametrize("size", [256, 1024, 16 * 1024, 3000])
@pytest.mark.parametrize("phase", [0, 1, 127, 128, 70_000])
def test_bodies_have_the_exact_size(size: int, phase: int) -> None:
    rows = make_rows(size, phase)
    assert len(encode_rows(rows)) == size
    assert rows[0]["p"] == phase
    assert len(rows) == max(1, size // 128)


def test_histogram_quantiles_err_at_most_one_percent_high() -> None:
    h = Histogram()
    for us in range(1, 10_001):
        h.add_ns(us * 1000)
    for q, exact_ms in ((0.5, 5.0), (0.9, 9.0), (0.99, 9.9)):
        got = h.quantile_ms(q)
        assert got is not None
        assert exact_ms <= got <= exact_ms * 1.01 + 1e-9
    again = Histogram.from_json(json.loads(json.dumps(h.to_json())))
    assert again.counts == h.counts
    assert Histogram().summary() == {"p50": None, "p90": None, "p99": None, "max": None}


def test_windows_and_process_split() -> None:
    assert window_for("per-message", 1024, 1) == 32
    assert window_for("per-message", 1024, 50) == 2
    assert window_for("session", 1024, 1) == 1000
    assert 16 <= window_for("session", 16 * 1024, 50) < window_for("session", 1024, 50)
    assert split_sessions(1, 4) == [1]
    assert split_sessions(10, 4) == [3, 3, 2, 2]
    assert split_sessions(50, 4) == [13, 13, 12, 12]


def _scenario(mode: str, fanout: int, phase: str, rate: float) -> dict[str, Any]:
    return {
        "mode": mode,
        "body_bytes": 1024,
        "fanout": fanout,
        "phase": phase,
        "rate_target": rate / 2 if phase == "paced" else None,
        "window": 1000,
        "sessions_per_process": [fanout],
        "sent": 100,
        "delivered": 100,
        "lost": 0,
        "rejected": 0,
        "messages_per_s": rate,
        "rows_per_s": rate * 8 * fanout,
        "mb_per_s": 1.0,
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 4.0},
        "processes": [{"role": "producer", "pid": 1, "cpu_s": 1.0, "peak_rss_mb": 40.0}],
    }


def test_targets_are_ratios_within_one_run() -> None:
    scenarios = [
        _scenario(mode, fanout, phase, rate)
        for mode, rate in (("plain-relay", 10_000.0), ("session", 9_000.0), ("per-message", 100.0))
        for fanout in (1, 50)
        for phase in ("max", "paced")
    ]
    report: dict[str, Any] = {
        "scenarios": scenarios,
        "soak": {
            "sent": 1_000_000,
            "delivered": 1_000_000,
            "rss_growth_mb": {"proxy": 1.0, "consumer": 25.0},
        },
        "first_row": {"rsa": {"median_s": 1.2, "max_s": 2.0, "n": 5}, "x25519": {}},
    }
    targets = {t["id"]: t for t in evaluate_targets(report)}
    assert targets["session_vs_plain"]["measured"] == 0.9
    assert targets["session_vs_plain"]["pass"] is True
    assert targets["session_vs_per_message"]["pass"] is True
    assert targets["session_p99"]["pass"] is True
    assert targets["fanout"]["pass"] is True
    assert targets["rss_growth_proxy"]["pass"] is True
    assert targets["rss_growth_consumer"]["pass"] is False
    assert targets["first_row_rsa"]["pass"] is True
    assert targets["first_row_x25519"]["pass"] is None


def test_a_degraded_run_gives_no_verdict() -> None:
    scenarios = [
        _scenario(mode, 1, phase, rate)
        for mode, rate in (("plain-relay", 10_000.0), ("session", 9_000.0), ("per-message", 1.0))
        for phase in ("max", "paced")
    ]
    scenarios[0].update(delivered=90, lost=10)  # plain-relay, max: a tenth never arrived
    report: dict[str, Any] = {"scenarios": scenarios, "rounds": [], "machine": {}}
    targets = {t["id"]: t for t in evaluate_targets(report)}
    assert targets["session_vs_plain"]["pass"] is None
    assert "delivered 90 of 100" in targets["session_vs_plain"]["note"]
    assert targets["session_vs_per_message"]["pass"] is True  # its runs are sound
    assert problems({**scenarios[1], "producer_stalled": True}) == [
        "producer stalled waiting for acknowledgements"
    ]


def _accounted(item: dict[str, Any]) -> None:
    """Every envelope the producer sent arrived and was classified, and every message was
    delivered: on loopback with a flow-controlled window nothing may be lost or refused."""
    arrived = item["delivered"] + item["rejected"] + item["stale"] + item["keys"]
    assert item["envelopes"] == arrived + item["lost"], item
    assert item["delivered"] == item["sent"], item
    assert item["lost"] == item["rejected"] == item["stale"] == 0, item
    assert item["keys"] == item["envelopes"] - item["sent"], item


def _bench(args: list[str], timeout_s: float) -> tuple[dict[str, Any], str]:
    """Run ``sealstream bench ARGS``; its report.json and report.md."""
    out = Path(args[args.index("--out") + 1])
    command = Path(sys.executable).parent / "sealstream"
    proc = subprocess.Popen(
        [str(command), "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench stops its processes and the embedded server itself
        _, stderr = proc.communicate(timeout=30)
        pytest.fail(
            f"bench {' '.join(args)} did not finish in {timeout_s:.0f} s:\n{stderr[-4000:]}"
        )
    assert proc.returncode == 0, stderr[-4000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return report, (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.timeout(260)
def test_quick_run_accounts_for_every_message(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    report, markdown = _bench(["--quick", "--out", str(out)], 210)

    assert report["schema"] == 1
    assert report["command"].startswith("sealstream bench --quick")
    assert report["plan"] == Plan.quick().to_json()
    for key in ("cpu_count", "python", "versions", "platform"):
        assert key in report["machine"]
    assert report["machine"]["versions"]["nats-server"]

    scenarios = report["scenarios"]
    assert {s["mode"] for s in scenarios} == set(MODES)
    plan = Plan.quick()
    expected = {
        (m, b, f, p)
        for m in MODES
        for b in plan.sizes
        for f in plan.fanouts
        for p in ("max", "paced")
    }
    assert {(s["mode"], s["body_bytes"], s["fanout"], s["phase"]) for s in scenarios} == expected
    for s in scenarios:
        assert s["sent"] > 0
        _accounted(s)
        assert problems(s) == [], s
        assert len(s["per_session"]) == s["fanout"]
        for session in s["per_session"]:
            _accounted(session)
        roles = {p["role"] for p in s["processes"]}
        assert {"producer", "consumer", "nats-server"} <= roles
        assert ("proxy" in roles) == (s["mode"] != "raw")
        for key in ("messages_per_s", "rows_per_s", "mb_per_s", "latency_ms"):
            assert key in s
        assert set(s["latency_ms"]) == {"p50", "p90", "p99", "max"}

    rounds = report["rounds"]
    assert {r["mode"] for r in rounds} == {"plain-relay", "session", "per-message"}
    assert len(rounds) == 4 * plan.ratio_rounds
    assert {r["phase"] for r in rounds} == {"round", "round-paced"}
    for r in rounds:
        _accounted(r)
        assert problems(r) == [], r

    soak = report["soak"]
    assert soak["sent"] == plan.soak_messages
    _accounted(soak)
    assert problems(soak) == [], soak
    # the proxies relayed every envelope their producers published, and dropped none
    for group in report["groups"]:
        if group["mode"] != "raw":
            assert group["proxy"]["relayed"] == group["producer_published"], group
            assert not group["proxy"]["rejected"], group
    assert {"proxy", "consumer"} <= set(soak["rss_growth_mb"])
    assert report["first_row"]["rsa"]["n"] == plan.first_row_rsa
    assert report["first_row"]["x25519"]["n"] == plan.first_row_x25519
    # every consumer logged in through the auth callout and opened its session
    logins = report["logins"]
    assert (logins["consumers"], logins["admitted"], logins["refused"]) == (plan.logins,) * 2 + (
        0,
    ), logins
    assert logins["open_p99_ms"] >= logins["open_p50_ms"] > 0
    assert "## Consumer logins through the NATS auth callout" in markdown

    ids = {t["id"] for t in report["targets"]}
    assert {"session_vs_plain", "session_vs_per_message", "session_p99", "fanout"} <= ids
    # the public API with the store and without it, side by side; what the store keeps a row
    (api_round,) = report["api"]["rounds"]
    assert api_round["store_rows_per_s"] > 0
    assert api_round["store_ratio"] > 0
    (stored,) = [r for r in report["api"]["runs"] if r["pipeline"] == "sealstream-store"]
    assert stored["stored_bytes_per_row"] > 0
    assert {"api_vs_plain", "api_store_vs_off"} <= ids
    assert "bytes kept per row" in markdown
    assert "## Targets" in markdown
    assert "delivered every message" in markdown  # the run-health section
    assert "## 1,024 B bodies" in markdown
    _otlp_accounted(report["otlp"])
    assert [r["pipeline"] for r in report["otlp"]["runs"]] == [*SEALED, "plain"]
    assert markdown == render_markdown(report)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_api_scenario_alone_sets_the_store_beside(tmp_path: Path) -> None:
    """``--quick --only api``: the public API's rows/s with the store, without it and plain,
    side by side, and nothing else."""
    report, markdown = _bench(["--quick", "--only", "api", "--out", str(tmp_path / "b")], 150)
    assert report["scenarios"] == report["rounds"] == []
    assert "otlp" not in report
    assert [r["pipeline"] for r in report["api"]["runs"]] == [
        "plain",
        "sealstream",
        "sealstream-store",
        "sealstream-store-1",
    ]
    targets = {t["id"]: t for t in report["targets"]}
    assert targets["api_store_vs_off"]["measured"] == report["api"]["median_store_ratio"] > 0
    assert report["api"]["median_store_alone_ratio"] > 0  # one caller, beside (no target)
    assert "sealstream-store-1: one caller" in markdown
    assert markdown == render_markdown(report)


def test_fanout_measures_group_against_session_mode() -> None:
    """The fan-out tool runs and reports every row (a tool: its figures are not asserted)."""
    from sealops._fanout import measure

    report = measure(fanouts=(1, 3), sizes=(1024,), batches=6)
    assert [(r["size"], r["fanout"]) for r in report["producer"]] == [(1024, 1), (1024, 3)]
    for r in report["producer"]:
        assert r["session_cpu_per_batch_s"] > 0
        assert r["group_cpu_per_batch_s"] > 0
    assert report["producer"][0]["group_rotation_cpu_s"] is None
    assert report["producer"][1]["group_rotation_cpu_s"] > 0
    assert [c["size"] for c in report["consumer"]] == [1024]


def test_otlp_request_is_built_once_with_one_stamp_place() -> None:
    """The generator and the sink build the same 512-span request; its stamp's place is the
    first span's trace id, found once, and a stamped request still decodes."""
    body, offset = build_request()
    assert build_request() == (body, offset)
    request = ExportTraceServiceRequest.FromString(body)
    spans = request.resource_spans[0].scope_spans[0].spans
    assert len(spans) == SPANS
    assert body[offset : offset + 16] == spans[0].trace_id
    stamped = body[:offset] + (2**64 - 1).to_bytes(8, "big") + b"\x00" * 8 + body[offset + 16 :]
    assert (
        ExportTraceServiceRequest.FromString(stamped)
        .resource_spans[0]
        .scope_spans[0]
        .spans[0]
        .trace_id
        == b"\xff" * 8 + b"\x00" * 8
    )


def _otlp_run(pipeline: str, n: int, spans_per_s: float, p99: float) -> dict[str, Any]:
    figures = {
        "accepted": 10,
        "delivered": 10,
        "duplicates": 0,
        "corrupt": 0,
        "statuses": {"200": 10},
        "retry_after": 0,
        "rate_target": None,
        "spans_per_s": spans_per_s,
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": p99, "max": p99},
    }
    cpu = {"producer": 0.5, "relay": 0.25, "consumer": 0.25 * (1 + (pipeline == "sealstream"))}
    return {"pipeline": pipeline, "round": n, "max": figures, "paced": figures, "cpu_s": cpu}


def test_otlp_targets_are_medians_of_rounds_and_a_lost_request_fails_the_overload() -> None:
    runs = [
        _otlp_run("plain", 0, 100_000.0, 5.0),
        _otlp_run("sealstream", 0, 90_000.0, 30.0),
        _otlp_run("plain", 1, 100_000.0, 5.0),
        _otlp_run("sealstream", 1, 70_000.0, 15.0),
        _otlp_run("plain", 2, 100_000.0, 5.0),
        _otlp_run("sealstream", 2, 85_000.0, 20.0),
    ]
    timeline = [{"producer": 80.0, "consumer": 70.0 + i} for i in range(8)]
    runs[1]["overload"] = {
        **runs[1]["max"],
        "statuses": {"200": 10, "503": 40},
        "retry_after": 40,
        "rss": overload_figures(timeline),
    }
    assert runs[1]["overload"]["rss"]["consumer"] == {
        "start_mb": 70.0,
        "peak_mb": 77.0,
        "peak_first_half_mb": 73.0,
        "peak_second_half_mb": 77.0,
        "growth_mb": 4.0,
    }
    otlp = otlp_summary(runs, spans=SPANS)
    assert [r["ratio"] for r in otlp["rounds"]] == [0.9, 0.7, 0.85]
    assert {r["cpu_ratio"] for r in otlp["rounds"]} == {0.8}  # 1.0 CPU s against 1.25
    targets = {t["id"]: t for t in evaluate_targets({"scenarios": [], "otlp": otlp})}
    assert (targets["otlp_vs_plain"]["measured"], targets["otlp_vs_plain"]["pass"]) == (
        0.85,
        True,
    )
    assert (targets["otlp_p99_added"]["measured"], targets["otlp_p99_added"]["pass"]) == (
        15.0,
        True,
    )
    assert (targets["otlp_overload"]["measured"], targets["otlp_overload"]["pass"]) == (4.0, True)
    runs[1]["overload"]["delivered"] = 9  # an acknowledged request never reached the sink
    targets = {t["id"]: t for t in otlp_targets(otlp_summary(runs, spans=SPANS))}
    assert targets["otlp_overload"]["pass"] is False
    assert targets["otlp_vs_plain"]["pass"] is None
    assert "delivered 9 of 10 acknowledged" in targets["otlp_vs_plain"]["note"]
    assert {t["pass"] for t in otlp_targets({})} == {None}
    # with the store: its spans/s against sealstream's without it, round by round
    runs[1]["overload"]["delivered"] = 10
    runs += [_otlp_run(STORED, 0, 72_000.0, 12.0), _otlp_run(STORED, 1, 35_000.0, 20.0)]
    otlp = otlp_summary(runs, spans=SPANS)
    assert [r.get("store_ratio") for r in otlp["rounds"]] == [0.8, 0.5, None]
    target = {t["id"]: t for t in otlp_targets(otlp)}["otlp_store_vs_off"]
    assert (target["measured"], target["pass"]) == (0.65, False)
    del runs[1]["overload"]  # (rendered in the smoke run's report)
    assert "72,000 (0.80)" in "\n".join(render_otlp(otlp_summary(runs, spans=SPANS)))


def _otlp_accounted(otlp: dict[str, Any]) -> None:
    """Every request the generator had acknowledged reached the sink, once and unchanged; the
    producer's outbox dropped nothing and the exporter delivered everything."""
    for run in otlp["runs"]:
        assert otlp_problems(run) == [], run
        for phase in ("max", "paced"):
            statuses = dict(run[phase]["statuses"])
            if run["pipeline"] == STORED:  # the store's acknowledgement is the pace: a 503
                statuses.pop("503", None)  # with Retry-After is the receiver's, retried
            assert statuses == {"200": run[phase]["accepted"]}, run
            assert run[phase]["spans_per_s"] > 0
        if run["pipeline"] in SEALED:
            assert run["producer"]["dropped"] == {}, run
            consumer = run["consumer"]
            assert (consumer["failed"], consumer["lost"], consumer["dropped"]) == ({}, 0, 0), run


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_otlp_overload_is_refused_with_retry_after_memory_bounded_nothing_lost(
    tmp_path: Path,
) -> None:
    """The otlp scenario alone (``--quick --only otlp``): at twice the maximum rate the receiver
    answers 503 with Retry-After, producer and consumer RSS stay within a bound below what
    keeping the refused requests would take, and every acknowledged request reaches the
    sink."""
    out = tmp_path / "bench"
    report, markdown = _bench(["--quick", "--only", "otlp", "--out", str(out)], 150)
    assert report["scenarios"] == report["rounds"] == []
    otlp = report["otlp"]
    _otlp_accounted(otlp)
    (run,) = [r for r in otlp["runs"] if r["pipeline"] == STORED]
    overload = run["overload"]
    assert overload["retry_after"] > 0
    assert overload["retry_after"] == int(overload["statuses"]["503"])
    assert set(overload["statuses"]) == {"200", "503"}
    assert run["producer"]["refused"]  # counted by reason
    # the bound: the receiver's 16 requests in hand (producer), the exporter's queue of 256
    # requests (consumer), with room; a receiver keeping what it refused would exceed it
    bound_mb = 48
    assert int(overload["statuses"]["503"]) * run["request_bytes"] / 1e6 > bound_mb
    for role in ("producer", "consumer"):
        rss = overload["rss"][role]
        assert rss["peak_mb"] - rss["start_mb"] <= bound_mb, overload["rss"]
    ids = {t["id"] for t in report["targets"]}
    assert {"otlp_vs_plain", "otlp_p99_added", "otlp_store_vs_off", "otlp_overload"} <= ids
    assert otlp["rounds"][0]["store_ratio"] > 0
    assert "## otlp: OpenTelemetry spans through sealstream" in markdown
    assert "## 1,024 B bodies" not in markdown
    assert markdown == render_markdown(report)
