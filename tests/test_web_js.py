"""The browser consumer's JavaScript (``consumers/web``) against the Python implementation:
the cross-language vectors under ``node --test``, its JSDoc types, and the committed bundle
built from its sources. Needs Node (20 or newer); CI (``CI`` set) fails without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.web_vectors import build_vectors

WEB = Path(__file__).resolve().parent.parent / "consumers" / "web"


def _npm_ready() -> str:
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        message = "Node.js 20+ and npm are needed for the browser consumer's tests (apt install nodejs npm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if not (WEB / "node_modules" / ".package-lock.json").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
    return node


def test_the_javascript_session_reaches_the_python_verdicts(tmp_path: Path) -> None:
    node = _npm_ready()
    vectors = tmp_path / "vectors.json"
    vectors.write_text(json.dumps(build_vectors()), encoding="utf-8")
    proc = subprocess.run(
        [node, "--test", "test/"],
        cwd=WEB,
        env={**os.environ, "SEALSTREAM_VECTORS": str(vectors)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout


def test_the_javascript_types_check() -> None:
    _npm_ready()
    proc = subprocess.run(
        ["npm", "run", "--silent", "typecheck"], cwd=WEB, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_committed_bundle_is_built_from_the_sources(tmp_path: Path) -> None:
    node = _npm_ready()
    out = tmp_path / "dist"
    proc = subprocess.run(
        [node, "build.mjs", str(out)], cwd=WEB, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("sealstream-web.js", "index.html"):
        fresh = (out / name).read_bytes()
        committed = (WEB / "dist" / name).read_bytes()
        assert fresh == committed, f"consumers/web/dist/{name} is stale: run 'make web'"
