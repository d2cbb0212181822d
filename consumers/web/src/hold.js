// The reorder hold, twin of consumers/_hold.py (docs/protocol.md, "Lossless delivery"):
// envelopes that arrived ahead of a gap wait here, by seq, until the missing ones come (a
// replay, another proxy's relay) or the hold's time runs out; then they go to the session's
// strict seq check in order. Pure: time is a parameter (milliseconds).

/** @typedef {import("./group.js").GroupEnvelope} GroupEnvelope */
/** a session's envelope, or a group batch (by gseq) @typedef {import("./wire.js").Envelope | GroupEnvelope} Envelope */

/**
 * `add` envelopes whose seq is past a gap; `next` gives the one to open now, if any: the
 * lowest held, once it follows the last accepted seq, or once the hold is past its time
 * (`holdMs` from the first held envelope, or from the last `extend`) or over its bounds. Two
 * different envelopes for one seq are both kept, in order of arrival (a forged one cannot
 * displace the genuine one); a byte-identical copy of one held, or of one of the last
 * `remember` accepted (a store's replay overlaps the live stream), is dropped and counted in
 * `duplicates`.
 */
export class Hold {
  /** @param {{holdMs?: number, maxCount?: number, maxBytes?: number, remember?: number}} [o] */
  constructor(o = {}) {
    this.holdMs = o.holdMs ?? 2000;
    this.maxCount = o.maxCount ?? 1024;
    this.maxBytes = o.maxBytes ?? 16 * 1024 * 1024;
    this.remember = o.remember ?? 4096;
    /** @type {Map<bigint, Envelope[]>} */
    this.bySeq = new Map();
    this.count = 0;
    this.size = 0;
    this.duplicates = 0;
    /** @type {number | null} */
    this.since = null;
    /** a replay was asked for and not answered yet: the hold's time does not run out */
    this.waiting = false;
    /** seq (as text) -> digest of the accepted envelope @type {Map<string, string>} */
    this.acceptedDigests = new Map();
  }

  /** @param {Envelope} env @param {number} now */
  add(env, now) {
    const held = this.bySeq.get(env.seq) ?? [];
    if (held.some((h) => same(h, env))) {
      this.duplicates += 1;
      return;
    }
    held.push(env);
    this.bySeq.set(env.seq, held);
    this.count += 1;
    this.size += env.body.length;
    if (this.since === null) this.since = now;
  }

  /** A replay was answered: what it brought may still be on its way. @param {number} now */
  extend(now) {
    if (this.since !== null) this.since = Math.max(this.since, now);
  }

  /** @returns {number | null} when the lowest held goes to the check whatever came */
  get deadline() {
    return this.since === null || this.waiting ? null : this.since + this.holdMs;
  }

  /**
   * The envelope to open now after `last` (the last accepted seq), or null; with `ready`,
   * the lowest that follows `last` waits too until `ready` says it may go (a group batch
   * whose key is on its way).
   * @param {bigint} last
   * @param {number} now
   * @param {(env: Envelope) => boolean} [ready]
   * @returns {Envelope | null}
   */
  next(last, now, ready) {
    if (this.count === 0) return null;
    let seq = -1n;
    for (const s of this.bySeq.keys()) if (seq < 0n || s < seq) seq = s;
    const due = this.deadline;
    const lowest = /** @type {Envelope[]} */ (this.bySeq.get(seq))[0];
    const waits = seq > last + 1n || (ready !== undefined && !ready(lowest));
    if (
      waits &&
      this.count <= this.maxCount &&
      this.size <= this.maxBytes &&
      (due === null || now < due)
    ) {
      return null;
    }
    const held = /** @type {Envelope[]} */ (this.bySeq.get(seq));
    const env = /** @type {Envelope} */ (held.shift());
    if (held.length === 0) this.bySeq.delete(seq);
    this.count -= 1;
    this.size -= env.body.length;
    if (this.count === 0) this.since = null;
    return env;
  }

  /** `env` passed the session's checks: a later copy of it is a duplicate. @param {Envelope} env */
  async accepted(env) {
    this.acceptedDigests.set(env.seq.toString(), await digest(env));
    while (this.acceptedDigests.size > this.remember) {
      const oldest = this.acceptedDigests.keys().next().value;
      if (oldest === undefined) break;
      this.acceptedDigests.delete(oldest);
    }
  }

  /** True (and counted) if `env` is byte for byte one accepted lately. @param {Envelope} env */
  async duplicate(env) {
    const known = this.acceptedDigests.get(env.seq.toString());
    if (known !== undefined && known === (await digest(env))) {
      this.duplicates += 1;
      return true;
    }
    return false;
  }
}

/** @param {Envelope} a @param {Envelope} b */
function same(a, b) {
  return (
    a.kind === b.kind &&
    a.cluster === b.cluster &&
    a.session === b.session &&
    a.stream === b.stream &&
    a.seq === b.seq &&
    a.ts === b.ts &&
    sameBytes(a.body, b.body) &&
    groupPart(a) === groupPart(b)
  );
}

/** @param {Uint8Array} a @param {Uint8Array} b */
const sameBytes = (a, b) => a.length === b.length && a.every((byte, i) => byte === b[i]);

/**
 * A group batch's epoch and signature, as text (empty for a session's envelope).
 * @param {Envelope} env
 */
function groupPart(env) {
  if (env.type !== "group") return "";
  const g = env;
  return `${g.epoch}:${Array.from(g.sig, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** @param {Envelope} env @returns {Promise<string>} */
async function digest(env) {
  const fields = new TextEncoder().encode(
    JSON.stringify([
      ...[env.kind, env.cluster, env.session, env.stream, `${env.seq}`, `${env.ts}`],
      groupPart(env),
    ]),
  );
  const data = new Uint8Array(fields.length + 1 + env.body.length);
  data.set(fields);
  data.set(env.body, fields.length + 1);
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return Array.from(hash, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * A group member's holds, one per group, by gseq (twin of consumers/_hold.py GroupHolds):
 * a batch past a gap of its group waits, and so does the next one while its epoch's key is
 * not installed yet. `line(group)` is the member's [last gseq, newest epoch] of a group,
 * null before its first key (its batches are then skipped by the checks, never held).
 */
export class GroupHolds {
  /** @param {(group: string) => [bigint, bigint] | null} line */
  constructor(line) {
    this.line = line;
    /** @type {Map<string, Hold>} */
    this.holds = new Map();
    /** nothing will fill a gap: the deployment keeps no store */
    this.noStore = false;
  }

  get duplicates() {
    let n = 0;
    for (const hold of this.holds.values()) n += hold.duplicates;
    return n;
  }

  /** @param {string} group */
  hold(group) {
    let hold = this.holds.get(group);
    if (hold === undefined) {
      hold = new Hold({ holdMs: this.noStore ? 0 : 2000 });
      this.holds.set(group, hold);
    }
    return hold;
  }

  /**
   * What to do with a batch that just arrived: "open" it now, it is "held" (past a gap: ask
   * its group's resume), "waiting" for its key, or a "duplicate".
   * @param {GroupEnvelope} env
   * @param {number} now
   * @returns {Promise<"open" | "held" | "waiting" | "duplicate">}
   */
  async take(env, now) {
    const line = this.line(env.stream);
    if (line === null) return "open";
    const [last, epoch] = line;
    const hold = this.hold(env.stream);
    if (env.seq <= last) return (await hold.duplicate(env)) ? "duplicate" : "open";
    if (env.seq > last + 1n) {
      hold.add(env, now);
      return "held";
    }
    if (env.epoch > epoch) {
      hold.add(env, now);
      return "waiting";
    }
    return "open";
  }

  /** No store: nothing will fill a gap, release at once. */
  stopHolding() {
    this.noStore = true;
    for (const hold of this.holds.values()) hold.holdMs = 0;
  }

  /**
   * The earliest time a held batch goes to the checks whatever came.
   * @param {(group: string) => boolean} waiting a group's resume is in flight
   * @returns {number | null}
   */
  deadline(waiting) {
    /** @type {number | null} */
    let due = null;
    for (const [group, hold] of this.holds) {
      hold.waiting = waiting(group);
      const at = hold.deadline;
      if (at !== null && (due === null || at < due)) due = at;
    }
    return due;
  }

  /**
   * A held batch to open now, if any.
   * @param {(group: string) => boolean} waiting
   * @param {number} now
   * @returns {GroupEnvelope | null}
   */
  next(waiting, now) {
    for (const [group, hold] of this.holds) {
      const line = this.line(group);
      if (hold.count === 0 || line === null) continue;
      const [last, epoch] = line;
      hold.waiting = waiting(group);
      const env = hold.next(last, now, (e) => /** @type {GroupEnvelope} */ (e).epoch <= epoch);
      if (env !== null) return /** @type {GroupEnvelope} */ (env);
    }
    return null;
  }
}
