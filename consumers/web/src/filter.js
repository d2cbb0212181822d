// The table's text filter: terms separated by spaces, a row shows when every term matches.
//   resp_status>=500   a column compared with a number (= != < <= > >=); units are allowed:
//                      latency_ns>20ms, resp_body_size>=2KiB
//   req_method=POST    a column equal (=) or not (!=) to a text, case-insensitive
//   req_path~orders    a column containing a text
//   checkout           any cell containing the text
// It reads the decoded values and the cells as shown (format.js); nothing leaves the page.

import { formatCell, numeric, raw } from "./format.js";

/** @typedef {(row: Record<string, unknown>) => boolean} RowTest */

const TERM = /^([A-Za-z_][\w.-]*)(>=|<=|!=|==|=|>|<|~)(.*)$/;
const NUMBER = /^(-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*([a-zµ]*)$/i;
const UNITS = /** @type {Record<string, number>} */ ({
  "": 1,
  ns: 1,
  us: 1e3,
  µs: 1e3,
  ms: 1e6,
  s: 1e9,
  b: 1,
  kib: 1024,
  mib: 1024 ** 2,
  gib: 1024 ** 3,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
});

/**
 * A number with an optional unit (in the base unit of its column: ns, bytes), or null.
 * @param {string} text
 */
export function quantity(text) {
  const m = NUMBER.exec(text.trim());
  if (m === null) return null;
  const scale = UNITS[m[2].toLowerCase()];
  return scale === undefined ? null : Number(m[1]) * scale;
}

/** @type {Record<string, (a: number, b: number) => boolean>} */
const COMPARE = {
  "=": (a, b) => a === b,
  "==": (a, b) => a === b,
  "!=": (a, b) => a !== b,
  "<": (a, b) => a < b,
  "<=": (a, b) => a <= b,
  ">": (a, b) => a > b,
  ">=": (a, b) => a >= b,
};

/**
 * @param {string} column @param {string} op @param {string} operand
 * @returns {RowTest}
 */
function term(column, op, operand) {
  const want = operand.toLowerCase();
  if (op === "~") {
    return (row) =>
      column in row &&
      (raw(row[column]).toLowerCase().includes(want) ||
        formatCell(column, row[column]).toLowerCase().includes(want));
  }
  const n = quantity(operand);
  if (n !== null) {
    const cmp = COMPARE[op];
    return (row) => {
      const x = numeric(row[column]);
      return x !== null && cmp(x, n);
    };
  }
  if (op === "=" || op === "==") return (row) => raw(row[column]).toLowerCase() === want;
  if (op === "!=") return (row) => column in row && raw(row[column]).toLowerCase() !== want;
  throw new Error(`'${column}${op}' wants a number (a unit is allowed: 20ms, 2KiB)`);
}

/**
 * The filter for `text`: a row test (null when the text is empty), or throw with a one-line
 * reason for a term it cannot read.
 * @param {string} text
 * @returns {RowTest | null}
 */
export function parseFilter(text) {
  const tests = text
    .trim()
    .split(/\s+/)
    .filter((t) => t !== "")
    .map((t) => {
      const m = TERM.exec(t);
      if (m === null) {
        const want = t.toLowerCase();
        return (/** @type {Record<string, unknown>} */ row) =>
          Object.entries(row).some(
            ([k, v]) =>
              raw(v).toLowerCase().includes(want) || formatCell(k, v).toLowerCase().includes(want),
          );
      }
      const [, column, op, operand] = m;
      if (operand === "") throw new Error(`'${t}' has nothing after '${op}'`);
      return term(column, op, operand);
    });
  if (tests.length === 0) return null;
  return (row) => tests.every((test) => test(row));
}
