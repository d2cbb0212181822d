// Cross-language vectors: sessions sealed by the Python ProducerSession, judged by the Python
// ConsumerSession (tests/support/web_vectors.py); the JavaScript session must reach the same verdict
// and the same rejection reason at every step. SEALSTREAM_VECTORS names the file.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { consumerKey, importPrivateKey, thumbprint } from "../src/crypto.js";
import { ConsumerSession, IntegrityError } from "../src/session.js";

const path = process.env.SEALSTREAM_VECTORS;
if (!path) {
  throw new Error(
    "set SEALSTREAM_VECTORS to a vector file: python -m tests.support.web_vectors build/web-vectors.json",
  );
}
const vectors = JSON.parse(readFileSync(path, "utf-8"));

/** Rows as tests/support/web_vectors.py writes them: ints as {int: decimal}, floats as {float: repr}. */
function plain(v) {
  if (v === null || typeof v === "string" || typeof v === "boolean") return v;
  if (typeof v === "bigint") return { int: v.toString() };
  if (typeof v === "number") {
    return Number.isInteger(v) ? { int: String(v) } : { float: String(v) };
  }
  if (v instanceof Uint8Array) return { bin: Buffer.from(v).toString("base64") };
  if (Array.isArray(v)) return v.map(plain);
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
}

async function trustOf(trust) {
  const out = {};
  for (const [cluster, jwks] of Object.entries(trust)) {
    out[cluster] = {};
    for (const jwk of jwks) out[cluster][await thumbprint(jwk)] = jwk;
  }
  return out;
}

async function sessionFor(c, policy) {
  const priv = await importPrivateKey(c.key.kind, c.key.private_jwk);
  const key = await consumerKey(c.key.kind, c.key.public_jwk, priv);
  assert.equal(key.sessionId, c.key.session_id, "thumbprint");
  return new ConsumerSession(key, {
    cluster: c.cluster,
    trust: await trustOf(c.trust),
    keyMode: c.options.key_mode,
    allowZip: c.options.allow_zip,
    maxPlaintext: c.options.max_plaintext,
    policy,
  });
}

test("the vector file has the whole matrix", () => {
  assert.ok(vectors.cases.length >= 60, `${vectors.cases.length} cases`);
  const reasons = new Set(vectors.cases.flatMap((c) => c.steps.map((s) => s.reason)));
  for (const r of ["replay", "bad_tag", "untrusted_key", "bad_claims", "bad_sig_alg", "bad_alg"]) {
    assert.ok(reasons.has(r), r);
  }
});

for (const c of vectors.cases) {
  test(c.name, async () => {
    // policy "fail" where the case says so: an untrusted key envelope must not throw
    const session = await sessionFor(c, c.options.policy ?? "discard");
    for (const [i, step] of c.steps.entries()) {
      const before = { ...session.rejected };
      const result = await session.accept(new Uint8Array(Buffer.from(step.payload, "base64")));
      const grew = Object.keys(session.rejected).filter(
        (k) => session.rejected[k] !== (before[k] ?? 0),
      );
      const at = `step ${i} (${step.expect} ${step.reason ?? ""})`;
      if (step.expect === "reject") {
        assert.deepEqual(grew, [step.reason], at);
        assert.equal(result, null, at);
        continue;
      }
      assert.deepEqual(grew, [], `${at}: rejected ${JSON.stringify(session.rejected)}`);
      if (step.expect === "key") {
        assert.equal(result, null, at);
        assert.equal(session.epoch.toString(), step.epoch, at);
      } else if (step.expect === "batch") {
        assert.equal(result?.type, "batch", at);
        assert.equal(result.stream, step.stream, at);
        assert.equal(result.seq.toString(), step.seq, at);
        assert.equal(result.ts.toString(), step.ts, at);
        assert.equal(result.lostBefore.toString(), step.lost_before, at);
        assert.deepEqual(plain(result.rows), step.rows, at);
      } else if (step.expect === "end") {
        assert.equal(result?.type, "end", at);
        assert.equal(result.reason, step.reason, at);
      } else if (step.expect === "notice") {
        assert.equal(result?.type, "notice", at);
        assert.equal(result.code, step.code, at);
      }
    }
    const f = c.final;
    assert.equal(session.accepted, f.accepted);
    assert.equal(session.gaps, f.gaps);
    assert.equal(session.lost.toString(), f.lost);
    assert.equal(session.epoch.toString(), f.epoch);
    assert.equal(session.ended, f.ended);
    assert.deepEqual({ ...session.rejected }, f.rejected);
  });
}

test("policy fail throws the one opaque error", async () => {
  const c = vectors.cases.find((x) => x.name === "replay and reorder");
  const session = await sessionFor(c, "fail");
  const payloads = c.steps.map((s) => new Uint8Array(Buffer.from(s.payload, "base64")));
  assert.equal(await session.accept(payloads[0]), null);
  assert.equal((await session.accept(payloads[1]))?.type, "batch");
  await assert.rejects(session.accept(payloads[2]), (err) => {
    assert.ok(err instanceof IntegrityError);
    assert.equal(err.message, "envelope rejected");
    return true;
  });
  assert.deepEqual({ ...session.rejected }, { replay: 1 });
});
