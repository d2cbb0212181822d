"""The chaos run (``sealstream chaos``), short: every kind of fault once, real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chaos_run_recovers_from_every_fault_without_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "sealstream"),
            "chaos",
            "--duration",
            "95",
            "--faults",
            "nats,proxy-a,producer,proxy-b",
            "--max-outage",
            "6",
            "--consumers",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert (out / "report.json").exists(), proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
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
