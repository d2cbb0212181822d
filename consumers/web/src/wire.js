// The msgpack codecs of the wire contract (docs/protocol.md), as sealstream/wire.py and the
// consumer's side of sealstream/control.py: pure, no I/O. Every malformed input becomes a WireError with a stable reason; sizes are capped
// before decoding. 64-bit integers are BigInt (`ts` is Unix nanoseconds, above 2^53), and a
// msgpack float never passes for an int, as on the Python side.

import { Decoder, Encoder } from "@msgpack/msgpack";

export const VERSION = 1;
/** NATS' default max_payload; envelopes never exceed it. */
export const DEFAULT_MAX_ENVELOPE = 1024 * 1024;
export const DEFAULT_MAX_REQUEST = 64 * 1024;
export const SESSION_STREAM = "_session";
const MAX_U63 = (1n << 63n) - 1n;
const KINDS = new Set(["key", "data", "end"]);

const CLUSTER_RE = /^[A-Za-z0-9_-]{1,64}$/;
const STREAM_RE = /^[a-z0-9][a-z0-9_]{0,63}$/;
const SESSION_RE = /^[A-Za-z0-9_-]{43}$/;

export class WireError extends Error {
  /** @param {string} reason @param {string} message */
  constructor(reason, message) {
    super(message);
    this.name = "WireError";
    this.reason = reason;
  }
}

/** A msgpack float as decoded by the strict decoder: kept apart from integers. */
export class WireFloat {
  /** @param {number} value */
  constructor(value) {
    this.value = value;
  }
}

/** @param {unknown} v */
export const isClusterId = (v) => typeof v === "string" && CLUSTER_RE.test(v);
/** @param {unknown} v */
export const isStream = (v) => typeof v === "string" && STREAM_RE.test(v);
/** @param {unknown} v */
export const isSessionId = (v) => typeof v === "string" && SESSION_RE.test(v);

/** @param {unknown} key @returns {string} */
function stringKey(key) {
  if (typeof key !== "string") throw new WireError("bad_key", "map keys must be strings");
  return key;
}

/**
 * The decoder of wire maps: floats are boxed as WireFloat so that an int field can refuse
 * them (msgpack's float 1.0 and int 1 are one JS number otherwise). It wraps the two float
 * readers of @msgpack/msgpack's Decoder, internal methods of the version pinned in
 * package-lock (test/wire.test.js fails if an upgrade changes them).
 */
function strictDecoder() {
  const decoder = new Decoder({ useBigInt64: true, mapKeyConverter: stringKey });
  /** @type {any} */
  const d = decoder;
  for (const name of ["readF32", "readF64"]) {
    const read = d[name];
    if (typeof read !== "function") throw new Error(`@msgpack/msgpack has no ${name}`);
    d[name] = function () {
      return new WireFloat(read.call(this));
    };
  }
  return decoder;
}

const wireDecoder = strictDecoder();
const encoder = new Encoder({ useBigInt64: true });

/** @param {Record<string, unknown>} value @returns {Uint8Array} */
export function encodeMap(value) {
  return encoder.encode(value);
}

/**
 * Decode a msgpack map with string keys, or throw WireError.
 * @param {Uint8Array} payload
 * @param {number} [maxSize]
 * @returns {Record<string, unknown>}
 */
export function decodeMap(payload, maxSize = DEFAULT_MAX_REQUEST) {
  if (payload.length > maxSize) {
    throw new WireError("oversize", `payload of ${payload.length} bytes exceeds ${maxSize}`);
  }
  let value;
  try {
    value = wireDecoder.decode(payload);
  } catch (err) {
    if (err instanceof WireError) throw err;
    throw new WireError("not_msgpack", "payload is not a single msgpack value");
  }
  if (!isPlainMap(value)) throw new WireError("not_a_map", "payload is not a msgpack map");
  return /** @type {Record<string, unknown>} */ (value);
}

/** @param {unknown} v */
function isPlainMap(v) {
  return typeof v === "object" && v !== null && Object.getPrototypeOf(v) === Object.prototype;
}

/**
 * A msgpack integer (number or BigInt; never a float or a bool) as a BigInt, else null.
 * @param {unknown} v
 * @returns {bigint | null}
 */
export function wireInt(v) {
  if (typeof v === "bigint") return v;
  if (typeof v === "number" && Number.isInteger(v)) return BigInt(v);
  return null;
}

/** @param {Record<string, unknown>} m @param {string} key */
function field(m, key) {
  if (!Object.hasOwn(m, key)) throw new WireError("missing_key", `missing key ${key}`);
  return m[key];
}

/** @param {Record<string, unknown>} m @param {string} key @returns {string} */
function str(m, key) {
  const v = field(m, key);
  if (typeof v !== "string") throw new WireError("bad_type", `key ${key} is not a str`);
  return v;
}

/** @param {Record<string, unknown>} m @param {string} key @returns {bigint} */
function int(m, key) {
  const v = wireInt(field(m, key));
  if (v === null) throw new WireError("bad_type", `key ${key} is not an int`);
  return v;
}

/** @param {Record<string, unknown>} m */
function checkVersion(m) {
  if (int(m, "v") !== BigInt(VERSION)) throw new WireError("bad_version", "unsupported version");
}

/** @param {Record<string, unknown>} m @param {string} key @returns {bigint} */
function uint(m, key) {
  const v = int(m, key);
  if (v < 0n || v > MAX_U63) throw new WireError("bad_value", `key ${key} out of range`);
  return v;
}

/**
 * @typedef {"key" | "data" | "end"} EnvelopeKind
 * @typedef {{type: "envelope", kind: EnvelopeKind, cluster: string, session: string,
 *   stream: string, seq: bigint, ts: bigint, body: Uint8Array}} Envelope
 * @typedef {{type: "notice", session: string, code: string, message: string}} Notice
 */

/**
 * @param {Record<string, unknown>} m
 * @param {number} maxSize
 * @returns {Envelope}
 */
function envelopeFromMap(m, maxSize) {
  checkVersion(m);
  const kind = str(m, "kind");
  if (!KINDS.has(kind)) throw new WireError("bad_kind", "unknown envelope kind");
  const cluster = str(m, "cluster");
  if (!isClusterId(cluster)) throw new WireError("bad_cluster", "bad cluster id");
  const session = str(m, "session");
  if (!isSessionId(session)) throw new WireError("bad_session", "bad session id");
  const stream = str(m, "stream");
  if (kind === "data") {
    if (!isStream(stream)) throw new WireError("bad_stream", "bad stream name");
  } else if (stream !== SESSION_STREAM) {
    throw new WireError("bad_stream", `${kind} envelopes carry stream ${SESSION_STREAM}`);
  }
  const body = field(m, "body");
  if (!(body instanceof Uint8Array)) throw new WireError("bad_type", "body is not bin");
  if (body.length === 0 || body.length > maxSize) {
    throw new WireError("bad_body", "body is empty or too large");
  }
  const seq = uint(m, "seq");
  const ts = uint(m, "ts");
  return {
    type: "envelope",
    kind: /** @type {EnvelopeKind} */ (kind),
    cluster,
    session,
    stream,
    seq,
    ts,
    body,
  };
}

/**
 * What arrives on a consumer inbox: an envelope, or a proxy notice.
 * @param {Uint8Array} payload
 * @param {number} [maxSize]
 * @returns {Envelope | Notice}
 */
export function decodeInbox(payload, maxSize = DEFAULT_MAX_ENVELOPE) {
  return inboxFromMap(decodeMap(payload, maxSize), maxSize);
}

/**
 * An inbox item from its decoded map (decodeMap), for a caller that looks at the map first.
 * @param {Record<string, unknown>} m
 * @param {number} [maxSize]
 * @returns {Envelope | Notice}
 */
export function inboxFromMap(m, maxSize = DEFAULT_MAX_ENVELOPE) {
  if (m.kind === "notice") {
    checkVersion(m);
    const session = str(m, "session");
    if (!isSessionId(session)) throw new WireError("bad_session", "bad session id");
    return {
      type: "notice",
      session,
      code: str(m, "code").slice(0, 64),
      message: str(m, "message").slice(0, 512),
    };
  }
  return envelopeFromMap(m, maxSize);
}

/** @param {Envelope} env @returns {Uint8Array} */
export function encodeEnvelope(env) {
  return encodeMap({
    v: VERSION,
    kind: env.kind,
    cluster: env.cluster,
    session: env.session,
    stream: env.stream,
    seq: env.seq,
    ts: env.ts,
    body: env.body,
  });
}

// --- session control (sealstream/control.py: the consumer's side) ----------------------------

export const ERROR_CODES = new Set([
  "bad_request",
  "unauthorized",
  "forbidden",
  "cluster_unavailable",
  "limit_exceeded",
]);
export const MAX_STREAMS = 64;
/** cap on the `proof` and `authz` strings of an open */
export const MAX_PROOF = 8192;
/** a refusal's `message` is cut to this many characters where it is decoded */
export const MAX_MESSAGE = 512;

/**
 * @typedef {{cluster: string, streams: string[], jwk: Record<string, unknown>,
 *   keyMode: "session" | "per-message" | "group", token: string, zip: boolean,
 *   proof?: string, authz?: string}} OpenRequest
 * @typedef {{session: string, token: string}} SessionRef
 * @typedef {{type: "ok"}} Ok
 * @typedef {{type: "opened", session: string, inbox: string, keepaliveS: number | null,
 *   store: boolean}} Opened
 * @typedef {{type: "keptAlive", keepaliveS: number | null}} KeptAlive
 * @typedef {{type: "replayed", replayed: bigint, more: boolean}} Replayed
 * @typedef {{type: "refusal", code: string, message: string, retry: boolean}} Refusal
 * @typedef {{ok: Ok, opened: Opened, keptAlive: KeptAlive, replayed: Replayed}} Replies
 */

/**
 * `P.api.session.open` (consumer -> proxy), the contract's keys in its order.
 * @param {OpenRequest} req
 * @returns {Uint8Array}
 */
export function encodeOpenRequest(req) {
  /** @type {Record<string, unknown>} */
  const m = {
    v: VERSION,
    token: req.token,
    cluster: req.cluster,
    streams: req.streams,
    jwk: req.jwk,
    key_mode: req.keyMode,
    zip: req.zip,
  };
  if (req.proof !== undefined) m.proof = req.proof;
  if (req.authz !== undefined) m.authz = req.authz;
  return encodeMap(m);
}

/**
 * close / keepalive request: `{"v":1, "token":JWT, "session":id}`.
 * @param {SessionRef} ref
 * @returns {Uint8Array}
 */
export function encodeSessionRef(ref) {
  return encodeMap({ v: VERSION, token: ref.token, session: ref.session });
}

/**
 * resume request (a cluster with a store): `{"v":1, "token":JWT, "session":id, "after":n}`,
 * `after` the last seq the consumer accepted (-1: none); with `"group":s` (a group member),
 * the last gseq it accepted of group s.
 * @param {SessionRef & {after: bigint, limit?: number, group?: string}} req
 * @returns {Uint8Array}
 */
export function encodeResume(req) {
  // the smallest msgpack integer, as sealstream.control writes it (a BigInt is always 64-bit)
  const small = Number(req.after);
  const after = Number.isSafeInteger(small) ? small : req.after;
  /** @type {Record<string, unknown>} */
  const m = { v: VERSION, token: req.token, session: req.session, after };
  if (req.limit !== undefined) m.limit = req.limit; // a page: at most this many envelopes
  if (req.group !== undefined) m.group = req.group; // a group member's: after is a gseq
  return encodeMap(m);
}

/** the keepalive interval a reply may set, in s: the relay chooses it, within these bounds */
export const KEEPALIVE_MIN_S = 1;
export const KEEPALIVE_MAX_S = 3600;

/**
 * A reply's keepalive interval, clamped to [1, 3600] s (docs/protocol.md): the relay is not
 * trusted to pace the keepalives (1e-9 would send them back to back, and 3e6 s overflows
 * setTimeout, which then fires at once).
 * @param {Record<string, unknown>} m
 * @returns {number | null}
 */
function keepaliveS(m) {
  if (!Object.hasOwn(m, "keepalive_s")) return null;
  const v = m.keepalive_s;
  const n = v instanceof WireFloat ? v.value : wireInt(v) === null ? NaN : Number(v);
  if (!Number.isFinite(n) || n <= 0) {
    throw new WireError("bad_value", "keepalive_s must be a positive number");
  }
  return Math.min(KEEPALIVE_MAX_S, Math.max(KEEPALIVE_MIN_S, n));
}

/** @param {Record<string, unknown>} m @returns {Refusal} */
function refusalFromMap(m) {
  const error = field(m, "error");
  if (!isPlainMap(error)) throw new WireError("bad_type", "key error is not a map");
  const e = /** @type {Record<string, unknown>} */ (error);
  const code = str(e, "code");
  if (!ERROR_CODES.has(code)) throw new WireError("bad_code", "unknown error code");
  const retry = Object.hasOwn(e, "retry") ? e.retry : false;
  if (typeof retry !== "boolean") throw new WireError("bad_type", "key retry must be a bool");
  return { type: "refusal", code, message: str(e, "message").slice(0, MAX_MESSAGE), retry };
}

/**
 * A reply that answers with `kind`, or a refusal; WireError if malformed.
 * @template {keyof Replies} K
 * @param {Uint8Array} payload
 * @param {K} kind
 * @returns {Replies[K] | Refusal}
 */
export function decodeReply(payload, kind) {
  const m = decodeMap(payload);
  const ok = field(m, "ok");
  if (typeof ok !== "boolean") throw new WireError("bad_type", "key ok is not a bool");
  if (!ok) return refusalFromMap(m);
  /** @type {Ok | Opened | KeptAlive | Replayed} */
  let reply;
  if (kind === "opened") {
    const session = str(m, "session");
    if (!isSessionId(session)) throw new WireError("bad_session", "bad session id");
    const store = Object.hasOwn(m, "store") ? m.store : false;
    if (typeof store !== "boolean") throw new WireError("bad_type", "key store must be a bool");
    const inbox = str(m, "inbox");
    reply = { type: "opened", session, inbox, keepaliveS: keepaliveS(m), store };
  } else if (kind === "replayed") {
    const replayed = wireInt(field(m, "replayed"));
    if (replayed === null || replayed < 0n) {
      throw new WireError("bad_value", "replayed must be a count");
    }
    const more = Object.hasOwn(m, "more") ? m.more : false;
    if (typeof more !== "boolean") throw new WireError("bad_type", "key more must be a bool");
    reply = { type: "replayed", replayed, more };
  } else if (kind === "keptAlive") {
    reply = { type: "keptAlive", keepaliveS: keepaliveS(m) };
  } else {
    reply = { type: "ok" };
  }
  return /** @type {Replies[K]} */ (reply);
}

// --- decrypted plaintexts ---------------------------------------------------------------------

/** @param {unknown} key @returns {string} */
function rowKey(key) {
  if (typeof key === "string") return key;
  // bin map keys are shown as base64, as sealstream-consume does
  if (key instanceof Uint8Array) return btoa(String.fromCharCode(...key));
  throw new Error("map keys must be str or bin");
}

const rowDecoder = new Decoder({ useBigInt64: true, mapKeyConverter: rowKey });

/**
 * A decrypted plaintext (msgpack), or throw.
 * @param {Uint8Array} plaintext
 * @returns {unknown}
 */
export function decodePlaintext(plaintext) {
  return rowDecoder.decode(plaintext);
}

// --- strict JSON (JOSE headers and claims) ----------------------------------------------------

/**
 * JSON with the Python side's semantics: an integer literal (no fraction, no exponent) is a
 * BigInt, so `ts` (nanoseconds, above 2^53) compares exactly and `1.0` is not an int;
 * duplicate member names are refused. Throws SyntaxError.
 * @param {string} text
 * @returns {unknown}
 */
export function parseJson(text) {
  let i = 0;
  const ws = () => {
    while (i < text.length && " \t\n\r".includes(text[i])) i++;
  };
  const fail = () => {
    throw new SyntaxError(`bad JSON at ${i}`);
  };
  /** @returns {unknown} */
  const value = () => {
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      /** @type {Record<string, unknown>} */
      const out = Object.create(null);
      ws();
      if (text[i] === "}") {
        i++;
        return out;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail();
        const k = string();
        if (Object.hasOwn(out, k)) throw new SyntaxError("duplicate member");
        ws();
        if (text[i++] !== ":") fail();
        out[k] = value();
        ws();
        const sep = text[i++];
        if (sep === "}") return out;
        if (sep !== ",") fail();
      }
    }
    if (c === "[") {
      i++;
      /** @type {unknown[]} */
      const out = [];
      ws();
      if (text[i] === "]") {
        i++;
        return out;
      }
      for (;;) {
        out.push(value());
        ws();
        const sep = text[i++];
        if (sep === "]") return out;
        if (sep !== ",") fail();
      }
    }
    if (c === '"') return string();
    for (const [word, v] of /** @type {const} */ ([
      ["true", true],
      ["false", false],
      ["null", null],
    ])) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return v;
      }
    }
    const m = /^-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
    if (!m) fail();
    const lit = /** @type {RegExpExecArray} */ (m)[0];
    i += lit.length;
    return m?.[1] === undefined && m?.[2] === undefined ? BigInt(lit) : Number(lit);
  };
  const string = () => {
    const start = i;
    i++;
    for (;;) {
      const c = text[i++];
      if (c === undefined) fail();
      if (c === '"') break;
      if (c === "\\") i++;
      else if (c < " ") fail();
    }
    return /** @type {string} */ (JSON.parse(text.slice(start, i)));
  };
  const out = value();
  ws();
  if (i !== text.length) fail();
  return out;
}
