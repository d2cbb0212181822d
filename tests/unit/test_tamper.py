"""The tamper matrices (``tests/support/matrix.py`` and, for group mode, ``group_matrix.py``:
the ones the browser consumer's vectors are written from): everything a hostile relay can do
besides drop and delay is caught, always as the one opaque IntegrityError, and counted with
the reason the matrix declares; what is genuine passes. Then the property behind it: any
single-byte change is caught."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealstream import IntegrityError
from sealstream.crypto import Batch, ConsumerKey, ConsumerSession, GroupMember, encode_rows
from tests.support.group_matrix import group_cases
from tests.support.helpers import Pair, env_map, gen_key, make_pair, repack
from tests.support.matrix import Step, flip, session_cases

CASES = {case.name: case for case in session_cases()}
GROUP_CASES = {case.name: case for case in group_cases()}


def rejected(consumer: ConsumerSession | GroupMember, payload: bytes, reason: str) -> None:
    before = consumer.rejected.copy()
    if reason == "untrusted_key":  # anyone's key envelope: counted and ignored, never fatal
        assert consumer.accept(payload) is None
    else:
        with pytest.raises(IntegrityError) as err:
            consumer.accept(payload)
        assert type(err.value) is IntegrityError  # the one opaque class, not a subclass
        assert str(err.value) == "envelope rejected"
        assert err.value.__cause__ is None
    assert consumer.rejected - before == {reason: 1}


def held_to(receiver: ConsumerSession | GroupMember, steps: list[Step]) -> None:
    """Under policy ``fail``: each step accepted, or refused for its reason."""
    assert steps
    for step in steps:
        if step.reason is None:
            receiver.accept(step.payload)
        else:
            rejected(receiver, step.payload, step.reason)
    refused = sum(step.reason is not None for step in steps)
    assert sum(receiver.rejected.values()) == refused


@pytest.mark.parametrize("name", CASES)
def test_the_matrix(name: str) -> None:
    held_to(CASES[name].consumer("fail"), CASES[name].steps)


@pytest.mark.parametrize("name", GROUP_CASES)
def test_the_group_matrix(name: str) -> None:
    held_to(GROUP_CASES[name].member("fail"), GROUP_CASES[name].steps)


def test_the_matrix_has_every_kind_of_tamper() -> None:
    """Bit flips, header swaps, replay and reorder, forged and substituted key envelopes,
    downgrades, oversize payloads, each caught for the reason that names it."""
    reasons = {step.reason for case in CASES.values() for step in case.steps}
    assert {
        *("bad_tag", "bad_decrypt", "header_mismatch", "replay", "untrusted_key"),
        *("bad_claims", "bad_sig_alg", "bad_alg", "unexpected_key", "bad_enc", "malformed"),
        *("bad_sizes", "zip_bomb", "zip_not_allowed", "reused_kid", "bad_base64"),
    } <= reasons


def test_replay_and_reorder_count_what_was_lost() -> None:
    consumer = CASES["replay and reorder"].consumer("discard")
    for step in CASES["replay and reorder"].steps:
        consumer.accept(step.payload)
    assert consumer.lost == 1
    assert consumer.rejected == {"replay": 3}


def test_discard_policy_counts_and_continues() -> None:
    pair = make_pair(gen_key("x25519"), policy="discard")
    key_env, d1, d2 = sealed(pair, 2)
    pair.consumer.accept(key_env)
    assert pair.consumer.accept(repack(d1, body=flip(env_map(d1)["body"], 3))) is None
    assert isinstance(pair.consumer.accept(d2), Batch)
    assert pair.consumer.rejected == {"bad_tag": 1}


# --- property: any single-byte change is detected --------------------------------------------


def sealed(pair: Pair, n: int = 2) -> list[bytes]:
    """[key, data, data, ...] envelopes of one session."""
    return [e for i in range(n) for e in pair.producer.seal("s", encode_rows([{"i": i}]))]


@pytest.fixture(scope="module")
def key() -> ConsumerKey:
    return gen_key("x25519")


@pytest.fixture(scope="module")
def stream(key: ConsumerKey) -> tuple[Pair, list[bytes]]:
    pair = make_pair(key)
    return pair, sealed(pair, 2)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_single_byte_change_is_rejected(
    key: ConsumerKey, stream: tuple[Pair, list[bytes]], data: st.DataObject
) -> None:
    pair, envs = stream
    index = data.draw(st.integers(0, len(envs) - 1), label="envelope")
    payload = envs[index]
    pos = data.draw(st.integers(0, len(payload) - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != payload[pos]), label="byte")
    tampered = payload[:pos] + bytes([byte]) + payload[pos + 1 :]
    fresh = make_pair(key, identity=pair.identity)
    for earlier in envs[:index]:
        fresh.consumer.accept(earlier)
    with pytest.raises(IntegrityError):
        fresh.consumer.accept(tampered)
