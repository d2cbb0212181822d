// What the charts draw, computed from the decrypted rows in the page (no I/O, no DOM): per
// second buckets over a sliding window, as uPlot's aligned data ([xs, ...ys], x in unix s).
//   rows/s of a stream        by arrival second (what this page received)
//   http_events latency       p50 and p99 of latency_ns, by the rows' own second (time_)
//   http_events statuses      rows per second per class (2xx 3xx 4xx 5xx), by time_
//   host_metrics              one point per row (time_), a line per metric

import { epochMs, numeric } from "./format.js";

/** seconds a chart shows */
export const WINDOW_S = 120;
/** a row's time_ further ahead of the page's clock is not charted (it would slide the window
 * past every later row) */
export const AHEAD_S = 60;

/** @typedef {[number[], ...(number | null)[][]]} Aligned */

/**
 * Buckets by unix second, the oldest dropped past the window.
 * @template B
 */
export class PerSecond {
  /** @param {() => B} make */
  constructor(make) {
    this.make = make;
    /** @type {Map<number, B>} */
    this.buckets = new Map();
    this.newest = -Infinity;
    /** the first second seen: only part of it was (the page opened during it) */
    this.first = Infinity;
  }

  /** @param {number} second @returns {B} */
  at(second) {
    let b = this.buckets.get(second);
    if (b === undefined) {
      b = this.make();
      this.buckets.set(second, b);
      if (this.first === Infinity) this.first = second;
      if (second > this.newest) this.newest = second;
      for (const s of this.buckets.keys()) if (s < this.newest - WINDOW_S) this.buckets.delete(s);
    }
    return b;
  }

  /**
   * Every second of the window up to `last` (included) after the first one, with its bucket
   * or undefined.
   * @param {number} last
   * @returns {[number, B | undefined][]}
   */
  upTo(last) {
    const from = Math.max(last - WINDOW_S, this.first);
    const seconds = [...this.buckets.keys()].filter((s) => s <= last && s > from);
    if (seconds.length === 0) return [];
    const out = /** @type {[number, B | undefined][]} */ ([]);
    for (let s = Math.min(...seconds); s <= last; s++) out.push([s, this.buckets.get(s)]);
    return out;
  }
}

/**
 * The q-quantile (nearest rank) of sorted numbers.
 * @param {number[]} sorted @param {number} q
 */
export function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

/**
 * A row's time_ in unix s; null if it has none, or if it is more than AHEAD_S ahead of `nowMs`.
 * @param {unknown} v
 * @param {number} nowMs
 */
function rowSecond(v, nowMs) {
  const t = numeric(v);
  if (t === null) return null;
  const s = epochMs(t) / 1000;
  return s > nowMs / 1000 + AHEAD_S ? null : s;
}

export const STATUS_CLASSES = ["2xx", "3xx", "4xx", "5xx"];

/** rows received per second, by arrival */
export class RowRate {
  constructor() {
    this.seconds = new PerSecond(() => ({ n: 0 }));
  }

  /** @param {number} n @param {number} nowMs */
  add(n, nowMs) {
    this.seconds.at(Math.floor(nowMs / 1000)).n += n;
  }

  /** the completed seconds (the current one is still filling) @param {number} nowMs */
  data(nowMs) {
    const done = this.seconds.upTo(Math.floor(nowMs / 1000) - 1);
    return /** @type {Aligned} */ ([done.map(([s]) => s), done.map(([, b]) => b?.n ?? 0)]);
  }
}

/** http_events: latency p50/p99 and status classes per second of the rows' own time */
export class HttpSeries {
  constructor() {
    this.seconds = new PerSecond(() => ({
      /** @type {number[]} */ latency: [],
      /** @type {[number | null, number | null] | null} p50 and p99, once the second is done */
      quantiles: null,
      classes: [0, 0, 0, 0],
    }));
  }

  /** @param {Record<string, unknown>[]} rows @param {number} [nowMs] */
  add(rows, nowMs = Date.now()) {
    for (const row of rows) {
      const t = rowSecond(row.time_, nowMs);
      if (t === null) continue;
      const b = this.seconds.at(Math.floor(t));
      const latency = numeric(row.latency_ns);
      if (latency !== null) b.latency.push(latency);
      const status = numeric(row.resp_status);
      const cls = status === null ? -1 : Math.floor(status / 100) - 2;
      if (cls >= 0 && cls < 4) b.classes[cls] += 1;
    }
  }

  /** seconds before the newest row's are complete: rows of a stream come in order */
  #done() {
    return this.seconds.upTo(this.seconds.newest - 1);
  }

  /** @returns {Aligned} [xs, p50, p99] in ns, null for a second without latency */
  latency() {
    const done = this.#done();
    const qs = done.map(([, b]) => {
      if (b === undefined) return [null, null];
      if (b.quantiles === null) {
        // a second is summed up once, and its latencies let go
        const l = b.latency.sort((x, y) => x - y);
        b.quantiles = l.length ? [quantile(l, 0.5), quantile(l, 0.99)] : [null, null];
        b.latency = [];
      }
      return b.quantiles;
    });
    return [done.map(([s]) => s), qs.map((q) => q[0]), qs.map((q) => q[1])];
  }

  /** @returns {Aligned} [xs, 2xx, 3xx, 4xx, 5xx] rows per second */
  statuses() {
    const done = this.#done();
    return [done.map(([s]) => s), ...STATUS_CLASSES.map((_, i) => done.map(([, b]) => b?.classes[i] ?? 0))];
  }
}

/** a line per metric: one point per row, at its time_ */
export class MetricSeries {
  /** @param {string[]} columns */
  constructor(columns) {
    this.columns = columns;
    /** @type {{t: number, values: (number | null)[]}[]} */
    this.points = [];
  }

  /** @param {Record<string, unknown>[]} rows @param {number} [nowMs] */
  add(rows, nowMs = Date.now()) {
    for (const row of rows) {
      const t = rowSecond(row.time_, nowMs);
      if (t === null) continue;
      this.points.push({ t, values: this.columns.map((c) => numeric(row[c])) });
    }
    const newest = this.points.at(-1)?.t ?? 0;
    const first = this.points.findIndex((p) => p.t > newest - WINDOW_S);
    if (first > 0) this.points.splice(0, first);
  }

  /** @returns {Aligned} */
  data() {
    return [this.points.map((p) => p.t), ...this.columns.map((_, i) => this.points.map((p) => p.values[i]))];
  }
}
