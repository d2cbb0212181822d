"""The browser consumer's JavaScript (``consumers/web``) against the Python implementation:
its ``node --test`` suite on the committed cross-language vectors (``tests/web/test_vectors.py``
checks they are current), its JSDoc types, and the committed bundle built from its sources.
Needs Node (20 or newer); CI (``CI`` set) fails without it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from producers._authz import Authorized, Authorizer, AuthzPolicy
from sealstream import SessionError
from sealstream.control import ControlOpen
from sealstream.crypto import ConsumerKey
from sealstream.jwk import thumbprint

WEB = Path(__file__).resolve().parents[2] / "consumers" / "web"
VECTORS = WEB / "test" / "vectors"


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


def test_the_javascript_session_reaches_the_python_verdicts() -> None:
    """``npm test``: the committed vectors, with Node alone."""
    _npm_ready()
    proc = subprocess.run(
        ["npm", "test", "--silent"],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
    cases = sum(len(json.loads(p.read_text(encoding="utf-8"))) for p in VECTORS.glob("*.json"))
    passed = re.search(r"^# pass (\d+)$", proc.stdout, re.MULTILINE)
    assert passed is not None
    assert int(passed[1]) > cases >= 80  # one test per case, and the suite's own


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


def test_the_javascript_proof_passes_the_producers_checks(tmp_path: Path) -> None:
    """A proof made by the page's code (in Node's WebCrypto, as in the browser) is accepted
    by the producer's checks of docs/protocol.md, once and only for what it was made for."""
    node = _npm_ready()
    session_key = ConsumerKey.generate("x25519")
    request = {
        "cluster": "c1",
        "session": session_key.session_id,
        "streams": ["http_events", "host_metrics"],
        "key_mode": "session",
    }
    out = tmp_path / "proofs.json"
    proc = subprocess.run(
        [node, "--test", "test/proof.test.js"],
        cwd=WEB,
        env={
            **os.environ,
            "SEALSTREAM_PROOF_OUT": str(out),
            "SEALSTREAM_PROOF_REQUEST": json.dumps(request),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    made = json.loads(out.read_text(encoding="utf-8"))
    policy_file = tmp_path / "authorized.json"
    AuthzPolicy().with_key(made["jwk"], ["http_events", "host_metrics"])[0].save(policy_file)
    authorizer = Authorizer(policy_file, cluster="c1")
    authorizer.refresh()
    now = time.time()

    def check(proof: str, **changes: Any) -> object:
        """What the open is answered: Authorized, or the reason it is refused."""
        open_: dict[str, Any] = {
            "proof": proof,
            "session": session_key.session_id,
            "jwk": session_key.public_jwk,
            "streams": tuple(request["streams"]),
            "key_mode": "session",
            "zip": False,
            "user": "u",
        }
        at = changes.pop("now", now)
        try:
            return authorizer.check(ControlOpen(**{**open_, **changes}), now=at)
        except SessionError as exc:
            return exc.detail if exc.code == "forbidden" else exc

    first, second = made["proofs"]
    accepted = check(first)
    assert isinstance(accepted, Authorized), accepted
    assert accepted.identity == made["kid"] == thumbprint(made["jwk"])
    assert check(first) == "proof replayed"
    assert check(second, streams=["http_events"]) == "proof is for other streams"
    assert check(second, key_mode="per-message") == "proof is for another key mode"
    other = ConsumerKey.generate("x25519")
    assert (
        check(second, session=other.session_id, jwk=other.public_jwk)
        == "proof is for another session"
    )
    assert check(second, now=now + 3600) == "proof expired"
    # an open that asks for zip (allowZip) carries a proof that says so, and only such an open
    assert check(second, zip=True) == "proof is for another zip"
    assert check(made["zipped"]) == "proof is for another zip"
    assert isinstance(check(made["zipped"], zip=True), Authorized)
    assert isinstance(check(second), Authorized)
