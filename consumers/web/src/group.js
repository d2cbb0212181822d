// A group-mode session on the consumer (docs/protocol.md, "Group mode"): the state machine of
// sealstream/crypto/_group.py GroupMember, check for check. Its own channel carries signed
// group keys and a signed end; group batches (one envelope for every member) are checked
// against the cluster's Ed25519 signature before they are decrypted. Pure logic over
// crypto.js, wire.js and session.js (no network).

import { Rejected, aead, b64uDecode, openDir, parseCompact } from "./crypto.js";
import { ConsumerSession, DEFAULT_MAX_PLAINTEXT, decodeResult } from "./session.js";
import {
  DEFAULT_MAX_ENVELOPE,
  VERSION,
  WireError,
  encodeMap,
  isClusterId,
  isStream,
  wireInt,
} from "./wire.js";

const MAX_U63 = (1n << 63n) - 1n;
const SIG_BYTES = 64;
/** a member keeps, per group, the current key and up to 7 previous ones (docs/protocol.md) */
export const KEYS_KEPT = 8;
/** Signed before the body: "sealstream-group-v1" and a NUL byte. */
export const GROUP_SIG_CONTEXT = new TextEncoder().encode("sealstream-group-v1\0");
// sorted, compared with a map's sorted member names
const ENVELOPE_KEYS = [
  ...["v", "kind", "cluster", "stream", "epoch", "gseq", "ts", "body", "sig"],
].sort();
const KEY_CLAIMS = ["cluster", "session", "group", "epoch", "kid", "k", "gseq", "iat"].sort();
const END_CLAIMS = ["cluster", "session", "reason", "iat"].sort();

/**
 * @typedef {{type: "group", kind: "group", cluster: string, session: string, stream: string,
 *   epoch: bigint, seq: bigint, ts: bigint, body: Uint8Array, sig: Uint8Array}} GroupEnvelope
 * @typedef {{cipher: CryptoKey, epoch: bigint, signer: CryptoKey}} GroupKey
 * @typedef {{firstEpoch: bigint, lastGseq: bigint, epoch: bigint,
 *   keys: Map<string, GroupKey>, current: string}} Group
 */

/** @param {string[]} a @param {string[]} b */
const sameKeys = (a, b) => a.length === b.length && a.every((k, i) => k === b[i]);

/**
 * A group envelope's nine fields, strictly (as sealstream/groupwire.py).
 * @param {Record<string, unknown>} m
 * @param {number} maxSize
 * @returns {GroupEnvelope}
 */
function groupFromMap(m, maxSize) {
  if (!sameKeys(Object.keys(m).sort(), ENVELOPE_KEYS)) {
    throw new WireError("bad_keys", "a group envelope has exactly its nine keys");
  }
  if (wireInt(m.v) !== BigInt(VERSION)) throw new WireError("bad_version", "unsupported version");
  const { cluster, stream, body, sig } = m;
  if (!isClusterId(cluster)) throw new WireError("bad_cluster", "bad cluster id");
  if (!isStream(stream)) throw new WireError("bad_stream", "bad stream name");
  if (!(body instanceof Uint8Array) || body.length === 0 || body.length > maxSize) {
    throw new WireError("bad_body", "body is empty, too large, or not bin");
  }
  if (!(sig instanceof Uint8Array) || sig.length !== SIG_BYTES) {
    throw new WireError("bad_sig", "sig must be 64 bytes of bin");
  }
  /** @param {string} key */
  const uint = (key) => {
    const v = wireInt(m[key]);
    if (v === null || v < 0n || v > MAX_U63) throw new WireError("bad_value", `bad ${key}`);
    return v;
  };
  return {
    type: "group",
    kind: "group",
    cluster: /** @type {string} */ (cluster),
    session: "",
    stream: /** @type {string} */ (stream),
    seq: uint("gseq"),
    ts: uint("ts"),
    epoch: uint("epoch"),
    body,
    sig,
  };
}

export class GroupMember extends ConsumerSession {
  /**
   * @param {import("./crypto.js").ConsumerKey} key
   * @param {object} options
   * @param {string} options.cluster
   * @param {string[]} options.streams the streams this session asked for (its groups)
   * @param {import("./session.js").TrustedKeys} options.trust
   * @param {import("./session.js").Policy} [options.policy]
   * @param {number} [options.maxPlaintext]
   * @param {number} [options.maxEnvelope]
   */
  constructor(
    key,
    {
      cluster,
      streams,
      trust,
      policy = "fail",
      maxPlaintext = DEFAULT_MAX_PLAINTEXT,
      maxEnvelope = DEFAULT_MAX_ENVELOPE,
    },
  ) {
    super(key, { cluster, trust, policy, maxPlaintext, maxEnvelope });
    if (!streams.every(isStream)) throw new TypeError("bad stream name");
    /** @type {string} */
    this.mode = "group";
    this.streams = new Set(streams);
    /** @type {Map<string, Group>} */
    this.groups = new Map();
    /** batches sealed before this member joined (dropped, not errors) */
    this.skipped = 0;
    /** groups carried from an earlier session whose first key of this one is still due */
    this.carried = new Set();
    /**
     * a carried group's first gseq under a key of this session: the batches before it that
     * no kept key opens were sealed while the subscription had no session
     * @type {Map<string, bigint>}
     */
    this.rejoined = new Map();
  }

  /** a key of THIS session was installed (carried keys do not count) */
  get keyed() {
    return [...this.groups.keys()].some((group) => !this.carried.has(group));
  }

  /**
   * Go on with `previous`'s group lines and keys (the same subscription's session that
   * ended), before this session's first envelope (docs/protocol.md, "A member's next
   * session"); GroupMember.carry's twin.
   * @param {GroupMember} previous
   */
  carry(previous) {
    if (previous.cluster !== this.cluster || this.groups.size > 0) {
      throw new TypeError("carry a session of the same cluster into a new session only");
    }
    for (const [group, state] of previous.groups) {
      if (!this.streams.has(group)) continue;
      this.groups.set(group, { ...state, keys: new Map(state.keys) });
      this.carried.add(group);
    }
  }

  /**
   * The group's last accepted gseq and the newest epoch installed; null before its first key.
   * @param {string} group
   * @returns {[bigint, bigint] | null}
   */
  line(group) {
    const state = this.groups.get(group);
    return state === undefined ? null : [state.lastGseq, state.epoch];
  }

  /**
   * @param {Record<string, unknown>} m
   * @returns {any}
   */
  fromMap(m) {
    return m.kind === "group" ? groupFromMap(m, this.maxEnvelope) : super.fromMap(m);
  }

  /**
   * @param {any} env
   * @returns {Promise<any>}
   */
  async open(env) {
    if (env.type === "group") return this.openGroup(/** @type {GroupEnvelope} */ (env));
    if (env.kind === "data") {
      if (this.ended) throw new Rejected("after_end");
      throw new Rejected("wrong_mode"); // session data: no downgrade
    }
    return super.open(env);
  }

  /** @param {import("./crypto.js").Compact} jwe */
  async installKey(jwe) {
    const { claims, signer, signerKid } = await this.signedClaims(jwe);
    const { group, epoch, kid, k, gseq } = claims;
    if (
      !sameKeys(Object.keys(claims).sort(), KEY_CLAIMS) ||
      typeof group !== "string" ||
      !this.streams.has(group) ||
      typeof epoch !== "bigint" ||
      epoch < 0n ||
      typeof kid !== "string" ||
      kid.length === 0 ||
      [...kid].length > 64 || // code points, as Python's len()
      typeof k !== "string" ||
      typeof gseq !== "bigint" ||
      gseq < 0n ||
      typeof claims.iat !== "bigint"
    ) {
      throw new Rejected("bad_claims");
    }
    let secret;
    try {
      secret = b64uDecode(k);
    } catch {
      throw new Rejected("bad_claims");
    }
    if (secret.length !== 32) throw new Rejected("bad_claims");
    let state = this.groups.get(group);
    const carried = state !== undefined && this.carried.has(group);
    if (state !== undefined && carried && (epoch <= state.epoch || gseq <= state.lastGseq)) {
      // the producer's group started again (its store had nothing of it): the line cannot
      // go on, and what was sealed meanwhile cannot be counted
      state = undefined;
    }
    if (state !== undefined && epoch <= state.epoch) throw new Rejected("stale_epoch");
    if (state !== undefined && state.keys.has(kid)) throw new Rejected("reused_kid");
    /** @type {GroupKey} */
    const fresh = { cipher: await aead(secret), epoch, signer };
    if (carried) {
      // this session's first key of a carried group: it is settled now
      this.carried.delete(group);
      if (state !== undefined) this.rejoined.set(group, gseq);
    }
    if (state === undefined) {
      this.groups.set(group, {
        firstEpoch: epoch,
        lastGseq: gseq - 1n,
        epoch,
        keys: new Map([[kid, fresh]]),
        current: kid,
      });
    } else {
      // keep the previous keys, for batches in flight or replayed from a store (a Map keeps
      // the order installed: the oldest goes first)
      state.keys.set(kid, fresh);
      for (const old of state.keys.keys()) {
        if (state.keys.size <= KEYS_KEPT) break;
        state.keys.delete(old);
      }
      state.current = kid;
      state.epoch = epoch;
    }
    this.signerKid = signerKid; // the page shows which pinned cluster key signed it
  }

  /**
   * Only an end reaches here (keys are installed, data is refused): its signed reason, as
   * the msgpack plaintext session mode's end carries.
   * @param {import("./crypto.js").Compact} jwe
   * @returns {Promise<Uint8Array>}
   */
  async openBody(jwe) {
    const { claims } = await this.signedClaims(jwe);
    if (
      !sameKeys(Object.keys(claims).sort(), END_CLAIMS) ||
      typeof claims.reason !== "string" ||
      typeof claims.iat !== "bigint"
    ) {
      throw new Rejected("bad_claims");
    }
    return encodeMap({ reason: claims.reason });
  }

  /**
   * @param {GroupEnvelope} env
   * @returns {Promise<import("./session.js").Batch | null>}
   */
  async openGroup(env) {
    if (this.ended) throw new Rejected("after_end");
    if (env.cluster !== this.cluster) throw new Rejected("wrong_route");
    if (!this.streams.has(env.stream)) throw new Rejected("not_member");
    const state = this.groups.get(env.stream);
    if (state === undefined || env.epoch < state.firstEpoch) {
      this.skipped += 1; // sealed before we joined (by the header's word)
      return null;
    }
    if (env.seq <= state.lastGseq) throw new Rejected("replay");
    const jwe = parseCompact(env.body);
    const h = jwe.header;
    if (
      typeof h.gseq !== "bigint" ||
      typeof h.ts !== "bigint" ||
      typeof h.epoch !== "bigint" ||
      h.gseq !== env.seq ||
      h.ts !== env.ts ||
      h.epoch !== env.epoch ||
      h.cluster !== env.cluster ||
      h.stream !== env.stream ||
      h.kind !== "group"
    ) {
      throw new Rejected("header_mismatch");
    }
    if (h.alg !== "dir") throw new Rejected("bad_alg");
    if (Object.hasOwn(h, "zip")) throw new Rejected("zip_not_allowed");
    const key = typeof h.kid === "string" ? state.keys.get(h.kid) : undefined;
    if (
      key === undefined &&
      (this.carried.has(env.stream) || env.seq < (this.rejoined.get(env.stream) ?? 0n))
    ) {
      // sealed while the subscription had no session (or before this session's first key
      // came), under a key it was not given: a gap, counted in lost when the line moves
      // past it, not an error
      this.skipped += 1;
      return null;
    }
    if (key === undefined) throw new Rejected("unknown_kid");
    if (key.epoch !== h.epoch) throw new Rejected("epoch_mismatch");
    const signed = new Uint8Array(GROUP_SIG_CONTEXT.length + env.body.length);
    signed.set(GROUP_SIG_CONTEXT);
    signed.set(env.body, GROUP_SIG_CONTEXT.length);
    let valid = false;
    try {
      valid = await crypto.subtle.verify(
        { name: "Ed25519" },
        key.signer,
        /** @type {BufferSource} */ (env.sig),
        signed,
      );
    } catch {
      valid = false;
    }
    if (!valid) throw new Rejected("bad_signature");
    const plaintext = await openDir(key.cipher, jwe, this.maxPlaintext);
    const result = /** @type {import("./session.js").Batch} */ (
      decodeResult(/** @type {any} */ ({ ...env, kind: "data" }), plaintext)
    );
    const lost = env.seq - state.lastGseq - 1n;
    if (lost) {
      this.gaps += 1;
      this.lost += lost;
      result.lostBefore = lost;
    }
    state.lastGseq = env.seq;
    this.accepted += 1;
    return result;
  }
}
