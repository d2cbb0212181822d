"""The consumer's reorder hold (pure): envelopes past a gap wait, in seq order, for the
missing ones or for the hold's time; a forged one never displaces the genuine one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consumers._hold import Hold
from sealstream import Envelope

SESSION = "-" + "A" * 42  # a session id may start with "-"


def env(seq: int, body: bytes = b"genuine") -> Envelope:
    return Envelope("data", "c1", SESSION, "records", seq, 1_700_000_000_000_000_000, body)


def drain(hold: Hold, last: int, *, now: float) -> list[Envelope]:
    out = []
    while (e := hold.next(last, now=now)) is not None:
        out.append(e)
        last = max(last, e.seq)
    return out


def test_held_envelopes_wait_for_the_gap_then_go_in_order() -> None:
    hold = Hold(hold_s=2.0)
    hold.add(env(3), now=10.0)
    hold.add(env(2), now=10.5)
    assert hold.next(0, now=11.0) is None  # seq 1 is missing, and there is time
    assert hold.deadline == 12.0
    assert [e.seq for e in drain(hold, 1, now=11.0)] == [2, 3]  # 1 came and was accepted
    assert len(hold) == 0
    assert hold.deadline is None


def test_past_its_time_the_lowest_goes_with_its_gap() -> None:
    hold = Hold(hold_s=2.0)
    hold.add(env(5), now=10.0)
    hold.extend(now=11.0)  # a replay was answered: its envelopes may still be on their way
    assert hold.next(0, now=12.5) is None
    assert [e.seq for e in drain(hold, 0, now=13.0)] == [5]


def test_over_its_bounds_the_lowest_goes_at_once() -> None:
    hold = Hold(max_count=2)
    for seq in (4, 5, 6):
        hold.add(env(seq), now=0.0)
    assert [e.seq for e in drain(hold, 0, now=0.0)] == [4, 5, 6]
    sized = Hold(max_bytes=10)
    sized.add(env(9, b"x" * 11), now=0.0)
    assert sized.next(0, now=0.0) == env(9, b"x" * 11)


def test_a_forged_envelope_cannot_displace_the_genuine_one() -> None:
    hold = Hold()
    hold.add(env(2, b"forged"), now=0.0)
    hold.add(env(2), now=0.0)
    hold.add(env(2), now=0.0)  # a byte-identical copy: dropped
    assert hold.duplicates == 1
    assert drain(hold, 1, now=0.0) == [env(2, b"forged"), env(2)]  # both tried, in order


def test_a_copy_of_an_accepted_envelope_is_a_duplicate_nothing_else_is() -> None:
    hold = Hold(remember=2)
    for seq in (0, 1, 2):
        hold.accepted(env(seq))
    assert hold.duplicate(env(2))
    assert not hold.duplicate(env(2, b"forged"))  # the session's check refuses it
    assert not hold.duplicate(env(0))  # forgotten: the session's check refuses it as replay
    assert hold.duplicates == 1


@given(st.permutations(list(range(1, 30))), st.integers(0, 29))
def test_any_arrival_order_comes_out_in_seq_order(order: list[int], missing: int) -> None:
    hold = Hold(hold_s=1.0)
    last = 0
    opened: list[int] = []
    for seq in order:
        if seq == missing:
            continue
        if seq > last + 1:
            hold.add(env(seq), now=0.0)
        else:
            opened.append(seq)
            last = seq
        for e in drain(hold, last, now=0.5):
            opened.append(e.seq)
            last = e.seq
    opened.extend(e.seq for e in drain(hold, last, now=2.0))  # the hold's time ran out
    assert opened == sorted(set(range(1, 30)) - {missing})


def test_while_a_replay_is_asked_for_the_hold_waits_for_its_answer() -> None:
    hold = Hold(hold_s=2.0)
    hold.add(env(5), now=10.0)
    hold.waiting = True
    assert hold.deadline is None
    assert hold.next(0, now=100.0) is None  # however long the store takes to answer
    hold.waiting = False
    hold.extend(now=100.0)
    assert hold.next(0, now=101.0) is None
    assert hold.next(0, now=102.0) == env(5)
