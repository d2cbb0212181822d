"""``sealstream chaos --topology hub``, short: a site's link down, real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_chaos


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hub_chaos_run_loses_nothing_while_a_sites_link_is_down(tmp_path: Path) -> None:
    """The site keeps sealing into its store while its link is down; its consumer's session
    outlives the cut and reads the rest from the site's store: nothing missing."""
    out = tmp_path / "chaos"
    words = ["--topology", "hub", "--duration", "50", "--faults", "link", "--leaf-outage", "15"]
    report = run_chaos(out, *words, "--consumers", "1", timeout_s=220)
    assert report["problems"] == []
    [fault] = report["faults"]
    assert fault["kind"] in ("link (link-acme)", "link (link-globex)")
    assert fault["down_s"] == 15
    assert [c["cluster"] for c in report["consumers"]] == ["acme", "globex"]
    for consumer in report["consumers"]:
        assert consumer["rows"] > 0
        assert (consumer["lost"], consumer["missing"], consumer["resumes"]) == (0, 0, 0)
        assert consumer["duplicates"] == 0
        assert consumer["out_of_order"] == 0
    assert report["unrecovered"] == 0
    assert sum(report["tracebacks"].values()) == 0
    assert (out / "logs" / "hub-0.log").exists()
