"""``sealstream chaos --topology hub``, short: a site's leaf node down, real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_chaos


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hub_chaos_run_recovers_from_a_leaf_outage(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    words = ["--topology", "hub", "--duration", "50", "--faults", "leaf", "--leaf-outage", "8"]
    report = run_chaos(out, *words, "--consumers", "1", timeout_s=220)
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
