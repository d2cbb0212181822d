// Cross-language vectors: sessions sealed by the Python ProducerSession, judged by the Python
// ConsumerSession (tests/support/matrix.py, committed in test/vectors/sessions.json); the
// JavaScript session must reach the same verdict and the same rejection reason at every step.
import assert from "node:assert/strict";
import { test } from "node:test";
import { consumerKey, importPrivateKey } from "../src/crypto.js";
import { ConsumerSession, IntegrityError } from "../src/session.js";
import { payloadOf, plain, sessionCases, trustOf } from "./vectors/load.js";

const vectors = { cases: sessionCases };

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
      const result = await session.accept(payloadOf(step));
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
  const payloads = c.steps.map(payloadOf);
  assert.equal(await session.accept(payloads[0]), null);
  assert.equal((await session.accept(payloads[1]))?.type, "batch");
  await assert.rejects(session.accept(payloads[2]), (err) => {
    assert.ok(err instanceof IntegrityError);
    assert.equal(err.message, "envelope rejected");
    return true;
  });
  assert.deepEqual({ ...session.rejected }, { replay: 1 });
});
