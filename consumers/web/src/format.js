// How a decrypted value reads in a cell, by its column's name: times in local time with ms,
// durations in ns/µs/ms/s, sizes in B/KiB/MiB/GiB, rates per second, percentages. Python twin:
// consumers/_view.py (the rich table applies the same rules).

/** @typedef {"time" | "duration" | "size" | "rate" | "percent" | "plain"} Kind */

/**
 * What a column holds, read from its name (the sources' conventions: `time_` in unix ns,
 * `*_ns` durations, `*_size`, `*bytes*` and `mem_total`/`mem_available` sizes, `*_rate` bytes
 * per second, `*_percent`).
 * @param {string} column
 * @returns {Kind}
 */
export function kindOf(column) {
  if (/^time_?$|^ts$|_time$/.test(column)) return "time";
  if (/_ns$/.test(column)) return "duration";
  if (/_rate$/.test(column)) return "rate";
  if (/_size$|(^|_)bytes(_|$)|^mem_(total|available)$/.test(column)) return "size";
  if (/_percent$/.test(column)) return "percent";
  return "plain";
}

/** @param {unknown} v @returns {number | null} a finite number, or null */
export function numeric(v) {
  if (typeof v === "bigint") return Number(v);
  if (typeof v === "number" && Number.isFinite(v)) return v;
  return null;
}

/** @param {number} x a magnitude, three significant digits at most */
function short(x) {
  const a = Math.abs(x);
  return a >= 100 || Number.isInteger(x) ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : x.toFixed(2);
}

/** @param {number} ns @returns {string} */
export function duration(ns) {
  const a = Math.abs(ns);
  if (a < 1e3) return `${short(ns)} ns`;
  if (a < 1e6) return `${short(ns / 1e3)} µs`;
  if (a < 1e9) return `${short(ns / 1e6)} ms`;
  return `${short(ns / 1e9)} s`;
}

const SIZE_UNITS = ["KiB", "MiB", "GiB", "TiB"];

/** @param {number} bytes @returns {string} */
export function size(bytes) {
  if (Math.abs(bytes) < 1024) return `${bytes.toFixed(0)} B`;
  let x = bytes;
  let unit = "B";
  for (const u of SIZE_UNITS) {
    if (Math.abs(x) < 1024) break;
    x /= 1024;
    unit = u;
  }
  return `${short(x)} ${unit}`;
}

/**
 * Unix time in ms from seconds, ms, µs or ns (told apart by magnitude: 1e11 s is year 5138).
 * @param {number | bigint} t
 * @returns {number}
 */
export function epochMs(t) {
  if (typeof t === "bigint") {
    // exact to the ns: a float holds unix ns to about 256 ns only
    const big = t >= 10n ** 17n || t <= -(10n ** 17n);
    return big ? Number(t / 1_000_000n) + Number(t % 1_000_000n) / 1e6 : epochMs(Number(t));
  }
  const a = Math.abs(t);
  return a >= 1e17 ? t / 1e6 : a >= 1e14 ? t / 1e3 : a >= 1e11 ? t : t * 1e3;
}

const pad = (/** @type {number} */ n, w = 2) => String(n).padStart(w, "0");

/**
 * Local time with milliseconds, the date in front when it is not today's.
 * @param {number} ms unix ms
 * @param {Date} [today]
 */
export function clock(ms, today = new Date()) {
  const d = new Date(ms);
  const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const time = `${hms}.${pad(d.getMilliseconds(), 3)}`;
  if (d.toDateString() === today.toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

/** a bytes value shows its first bytes, then `…` (as consumers/_otlpview.py) */
export const BYTES_SHOWN = 96;

/**
 * The first BYTES_SHOWN bytes in base64: cut before encoding, as a table renders every 250 ms.
 * @param {Uint8Array} b
 */
function base64(b) {
  const shown = btoa(String.fromCharCode(...b.subarray(0, BYTES_SHOWN)));
  return b.length > BYTES_SHOWN ? `${shown}…` : shown;
}

/**
 * Any decoded value as text (bigints exactly, bytes as base64 of their first BYTES_SHOWN,
 * maps and arrays as JSON).
 * @param {unknown} v
 * @returns {string}
 */
export function raw(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "bigint") return v.toString();
  if (v instanceof Uint8Array) return base64(v);
  if (typeof v === "object") {
    return JSON.stringify(v, (_k, x) =>
      typeof x === "bigint" ? x.toString() : x instanceof Uint8Array ? base64(x) : x,
    );
  }
  return String(v);
}

/**
 * A value as its column reads: formatted when the column's kind and the value's type agree,
 * else its raw text (a string in a `time_` column stays that string).
 * @param {string} column
 * @param {unknown} v
 * @returns {string}
 */
export function formatCell(column, v) {
  const x = numeric(v);
  if (x === null) return raw(v);
  switch (kindOf(column)) {
    case "time":
      return clock(epochMs(typeof v === "bigint" ? v : x));
    case "duration":
      return duration(x);
    case "size":
      return size(x);
    case "rate":
      return `${size(x)}/s`;
    case "percent":
      return `${x.toFixed(1)} %`;
    default:
      return typeof v === "number" && !Number.isInteger(v) ? v.toFixed(2) : raw(v);
  }
}
