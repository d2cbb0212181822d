"""The committed cross-language vectors (``consumers/web/test/vectors/``): current with the
tamper matrices they are written from, and still the Python consumer's verdicts, payload by
payload. ``npm test`` runs the browser consumer on them with Node alone."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jwcrypto import jwk as jc_jwk

from sealstream.crypto import ConsumerKey, ConsumerSession, GroupMember, TrustStore
from tests.support import otlp_vectors
from tests.support.vectors import COMMAND, OUT, final, payload_of, stale, verdict


def _committed(name: str) -> list[dict[str, Any]]:
    cases = json.loads((OUT / name).read_text(encoding="utf-8"))
    assert isinstance(cases, list)
    return cases


def test_the_committed_vectors_are_current() -> None:
    """A regeneration changes nothing but the payloads (key envelopes are encrypted with fresh
    randomness): same cases, same verdicts, same keys and options."""
    names = stale()
    assert names == [], f"consumers/web/test/vectors/{', '.join(names)} stale: run {COMMAND}"


def test_the_committed_otlp_vectors_are_current() -> None:
    """The page's OTLP decoder is tested on what the Python view makes of the requests now."""
    assert otlp_vectors.current(), f"otlp.json stale: run {otlp_vectors.COMMAND}"


def _key(case: dict[str, Any]) -> ConsumerKey:
    key = ConsumerKey(jc_jwk.JWK(**case["key"]["private_jwk"]), case["key"]["kind"])
    assert key.session_id == case["key"]["session_id"]
    return key


def _session(case: dict[str, Any]) -> ConsumerSession:
    options = case["options"]
    return ConsumerSession(
        _key(case),
        cluster=case["cluster"],
        trust=TrustStore(case["trust"]),
        key_mode=options["key_mode"],
        allow_zip=options["allow_zip"],
        max_plaintext=options["max_plaintext"],
        policy="discard",
    )


def _member(case: dict[str, Any]) -> GroupMember:
    member = GroupMember(
        _key(case),
        cluster=case["cluster"],
        streams=case["streams"],
        trust=TrustStore(case["trust"]),
        policy="discard",
    )
    previous = case.get("previous")
    if previous is not None:  # the subscription's session that ended, carried into this one
        ended = _member({**case, **previous, "previous": None})
        for step in previous["steps"]:
            ended.accept(payload_of(step))
        assert not ended.rejected
        member.carry(ended)
    return member


@pytest.mark.parametrize(
    ("name", "receiver"), [("sessions.json", _session), ("groups.json", _member)]
)
def test_the_python_consumer_reaches_the_committed_verdicts(name: str, receiver: Any) -> None:
    """The frozen payloads are known answers for the Python side too."""
    cases = _committed(name)
    assert len(cases) >= 10
    for case in cases:
        r = receiver(case)
        for i, step in enumerate(case["steps"]):
            recorded = {k: v for k, v in step.items() if not k.startswith("payload")}
            assert verdict(r, payload_of(step)) == recorded, f"{case['name']!r} step {i}"
        assert final(r) == case["final"], case["name"]


def test_large_payloads_are_stored_deflated() -> None:
    """The 2 MiB oversize envelope is a few KiB in the file."""
    assert (OUT / "sessions.json").stat().st_size < 1024 * 1024
    steps = [s for c in _committed("sessions.json") for s in c["steps"]]
    big = [s for s in steps if "payload_deflated" in s]
    assert big
    assert all(len(payload_of(s)) > 64 * 1024 for s in big)
