// The reorder hold (consumers/web/src/hold.js), the same cases as tests/unit/test_hold.py.
import assert from "node:assert/strict";
import { test } from "node:test";
import { GroupHolds, Hold } from "../src/hold.js";

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

/**
 * @param {number} gseq @param {number} [epoch] @param {string} [body]
 * @returns {import("../src/group.js").GroupEnvelope}
 */
function groupEnv(gseq, epoch = 0, body = "genuine") {
  return {
    type: "group",
    kind: "group",
    cluster: "c1",
    session: "",
    stream: "records",
    seq: BigInt(gseq),
    ts: 1700000000000000000n,
    epoch: BigInt(epoch),
    body: new TextEncoder().encode(body),
    sig: new Uint8Array(64).fill(115),
  };
}

/** a member's [last gseq, newest epoch] of each group it holds a key of */
class Line {
  /** @param {Record<string, [bigint, bigint]>} groups */
  constructor(groups) {
    this.groups = groups;
  }

  /** @param {string} group @returns {[bigint, bigint] | null} */
  at(group) {
    return this.groups[group] ?? null;
  }
}

const never = () => false;

test("a group batch past a gap is held until the gap fills", async () => {
  const line = new Line({ records: [4n, 0n] });
  const holds = new GroupHolds((g) => line.at(g));
  assert.equal(await holds.take(groupEnv(7), 0), "held");
  assert.equal(await holds.take(groupEnv(6), 500), "held");
  assert.equal(await holds.take(groupEnv(7), 600), "held"); // a copy of one held: kept once
  assert.equal(holds.next(never, 1000), null); // 5 is missing and there is time
  assert.equal(holds.deadline(never), 2000);
  assert.equal(await holds.take(groupEnv(5), 1000), "open");
  line.groups.records = [5n, 0n];
  assert.equal(holds.next(never, 1000)?.seq, 6n);
  line.groups.records = [6n, 0n];
  assert.equal(holds.next(never, 1000)?.seq, 7n);
  assert.equal(holds.next(never, 1000), null);
  assert.equal(holds.deadline(never), null);
});

test("a group batch whose key has not come waits for it", async () => {
  const line = new Line({ records: [4n, 0n] });
  const holds = new GroupHolds((g) => line.at(g));
  assert.equal(await holds.take(groupEnv(5, 1), 0), "waiting");
  assert.equal(holds.next(never, 1000), null); // next in line, but its key is on its way
  line.groups.records = [4n, 1n];
  assert.equal(holds.next(never, 1000)?.epoch, 1n);
});

test("past its time a held group batch goes to the checks", async () => {
  const holds = new GroupHolds(() => [4n, 0n]);
  await holds.take(groupEnv(9), 0);
  await holds.take(groupEnv(5, 3), 0);
  assert.equal(holds.next((g) => g === "records", 100_000), null); // a resume in flight
  holds.holds.get("records")?.extend(10_000);
  assert.equal(holds.next(never, 11_000), null);
  assert.equal(holds.next(never, 12_000)?.seq, 5n);
});

test("group duplicates, and groups without a key", async () => {
  const line = new Line({ records: [4n, 0n] });
  const holds = new GroupHolds((g) => line.at(g));
  assert.equal(await holds.take(groupEnv(5), 0), "open");
  await holds.hold("records").accepted(groupEnv(5));
  line.groups.records = [5n, 0n];
  assert.equal(await holds.take(groupEnv(5), 0), "duplicate");
  assert.equal(await holds.take(groupEnv(5, 0, "forged"), 0), "open"); // refused as replay
  assert.equal(await holds.take(groupEnv(5, 1), 0), "open"); // not the same bytes
  assert.equal(holds.duplicates, 1);
  const other = new GroupHolds((g) => (g === "other" ? [4n, 0n] : null));
  assert.equal(await other.take(groupEnv(50), 0), "open"); // no key of it: the checks skip it
});

test("without a store held group batches go at once", async () => {
  const holds = new GroupHolds(() => [4n, 0n]);
  await holds.take(groupEnv(9), 0);
  holds.stopHolding();
  assert.equal(holds.next(never, 0)?.seq, 9n);
});
