// The subscription's verification queue and key deadline (src/client.js), driven without a
// broker: a session stand-in refuses every inbox message as a key envelope signed by a key
// the page does not pin, as a relay's forgeries are.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Subscription, TrustError } from "../src/client.js";
import { consumerKey, importPrivateKey } from "../src/crypto.js";
import { GroupMember } from "../src/group.js";
import { GroupHolds } from "../src/hold.js";
import { groupCases, payloadOf, trustOf } from "./vectors/load.js";

/** A relay's forged key envelopes: each one refused as untrusted_key, one at a time. */
class ForgedKeys {
  constructor() {
    this.cluster = "c1";
    this.session = "-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA_";
    this.keyed = false;
    /** @type {Record<string, number>} */
    this.rejected = {};
    this.verified = 0;
    /** called after each verification (the relay sends on) */
    this.then = () => {};
  }

  /** @template T @param {() => T} step */
  async guard(step) {
    return step();
  }

  /** every message parses as a key envelope (not yet opened) */
  parse() {
    return { type: "envelope", kind: "key" };
  }

  /** opening it refuses it, as a key signed by a key not pinned */
  async acceptItem() {
    await new Promise((resolve) => setImmediate(resolve)); // an RSA decrypt takes time
    this.verified += 1;
    this.rejected.untrusted_key = (this.rejected.untrusted_key ?? 0) + 1;
    this.then();
    return null;
  }
}

/** @param {ForgedKeys} session */
function subscription(session) {
  /** @type {Error[]} */
  const errors = [];
  const sub = new Subscription({
    natsUrl: "ws://127.0.0.1:1",
    token: () => "t",
    cluster: session.cluster,
    streams: ["http_events"],
    trust: {},
    onError: (err) => errors.push(err),
  });
  sub.session = /** @type {any} */ (session);
  return { sub, errors };
}

test("a flood of forged key envelopes ends in the trust error at the key deadline", async () => {
  const forged = new ForgedKeys();
  const { sub, errors } = subscription(forged);
  const message = new Uint8Array([1]);
  for (let i = 0; i < 5; i++) sub.onMessage(/** @type {any} */ (forged), message);
  sub.keyDue(/** @type {any} */ (forged));
  // the relay keeps the queue full: one more forgery for each one verified, up to 1,000
  forged.then = () => {
    if (sub.received < 1000) sub.onMessage(/** @type {any} */ (forged), message);
  };
  await sub.chain;
  while (sub.pending > 0) await sub.chain;
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof TrustError, String(errors[0]));
  // only the messages received by the deadline were verified, then the error
  assert.equal(forged.verified, 5);
});

test("before the key deadline forged key envelopes are only counted", async () => {
  const forged = new ForgedKeys();
  const { sub, errors } = subscription(forged);
  for (let i = 0; i < 3; i++) sub.onMessage(/** @type {any} */ (forged), new Uint8Array([1]));
  await sub.chain;
  assert.equal(forged.verified, 3);
  assert.deepEqual(errors, []);
  // the deadline with nothing queued: the error at once
  sub.keyDue(/** @type {any} */ (forged));
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof TrustError);
});

test("with a store, a member's batches past a gap or ahead of their key wait, then open in order", async () => {
  // real key envelopes and batches, sealed by the Python GroupSealer: 9 epochs of one group
  const c = groupCases.find((x) => x.name === "group keys kept for batches replayed after rotations");
  assert.ok(c !== undefined);
  const priv = await importPrivateKey(c.key.kind, c.key.private_jwk);
  const key = await consumerKey(c.key.kind, c.key.public_jwk, priv);
  const member = new GroupMember(key, {
    cluster: c.cluster,
    streams: c.streams,
    trust: await trustOf(c.trust),
    policy: "fail", // a batch opened out of order or before its key would end it
  });
  const keys = c.steps.slice(0, 9).map(payloadOf); // epochs 0..8
  const batches = c.steps.slice(9).map(payloadOf); // gseq 0..8, batch i under epoch i
  /** @type {bigint[]} */
  const opened = [];
  /** @type {Error[]} */
  const errors = [];
  const sub = new Subscription({
    natsUrl: "ws://127.0.0.1:1",
    token: () => "t",
    cluster: c.cluster,
    streams: c.streams,
    trust: {},
    onBatch: (b) => opened.push(b.seq),
    onError: (err) => errors.push(err),
  });
  // as startSession leaves it for a session whose open said "store": true
  sub.session = /** @type {any} */ (member);
  sub.store = true;
  sub.groupHolds = new GroupHolds((g) => member.line(g));
  const feed = async (/** @type {Uint8Array[]} */ ...payloads) => {
    for (const p of payloads) sub.onMessage(/** @type {any} */ (member), p);
    await sub.chain;
  };
  await feed(keys[0], keys[1], batches[1]); // gseq 1 past the gap before it: held
  assert.deepEqual(opened, []);
  await feed(batches[0]); // the gap fills: 0, then 1 from the hold
  assert.deepEqual(opened, [0n, 1n]);
  await feed(batches[3], batches[2]); // 3 past a gap, 2 next but its key (epoch 2) not here
  assert.deepEqual(opened, [0n, 1n]);
  await feed(keys[2]); // epoch 2's key: 2 opens, 3 waits for epoch 3's
  assert.deepEqual(opened, [0n, 1n, 2n]);
  await feed(keys[3]);
  assert.deepEqual(opened, [0n, 1n, 2n, 3n]);
  assert.deepEqual(member.rejected, {});
  assert.deepEqual(errors, []);
  clearTimeout(sub.holdTimer);
});
