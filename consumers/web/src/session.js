// One session's decryption and verification state, on the consumer: the state machine of
// sealstream/crypto/_session.py ConsumerSession, check for check. Pure logic over crypto.js
// and wire.js (no network). Every failure is counted by reason in `rejected`; with policy
// "fail" it also throws the one opaque IntegrityError, with "discard" it returns null. A key
// envelope signed by a key the page does not pin (untrusted_key) is ignored under either.

import {
  Rejected,
  aead,
  b64uDecode,
  importClusterKey,
  inflate,
  jwsHeader,
  openDir,
  openWithKey,
  parseCompact,
  verifyClaims,
} from "./crypto.js";
import {
  DEFAULT_MAX_ENVELOPE,
  WireError,
  decodeMap,
  decodePlaintext,
  inboxFromMap,
  isClusterId,
} from "./wire.js";

/** Cap on a decrypted (and inflated) body. */
export const DEFAULT_MAX_PLAINTEXT = 16 * 1024 * 1024;
const MAX_KEY_PLAINTEXT = 16 * 1024;

/** The one error a caller sees for any rejected envelope (policy "fail"). */
export class IntegrityError extends Error {
  constructor() {
    super("envelope rejected");
    this.name = "IntegrityError";
  }
}

/**
 * @typedef {import("./wire.js").Envelope} Envelope
 * @typedef {import("./wire.js").Notice} Notice
 * @typedef {import("./crypto.js").ConsumerKey} ConsumerKey
 * @typedef {{type: "batch", stream: string, seq: bigint, ts: bigint,
 *   rows: Record<string, unknown>[], lostBefore: bigint}} Batch
 * @typedef {{type: "end", reason: string, seq: bigint}} End
 * @typedef {"session" | "per-message"} KeyMode
 * @typedef {"fail" | "discard"} Policy
 */

/**
 * Pinned cluster signing keys: cluster id -> kid (thumbprint) -> public JWK.
 * @typedef {Record<string, Record<string, Record<string, unknown>>>} TrustedKeys
 */

export class ConsumerSession {
  /**
   * @param {ConsumerKey} key
   * @param {object} options
   * @param {string} options.cluster
   * @param {TrustedKeys} options.trust
   * @param {KeyMode} [options.keyMode]
   * @param {boolean} [options.allowZip]
   * @param {Policy} [options.policy]
   * @param {number} [options.maxPlaintext]
   * @param {number} [options.maxEnvelope]
   */
  constructor(
    key,
    {
      cluster,
      trust,
      keyMode = "session",
      allowZip = false,
      policy = "fail",
      maxPlaintext = DEFAULT_MAX_PLAINTEXT,
      maxEnvelope = DEFAULT_MAX_ENVELOPE,
    },
  ) {
    if (policy !== "fail" && policy !== "discard") throw new TypeError("policy: fail or discard");
    if (keyMode !== "session" && keyMode !== "per-message") throw new TypeError("bad key mode");
    if (!isClusterId(cluster)) throw new TypeError("bad cluster id");
    if (keyMode === "per-message" && allowZip) {
      // jose 6 has no JWE compression: a per-message session cannot inflate
      throw new TypeError("zip is supported with session keys only");
    }
    this.key = key;
    this.cluster = cluster;
    this.session = key.sessionId;
    this.trust = trust;
    this.keyMode = keyMode;
    this.allowZip = allowZip;
    this.policy = policy;
    this.maxPlaintext = maxPlaintext;
    this.maxEnvelope = maxEnvelope;
    this.lastSeq = -1n;
    this.epoch = -1n;
    this.ended = false;
    /** @type {Map<string, CryptoKey>} */
    this.keys = new Map();
    this.currentKid = "";
    this.accepted = 0;
    this.gaps = 0;
    this.lost = 0n;
    /** @type {Record<string, number>} */
    this.rejected = {};
    /** kid of the cluster key that verified the current session key @type {string | null} */
    this.signerKid = null;
    /** @type {Map<string, Promise<CryptoKey>>} */
    this.clusterKeys = new Map();
  }

  /** True once a session key was accepted (always true in per-message mode). */
  get keyed() {
    return this.keyMode === "per-message" || this.keys.size > 0;
  }

  /** @returns {number} */
  get rejectedTotal() {
    return Object.values(this.rejected).reduce((a, b) => a + b, 0);
  }

  /**
   * Parse and open one inbox payload. Callers must await each call before the next.
   * @param {Uint8Array} payload
   * @returns {Promise<Batch | End | Notice | null>}
   */
  async accept(payload) {
    return this.guard(async () => {
      const item = this.parse(payload);
      if (item.type === "notice") return item;
      return await this.open(item);
    });
  }

  /**
   * Open an item parsed already (by `guard(() => this.parse(...))`), under the policy.
   * @param {ReturnType<ConsumerSession["parse"]>} item
   * @returns {Promise<Batch | End | Notice | null>}
   */
  async acceptItem(item) {
    return this.guard(async () => (item.type === "notice" ? item : await this.open(item)));
  }

  /**
   * Run a step of `accept` under the failure policy: a rejection is counted, then null
   * (policy "discard", or a key signed by an unpinned key) or the one opaque IntegrityError.
   * @template T
   * @param {() => T | Promise<T>} step
   * @returns {Promise<T | null>}
   */
  async guard(step) {
    try {
      return await step();
    } catch (err) {
      if (!(err instanceof Rejected)) throw err;
      this.rejected[err.reason] = (this.rejected[err.reason] ?? 0) + 1;
      // a key envelope signed by an unpinned key is anyone's (a relay can race one ahead of
      // the cluster's): ignored under both policies, the caller decides when to stop
      if (this.policy === "discard" || err.reason === "untrusted_key") return null;
      throw new IntegrityError();
    }
  }

  /**
   * @param {Uint8Array} payload
   * @returns {Envelope | Notice}
   */
  parse(payload) {
    try {
      return this.fromMap(decodeMap(payload, this.maxEnvelope));
    } catch (err) {
      if (err instanceof WireError) throw new Rejected("malformed");
      throw err;
    }
  }

  /**
   * An inbox item from its decoded map (the payload is decoded once; GroupMember adds its
   * group envelopes here).
   * @param {Record<string, unknown>} m
   * @returns {Envelope | Notice}
   */
  fromMap(m) {
    const item = inboxFromMap(m, this.maxEnvelope);
    if (item.session !== this.session) throw new Rejected("wrong_route");
    return item;
  }

  /**
   * @param {Envelope} env
   * @returns {Promise<Batch | End | null>}
   */
  async open(env) {
    if (this.ended) throw new Rejected("after_end");
    if (env.cluster !== this.cluster || env.session !== this.session) {
      throw new Rejected("wrong_route");
    }
    if (env.seq <= this.lastSeq) throw new Rejected("replay");
    const jwe = parseCompact(env.body);
    const h = jwe.header;
    // JSON integers are BigInt (parseJson): a float, a bool or a string never passes for one
    if (
      typeof h.seq !== "bigint" ||
      typeof h.ts !== "bigint" ||
      h.seq !== env.seq ||
      h.ts !== env.ts ||
      h.cluster !== env.cluster ||
      h.session !== env.session ||
      h.stream !== env.stream ||
      h.kind !== env.kind
    ) {
      throw new Rejected("header_mismatch");
    }
    /** @type {Batch | End | null} */
    let result = null;
    if (env.kind === "key") {
      await this.installKey(jwe);
    } else {
      result = decodeResult(env, await this.openBody(jwe));
    }
    const lost = env.seq - this.lastSeq - 1n;
    if (lost) {
      this.gaps += 1;
      this.lost += lost;
      if (result?.type === "batch") result.lostBefore = lost;
    }
    this.lastSeq = env.seq;
    this.accepted += 1;
    if (result?.type === "end") this.ended = true;
    return result;
  }

  /**
   * @param {import("./crypto.js").Compact} jwe
   * @returns {Promise<Uint8Array>}
   */
  async openBody(jwe) {
    const h = jwe.header;
    if (h.zip !== undefined && h.zip !== null && !this.allowZip) {
      throw new Rejected("zip_not_allowed");
    }
    if (this.keyMode === "per-message") {
      if (h.alg !== this.key.alg || h.kid !== this.session) throw new Rejected("bad_alg");
      return openWithKey(this.key, jwe, this.maxPlaintext);
    }
    if (h.alg !== "dir") throw new Rejected("bad_alg");
    const cipher = typeof h.kid === "string" ? this.keys.get(h.kid) : undefined;
    if (cipher === undefined) throw new Rejected("unknown_kid");
    const plaintext = await openDir(cipher, jwe, this.maxPlaintext);
    if (h.zip === undefined || h.zip === null) return plaintext;
    if (h.zip !== "DEF") throw new Rejected("zip_not_allowed");
    return inflate(plaintext, this.maxPlaintext);
  }

  /**
   * The cluster's signed claims of a key (or group end) envelope: a JWE to our key holding a
   * JWS by a pinned cluster key, naming this cluster and session.
   * @param {import("./crypto.js").Compact} jwe
   * @returns {Promise<{claims: Record<string, unknown>, signer: CryptoKey, signerKid: string}>}
   */
  async signedClaims(jwe) {
    const h = jwe.header;
    if (
      h.alg !== this.key.alg ||
      h.kid !== this.session ||
      h.cty !== "JWT" ||
      Object.hasOwn(h, "zip")
    ) {
      throw new Rejected("bad_key_header");
    }
    const jws = await openWithKey(this.key, jwe, MAX_KEY_PLAINTEXT);
    const signerKid = this.signer(jwsHeader(jws));
    const signer = await this.clusterKey(signerKid);
    const claims = await verifyClaims(jws, signer);
    if (claims.cluster !== this.cluster || claims.session !== this.session) {
      throw new Rejected("bad_claims");
    }
    return { claims, signer, signerKid };
  }

  /** @param {import("./crypto.js").Compact} jwe */
  async installKey(jwe) {
    if (this.keyMode !== "session") throw new Rejected("unexpected_key");
    const { claims, signerKid } = await this.signedClaims(jwe);
    const { k, kid, epoch } = claims;
    if (
      typeof kid !== "string" ||
      kid.length === 0 ||
      [...kid].length > 64 || // code points, as Python's len()
      typeof k !== "string" ||
      typeof epoch !== "bigint" ||
      typeof claims.iat !== "bigint"
    ) {
      throw new Rejected("bad_claims");
    }
    if (epoch <= this.epoch) throw new Rejected("stale_epoch");
    if (this.keys.has(kid)) throw new Rejected("reused_kid");
    let secret;
    try {
      secret = b64uDecode(k);
    } catch {
      throw new Rejected("bad_claims");
    }
    if (secret.length !== 32) throw new Rejected("bad_claims");
    const cipher = await aead(secret);
    // keep at most the previous key, for data still in flight
    const current = this.keys.get(this.currentKid);
    this.keys = new Map([[kid, cipher]]);
    if (current !== undefined) this.keys.set(this.currentKid, current);
    this.currentKid = kid;
    this.epoch = epoch;
    this.signerKid = signerKid;
  }

  /**
   * The kid of the pinned key that must have signed (no trust on first use in the page).
   * @param {Record<string, unknown>} header
   * @returns {string}
   */
  signer(header) {
    const kid = header.kid;
    if (typeof kid !== "string") throw new Rejected("bad_jws");
    const pinned = this.trust[this.cluster];
    if (pinned && Object.hasOwn(pinned, kid)) return kid;
    throw new Rejected("untrusted_key");
  }

  /** @param {string} kid @returns {Promise<CryptoKey>} */
  clusterKey(kid) {
    let key = this.clusterKeys.get(kid);
    if (key === undefined) {
      key = importClusterKey(this.trust[this.cluster][kid]);
      this.clusterKeys.set(kid, key);
    }
    return key;
  }
}

/**
 * @param {Envelope} env
 * @param {Uint8Array} plaintext
 * @returns {Batch | End}
 */
export function decodeResult(env, plaintext) {
  let value;
  try {
    value = decodePlaintext(plaintext);
  } catch {
    throw new Rejected("bad_plaintext");
  }
  if (!isMap(value)) throw new Rejected("bad_plaintext");
  const m = /** @type {Record<string, unknown>} */ (value);
  if (env.kind === "end") {
    if (typeof m.reason !== "string") throw new Rejected("bad_plaintext");
    return { type: "end", reason: m.reason, seq: env.seq };
  }
  const rows = m.rows;
  if (!Array.isArray(rows) || !rows.every(isMap)) throw new Rejected("bad_plaintext");
  return { type: "batch", stream: env.stream, seq: env.seq, ts: env.ts, rows, lostBefore: 0n };
}

/**
 * A decoded msgpack map: a plain object (not an array, bin, an extension value or a Date).
 * @param {unknown} v
 */
function isMap(v) {
  return typeof v === "object" && v !== null && Object.getPrototypeOf(v) === Object.prototype;
}
