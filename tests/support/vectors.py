"""Cross-language vectors for the browser consumer (``consumers/web``), written from the tamper
matrices (``tests/support/matrix.py``, ``tests/support/group_matrix.py``) into
``consumers/web/test/vectors/`` and committed, so that ``npm test`` runs with Node alone.

At every step of every case the Python consumer (or group member) is the oracle: the file
records what it made of the payload (a batch and its rows, an installed key, an end, a notice,
a skip, or a rejection and its reason), and ``node --test`` asserts that the JavaScript does
the same; the verdicts must be the ones the matrix declares. The consumer keys' PRIVATE JWKs
are in the files: test fixtures, never shipped.

Update after changing a matrix: ``python -m tests.support.vectors`` (``--check`` only says
whether the committed files are current; ``tests/web/test_vectors.py`` fails when they are
not). Key envelopes are encrypted with fresh randomness each time (an ephemeral ECDH key, OAEP
padding), so a regenerated file differs in its payloads, never in anything else: a file whose
cases, verdicts, keys and options are unchanged is left as it is.
"""

from __future__ import annotations

import base64
import json
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from sealstream import configure_logging
from sealstream.crypto import Batch, ConsumerKey, ConsumerSession, End, GroupMember
from sealstream.wire import Notice
from tests.support.group_matrix import GroupCase, group_cases
from tests.support.helpers import CLUSTER
from tests.support.matrix import Case, Step, session_cases

__all__ = ["COMMAND", "OUT", "build", "final", "main", "payload_of", "plain", "stale", "verdict"]

OUT: Final = Path(__file__).resolve().parents[2] / "consumers" / "web" / "test" / "vectors"
COMMAND: Final = "python -m tests.support.vectors"
#: payloads longer than this are stored deflated (an oversize envelope is 2 MiB of one byte)
DEFLATE_OVER: Final = 64 * 1024


def plain(value: Any) -> Any:
    """Rows as JSON the JS side compares with: ints as decimal strings (exact), floats by
    their repr, bin as base64."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, bytes):
        return {"bin": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    raise TypeError(type(value))


def _payload(payload: bytes) -> dict[str, str]:
    if len(payload) > DEFLATE_OVER:
        return {"payload_deflated": base64.b64encode(zlib.compress(payload, 9)).decode()}
    return {"payload": base64.b64encode(payload).decode()}


def payload_of(step: dict[str, Any]) -> bytes:
    if "payload_deflated" in step:
        return zlib.decompress(base64.b64decode(step["payload_deflated"]))
    return base64.b64decode(step["payload"])


def verdict(
    receiver: ConsumerSession | GroupMember, payload: bytes, state: Any = None
) -> dict[str, Any]:
    """What ``receiver`` (a discarding consumer or member) makes of ``payload``."""
    before = receiver.rejected.copy()
    skipped = receiver.skipped if isinstance(receiver, GroupMember) else 0
    result = receiver.accept(payload)
    delta = receiver.rejected - before
    if delta:
        (reason,) = delta
        return {"expect": "reject", "reason": reason}
    if isinstance(result, Batch):
        return {
            "expect": "batch",
            "stream": result.stream,
            "seq": str(result.seq),
            "ts": str(result.ts),
            "rows": plain(result.rows),
            "lost_before": str(result.lost_before),
        }
    if isinstance(result, End):
        return {"expect": "end", "reason": result.reason}
    if isinstance(result, Notice):
        return {"expect": "notice", "code": result.code}
    if isinstance(receiver, GroupMember):
        if receiver.skipped > skipped:
            return {"expect": "skip"}
        return {"expect": "key", "epochs": {g: str(s.epoch) for g, s in receiver.groups.items()}}
    return {"expect": "key", "epoch": str(receiver.epoch)}


def final(receiver: ConsumerSession | GroupMember) -> dict[str, Any]:
    out: dict[str, Any] = {
        "accepted": receiver.accepted,
        "gaps": receiver.gaps,
        "lost": str(receiver.lost),
        "ended": receiver.ended,
        "rejected": dict(receiver.rejected),
    }
    if isinstance(receiver, GroupMember):
        out["skipped"] = receiver.skipped
    else:
        out["epoch"] = str(receiver.epoch)
    return out


def _key(key: ConsumerKey) -> dict[str, Any]:
    return {
        "kind": key.kind,
        "public_jwk": key.public_jwk,
        "private_jwk": key._key.export_private(as_dict=True),
        "session_id": key.session_id,
    }


def _steps(
    name: str, receiver: ConsumerSession | GroupMember, steps: list[Step]
) -> list[dict[str, Any]]:
    """Each step's payload and the oracle's verdict, which must be the one declared."""
    out = []
    for i, step in enumerate(steps):
        made = verdict(receiver, step.payload)
        declared = "accepted" if step.reason is None else step.reason
        said = made["reason"] if made["expect"] == "reject" else "accepted"
        if said != declared:
            raise AssertionError(f"{name!r} step {i}: the matrix says {declared}, not {said}")
        out.append({**_payload(step.payload), **made})
    return out


def _session_case(case: Case) -> dict[str, Any]:
    consumer = case.consumer("discard")
    steps = _steps(case.name, consumer, case.steps)
    return {
        "name": case.name,
        "cluster": CLUSTER,
        "key": _key(case.pair.key),
        "trust": {CLUSTER: [case.pair.identity.public_jwk]},
        "options": {
            "key_mode": consumer.key_mode,
            "allow_zip": case.allow_zip,
            "max_plaintext": case.max_plaintext,
            "policy": case.policy,
        },
        "steps": steps,
        "final": final(consumer),
    }


def _group_case(case: GroupCase) -> dict[str, Any]:
    member = case.member("discard")
    steps = _steps(case.name, member, case.steps)
    return {
        "name": case.name,
        "cluster": CLUSTER,
        "streams": list(case.streams),
        "key": _key(case.key),
        "trust": {CLUSTER: [case.world.identity.public_jwk]},
        "policy": case.policy,
        "steps": steps,
        "final": final(member),
        **({} if case.previous is None else {"previous": _previous(case.previous)}),
    }


def _previous(case: GroupCase) -> dict[str, Any]:
    """A session carried into a case's member: its key and payloads, all accepted."""
    return {
        "key": _key(case.key),
        "streams": list(case.streams),
        "steps": [_payload(step.payload) for step in case.steps],
    }


def build() -> dict[str, list[dict[str, Any]]]:
    """Each vector file's name and its cases."""
    return {
        "sessions.json": [_session_case(c) for c in session_cases()],
        "groups.json": [_group_case(c) for c in group_cases()],
    }


def dumps(cases: Iterable[dict[str, Any]]) -> str:
    """One case per line: a changed verdict is a changed line in a diff."""
    return "[\n" + ",\n".join(json.dumps(c, sort_keys=True) for c in cases) + "\n]\n"


def without_payloads(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases with every payload left out: what a regeneration must reproduce exactly."""
    return [
        {
            **c,
            "steps": _bare(c["steps"]),
            **(
                {"previous": {**c["previous"], "steps": _bare(c["previous"]["steps"])}}
                if "previous" in c
                else {}
            ),
        }
        for c in cases
    ]


def _bare(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in s.items() if k not in ("payload", "payload_deflated")} for s in steps]


def _is_current(path: Path, cases: list[dict[str, Any]]) -> bool:
    if not path.exists():
        return False
    committed = json.loads(path.read_text(encoding="utf-8"))
    return bool(without_payloads(committed) == without_payloads(cases))


def stale(out: Path = OUT) -> list[str]:
    """The vector files under ``out`` that a regeneration would change (beyond payloads)."""
    return [name for name, cases in build().items() if not _is_current(out / name, cases)]


def main(argv: list[str] | None = None) -> int:
    configure_logging(level="error")
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print(f"usage: {COMMAND} [--check]", file=sys.stderr)
        return 2
    if args == ["--check"]:
        names = stale()
        for name in names:
            print(f"consumers/web/test/vectors/{name} is stale: run {COMMAND}", file=sys.stderr)
        return 1 if names else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, cases in build().items():
        path = OUT / name
        if _is_current(path, cases):  # rewritten, only its payloads would change
            print(f"consumers/web/test/vectors/{name} is current")
            continue
        path.write_text(dumps(cases), encoding="utf-8")
        print(f"wrote {len(cases)} cases to consumers/web/test/vectors/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
