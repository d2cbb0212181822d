"""OTLP streams in the views (``consumers._otlpview``, ``consumers._view``): export requests
built with opentelemetry-proto (every signal, every data point type) read as a line per span,
log record or data point, bounded per batch; broken requests counted, never shown; the JSON
lines keep the lossless row. The page's twin reads the same requests the same way
(``consumers/web/test/otlp.test.js`` on ``tests.support.otlp_vectors``)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from consumers._otlpview import LINES_PER_BATCH, expand, number
from consumers._view import JsonLinesWriter, LiveTable
from sealstream.crypto import Batch
from sealstream.otlp import SIGNALS, otlp_row
from tests.support.otlp_vectors import T0, cases, logs, metrics, traces


def _row(request: Any, signal: str = "traces") -> dict[str, Any]:
    s = SIGNALS[signal]  # type: ignore[index]
    return otlp_row(s, request, request.SerializeToString())


def test_spans_read_with_service_name_kind_duration_status_and_trace_id() -> None:
    got = expand(SIGNALS["traces"], [_row(traces())])
    assert got.items == 7
    assert got.undecodable == 0
    assert got.lines[2] == {
        "time": T0 + 2,
        "service": "checkout",
        "name": "GET /api/orders/2",
        "kind": "server",
        "duration_ns": 421_000,
        "status": "error: card declined",
        "trace_id": "0002000102030405060708090a0b0c0d",
    }
    assert [line["kind"] for line in got.lines] == [
        "unspecified",
        "internal",
        "server",
        "client",
        "producer",
        "consumer",
        "9",  # a kind the schema does not name yet: its number
    ]
    assert got.lines[-1]["service"] == ""  # a resource without service.name


def test_every_data_point_type_reads_as_a_value_or_a_summary() -> None:
    got = expand(SIGNALS["metrics"], [_row(metrics(), "metrics")])
    shown = [(line["name"], line["type"], line["value"], line["unit"]) for line in got.lines]
    assert shown == [
        ("queue.depth", "gauge", "1.23e-4", "{item}"),
        ("queue.depth", "gauge", "-0.13", "{item}"),
        ("queue.depth", "gauge", str(2**62 + 1), "{item}"),  # an int stays exact
        ("http.requests", "sum", "1235", "1"),
        ("http.requests", "sum", "12.3", "1"),
        ("http.duration", "histogram", "count 5 · sum 12.5 · min 1 · max 4", "ms"),
        ("http.duration", "histogram", "count 3", "ms"),  # no sum, min, max: not made up
        ("rpc.duration", "exponential_histogram", "count 7 · sum 3.75 · scale -2 · "
         "min 0.01 · max 2.5", "s"),
        ("gc.pause", "summary", "count 10 · sum 1000000 · p50 80000 · p99.9 350000", "ns"),
    ]  # fmt: skip
    assert got.lines[2]["attributes"] == "queue=a, shard=-3"
    assert got.lines[5]["attributes"] == "ok=true, ratio=0.5"
    assert got.items == 9  # data points; the metric without data has none
    assert {line["time"] for line in got.lines} == {T0}


def test_log_records_read_with_time_severity_body_and_service() -> None:
    got = expand(SIGNALS["logs"], [_row(logs(), "logs")])
    assert got.lines[0] == {
        "time": T0,
        "severity": "Information",
        "body": "order 1042 charged",
        "service": "checkout",
    }
    # severity by number when no text; the observed time when no time; any value as a body
    shown = [(line["time"] - T0, line["severity"], line["body"]) for line in got.lines[1:-1]]
    assert shown == [
        (0, "", "false"),
        (1, "TRACE", str(-(2**63))),
        (6, "DEBUG2", "2.5"),
        (18, "ERROR2", "/wA="),
        (19, "ERROR3", base64.b64encode(bytes(range(96))).decode() + "…"),  # the first bytes
        (24, "FATAL4", ""),
        (30, "30", "[a, {k=1, deep=[true]}]"),
        (2, "TRACE2", "[[[[[[[[…]]]]]]]]"),  # nested deeper than 8: cut
    ]
    assert got.lines[-1]["time"] == ""  # unknown: not 1970


def test_a_batch_gives_at_most_its_limit_of_lines_and_counts_every_item() -> None:
    big = traces()
    spans = big.resource_spans[0].scope_spans[0].spans
    for i in range(1000):
        spans.add(name=f"s{i}")
    got = expand(SIGNALS["traces"], [_row(traces()), _row(big), _row(traces())])
    assert len(got.lines) == LINES_PER_BATCH
    assert got.items == 7 + 1007 + 7
    assert got.hidden == got.items - LINES_PER_BATCH
    assert got.lines[7]["name"] == "GET /api/orders/0"  # the second request's first span
    assert got.lines[-1]["name"] == f"s{LINES_PER_BATCH - 7 - 7}"


@pytest.mark.parametrize(("name", "signal", "otlp"), [c for c in cases() if c[0] != "spans"])
def test_broken_requests_are_counted_with_a_reason_never_shown(
    name: str, signal: str, otlp: bytes
) -> None:
    got = expand(SIGNALS[signal], [{"otlp": otlp}, {"otlp": "text"}, {}])  # type: ignore[index]
    broken = name not in ("data points", "log records", "an empty request")
    assert got.undecodable == 2 + broken
    assert got.reason == "no otlp bytes"
    if broken:
        got = expand(SIGNALS[signal], [{"otlp": otlp}])  # type: ignore[index]
        assert (got.lines, got.items, got.undecodable) == ([], 0, 1)
        assert got.reason.startswith("not an Export")


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (12.25, "12.3"),  # a tie, away from zero as JavaScript's toFixed
        (-12.25, "-12.3"),
        (0.125, "0.13"),
        (2.5, "2.5"),
        (1234.5678, "1235"),
        (0.000123, "1.23e-4"),
        (1e300, "1e300"),
        (2.0**60 + 0.5, "1.15e18"),
        (float("nan"), "NaN"),
        (float("-inf"), "-Inf"),
    ],
)
def test_numbers_read_as_in_the_page(x: float, text: str) -> None:
    assert number(x) == text


def _render(table: LiveTable) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(table.render())
    return out.getvalue()


def test_the_table_shows_a_line_per_span_and_says_how_many_it_left_out() -> None:
    big = traces()
    spans = big.resource_spans[0].scope_spans[0].spans
    for i in range(1000):
        spans.add(name=f"span-{i}", start_time_unix_nano=T0, end_time_unix_nano=T0 + 4_210_000)
    table = LiveTable("c1", "s-1")
    table.add(Batch("otlp_traces", 1, T0, [_row(traces()), _row(big)]))
    text = _render(table)
    title = text.splitlines()[1]
    assert title.startswith(
        f"otlp_traces: 2 requests, 1014 spans, {1014 - LINES_PER_BATCH} not shown "
        f"(at most {LINES_PER_BATCH} a batch)"
    ), title
    header = next(line for line in text.splitlines() if "┃" in line)
    for column in ("time", "service", "name", "kind", "duration_ns", "status", "trace_id"):
        assert column in header
    assert f"span-{LINES_PER_BATCH - 7 - 7 - 1}" in text  # the last line shown
    assert "4.21 ms" in text  # formatted by its column, as any row
    assert "otlp" not in header  # the request's bytes are not a column


def test_a_broken_request_is_counted_and_logged_without_its_content() -> None:
    table = LiveTable("c1", "s-1")
    secret = b"\x0a\x07\x12\x05\x12\x03\x2a\x01\xff" + b"marker-7f3a"
    with capture_logs() as logged:
        table.add(Batch("otlp_logs", 4, T0, [{"otlp": secret}, _row(logs(), "logs")]))
    assert "2 requests, 10 log records, 1 undecodable" in _render(table)
    assert logged == [
        {
            "event": "view.otlp_undecodable",
            "log_level": "warning",
            "stream": "otlp_logs",
            "seq": 4,
            "rows": 1,
            "reason": "not an ExportLogsServiceRequest",
        }
    ]


def test_json_lines_keep_the_lossless_row() -> None:
    """``jq -c .row`` still gives the row back: the request's bytes as base64, unchanged."""
    row = _row(metrics(), "metrics")
    out = io.StringIO()
    JsonLinesWriter(out).add(Batch("otlp_metrics", 3, T0, [row]))
    line = json.loads(out.getvalue())
    assert line["row"] == {**row, "otlp": base64.b64encode(row["otlp"]).decode()}
    assert base64.b64decode(line["row"]["otlp"]) == metrics().SerializeToString()
