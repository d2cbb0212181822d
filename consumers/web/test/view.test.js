import assert from "node:assert/strict";
import { test } from "node:test";
import { parseFilter, quantity } from "../src/filter.js";
import { BYTES_SHOWN, clock, duration, epochMs, formatCell, kindOf, size } from "../src/format.js";
import {
  AHEAD_S,
  HttpSeries,
  MetricSeries,
  PerSecond,
  RowRate,
  WINDOW_S,
  quantile,
} from "../src/series.js";
import { MAX_COLUMNS, addColumns } from "../src/view.js";

test("columns read by their names, as the sources name them", () => {
  assert.equal(kindOf("time_"), "time");
  assert.equal(kindOf("boot_time"), "time");
  assert.equal(kindOf("latency_ns"), "duration");
  assert.equal(kindOf("resp_body_size"), "size");
  assert.equal(kindOf("disk_read_bytes"), "size");
  assert.equal(kindOf("net_bytes_recv"), "size");
  assert.equal(kindOf("mem_total"), "size");
  assert.equal(kindOf("net_recv_rate"), "rate");
  assert.equal(kindOf("cpu_percent"), "percent");
  assert.equal(kindOf("resp_status"), "plain");
  assert.equal(kindOf("timeout"), "plain");
});

test("durations in ns, µs, ms and s; sizes in B, KiB, MiB", () => {
  assert.equal(duration(850), "850 ns");
  assert.equal(duration(12_345), "12.3 µs");
  assert.equal(duration(4_210_000), "4.21 ms");
  assert.equal(duration(250_000_000), "250 ms");
  assert.equal(duration(3_500_000_000), "3.50 s");
  assert.equal(size(0), "0 B");
  assert.equal(size(1023), "1023 B");
  assert.equal(size(1024), "1 KiB");
  assert.equal(size(2500), "2.44 KiB");
  assert.equal(size(16 * 1024 ** 3), "16 GiB");
  assert.equal(formatCell("net_recv_rate", 2048), "2 KiB/s");
  assert.equal(formatCell("cpu_percent", 12.345), "12.3 %");
});

test("times in local time with ms; the date only when not today", () => {
  const t = new Date(2026, 11, 6, 9, 5, 7, 42);
  const ns = BigInt(t.getTime()) * 1_000_000n + 123_456n;
  // (today is a parameter: the test passes whatever day it runs)
  assert.equal(clock(t.getTime(), new Date(2026, 11, 6, 23, 59)), "09:05:07.042");
  assert.equal(clock(t.getTime(), new Date(2026, 11, 7)), "2026-12-06 09:05:07.042");
  assert.equal(formatCell("time_", ns), clock(t.getTime()));
  // unix s, ms, µs and ns are the same instant
  for (const x of [t.getTime() / 1000, t.getTime(), t.getTime() * 1e3, t.getTime() * 1e6]) {
    assert.ok(Math.abs(epochMs(x) - t.getTime()) < 1e-3, String(x));
  }
  assert.equal(epochMs(ns), t.getTime() + 0.123456);
});

test("values a column's kind does not fit stay as they are", () => {
  assert.equal(formatCell("time_", "yesterday"), "yesterday");
  assert.equal(formatCell("latency_ns", null), "");
  assert.equal(formatCell("resp_status", 200), "200");
  assert.equal(formatCell("load1", 0.5), "0.50");
  assert.equal(formatCell("big", 2n ** 63n), "9223372036854775808");
  assert.equal(formatCell("blob", new Uint8Array([0xff, 0x00])), "/wA=");
  // the first BYTES_SHOWN bytes only are encoded: a table renders every 250 ms
  assert.equal(BYTES_SHOWN, 96);
  const big = new Uint8Array(300_000).fill(0xfb); // more than a call's arguments
  assert.equal(formatCell("blob", big), `${"+/v7".repeat(32)}…`);
  assert.equal(formatCell("blob", big.subarray(0, 96)), "+/v7".repeat(32));
  assert.equal(formatCell("nested", { b: big.subarray(0, 97) }), `{"b":"${"+/v7".repeat(32)}…"}`);
  assert.equal(formatCell("nested", { a: 1n, b: [1] }), '{"a":"1","b":[1]}');
  assert.equal(formatCell("latency_ns", Number.NaN), "NaN");
});

const rows = [
  { resp_status: 200, req_method: "GET", req_path: "/api/orders/7", latency_ns: 3_000_000n },
  { resp_status: 503, req_method: "POST", req_path: "/api/checkout", latency_ns: 40_000_000n },
  { resp_status: 404, req_method: "GET", req_path: "/static/app.js", latency_ns: 900_000 },
];
/** @param {string} text */
const paths = (text) => {
  const t = parseFilter(text);
  return rows.filter((r) => t === null || t(r)).map((r) => r.req_path);
};

test("the filter compares columns, with units, and finds text anywhere", () => {
  assert.equal(parseFilter("   "), null);
  assert.deepEqual(paths("resp_status>=500"), ["/api/checkout"]);
  assert.deepEqual(paths("resp_status<400 req_method=get"), ["/api/orders/7"]);
  assert.deepEqual(paths("resp_status!=200"), ["/api/checkout", "/static/app.js"]);
  assert.deepEqual(paths("latency_ns>20ms"), ["/api/checkout"]);
  assert.deepEqual(paths("latency_ns<1ms"), ["/static/app.js"]);
  assert.deepEqual(paths("req_method!=GET"), ["/api/checkout"]);
  assert.deepEqual(paths("req_path~ORDERS"), ["/api/orders/7"]);
  assert.deepEqual(paths("checkout"), ["/api/checkout"]);
  assert.deepEqual(paths("µs"), ["/static/app.js"]); // the cell as shown: "900 µs"
  assert.deepEqual(paths("µs post"), []); // every term must match
  assert.deepEqual(paths("no_such_column>1"), []);
  assert.equal(quantity("2KiB"), 2048);
  assert.equal(quantity("1.5s"), 1.5e9);
  assert.equal(quantity("3 parsecs"), null);
});

test("a term the filter cannot read is a one-line error", () => {
  assert.throws(() => parseFilter("resp_status>="), /nothing after '>='/);
  assert.throws(() => parseFilter("req_method>GET"), /wants a number/);
});

test("rows/s counts completed seconds, with the quiet ones as zeros", () => {
  const rate = new RowRate();
  rate.add(3, 99_700); // the page opened during second 99: not a full second
  rate.add(10, 100_000);
  rate.add(5, 100_900);
  rate.add(7, 102_100);
  assert.deepEqual(rate.data(102_500), [[100, 101], [15, 0]]);
  assert.deepEqual(rate.data(103_000), [[100, 101, 102], [15, 0, 7]]);
});

test("latency p50/p99 and status classes per second of the rows' own time", () => {
  const http = new HttpSeries();
  const at = (/** @type {number} */ s, /** @type {number} */ ms, /** @type {number} */ status) => ({
    time_: BigInt(s) * 1_000_000_000n + 5n,
    latency_ns: ms * 1e6,
    resp_status: status,
  });
  const second = [at(1_789_999_999, 1, 200)]; // the first second seen, partly
  const t0 = 1_790_000_000;
  for (let i = 1; i <= 100; i++) second.push(at(t0, i, i === 100 ? 503 : 200));
  http.add(second);
  assert.deepEqual(http.latency(), [[], [], []]); // second t0 may still fill
  http.add([at(t0 + 2, 1, 404)]);
  assert.deepEqual(http.latency(), [[t0, t0 + 1], [50e6, null], [99e6, null]]);
  assert.deepEqual(http.latency(), [[t0, t0 + 1], [50e6, null], [99e6, null]]); // kept
  assert.deepEqual(http.statuses(), [[t0, t0 + 1], [99, 0], [0, 0], [0, 0], [1, 0]]);
  assert.equal(quantile([5], 0.99), 5);
});

test("a row's time_ far ahead of the clock is not charted: later rows still are", () => {
  const now = 1_790_000_000_500; // ms
  const t0 = 1_790_000_000;
  const ns = (/** @type {number} */ s) => BigInt(s) * 1_000_000_000n;
  const http = new HttpSeries();
  const far = { time_: ns(t0 + 10 ** 6), latency_ns: 1, resp_status: 200 };
  const partial = { time_: ns(t0 - 1), latency_ns: 1, resp_status: 200 }; // the first second
  http.add([partial, far, { time_: ns(t0), latency_ns: 5e6, resp_status: 200 }], now);
  http.add([{ time_: ns(t0 + 1), latency_ns: 1e6, resp_status: 500 }], now + 1000);
  assert.deepEqual(http.statuses(), [[t0], [1], [0], [0], [0]]);
  // within AHEAD_S the producer's clock may simply run ahead of the page's
  http.add([{ time_: ns(t0 + AHEAD_S), latency_ns: 1e6, resp_status: 200 }], now);
  assert.equal(http.seconds.newest, t0 + AHEAD_S);
  const m = new MetricSeries(["cpu_percent"]);
  m.add([{ time_: ns(t0 + 10 ** 6), cpu_percent: 99 }], now);
  for (let s = 0; s < 3; s++) m.add([{ time_: ns(t0 + s), cpu_percent: s }], now + s * 1000);
  assert.deepEqual(m.data(), [[t0, t0 + 1, t0 + 2], [0, 1, 2]]);
});

test("the window slides: nothing older than WINDOW_S seconds is kept", () => {
  const b = new PerSecond(() => ({ n: 0 }));
  for (let s = 0; s < 3 * WINDOW_S; s++) b.at(s).n += 1;
  assert.ok(b.buckets.size <= WINDOW_S + 1);
  assert.equal(b.upTo(3 * WINDOW_S - 1).length, WINDOW_S);
  const m = new MetricSeries(["cpu_percent"]);
  for (let s = 0; s < 3 * WINDOW_S; s++) m.add([{ time_: s * 1e9 + 1e18, cpu_percent: s }]);
  const [xs, cpu] = m.data();
  assert.equal(xs.length, WINDOW_S);
  assert.equal(cpu.at(-1), 3 * WINDOW_S - 1);
});

test("a table shows the first MAX_COLUMNS columns seen", () => {
  assert.equal(MAX_COLUMNS, 16); // host_metrics rows have 15
  /** @type {string[]} */
  const columns = ["time_"];
  const wide = Object.fromEntries(Array.from({ length: 5000 }, (_, i) => [`c${i}`, i]));
  addColumns(columns, [{ time_: 1, c0: 0 }, wide, { other: 1 }]);
  assert.deepEqual(columns, ["time_", ...Array.from({ length: 15 }, (_, i) => `c${i}`)]);
});
