"""The rich table's cells and counters (``consumers._view``): the page's formatting rules
(``consumers/web/src/format.js``, whose test/view.test.js holds the same cases), and rejected
envelopes shown by reason in the footer and the exit summary."""

from __future__ import annotations

import asyncio
import io
from datetime import datetime

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from rich.console import Console

from consumers._subscription import Stats
from consumers._view import LiveTable, cell, printable, rejections, summary
from sealstream.crypto import Batch


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [
        ("latency_ns", 850, "850 ns"),
        ("latency_ns", 12_345, "12.3 µs"),
        ("latency_ns", 4_210_000, "4.21 ms"),
        ("latency_ns", 250_000_000, "250 ms"),
        ("latency_ns", 3_500_000_000, "3.50 s"),
        ("resp_body_size", 0, "0 B"),
        ("resp_body_size", 1023, "1023 B"),
        ("resp_body_size", 1024, "1 KiB"),
        ("resp_body_size", 2500, "2.44 KiB"),
        ("net_bytes_recv", 1024**2, "1 MiB"),
        ("mem_total", 16 * 1024**3, "16 GiB"),
        ("net_recv_rate", 2048.0, "2 KiB/s"),
        ("cpu_percent", 12.345, "12.3 %"),
        ("resp_status", 200, "200"),
        ("load1", 0.5, "0.50"),
        # what a column's kind does not fit stays as it is
        ("time_", "yesterday", "yesterday"),
        ("latency_ns", float("nan"), "nan"),
        ("latency_ns", True, "True"),
        ("timeout", 10**18, "1000000000000000000"),  # not a time column
        ("req_path", "/" + "x" * 40, "/" + "x" * 26 + "…"),
    ],
)
def test_cells_read_as_their_columns_say(column: str, value: object, shown: str) -> None:
    assert cell(column, value) == shown


def test_times_are_local_with_ms_and_a_date_when_not_today() -> None:
    today = datetime.now().replace(hour=9, minute=5, second=7, microsecond=42_000)
    ns = int(today.timestamp()) * 10**9 + 42_123_456
    assert cell("time_", ns) == "09:05:07.042"  # ns exactly: no float rounding to .041
    assert cell("time_", ns // 1000) == "09:05:07.042"  # µs
    before = datetime(2001, 2, 3, 4, 5, 6, 789_000)
    assert cell("boot_time", before.timestamp()) == "2001-02-03 04:05:06.789"  # unix s


def _stats(**changes: object) -> Stats:
    values: dict[str, object] = {
        "received": 10,
        "batches": 7,
        "rows": 70,
        "rejected": {},
        "dropped": 0,
        "gaps": 0,
        "lost": 0,
    }
    return Stats(**{**values, **changes})  # type: ignore[arg-type]


def test_rejected_envelopes_are_shown_by_reason() -> None:
    hostile = _stats(rejected={"replay": 1, "bad_signature": 2})
    assert rejections(hostile) == "rejected 3 (bad_signature 2, replay 1)"
    assert rejections(_stats()) == "rejected 0"
    assert summary(_stats()) is None
    assert (
        summary(hostile) == "rejected 3 (bad_signature 2, replay 1), lost 0, dropped 0, sessions 1"
    )
    assert summary(_stats(sessions=2)) == "rejected 0, lost 0, dropped 0, sessions 2"

    current = [hostile]
    table = LiveTable("c1", "s-1", stats=lambda: current[0])
    table.add(Batch("http_events", 1, 1, [{"latency_ns": 4_210_000, "resp_body_size": 2500}]))
    out = io.StringIO()
    Console(file=out, width=140).print(table.render())
    text = out.getvalue()
    assert "4.21 ms" in text
    assert "2.44 KiB" in text
    footer = text.rstrip().splitlines()[-1]
    assert "rejected 3 (bad_signature 2, replay 1)" in footer
    assert "rows 70" in footer


def test_rich_markup_in_decrypted_names_and_values_is_shown_as_written() -> None:
    table = LiveTable("c1", "s-1")
    link = "[link=https://example.com/x]click[/link]"
    table.add(Batch("records", 1, 1, [{"[bold]name": link}]))
    out = io.StringIO()
    Console(file=out, width=140).print(table.render())
    assert "[bold]name" in out.getvalue()
    assert link[:27] in out.getvalue()


def test_control_characters_in_decrypted_text_never_reach_the_terminal() -> None:
    """ESC [2J (clear), OSC 52 (write the clipboard), a C1 CSI, DEL: shown escaped, in a
    cell, a column name and an OTLP line alike."""
    clear, clipboard = "\x1b[2J", "\x1b]52;c;ZXZpbA==\x07"
    assert cell("name", f"a{clear}b") == "a\\x1b[2Jb"
    assert printable(f"{clipboard}\x9b1m\x7f\n") == "\\x1b]52;c;ZXZpbA==\\x07\\x9b1m\\x7f\\x0a"
    assert printable("tab\tü…") == "tab\\x09ü…"  # printable text beyond ASCII stays
    request = ExportLogsServiceRequest()
    record = request.resource_logs.add().scope_logs.add().log_records.add()
    record.body.string_value = f"login {clipboard}"
    table = LiveTable("c1", "s-1")
    table.add(Batch("records", 1, 1, [{f"col{clear}": f"v{clear}"}]))
    table.add(Batch("otlp_logs", 1, 1, [{"otlp": request.SerializeToString(), "items": 1}]))
    out = io.StringIO()
    Console(file=out, width=200).print(table.render())
    text = out.getvalue()
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "col\\x1b[2J" in text
    assert "v\\x1b[2J" in text
    assert "login \\x1b]52" in text


async def test_the_live_footer_follows_the_counters_without_batches() -> None:
    """No batch comes (a relay whose every envelope is refused): the footer still shows the
    counters as they grow, read in the loop's thread."""
    current = [_stats()]
    out = io.StringIO()
    table = LiveTable("c1", "s-1", stats=lambda: current[0])
    with table.live(Console(file=out, width=140, force_terminal=True)):
        current[0] = _stats(rejected={"untrusted_key": 4})
        while table.stats is not current[0]:
            await asyncio.sleep(0.01)
    assert "rejected 4 (untrusted_key 4)" in out.getvalue()
