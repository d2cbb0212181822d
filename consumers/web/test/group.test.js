// Cross-language vectors of group mode: group keys and batches sealed by the Python
// GroupSealer, judged by the Python GroupMember (tests/support/group_matrix.py, committed in
// test/vectors/groups.json); the JavaScript member must reach the same verdict and the same
// rejection reason at every step.
import assert from "node:assert/strict";
import { test } from "node:test";
import { consumerKey, importPrivateKey } from "../src/crypto.js";
import { GroupMember } from "../src/group.js";
import { ConsumerSession, IntegrityError } from "../src/session.js";
import { groupCases as cases, payloadOf, plain, trustOf } from "./vectors/load.js";

async function memberFor(c, policy) {
  const priv = await importPrivateKey(c.key.kind, c.key.private_jwk);
  const key = await consumerKey(c.key.kind, c.key.public_jwk, priv);
  assert.equal(key.sessionId, c.key.session_id, "thumbprint");
  const trust = await trustOf(c.trust);
  const member = new GroupMember(key, { cluster: c.cluster, streams: c.streams, trust, policy });
  if (c.previous) {
    // the subscription's session that ended, carried into this one (its steps all accepted)
    const ended = await memberFor({ ...c, ...c.previous, previous: undefined }, policy);
    for (const step of c.previous.steps) await ended.accept(payloadOf(step));
    assert.deepEqual(ended.rejected, {});
    member.carry(ended);
  }
  return member;
}

test("the group vectors cover the group checks", () => {
  assert.ok(cases.length >= 10, `${cases.length} cases`);
  const reasons = new Set(cases.flatMap((c) => c.steps.map((s) => s.reason)));
  for (const r of [
    "bad_signature",
    "not_member",
    "unknown_kid",
    "wrong_mode",
    "header_mismatch",
    "replay",
    "untrusted_key",
  ]) {
    assert.ok(reasons.has(r), r);
  }
  assert.ok(cases.some((c) => c.steps.some((s) => s.expect === "skip")));
  assert.ok(cases.some((c) => c.previous), "a member's next session");
});

for (const c of cases) {
  test(c.name, async () => {
    // policy "fail" where the case says so: an untrusted key envelope must not throw
    const member = await memberFor(c, c.policy ?? "discard");
    for (const [i, step] of c.steps.entries()) {
      const before = { ...member.rejected };
      const skipped = member.skipped;
      const result = await member.accept(payloadOf(step));
      const grew = Object.keys(member.rejected).filter(
        (k) => member.rejected[k] !== (before[k] ?? 0),
      );
      const at = `step ${i} (${step.expect} ${step.reason ?? ""})`;
      if (step.expect === "reject") {
        assert.deepEqual(grew, [step.reason], at);
        assert.equal(result, null, at);
        continue;
      }
      assert.deepEqual(grew, [], `${at}: rejected ${JSON.stringify(member.rejected)}`);
      if (step.expect === "skip") {
        assert.equal(result, null, at);
        assert.equal(member.skipped, skipped + 1, at);
      } else if (step.expect === "key") {
        assert.equal(result, null, at);
        const epochs = Object.fromEntries(
          [...member.groups].map(([g, s]) => [g, s.epoch.toString()]),
        );
        assert.deepEqual(epochs, step.epochs, at);
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
      }
    }
    const f = c.final;
    assert.equal(member.accepted, f.accepted);
    assert.equal(member.gaps, f.gaps);
    assert.equal(member.lost.toString(), f.lost);
    assert.equal(member.skipped, f.skipped);
    assert.equal(member.ended, f.ended);
    assert.deepEqual({ ...member.rejected }, f.rejected);
  });
}

test("policy fail throws the one opaque error in group mode", async () => {
  const c = cases.find((x) => x.name === "group member forging");
  const member = await memberFor(c, "fail");
  assert.equal(await member.accept(payloadOf(c.steps[0])), null);
  assert.equal((await member.accept(payloadOf(c.steps[1])))?.type, "batch");
  await assert.rejects(member.accept(payloadOf(c.steps[2])), (err) => {
    assert.ok(err instanceof IntegrityError);
    assert.equal(err.message, "envelope rejected");
    return true;
  });
  assert.deepEqual({ ...member.rejected }, { bad_signature: 1 });
});

test("a session envelope is decoded once by a group member too", async () => {
  const c = cases.find((x) => x.name === "group member forging");
  const member = await memberFor(c, "discard");
  const session = new ConsumerSession(member.key, { cluster: c.cluster, trust: member.trust });
  /** reads of the payload's length: each decode reads it */
  const reads = (/** @type {{parse(p: Uint8Array): unknown}} */ s) => {
    const payload = payloadOf(c.steps[0]);
    let n = 0;
    const length = payload.length;
    Object.defineProperty(payload, "length", {
      get: () => {
        n += 1;
        return length;
      },
    });
    assert.equal(/** @type {any} */ (s.parse(payload)).type, "envelope");
    return n;
  };
  const once = reads(session);
  assert.ok(once > 0);
  assert.equal(reads(member), once);
});
