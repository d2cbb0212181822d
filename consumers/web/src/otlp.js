// OTLP rows as lines a person reads (docs/protocol.md, "OpenTelemetry streams"). Python twin:
// consumers/_otlpview.py; the vectors in test/vectors/otlp.json hold both to the same lines.
//
// A row of otlp_traces, otlp_metrics or otlp_logs is one export request: its `otlp` bytes are
// decoded here, in the page, into one line per span, log record or metric data point. The
// decoder is a minimal protobuf wire reader of just the fields shown (about a hundred lines,
// no dependency): a generated or reflective library would add its runtime and the whole
// schema to the bundle for the dozen fields a line shows. Field numbers are opentelemetry-proto
// v1's; unknown fields are skipped, as protobuf does; strings must be UTF-8, as protobuf says.

import { raw } from "./format.js";

/** lines a batch gives at most: a request of thousands of spans must not flood the view */
export const LINES_PER_BATCH = 200;
/** nesting of array and map values shown, deeper ones are … */
const DEPTH = 8;

/** @typedef {"traces" | "metrics" | "logs"} SignalName */
/** @typedef {Record<string, string | bigint>} Line */

/** the streams of the three signals, and what their items are called */
export const SIGNALS = /** @type {Record<string, {signal: SignalName, noun: string}>} */ ({
  otlp_traces: { signal: "traces", noun: "spans" },
  otlp_metrics: { signal: "metrics", noun: "data points" },
  otlp_logs: { signal: "logs", noun: "log records" },
});

export class OtlpError extends Error {}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** @typedef {[number, 0, bigint] | [number, 1 | 2 | 5, Uint8Array]} Field */

/**
 * The fields of one message, in order: [number, wire type, value] where a varint's value is
 * a bigint (its 64 bits) and any other's is its bytes.
 * @param {Uint8Array} b
 * @returns {Generator<Field>}
 */
function* fields(b) {
  const at = { p: 0 };
  while (at.p < b.length) {
    const tag = varint(b, at);
    const number = Number(tag >> 3n);
    const wire = Number(tag & 7n);
    if (number === 0) throw new OtlpError("field number 0");
    if (wire === 0) yield [number, 0, varint(b, at)];
    else if (wire === 1 || wire === 5) yield [number, wire, take(b, at, wire === 1 ? 8 : 4)];
    else if (wire === 2) {
      const n = varint(b, at);
      if (n > BigInt(b.length - at.p)) throw new OtlpError("truncated");
      yield [number, 2, take(b, at, Number(n))];
    } else throw new OtlpError(`wire type ${wire}`); // groups (3, 4): not in OTLP
  }
}

/** @param {Uint8Array} b @param {{p: number}} at */
function varint(b, at) {
  let x = 0n;
  for (let shift = 0n; shift < 70n; shift += 7n) {
    if (at.p >= b.length) throw new OtlpError("truncated");
    const byte = b[at.p++];
    x |= BigInt(byte & 0x7f) << shift;
    if (byte < 0x80) return BigInt.asUintN(64, x);
  }
  throw new OtlpError("varint too long");
}

/** @param {Uint8Array} b @param {{p: number}} at @param {number} n */
function take(b, at, n) {
  if (at.p + n > b.length) throw new OtlpError("truncated");
  at.p += n;
  return b.subarray(at.p - n, at.p);
}

const view = (/** @type {Uint8Array} */ b) => new DataView(b.buffer, b.byteOffset, b.byteLength);

/**
 * One message's fields by number, the last value of each (protobuf: the last one wins), and
 * the repeated ones asked for as lists.
 * @param {Uint8Array} b
 * @param {number[]} [repeated]
 */
function message(b, repeated = []) {
  /** @type {Map<number, Field>} */
  const last = new Map();
  /** @type {Map<number, number>} where each field was last seen */
  const at = new Map();
  /** @type {Map<number, Uint8Array[]>} */
  const lists = new Map(repeated.map((n) => [n, []]));
  let i = 0;
  for (const f of fields(b)) {
    const list = lists.get(f[0]);
    if (list !== undefined) {
      if (f[1] === 2) list.push(f[2]);
    } else last.set(f[0], f);
    at.set(f[0], i++);
  }
  const get = (/** @type {number} */ n, /** @type {number} */ wire) => {
    const f = last.get(n);
    return f !== undefined && f[1] === wire ? f[2] : undefined;
  };
  return {
    has: (/** @type {number} */ n) => last.has(n),
    /** which of two fields came last (a oneof's member set last wins) */
    order: (/** @type {number} */ n) => at.get(n) ?? -1,
    list: (/** @type {number} */ n) => lists.get(n) ?? [],
    bytes: (/** @type {number} */ n) => /** @type {Uint8Array | undefined} */ (get(n, 2)),
    /** @param {number} n */
    string(n) {
      const v = /** @type {Uint8Array | undefined} */ (get(n, 2));
      return v === undefined ? "" : text(v);
    },
    varint: (/** @type {number} */ n) => /** @type {bigint | undefined} */ (get(n, 0)) ?? 0n,
    /** @param {number} n @returns {bigint} */
    fixed64(n) {
      const v = /** @type {Uint8Array | undefined} */ (get(n, 1));
      return v === undefined ? 0n : view(v).getBigUint64(0, true);
    },
    /** @param {number} n @returns {bigint} */
    sfixed64(n) {
      const v = /** @type {Uint8Array | undefined} */ (get(n, 1));
      return v === undefined ? 0n : view(v).getBigInt64(0, true);
    },
    /** @param {number} n @returns {number | undefined} */
    double(n) {
      const v = /** @type {Uint8Array | undefined} */ (get(n, 1));
      return v === undefined ? undefined : view(v).getFloat64(0, true);
    },
  };
}

/** @param {Uint8Array} b */
function text(b) {
  try {
    return utf8.decode(b);
  } catch {
    throw new OtlpError("a string that is not UTF-8");
  }
}

/** a decimal without trailing zeros */
const trim = (/** @type {string} */ d) => (d.includes(".") ? d.replace(/\.?0+$/, "") : d);

/**
 * A number as the views write it: whole when it is, else three significant digits, halves
 * rounded away from zero (as toFixed and toExponential do), no trailing zeros.
 * @param {number} x
 */
export function number(x) {
  if (Number.isNaN(x)) return "NaN";
  if (!Number.isFinite(x)) return x > 0 ? "Inf" : "-Inf";
  const a = Math.abs(x);
  if (Number.isInteger(x) && a < 1e15) return String(x);
  if (a < 0.01 || a >= 1e15) {
    const [mantissa, exponent] = x.toExponential(2).split("e");
    return `${trim(mantissa)}e${Number(exponent)}`;
  }
  return trim(x.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 2));
}

/** @param {Uint8Array} b */
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

/**
 * An attribute value or a log body (AnyValue) as text.
 * @param {Uint8Array | undefined} b
 * @param {number} [depth]
 * @returns {string}
 */
function anyText(b, depth = 0) {
  if (b === undefined) return "";
  let last = "";
  for (const [n, wire, v] of fields(b)) {
    // a oneof: the last member set wins
    if (n === 1 && wire === 2) last = text(v);
    else if (n === 2 && wire === 0) last = v === 0n ? "false" : "true";
    else if (n === 3 && wire === 0) last = BigInt.asIntN(64, v).toString();
    else if (n === 4 && wire === 1) last = number(view(v).getFloat64(0, true));
    else if (n === 7 && wire === 2) last = raw(v);
    else if ((n === 5 || n === 6) && wire === 2) {
      if (depth >= DEPTH) {
        last = "…";
        continue;
      }
      const values = message(v, [1]).list(1);
      if (n === 5) last = `[${values.map((x) => anyText(x, depth + 1)).join(", ")}]`;
      else last = `{${pairs(values, depth + 1)}}`;
    }
  }
  return last;
}

/** KeyValue list: key=value, ... @param {Uint8Array[]} list @param {number} [depth] */
function pairs(list, depth = 0) {
  return list
    .map((kv) => {
      const m = message(kv);
      return `${m.string(1)}=${anyText(m.bytes(2), depth)}`;
    })
    .join(", ");
}

/**
 * A resource's service.name string attributes, distinct, joined by "," (sealstream/otlp.py
 * service_names: the `service` column's rule).
 * @param {Uint8Array | undefined} b
 */
function service(b) {
  if (b === undefined) return "";
  const names = new Set();
  for (const kv of message(b, [1]).list(1)) {
    const m = message(kv);
    const value = m.bytes(2);
    if (m.string(1) !== "service.name" || value === undefined) continue;
    const any = message(value);
    if (any.bytes(1) !== undefined) names.add(any.string(1));
  }
  return [...names].join(",").slice(0, 256);
}

/** OTLP's 0 is "unknown": shown empty, not as 1970 @param {bigint} ns */
const unknown = (ns) => (ns === 0n ? "" : ns);

const KINDS = ["unspecified", "internal", "server", "client", "producer", "consumer"];
const STATUSES = ["unset", "ok", "error"];
const SEVERITIES = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"];
/** an enum's name, or its number @param {string[]} names @param {bigint} v */
const named = (names, v) => names[Number(v)] ?? BigInt.asIntN(32, v).toString();

/** @param {Uint8Array} b @param {string} svc @returns {Line} */
function span(b, svc) {
  const m = message(b);
  const status = message(m.bytes(15) ?? new Uint8Array());
  const code = named(STATUSES, status.varint(3));
  const text = status.string(2);
  const start = m.fixed64(7);
  return {
    time: unknown(start),
    service: svc,
    name: m.string(5),
    kind: named(KINDS, m.varint(6)),
    duration_ns: m.fixed64(8) - start,
    status: text ? `${code}: ${text}` : code,
    trace_id: hex(m.bytes(1) ?? new Uint8Array()),
  };
}

/** @param {bigint} n @param {string} text */
function severity(n, text) {
  if (text || n === 0n) return text;
  if (n > BigInt(4 * SEVERITIES.length)) return BigInt.asIntN(32, n).toString();
  const i = Number(n) - 1;
  return SEVERITIES[Math.floor(i / 4)] + (i % 4 ? String((i % 4) + 1) : "");
}

/** @param {Uint8Array} b @param {string} svc @returns {Line} */
function log(b, svc) {
  const m = message(b);
  const time = m.fixed64(1);
  return {
    time: unknown(time || m.fixed64(11)),
    severity: severity(m.varint(2), m.string(3)),
    body: anyText(m.bytes(5)),
    service: svc,
  };
}

/** a metric's data field and its type @type {[number, string][]} */
const METRIC_TYPES = [
  [5, "gauge"],
  [7, "sum"],
  [9, "histogram"],
  [10, "exponential_histogram"],
  [11, "summary"],
];

/** the metric's type and data (the last of the oneof) @param {ReturnType<typeof message>} m */
function metricData(m) {
  /** @type {[string, Uint8Array, number] | null} */
  let data = null;
  for (const [n, type] of METRIC_TYPES) {
    const b = m.bytes(n);
    if (b !== undefined && (data === null || m.order(n) > m.order(data[2]))) data = [type, b, n];
  }
  return data;
}

/**
 * A histogram's or summary's data point in one line.
 * @param {ReturnType<typeof message>} p
 * @param {string} type
 */
function summary(p, type) {
  const parts = [`count ${p.fixed64(4)}`];
  const sum = p.double(5);
  if (sum !== undefined || type !== "histogram") parts.push(`sum ${number(sum ?? 0)}`);
  if (type === "summary") {
    for (const q of p.list(6)) {
      const vq = message(q);
      parts.push(`p${number((vq.double(1) ?? 0) * 100)} ${number(vq.double(2) ?? 0)}`);
    }
    return parts.join(" · ");
  }
  const [min, max] = type === "histogram" ? [11, 12] : [12, 13];
  if (type === "exponential_histogram") {
    const z = Number(BigInt.asUintN(32, p.varint(6)));
    parts.push(`scale ${(z >>> 1) ^ -(z & 1)}`);
  }
  for (const [name, n] of /** @type {[string, number][]} */ ([
    ["min", min],
    ["max", max],
  ])) {
    const v = p.double(n);
    if (v !== undefined) parts.push(`${name} ${number(v)}`);
  }
  return parts.join(" · ");
}

/** attributes field of each data point type @type {Record<string, number>} */
const POINT_ATTRIBUTES = {
  gauge: 7,
  sum: 7,
  histogram: 9,
  exponential_histogram: 1,
  summary: 7,
};

/**
 * @param {Uint8Array} b
 * @param {string} svc
 * @param {number} room lines still wanted
 * @returns {{lines: Line[], items: number}}
 */
function points(b, svc, room) {
  const m = message(b);
  const data = metricData(m);
  if (data === null) return { lines: [], items: 0 };
  const [type, body] = data;
  const list = message(body, [1]).list(1);
  const lines = list.slice(0, Math.max(room, 0)).map((pb) => {
    const attributes = POINT_ATTRIBUTES[type];
    const p = message(pb, type === "summary" ? [attributes, 6] : [attributes]);
    let value;
    if (type === "gauge" || type === "sum") {
      const int = p.has(6) ? p.sfixed64(6) : undefined;
      const double = p.double(4);
      const intLast = int !== undefined && (double === undefined || p.order(6) > p.order(4));
      value = intLast ? String(int) : double !== undefined ? number(double) : "";
    } else value = summary(p, type);
    return {
      time: unknown(p.fixed64(3)),
      service: svc,
      name: m.string(1),
      type,
      value,
      unit: m.string(3),
      attributes: pairs(p.list(attributes)),
    };
  });
  return { lines, items: list.length };
}

/**
 * Each resource group's service and its items' bytes.
 * @param {SignalName} signal
 * @param {Uint8Array} request
 * @returns {Generator<[string, Uint8Array]>}
 */
function* items(signal, request) {
  for (const group of message(request, [1]).list(1)) {
    const g = message(group, [2]);
    const svc = service(g.bytes(1));
    for (const scope of g.list(2)) {
      for (const item of message(scope, [2]).list(2)) yield [svc, item];
    }
  }
}

/**
 * The lines of a batch's rows, in order, at most `limit`, and how many items they hold; a row
 * whose `otlp` is not bytes of the signal's export request is counted as undecodable, with
 * the reason.
 * @param {SignalName} signal
 * @param {Record<string, unknown>[]} rows
 * @param {number} [limit]
 */
export function expand(signal, rows, limit = LINES_PER_BATCH) {
  const out = { lines: /** @type {Line[]} */ ([]), items: 0, undecodable: 0, reason: "" };
  for (const row of rows) {
    const otlp = row.otlp;
    if (!(otlp instanceof Uint8Array)) {
      out.undecodable += 1;
      out.reason = "no otlp bytes";
      continue;
    }
    try {
      const lines = [];
      let count = 0;
      for (const [svc, item] of items(signal, otlp)) {
        const room = limit - out.lines.length - lines.length;
        if (signal === "metrics") {
          const got = points(item, svc, room);
          lines.push(...got.lines);
          count += got.items;
        } else {
          if (room > 0) lines.push(signal === "traces" ? span(item, svc) : log(item, svc));
          count += 1;
        }
      }
      out.lines.push(...lines);
      out.items += count;
    } catch (err) {
      if (!(err instanceof OtlpError)) throw err;
      out.undecodable += 1;
      out.reason = err.message;
    }
  }
  return out;
}
