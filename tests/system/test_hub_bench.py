"""``sealstream bench-hub``, tiny: its phases run and its report says what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_hub_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [str(Path(sys.executable).parent / "sealstream"), "bench-hub", "--clusters", "2"]
    argv += ["--sessions", "6", "--proxies", "1", "--window", "2", "--timeout", "60"]
    proc = subprocess.run(
        [*argv, "--out", str(out)], capture_output=True, text=True, timeout=110, check=False
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((out / "hub.json").read_text())
    assert report["open"]["failed"] == {}
    assert report["open"]["all_receiving_s"] is not None
    assert report["steady"]["sessions_fed"] == 6
    assert report["steady"]["rows_per_s"] > 0
    # measured, as a number: 6 sessions over a 2 s window can cost the proxy less than one
    # clock tick of CPU time, so zero is a possible reading here
    assert isinstance(report["steady"]["proxy_cpu_cores"], float)
    assert report["node_kill"]["all_receiving_again_s"] is not None
    assert (out / "hub.md").read_text().startswith("# Hub bench")
