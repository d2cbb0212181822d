"""``sealstream bench``: the pure parts, and one ``--quick`` run whose report must account for
every message. Benchmarks are tools, not timed tests: nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sealops._report import (
    MODES,
    Histogram,
    Plan,
    evaluate_targets,
    make_rows,
    problems,
    render_markdown,
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


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_quick_run_accounts_for_every_message(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    command = Path(sys.executable).parent / "sealstream"
    proc = subprocess.Popen(
        [str(command), "bench", "--quick", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench stops its processes and the embedded server itself
        _, stderr = proc.communicate(timeout=30)
        pytest.fail(f"bench --quick did not finish in 150 s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    markdown = (out / "report.md").read_text(encoding="utf-8")

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
    assert "## Targets" in markdown
    assert "delivered every message" in markdown  # the run-health section
    assert "## 1,024 B bodies" in markdown
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
