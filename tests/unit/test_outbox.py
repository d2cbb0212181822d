"""The producer's outbox (pure): bounded per session and in all, oldest data first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producers._outbox import Outbox


def _drain(box: Outbox, session: str) -> list[bytes]:
    out = []
    while (env := box.peek(session)) is not None:
        out.append(env)
        box.pop(session)
    return out


def test_a_session_over_its_budget_loses_its_oldest_data_not_its_key() -> None:
    box = Outbox(max_bytes=10)
    box.put("s", b"K" * 4, key=True)
    for i in range(4):
        box.put("s", bytes([48 + i]) * 3)  # "000", "111", ...
    # 4 + 3 * 4 = 16 > 10: "000" and "111" went, the key stayed
    assert _drain(box, "s") == [b"KKKK", b"222", b"333"]
    assert box.dropped == {"buffer_full": 2}
    assert box.size == 0


def test_an_outbox_that_does_not_drop_keeps_everything_past_its_bounds() -> None:
    """With a store, what the outbox holds is promised to callers: it never drops (the
    producer's backpressure keeps it near its bounds), and every ticket leaves it taken."""
    box = Outbox(max_bytes=10, max_total_bytes=12, drops=False)
    for i in range(4):
        assert box.put("s", bytes([48 + i]) * 3) == 0
    box.put("t", b"t" * 6)
    assert box.size == 18
    assert box.dropped == {}
    assert _drain(box, "s") == [b"000", b"111", b"222", b"333"]
    assert box.oldest() == 5


def test_all_sessions_together_are_bounded_the_largest_giving_way() -> None:
    box = Outbox(max_bytes=10, max_total_bytes=12)
    box.put("a", b"a1" * 2)  # 4
    box.put("b", b"b1" * 3)  # 6
    box.put("b", b"b2" * 2)  # 4: b holds 10, all 14 > 12: b's oldest goes
    assert _drain(box, "a") == [b"a1a1"]
    assert _drain(box, "b") == [b"b2b2"]
    assert box.dropped == {"buffer_full": 1}


def test_largest_is_the_fullest_sessions_bytes() -> None:
    box = Outbox(max_bytes=100)
    assert box.largest() == 0
    box.put("-a", b"x" * 30)
    box.put("_b", b"y" * 20)
    box.put("_b", b"y" * 20)
    assert box.largest() == 40
    _drain(box, "_b")
    assert box.largest() == 30


def test_discard_counts_what_a_finished_session_held() -> None:
    box = Outbox(max_bytes=100)
    box.put("s", b"x")
    box.put("s", b"y")
    assert box.discard("s") == 2
    box.pop("s")  # popping after a discard (a publish in flight) is harmless
    assert box.size == 0
    assert box.dropped == {"session_gone": 2}
    assert not box


def test_budgets_must_make_sense() -> None:
    with pytest.raises(ValueError):
        Outbox(max_bytes=0)
    with pytest.raises(ValueError):
        Outbox(max_bytes=10, max_total_bytes=5)


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.binary(min_size=1, max_size=8), st.booleans()),
        max_size=60,
    )
)
def test_sizes_stay_within_bounds_and_order_is_kept(
    puts: list[tuple[str, bytes, bool]],
) -> None:
    box = Outbox(max_bytes=16, max_total_bytes=32)
    order: dict[str, list[bytes]] = {}
    for session, payload, key in puts:
        sent = order.setdefault(session, [])
        unique = payload + len(sent).to_bytes(2, "big")  # distinct, in order
        sent.append(unique)
        box.put(session, unique, key=key)
        assert box.size <= 32
        held = [item[0] for s in box.sessions() for item in box._queues[s].items]
        assert box.size == sum(map(len, held))
        assert box.oldest() == min(box._queues[s].items[0][2] for s in box.sessions())
    for session, sent in order.items():
        kept = _drain(box, session)
        rest = iter(sent)
        assert all(k in rest for k in kept)  # a subsequence of what was sent: never reordered
    assert box.size == 0


def test_tickets_tell_when_what_was_put_has_left() -> None:
    box = Outbox(max_bytes=100)
    assert box.oldest() is None
    box.put("a", b"1")
    box.put("b", b"2")
    mark = box.ticket
    box.put("a", b"3")
    assert box.head("a", 5) == [b"1", b"3"]
    assert box.head("nobody", 5) == []
    box.pop("a")
    assert box.oldest() == 2  # "b" still holds ticket 2 <= mark
    box.discard("b")
    assert box.oldest() == 3 == mark + 1
