"""The chaos run (``sealstream chaos``), short: every kind of fault once, real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_chaos


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chaos_run_recovers_from_every_fault_without_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    words = ["--duration", "95", "--faults", "nats,proxy-a,producer,proxy-b"]
    report = run_chaos(out, *words, "--max-outage", "6", "--consumers", "2", timeout_s=280)
    assert report["problems"] == []
    assert [f["kind"] for f in report["faults"]] == ["nats", "proxy-a", "producer", "proxy-b"]
    for consumer in report["consumers"]:
        assert consumer["rows"] > 0
        assert consumer["duplicates"] == 0
        assert consumer["out_of_order"] == 0
        assert consumer["error"] is None
        assert consumer["sessions"] >= 2  # the restarted producer forgot the first session
    assert report["unrecovered"] == 0
    assert sum(report["tracebacks"].values()) == 0  # no role ended on a broker error
    assert set(report["exit_codes"].values()) == {0}
    assert (out / "report.md").read_text().startswith("# Chaos run")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_consumer_ten_times_slower_for_a_while_falls_behind_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """``--faults slow``: the first consumer reads at a tenth of the stream's rate for 15 s
    with a queue of 20 envelopes: it falls behind (envelopes let go, read again from the
    store), catches up, and loses nothing; the other streams on as if nothing happened."""
    out = tmp_path / "slow"
    words = ["--duration", "45", "--faults", "slow", "--slow", "15", "--queue", "20"]
    report = run_chaos(out, *words, "--consumers", "2", timeout_s=180)
    assert report["problems"] == []
    assert [(f["kind"], f["down_s"]) for f in report["faults"]] == [("slow", 15.0)]
    slow, other = report["consumers"]
    assert slow["deferred"] > 0  # it fell behind
    for consumer in (slow, other):
        # no row missing below the last one it saw, none twice, none out of order
        assert (consumer["lost"], consumer["missing"]) == (0, 0)
        assert (consumer["duplicates"], consumer["out_of_order"]) == (0, 0)
        assert (consumer["sessions"], consumer["resumes"], consumer["error"]) == (1, 0, None)
        assert consumer["rows"] > 4000  # ~45 s at 200 rows/s, less the warm-up
    assert report["unrecovered"] == 0
    assert "--faults slow --slow 15 --queue 20" in (out / "report.md").read_text()
