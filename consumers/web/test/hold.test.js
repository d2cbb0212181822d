// The reorder hold (consumers/web/src/hold.js), the same cases as tests/unit/test_hold.py.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Hold } from "../src/hold.js";

const SESSION = `-${"A".repeat(42)}`; // a session id may start with "-"

/** @param {number} seq @param {string} [body] @returns {import("../src/wire.js").Envelope} */
function env(seq, body = "genuine") {
  return {
    type: "envelope",
    kind: "data",
    cluster: "c1",
    session: SESSION,
    stream: "records",
    seq: BigInt(seq),
    ts: 1700000000000000000n,
    body: new TextEncoder().encode(body),
  };
}

/** @param {Hold} hold @param {bigint} last @param {number} now */
function drain(hold, last, now) {
  const out = [];
  for (let e = hold.next(last, now); e !== null; e = hold.next(last, now)) {
    out.push(e);
    if (e.seq > last) last = e.seq;
  }
  return out;
}

test("held envelopes wait for the gap, then go in order", () => {
  const hold = new Hold({ holdMs: 2000 });
  hold.add(env(3), 10_000);
  hold.add(env(2), 10_500);
  assert.equal(hold.next(0n, 11_000), null); // seq 1 is missing, and there is time
  assert.equal(hold.deadline, 12_000);
  assert.deepEqual(
    drain(hold, 1n, 11_000).map((e) => e.seq),
    [2n, 3n],
  );
  assert.equal(hold.deadline, null);
});

test("past its time the lowest goes with its gap; an answer gives more time", () => {
  const hold = new Hold({ holdMs: 2000 });
  hold.add(env(5), 10_000);
  hold.extend(11_000);
  assert.equal(hold.next(0n, 12_500), null);
  assert.deepEqual(
    drain(hold, 0n, 13_000).map((e) => e.seq),
    [5n],
  );
});

test("over its bounds the lowest goes at once", () => {
  const hold = new Hold({ maxCount: 2 });
  for (const seq of [4, 5, 6]) hold.add(env(seq), 0);
  assert.deepEqual(
    drain(hold, 0n, 0).map((e) => e.seq),
    [4n, 5n, 6n],
  );
});

test("a forged envelope cannot displace the genuine one", () => {
  const hold = new Hold();
  hold.add(env(2, "forged"), 0);
  hold.add(env(2), 0);
  hold.add(env(2), 0); // a byte-identical copy: dropped
  assert.equal(hold.duplicates, 1);
  assert.deepEqual(
    drain(hold, 1n, 0).map((e) => new TextDecoder().decode(e.body)),
    ["forged", "genuine"],
  );
});

test("a copy of an accepted envelope is a duplicate, nothing else is", async () => {
  const hold = new Hold({ remember: 2 });
  for (const seq of [0, 1, 2]) await hold.accepted(env(seq));
  assert.equal(await hold.duplicate(env(2)), true);
  assert.equal(await hold.duplicate(env(2, "forged")), false);
  assert.equal(await hold.duplicate(env(0)), false); // forgotten: the session refuses it
  assert.equal(hold.duplicates, 1);
});

test("while a replay is asked for, the hold waits for its answer", () => {
  const hold = new Hold({ holdMs: 2000 });
  hold.add(env(5), 10_000);
  hold.waiting = true;
  assert.equal(hold.deadline, null);
  assert.equal(hold.next(0n, 100_000), null);
  hold.waiting = false;
  hold.extend(100_000);
  assert.equal(hold.next(0n, 101_000), null);
  assert.equal(hold.next(0n, 102_000)?.seq, 5n);
});
