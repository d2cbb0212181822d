// The page's OTLP decoder (src/otlp.js) on export requests built by opentelemetry-proto in
// Python (test/vectors/otlp.json, written by `python -m tests.support.otlp_vectors`, checked
// current by tests/web/test_vectors.py): the same lines as the Python view, the same refusals.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { raw } from "../src/format.js";
import { SIGNALS, expand, number } from "../src/otlp.js";

const cases = JSON.parse(readFileSync(new URL("./vectors/otlp.json", import.meta.url), "utf-8"));
const bytes = (/** @type {string} */ b64) => new Uint8Array(Buffer.from(b64, "base64"));

test("the vectors cover every signal, every data point type, and broken requests", () => {
  assert.deepEqual(new Set(cases.map((c) => c.signal)), new Set(["traces", "metrics", "logs"]));
  const types = new Set(cases.flatMap((c) => c.lines.map((l) => l.type)).filter(Boolean));
  const all = ["gauge", "sum", "histogram", "exponential_histogram", "summary"];
  assert.deepEqual(types, new Set(all));
  assert.ok(cases.filter((c) => c.undecodable).length >= 3);
});

for (const c of cases) {
  test(`the page reads ${c.name} as the Python view does`, () => {
    const got = expand(c.signal, [{ otlp: bytes(c.otlp) }], 100);
    assert.equal(got.undecodable, c.undecodable);
    assert.equal(got.items, c.items);
    const text = (/** @type {object} */ l) =>
      Object.fromEntries(Object.entries(l).map(([k, v]) => [k, raw(v)]));
    assert.deepEqual(got.lines.map(text), c.lines);
    // the same columns in the same order
    assert.deepEqual(
      got.lines.map((l) => Object.keys(l)),
      c.lines.map((/** @type {object} */ l) => Object.keys(l)),
    );
    if (c.undecodable) assert.notEqual(got.reason, "");
  });
}

test("a batch gives at most its limit of lines, and counts all its items", () => {
  const spans = cases.find((c) => c.name === "spans");
  const points = cases.find((c) => c.name === "data points");
  const rows = [spans, spans, spans].map((c) => ({ otlp: bytes(c.otlp) }));
  const got = expand("traces", rows, 10);
  assert.equal(got.lines.length, 10);
  assert.equal(got.lines[7].name, spans.lines[0].name); // the second row's first span
  assert.equal(got.items, 3 * spans.items);
  const metrics = expand("metrics", [{ otlp: bytes(points.otlp) }], 3);
  assert.equal(metrics.lines.length, 3);
  assert.equal(metrics.items, points.items);
});

test("a row without otlp bytes is counted, not shown", () => {
  const got = expand("logs", [{ otlp: "not bytes" }, {}]);
  assert.deepEqual([got.lines.length, got.items, got.undecodable], [0, 0, 2]);
  assert.equal(got.reason, "no otlp bytes");
});

test("the three streams and their items' names", () => {
  assert.deepEqual(Object.keys(SIGNALS), ["otlp_traces", "otlp_metrics", "otlp_logs"]);
  assert.equal(SIGNALS.otlp_logs.noun, "log records");
});

test("numbers: whole, or three significant digits, halves away from zero", () => {
  for (const [x, text] of [
    [0, "0"],
    [-0, "0"],
    [1234.5678, "1235"],
    [12.25, "12.3"],
    [-12.25, "-12.3"],
    [0.125, "0.13"],
    [2.5, "2.5"],
    [0.000123, "1.23e-4"],
    [1e300, "1e300"],
    [2 ** 60 + 0.5, "1.15e18"],
    [Number.NaN, "NaN"],
    [-Infinity, "-Inf"],
  ]) {
    assert.equal(number(x), text, String(x));
  }
});
