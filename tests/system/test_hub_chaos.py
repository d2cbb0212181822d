"""``sealstream chaos --topology hub``, short: a site's leaf node down, real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hub_chaos_run_recovers_from_a_leaf_outage(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "sealstream"),
            "chaos",
            "--topology",
            "hub",
            "--duration",
            "50",
            "--faults",
            "leaf",
            "--leaf-outage",
            "8",
            "--consumers",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert (out / "report.json").exists(), proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert report["problems"] == []
    [fault] = report["faults"]
    assert fault["kind"] in ("leaf (leaf-acme)", "leaf (leaf-globex)")
    assert fault["down_s"] == 8
    assert [c["cluster"] for c in report["consumers"]] == ["acme", "globex"]
    for consumer in report["consumers"]:
        assert consumer["rows"] > 0
        assert consumer["duplicates"] == 0
        assert consumer["out_of_order"] == 0
    assert report["unrecovered"] == 0
    assert sum(report["tracebacks"].values()) == 0
    assert (out / "logs" / "hub-0.log").exists()
