"""The consumer's reorder hold (pure): envelopes past a gap wait, in seq order, for the
missing ones or for the hold's time; a forged one never displaces the genuine one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consumers._hold import GroupHolds, Hold
from sealstream import Envelope
from sealstream.groupwire import GroupEnvelope

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


def group_env(gseq: int, epoch: int = 0, body: bytes = b"genuine") -> GroupEnvelope:
    ts = 1_700_000_000_000_000_000
    return GroupEnvelope("group", "c1", "", "records", gseq, ts, body, epoch, b"s" * 64)


class Line:
    """A member's (last gseq, newest epoch) of each group it holds a key of."""

    def __init__(self, **groups: tuple[int, int]) -> None:
        self.groups = groups

    def __call__(self, group: str) -> tuple[int, int] | None:
        return self.groups.get(group)


def never(_group: str) -> bool:
    return False


def test_a_group_batch_past_a_gap_is_held_until_the_gap_fills() -> None:
    line = Line(records=(4, 0))
    holds = GroupHolds(line)
    assert holds.take(group_env(7), now=0.0) == "held"
    assert holds.take(group_env(6), now=0.5) == "held"
    assert holds.take(group_env(7), now=0.6) == "held"  # a copy of one held: kept once
    assert holds.next(never, now=1.0) is None  # 5 is missing and there is time
    assert holds.deadline(never) == 2.0
    assert holds.take(group_env(5), now=1.0) == "open"  # the next one goes to the checks
    line.groups["records"] = (5, 0)  # ... and was accepted
    assert holds.next(never, now=1.0) == group_env(6)
    line.groups["records"] = (6, 0)
    assert holds.next(never, now=1.0) == group_env(7)
    assert holds.next(never, now=1.0) is None
    assert holds.deadline(never) is None


def test_a_group_batch_whose_key_has_not_come_waits_for_it() -> None:
    line = Line(records=(4, 0))
    holds = GroupHolds(line)
    assert holds.take(group_env(5, epoch=1), now=0.0) == "waiting"
    assert holds.next(never, now=1.0) is None  # next in line, but its key is on its way
    line.groups["records"] = (4, 1)  # the key envelope of epoch 1 was installed
    assert holds.next(never, now=1.0) == group_env(5, epoch=1)


def test_past_its_time_a_held_group_batch_goes_to_the_checks() -> None:
    holds = GroupHolds(Line(records=(4, 0)))
    holds.take(group_env(9), now=0.0)
    holds.take(group_env(5, epoch=3), now=0.0)
    assert holds.next(lambda group: group == "records", now=100.0) is None  # resume in flight
    holds.extend("records", now=10.0)  # answered at 10: its envelopes may be on their way
    assert holds.next(never, now=11.0) is None
    assert holds.next(never, now=12.0) == group_env(5, epoch=3)  # refused by the checks then


def test_group_duplicates_and_groups_without_a_key() -> None:
    line = Line(records=(4, 0))
    holds = GroupHolds(line)
    assert holds.take(group_env(5), now=0.0) == "open"
    holds.accepted(group_env(5))
    line.groups["records"] = (5, 0)
    assert holds.take(group_env(5), now=0.0) == "duplicate"  # a replay's copy: once only
    assert holds.take(group_env(5, body=b"forged"), now=0.0) == "open"  # refused as replay
    assert holds.take(group_env(5, epoch=1), now=0.0) == "open"  # not the same bytes
    assert holds.duplicates == 1
    # a group it holds no key of: never held (the checks skip its batches)
    assert GroupHolds(Line(other=(4, 0))).take(group_env(50), now=0.0) == "open"


def test_without_a_store_held_group_batches_go_at_once() -> None:
    holds = GroupHolds(Line(records=(4, 0)))
    holds.take(group_env(9), now=0.0)
    holds.stop_holding()
    assert holds.next(never, now=0.0) == group_env(9)
