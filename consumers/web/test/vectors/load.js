// The committed cross-language vectors (written by `python -m tests.support.vectors` from the
// tamper matrices in tests/support/; tests/web/test_vectors.py checks they are current) and
// the helpers both vector tests share.
import { readFileSync } from "node:fs";
import { inflateSync } from "node:zlib";
import { thumbprint } from "../../src/crypto.js";

/** @param {string} name */
const load = (name) => JSON.parse(readFileSync(new URL(name, import.meta.url), "utf-8"));

/** Session and per-message cases (tests/support/matrix.py). */
export const sessionCases = load("./sessions.json");
/** Group-mode cases (tests/support/group_matrix.py). */
export const groupCases = load("./groups.json");

/** A step's payload: base64, or deflated then base64 when large. */
export function payloadOf(step) {
  if (step.payload_deflated !== undefined) {
    return new Uint8Array(inflateSync(Buffer.from(step.payload_deflated, "base64")));
  }
  return new Uint8Array(Buffer.from(step.payload, "base64"));
}

/** Rows as the vectors write them: ints as {int: decimal}, floats as {float: repr}, bin as base64. */
export function plain(v) {
  if (v === null || typeof v === "string" || typeof v === "boolean") return v;
  if (typeof v === "bigint") return { int: v.toString() };
  if (typeof v === "number") {
    return Number.isInteger(v) ? { int: String(v) } : { float: String(v) };
  }
  if (v instanceof Uint8Array) return { bin: Buffer.from(v).toString("base64") };
  if (Array.isArray(v)) return v.map(plain);
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
}

/** A case's trusted cluster keys, by cluster and thumbprint. */
export async function trustOf(trust) {
  const out = {};
  for (const [cluster, jwks] of Object.entries(trust)) {
    out[cluster] = {};
    for (const jwk of jwks) out[cluster][await thumbprint(jwk)] = jwk;
  }
  return out;
}
