"""Telemetry sources: paced synthetic events, real host figures, JSON lines, the Python API."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import re
import sys
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgpack
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from producers._batcher import Batcher, Batching, array_header_size
from producers.sources import (
    HostMetrics,
    HttpEvents,
    JsonLines,
    Records,
    Row,
    Source,
    check_rows,
    plain_rows,
    validate_row,
)
from sealstream.errors import WireError

START_NS = 1_700_000_000_000_000_000


class _Stop(Exception):
    """Raised by the fake sleep once the test has seen enough ticks."""


class FakeTime:
    """A clock that only moves when the source sleeps; stops the source after ``ticks``."""

    def __init__(self, ticks: int) -> None:
        self.now = START_NS
        self.ticks = ticks
        self.sleeps: list[float] = []

    def clock(self) -> int:
        return self.now

    async def sleep(self, delay: float) -> None:
        if len(self.sleeps) == self.ticks:
            raise _Stop
        self.sleeps.append(delay)
        self.now += round(delay * 1e9)


async def _drain(source: Source, batches: list[list[Row]]) -> None:
    """Collect every batch of ``source`` into ``batches`` (kept if the source raises)."""
    async for batch in source.rows():
        assert batch, "a source never yields an empty batch"
        batches.append(batch)


async def _http_rows(rate: float, ticks: int, seed: int | None = 7) -> tuple[list[Row], FakeTime]:
    fake = FakeTime(ticks)
    source = HttpEvents(rate=rate, seed=seed, clock=fake.clock, sleep=fake.sleep)
    batches: list[list[Row]] = []
    with pytest.raises(_Stop):
        await _drain(source, batches)
    return [row for batch in batches for row in batch], fake


def test_sources_follow_the_protocol() -> None:
    sources: list[Source] = [
        HttpEvents(),
        HostMetrics(),
        JsonLines(io.StringIO(), stream="lines"),
        Records("api"),
    ]
    assert [s.stream for s in sources] == ["http_events", "host_metrics", "lines", "api"]


# --------------------------------------------------------------------------- HttpEvents


@pytest.mark.parametrize(
    ("rate", "ticks", "expected"),
    [(50.0, 20, 100), (7.3, 100, 73), (1000.0, 3, 300), (0.5, 25, 1), (3.0, 1, 0)],
)
async def test_http_events_emit_exactly_the_rate(rate: float, ticks: int, expected: int) -> None:
    rows, fake = await _http_rows(rate, ticks)
    assert len(rows) == expected
    assert fake.sleeps == [pytest.approx(0.1)] * ticks


async def test_http_events_batches_per_tick() -> None:
    fake = FakeTime(10)
    source = HttpEvents(rate=50.0, seed=1, clock=fake.clock, sleep=fake.sleep)
    batches: list[list[Row]] = []
    with pytest.raises(_Stop):
        await _drain(source, batches)
    assert [len(batch) for batch in batches] == [5] * 10


async def test_http_events_columns() -> None:
    rows, fake = await _http_rows(200.0, 50)
    assert len(rows) == 1000
    columns = {
        "time_": int,
        "upid": str,
        "remote_addr": str,
        "remote_port": int,
        "req_method": str,
        "req_path": str,
        "resp_status": int,
        "latency_ns": int,
        "req_body_size": int,
        "resp_body_size": int,
    }
    times = []
    for row in rows:
        assert {k: type(v) for k, v in row.items()} == columns
        assert validate_row(row) == row
        assert re.fullmatch(r"\d+:\d+:\d+", row["upid"])
        assert ipaddress.IPv4Address(row["remote_addr"]) in ipaddress.IPv4Network("10.0.0.0/8")
        assert 1 <= row["remote_port"] <= 65535
        assert row["req_method"] in {"GET", "POST", "PUT", "DELETE"}
        assert row["req_path"].startswith("/")
        assert row["resp_status"] in {200, 201, 204, 301, 404, 500, 503}
        assert row["latency_ns"] > 0
        assert row["req_body_size"] >= 0
        assert row["resp_body_size"] >= 0
        times.append(row["time_"])
    assert times == sorted(times)
    assert times[0] > START_NS
    assert times[-1] == fake.now
    methods = [row["req_method"] for row in rows]
    assert methods.count("GET") > len(rows) / 2
    assert set(methods) == {"GET", "POST", "PUT", "DELETE"}
    statuses = [row["resp_status"] for row in rows]
    assert statuses.count(200) > len(rows) / 2
    assert len(set(statuses)) >= 4


async def test_http_events_deterministic_for_a_seed() -> None:
    first, _ = await _http_rows(80.0, 30, seed=42)
    again, _ = await _http_rows(80.0, 30, seed=42)
    other, _ = await _http_rows(80.0, 30, seed=43)
    assert first == again
    assert first != other


async def test_http_events_restart_pacing_after_a_clock_step() -> None:
    fake = FakeTime(20)

    async def sleep(delay: float) -> None:
        await fake.sleep(delay)
        if len(fake.sleeps) == 10:
            fake.now += 3600 * 10**9  # the machine slept for an hour

    source = HttpEvents(rate=50.0, seed=3, clock=fake.clock, sleep=sleep)
    batches: list[list[Row]] = []
    with capture_logs() as logs, pytest.raises(_Stop):
        await _drain(source, batches)
    assert (
        sum(len(batch) for batch in batches) == 95
    )  # 10 ticks, one skipped tick, 9 ticks: no burst of 180,000 rows
    assert [e["event"] for e in logs] == ["http_events.clock_step"]


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_http_events_reject_a_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        HttpEvents(rate=rate)


# --------------------------------------------------------------------------- HostMetrics


async def test_host_metrics_are_real_and_plausible() -> None:
    source = HostMetrics(interval=0.01)
    async with aclosing(source.rows()) as it:
        first = await anext(it)
        second = await anext(it)
    assert len(first) == len(second) == 1
    a, b = first[0], second[0]
    mem = psutil.virtual_memory()
    for row in (a, b):
        assert validate_row(row) == row
        assert row["mem_total"] == mem.total
        assert 0 <= row["mem_available"] <= row["mem_total"]
        assert 0.0 <= row["cpu_percent"] <= 100.0
        assert 0.0 <= row["mem_percent"] <= 100.0
        assert 0.0 <= row["swap_percent"] <= 100.0
        assert row["load1"] >= 0.0
        assert row["procs"] >= 1
        assert 0 < row["boot_time"] < row["time_"] / 1e9
        assert row["net_send_rate"] >= 0.0
        assert row["net_recv_rate"] >= 0.0
        assert isinstance(row["time_"], int)
    assert b["time_"] > a["time_"]
    for counter in ("net_bytes_sent", "net_bytes_recv", "disk_read_bytes", "disk_write_bytes"):
        assert isinstance(a[counter], int)
        assert b[counter] >= a[counter] >= 0


async def test_host_metrics_sleep_between_rows() -> None:
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    async with aclosing(HostMetrics(interval=2.5, sleep=sleep).rows()) as it:
        for _ in range(3):
            await anext(it)
    assert delays == [2.5, 2.5, 2.5]


# --------------------------------------------------------------------------- JsonLines

_MARK = "SECRET-PAYLOAD"
_LINES: list[tuple[bytes, Row | str | None]] = [
    (b'{"a": 1, "b": "x"}', {"a": 1, "b": "x"}),
    (f"not json {_MARK}".encode(), "not_json"),
    (f'[1, "{_MARK}"]'.encode(), "not_object"),
    (json.dumps({"a": _MARK * 20}).encode(), "too_long"),
    (f'{{"a": ["{_MARK}"]}}'.encode(), "nested_value"),
    (b"   ", None),
    (f'{{"a": NaN, "m": "{_MARK}"}}'.encode(), "not_json"),
    (b'{"a": 2.5, "c": null, "d": true}', {"a": 2.5, "c": None, "d": True}),
    (f'{{"n": {{"x": "{_MARK}"}}}}'.encode(), "nested_value"),
    (b'{"a": "\xff\xfe"}', "not_json"),
    (f'"{_MARK}"'.encode(), "not_object"),
    (b'{"big": 1e400}', "bad_value"),
    (b'{"a": "\\ud800"}', "bad_value"),
    (b"", None),
    (b'{"a": 3}', {"a": 3}),  # the last line has no newline
]


async def _collect(source: JsonLines) -> list[list[Row]]:
    return [batch async for batch in source.rows()]


async def test_json_lines_reject_bad_lines_and_keep_the_good(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in _LINES))
    calls: list[tuple[int, str]] = []
    source = JsonLines(
        path, stream="lines", max_line=200, on_reject=lambda n, r: calls.append((n, r))
    )
    with capture_logs() as logs:
        batches = await _collect(source)

    rows = [row for batch in batches for row in batch]
    assert rows == [want for _, want in _LINES if isinstance(want, dict)]
    expected = [(n, want) for n, (_, want) in enumerate(_LINES, 1) if isinstance(want, str)]
    assert calls == expected
    assert source.rejected == {
        "not_json": 3,
        "not_object": 2,
        "too_long": 1,
        "nested_value": 2,
        "bad_value": 2,
    }
    rejected = [(e["line"], e["reason"]) for e in logs if e["event"] == "jsonl.rejected"]
    assert rejected == expected
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "jsonl.rejected")
    assert [e["event"] for e in logs][-1] == "jsonl.eof"
    assert _MARK not in repr(logs)


async def test_json_lines_length_limit_excludes_the_newline(tmp_path: Path) -> None:
    fits = json.dumps({"k": "v" * 10})  # 17 characters
    path = tmp_path / "in.jsonl"
    path.write_text(f"{fits}\n{fits} \r\n{fits}\n{fits}  ")
    source = JsonLines(path, stream="lines", max_line=len(fits))
    rows = [row for batch in await _collect(source) for row in batch]
    assert rows == [{"k": "v" * 10}] * 2
    assert source.rejected == {"too_long": 2}


async def test_json_lines_batches(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(7)))
    batches = await _collect(JsonLines(path, stream="lines", batch_rows=2))
    assert all(1 <= len(batch) <= 2 for batch in batches)
    assert [row["i"] for batch in batches for row in batch] == list(range(7))


async def test_json_lines_from_a_text_file_object() -> None:
    text = '\ufeff{"a": 1}\n\n{"b": "é"}\n[]\n'
    rejects: list[tuple[int, str]] = []
    source = JsonLines(
        io.StringIO(text), stream="lines", on_reject=lambda n, r: rejects.append((n, r))
    )
    batches = await _collect(source)
    assert [row for batch in batches for row in batch] == [{"a": 1}, {"b": "é"}]
    assert rejects == [(4, "not_object")]


async def test_json_lines_from_an_in_memory_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n{"a": 2}\n'), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    batches = await _collect(JsonLines(None, stream="stdin"))
    assert [row for batch in batches for row in batch] == [{"a": 1}, {"a": 2}]


async def test_json_lines_from_a_stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin, encoding="utf-8"))
        rejects: list[tuple[int, str]] = []
        source = JsonLines(
            None, stream="stdin", max_line=12, on_reject=lambda n, r: rejects.append((n, r))
        )
        async with aclosing(source.rows()) as it:
            try:
                os.write(write_fd, b'{"a": 1}\n{"b": "' + b"x" * 40)  # then a long line begins
                assert await asyncio.wait_for(anext(it), 5) == [{"a": 1}]
                os.write(write_fd, b"x" * 40 + b'"}\n{"c": 3}\n{"d"')
                assert await asyncio.wait_for(anext(it), 5) == [{"c": 3}]
                os.write(write_fd, b": 4}")  # the last line has no newline
            finally:
                os.close(write_fd)
            rest = [batch async for batch in it]
    assert rest == [[{"d": 4}]]
    assert rejects == [(2, "too_long")]


async def test_json_lines_yield_without_waiting_for_a_full_batch() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader:
        source = JsonLines(reader, stream="pipe", batch_rows=500)
        async with aclosing(source.rows()) as it:
            try:
                os.write(write_fd, b'{"a": 1}\n')
                assert await asyncio.wait_for(anext(it), 5) == [{"a": 1}]
                os.write(write_fd, b'{"a": 2}\n{"a": 3}\n')
            finally:
                os.close(write_fd)
            rest = [row async for batch in it for row in batch]
    assert rest == [{"a": 2}, {"a": 3}]


async def test_json_lines_read_errors_surface(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await _collect(JsonLines(tmp_path / "missing.jsonl", stream="lines"))


async def test_json_lines_iterate_once() -> None:
    source = JsonLines(io.StringIO('{"a": 1}\n'), stream="lines")
    await _collect(source)
    with pytest.raises(RuntimeError):
        await _collect(source)


def test_json_lines_check_the_stream_name() -> None:
    with pytest.raises(WireError) as info:
        JsonLines(io.StringIO(), stream="Bad Stream")
    assert info.value.reason == "bad_stream"


# --------------------------------------------------------------------------- Records


async def test_records_round_trip() -> None:
    records = Records("api")
    await records.put([{"i": 0}, {"i": 1}])
    records.put_nowait(iter([{"i": 2}]))
    await records.put([])
    records.close()
    batches = [batch async for batch in records.rows()]
    assert batches == [[{"i": 0}, {"i": 1}, {"i": 2}]]


async def test_records_batches_of_at_most_1000() -> None:
    records = Records("api")
    await records.put({"i": i} for i in range(2500))
    records.close()
    batches = [batch async for batch in records.rows()]
    assert [len(batch) for batch in batches] == [1000, 1000, 500]
    assert [row["i"] for batch in batches for row in batch] == list(range(2500))


async def test_records_copy_the_rows() -> None:
    records = Records("api")
    row: dict[str, Any] = {"i": 1}
    await records.put([row])
    row["i"] = 2
    records.close()
    assert [batch async for batch in records.rows()] == [[{"i": 1}]]


async def test_records_refuse_a_call_with_an_invalid_row() -> None:
    records = Records("api")
    with pytest.raises(WireError) as info:
        await records.put([{"ok": 1}, {"bad": [1, 2]}])
    assert info.value.reason == "bad_row"
    with pytest.raises(WireError):
        records.put_nowait([{"ok": 1}, {2: "x"}])  # type: ignore[dict-item]
    assert records.qsize() == 0
    records.close()
    assert [batch async for batch in records.rows()] == []


async def test_records_backpressure() -> None:
    records = Records("api", maxsize=3)
    records.put_nowait([{"i": 0}, {"i": 1}])
    with pytest.raises(asyncio.QueueFull):
        records.put_nowait([{"i": 2}, {"i": 3}])  # all or nothing
    records.put_nowait([{"i": 2}])
    with pytest.raises(asyncio.QueueFull):
        records.put_nowait([{"i": 3}])
    assert records.qsize() == 3

    async with aclosing(records.rows()) as it, asyncio.TaskGroup() as tg:
        put = tg.create_task(records.put([{"i": 3}, {"i": 4}]))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not put.done()  # blocked: the queue is full
        assert await anext(it) == [{"i": 0}, {"i": 1}, {"i": 2}]
        await put
        records.close()
        assert [batch async for batch in it] == [[{"i": 3}, {"i": 4}]]


async def test_records_close_wakes_the_reader_and_refuses_puts() -> None:
    records = Records("api")
    async with asyncio.TaskGroup() as tg:
        reader = tg.create_task(anext(records.rows(), None))
        await asyncio.sleep(0)
        records.close()
    assert reader.result() is None
    with pytest.raises(ValueError, match="closed"):
        await records.put([{"i": 1}])
    with pytest.raises(ValueError, match="closed"):
        records.put_nowait([{"i": 1}])


# --------------------------------------------------------------------------- validate_row

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_flat = st.dictionaries(st.text(), _scalars)
_nested = st.lists(_scalars) | st.dictionaries(st.text(), _scalars)


@given(_flat)
def test_validate_row_accepts_flat_scalars(row: dict[str, Any]) -> None:
    checked = validate_row(row)
    assert checked == row
    assert checked is not row
    assert validate_row(json.loads(json.dumps(row))) == row


@given(_flat, st.text(), _nested)
def test_validate_row_rejects_nested_values(row: dict[str, Any], key: str, nested: Any) -> None:
    assert validate_row({**row, key: nested}) == "nested_value"


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([("a", 1)], "not_object"),
        ("text", "not_object"),
        (None, "not_object"),
        ({1: "a"}, "bad_key"),
        ({"\ud800": 1}, "bad_key"),
        ({"a": (1,)}, "nested_value"),
        ({"a": {1}}, "nested_value"),
        ({"a": float("nan")}, "bad_value"),
        ({"a": float("-inf")}, "bad_value"),
        ({"a": 2**64}, "bad_value"),
        ({"a": -(2**63) - 1}, "bad_value"),
        ({"a": b"bytes"}, "bad_value"),
        ({"a": "\udcff"}, "bad_value"),
    ],
)
def test_validate_row_reasons(obj: object, reason: str) -> None:
    assert validate_row(obj) == reason


# --------------------------------------------------------------------------- plain_rows


_any_value = (
    _scalars
    | _nested
    | st.binary()
    | st.sampled_from([float("nan"), float("inf"), 2**64, -(2**63) - 1, "\udcff"])
)
_any_row = st.dictionaries(st.text() | st.integers() | st.binary(), _any_value, max_size=5)


@given(st.lists(_any_row, max_size=5))
def test_plain_rows_pass_only_rows_validate_row_accepts(rows: list[dict[Any, Any]]) -> None:
    """The fast check never lets through what the row-by-row check refuses; what it leaves to
    packing (ints beyond 64 bits, str not UTF-8) makes msgpack raise."""
    if not plain_rows(rows):
        return
    try:
        msgpack.packb(rows, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    assert all(isinstance(validate_row(row), dict) for row in rows)


@pytest.mark.parametrize(
    "rows",
    [
        [{"a": 1.5}],  # floats must be checked finite: row by row
        [{1: "a"}],
        [{"a": b"x"}],
        [{"a": [1]}],
        [("a", 1)],
        ({"a": 1},),  # not a list
        [{"a": True, "b": None}, {"c": "x"}, "row"],
    ],
)
def test_plain_rows_sends_the_rest_row_by_row(rows: Any) -> None:
    assert not plain_rows(rows)


@given(st.lists(st.lists(_flat.filter(lambda r: plain_rows([r])), max_size=40), max_size=30))
def test_batcher_packed_rows_make_the_same_batches(chunks: list[list[dict[str, Any]]]) -> None:
    """Rows added packed in one piece give exactly the plaintexts of adding them one by one."""
    batching = Batching(max_rows=50, max_bytes=4096, max_delay_s=1.0)
    one_by_one = Batcher(batching, budget=10**6)
    packed = Batcher(batching, budget=10**6)
    expected: list[bytes] = []
    got: list[bytes] = []
    for chunk in chunks:
        expected += one_by_one.add(chunk, now=0.0)
        ready = (
            packed.add_packed(
                msgpack.packb(chunk)[array_header_size(len(chunk)) :], len(chunk), now=0.0
            )
            if chunk
            else []
        )
        got += ready if ready is not None else packed.add(chunk, now=0.0)
    assert got + [b for b in (packed.flush(),) if b] == expected + [
        b for b in (one_by_one.flush(),) if b
    ]


# --------------------------------------------------------------------------- check_rows


@given(st.lists(_any_row, max_size=6))
def test_check_rows_is_validate_row_on_every_row(rows: list[dict[Any, Any]]) -> None:
    """One answer per call: the rows validate_row accepts, in order, and the reason of every
    other; packed (in one piece) only when every row was valid."""
    checked = check_rows(rows)
    verdicts = [validate_row(row) for row in rows]
    assert checked.rows == [v for v in verdicts if not isinstance(v, str)]
    assert checked.rejected == [v for v in verdicts if isinstance(v, str)]
    if checked.packed is not None:
        assert not checked.rejected
        assert checked.packed == msgpack.packb(rows, use_bin_type=True)


@pytest.mark.parametrize(
    ("rows", "packed"),
    [
        ([{"a": 1, "b": "x"}], True),
        ([{"a": 2**64}], False),  # plain, but msgpack refuses it: row by row
        ([{"a": "\udcff"}], False),
        ([], False),
        (iter([{"a": 1}]), False),  # not a list: row by row
    ],
)
def test_check_rows_packs_only_plain_lists(rows: Any, packed: bool) -> None:
    assert (check_rows(rows).packed is not None) is packed


@given(st.lists(st.lists(_flat, max_size=40), max_size=30))
def test_batcher_given_checked_rows_makes_the_same_batches(
    chunks: list[list[dict[str, Any]]],
) -> None:
    """What the agent hands the batcher (the checked rows, packed when plain) gives exactly
    the plaintexts of adding the valid rows one by one."""
    batching = Batching(max_rows=50, max_bytes=4096, max_delay_s=1.0)
    one_by_one = Batcher(batching, budget=10**6)
    checked_in = Batcher(batching, budget=10**6)
    expected: list[bytes] = []
    got: list[bytes] = []
    for chunk in chunks:
        expected += one_by_one.add(chunk, now=0.0)
        checked = check_rows(chunk)
        got += checked_in.add(checked.rows, packed=checked.packed, now=0.0)
    assert got + [b for b in (checked_in.flush(),) if b] == expected + [
        b for b in (one_by_one.flush(),) if b
    ]
