// The one module that touches WebCrypto and jose. Callers use recipes (generate a key pair,
// open a key JWE, verify the cluster's signature, open a dir/A256GCM JWE, make the identity's
// proof for an open) and never choose an algorithm: the allow-list is pinned here, never taken
// from a header. Every failure becomes a Rejected with a reason for the counters, as
// sealstream/crypto/_jose.py.

import {
  CompactSign,
  calculateJwkThumbprint,
  compactDecrypt,
  compactVerify,
  importJWK,
} from "jose";
import { parseJson } from "./wire.js";

export const ENC = "A256GCM";
export const SIG_ALG = "Ed25519";
const MAX_HEADER = 4096;
const MAX_JWS = 16 * 1024;
const NONCE = 12;
const TAG = 16;

/** Internal carrier of a rejection reason; callers of the session see only the counter. */
export class Rejected extends Error {
  /** @param {string} reason */
  constructor(reason) {
    super("envelope rejected");
    this.name = "Rejected";
    this.reason = reason;
  }
}

// --- canonical base64url ------------------------------------------------------------------------

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const VALUE = new Int8Array(128).fill(-1);
for (let i = 0; i < ALPHABET.length; i++) VALUE[ALPHABET.charCodeAt(i)] = i;

/**
 * Strict unpadded base64url, canonical only (the unused low bits of the last character must
 * be zero, so one value has one encoding). Throws RangeError.
 * @param {string} text
 * @returns {Uint8Array}
 */
export function b64uDecode(text) {
  const n = text.length;
  const rem = n % 4;
  if (rem === 1) throw new RangeError("not unpadded base64url");
  const out = new Uint8Array((n * 3) >> 2);
  let acc = 0;
  let bits = 0;
  let at = 0;
  for (let i = 0; i < n; i++) {
    const c = text.charCodeAt(i);
    const v = c < 128 ? VALUE[c] : -1;
    if (v < 0) throw new RangeError("not base64url");
    acc = ((acc << 6) | v) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[at++] = (acc >> bits) & 0xff;
    }
  }
  if (acc & ((1 << bits) - 1)) throw new RangeError("non-canonical base64url");
  return out;
}

/** @param {Uint8Array} data @returns {string} */
export function b64uEncode(data) {
  let s = "";
  for (const b of data) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const ascii = new TextDecoder("ascii", { fatal: false });
const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * A JSON object from UTF-8 bytes (strict: duplicates refused, integers as BigInt).
 * @param {Uint8Array} raw
 * @param {string} reason
 * @returns {Record<string, unknown>}
 */
export function jsonObject(raw, reason) {
  let value;
  try {
    value = parseJson(utf8.decode(raw));
  } catch {
    throw new Rejected(reason);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Rejected(reason);
  }
  return /** @type {Record<string, unknown>} */ (value);
}

/** @param {string} b64 @param {string} reason */
function b64JsonObject(b64, reason) {
  if (b64.length > MAX_HEADER) throw new Rejected(reason);
  let raw;
  try {
    raw = b64uDecode(b64);
  } catch {
    throw new Rejected(reason);
  }
  return jsonObject(raw, reason);
}

// --- consumer key pairs -------------------------------------------------------------------------

/** @typedef {"x25519" | "p256" | "rsa"} KeyKind */

/**
 * @typedef {object} ConsumerKey
 * @property {KeyKind} kind
 * @property {string} alg the key management algorithm JWEs to this key use
 * @property {Record<string, string>} publicJwk key members and alg only
 * @property {string} sessionId RFC 7638 thumbprint of publicJwk
 * @property {CryptoKey} privateKey non-extractable
 */

/** @type {Record<KeyKind, {alg: string, params: any, usages: KeyUsage[]}>} */
const KINDS = {
  x25519: { alg: "ECDH-ES+A256KW", params: { name: "X25519" }, usages: ["deriveBits"] },
  p256: {
    alg: "ECDH-ES+A256KW",
    params: { name: "ECDH", namedCurve: "P-256" },
    usages: ["deriveBits"],
  },
  rsa: {
    alg: "RSA-OAEP-256",
    params: {
      name: "RSA-OAEP",
      modulusLength: 4096,
      publicExponent: new Uint8Array([1, 0, 1]),
      hash: "SHA-256",
    },
    usages: ["encrypt", "decrypt"],
  },
};
const KEY_MEMBERS = { OKP: ["crv", "kty", "x"], EC: ["crv", "kty", "x", "y"], RSA: ["e", "kty", "n"] };

/**
 * A consumer key pair whose private half cannot be exported (WebCrypto `extractable: false`).
 * @param {KeyKind} [kind]
 * @returns {Promise<ConsumerKey>}
 */
export async function generateConsumerKey(kind = "x25519") {
  const spec = KINDS[kind];
  if (spec === undefined) throw new TypeError(`unknown key kind ${kind}`);
  const pair = /** @type {CryptoKeyPair} */ (
    await crypto.subtle.generateKey(spec.params, false, spec.usages)
  );
  const jwk = await crypto.subtle.exportKey("jwk", pair.publicKey);
  return consumerKey(kind, jwk, pair.privateKey);
}

/**
 * A ConsumerKey from a public JWK and its private CryptoKey (tests import a known one).
 * @param {KeyKind} kind
 * @param {JsonWebKey} jwk
 * @param {CryptoKey} privateKey
 * @returns {Promise<ConsumerKey>}
 */
export async function consumerKey(kind, jwk, privateKey) {
  const spec = KINDS[kind];
  const members = KEY_MEMBERS[/** @type {"OKP" | "EC" | "RSA"} */ (jwk.kty)];
  if (members === undefined) throw new TypeError("unsupported key type");
  /** @type {Record<string, string>} */
  const publicJwk = {};
  for (const k of members) publicJwk[k] = String(/** @type {any} */ (jwk)[k]);
  publicJwk.alg = spec.alg;
  const sessionId = await calculateJwkThumbprint(/** @type {any} */ (publicJwk), "sha256");
  return { kind, alg: spec.alg, publicJwk, sessionId, privateKey };
}

/**
 * Import a private JWK as a non-extractable CryptoKey (test vectors only).
 * @param {KeyKind} kind
 * @param {JsonWebKey} jwk
 * @returns {Promise<CryptoKey>}
 */
export async function importPrivateKey(kind, jwk) {
  const spec = KINDS[kind];
  const usages = kind === "rsa" ? ["decrypt"] : ["deriveBits"];
  const { alg: _alg, key_ops: _ops, use: _use, ...members } = jwk;
  return crypto.subtle.importKey("jwk", members, spec.params, false, /** @type {any} */ (usages));
}

/**
 * The RFC 7638 thumbprint of a public JWK (the cluster key's kid, a session id).
 * @param {Record<string, unknown>} jwk
 * @returns {Promise<string>}
 */
export function thumbprint(jwk) {
  return calculateJwkThumbprint(/** @type {any} */ (jwk), "sha256");
}

// --- compact JWE --------------------------------------------------------------------------------

/**
 * @typedef {object} Compact
 * @property {Record<string, unknown>} header
 * @property {string} protected the base64url header as sent: the AEAD's additional data
 * @property {Uint8Array} encryptedKey
 * @property {Uint8Array} iv
 * @property {Uint8Array} ciphertext
 * @property {Uint8Array} tag
 * @property {string} text the whole compact serialization
 */

/**
 * Split and decode a JWE compact; reject before any crypto anything that is not five
 * canonical base64url parts, or whose `enc` is not A256GCM, or that has `crit`.
 * @param {Uint8Array} body
 * @returns {Compact}
 */
export function parseCompact(body) {
  const text = ascii.decode(body);
  const parts = text.split(".");
  if (parts.length !== 5) throw new Rejected("not_jwe");
  const header = b64JsonObject(parts[0], "bad_header");
  if (Object.hasOwn(header, "crit")) throw new Rejected("crit_header");
  if (header.enc !== ENC) throw new Rejected("bad_enc");
  let ek, iv, ct, tag;
  try {
    ek = parts[1] ? b64uDecode(parts[1]) : new Uint8Array(0);
    iv = b64uDecode(parts[2]);
    ct = b64uDecode(parts[3]);
    tag = b64uDecode(parts[4]);
  } catch {
    throw new Rejected("bad_base64");
  }
  if (iv.length !== NONCE || tag.length !== TAG) throw new Rejected("bad_sizes");
  return { header, protected: parts[0], encryptedKey: ek, iv, ciphertext: ct, tag, text };
}

/**
 * Import a 32-byte session key as a non-extractable AES-GCM decryption key.
 * @param {Uint8Array} secret
 * @returns {Promise<CryptoKey>}
 */
export function aead(secret) {
  if (secret.length !== 32) throw new RangeError("A256GCM needs a 32-byte key");
  return crypto.subtle.importKey("raw", /** @type {BufferSource} */ (secret), "AES-GCM", false, [
    "decrypt",
  ]);
}

const asciiEncoder = new TextEncoder();

/**
 * Decrypt a `dir`/A256GCM JWE whose header the caller checked; AAD = the protected header's
 * base64url bytes (RFC 7516 5.2).
 * @param {CryptoKey} key
 * @param {Compact} jwe
 * @param {number} maxPlaintext
 * @returns {Promise<Uint8Array>}
 */
export async function openDir(key, jwe, maxPlaintext) {
  if (jwe.encryptedKey.length) throw new Rejected("bad_alg");
  if (jwe.ciphertext.length > maxPlaintext) throw new Rejected("bad_sizes");
  const sealed = new Uint8Array(jwe.ciphertext.length + TAG);
  sealed.set(jwe.ciphertext);
  sealed.set(jwe.tag, jwe.ciphertext.length);
  try {
    const out = await crypto.subtle.decrypt(
      {
        name: "AES-GCM",
        iv: /** @type {BufferSource} */ (jwe.iv),
        additionalData: asciiEncoder.encode(jwe.protected),
        tagLength: 128,
      },
      key,
      sealed,
    );
    return new Uint8Array(out);
  } catch {
    throw new Rejected("bad_tag");
  }
}

/**
 * Decrypt a JWE addressed to the consumer key, with exactly the key's algorithm and A256GCM
 * (the caller checked the header). jose refuses `zip`, which the callers refuse first.
 * @param {ConsumerKey} key
 * @param {Compact} jwe
 * @param {number} maxPlaintext
 * @returns {Promise<Uint8Array>}
 */
export async function openWithKey(key, jwe, maxPlaintext) {
  if (jwe.ciphertext.length > maxPlaintext) throw new Rejected("bad_decrypt");
  try {
    const { plaintext } = await compactDecrypt(jwe.text, key.privateKey, {
      keyManagementAlgorithms: [key.alg],
      contentEncryptionAlgorithms: [ENC],
    });
    return plaintext;
  } catch {
    throw new Rejected("bad_decrypt");
  }
}

/**
 * Inflate a raw DEFLATE plaintext with a cap (only when the consumer asked for `zip`).
 * @param {Uint8Array} data
 * @param {number} limit
 * @returns {Promise<Uint8Array>}
 */
export async function inflate(data, limit) {
  const stream = new Blob([/** @type {BlobPart} */ (data)])
    .stream()
    .pipeThrough(new DecompressionStream("deflate-raw"));
  const reader = stream.getReader();
  /** @type {Uint8Array[]} */
  const chunks = [];
  let size = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.length;
      if (size > limit) {
        await reader.cancel();
        throw new Rejected("zip_bomb");
      }
      chunks.push(value);
    }
  } catch (err) {
    if (err instanceof Rejected) throw err;
    throw new Rejected("bad_zip");
  }
  const out = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

// --- the cluster's signature --------------------------------------------------------------------

/**
 * The protected header of a JWS compact, parsed strictly (not verified).
 * @param {Uint8Array} token
 * @returns {Record<string, unknown>}
 */
export function jwsHeader(token) {
  const text = ascii.decode(token);
  if (token.length > MAX_JWS || text.split(".").length !== 3) throw new Rejected("bad_jws");
  return b64JsonObject(text.split(".")[0], "bad_jws");
}

/**
 * Import a pinned cluster key (public Ed25519 JWK) for verification.
 * @param {Record<string, unknown>} jwk
 * @returns {Promise<CryptoKey>}
 */
export async function importClusterKey(jwk) {
  if (jwk.kty !== "OKP" || jwk.crv !== "Ed25519" || "d" in jwk || typeof jwk.x !== "string") {
    throw new TypeError("a cluster key must be a public Ed25519 JWK");
  }
  const key = await importJWK({ kty: "OKP", crv: "Ed25519", x: jwk.x }, SIG_ALG);
  return /** @type {CryptoKey} */ (key);
}

/**
 * Verify a JWS compact with exactly Ed25519 against one pinned key; return its JSON claims
 * (integers as BigInt).
 * @param {Uint8Array} token
 * @param {CryptoKey} key
 * @returns {Promise<Record<string, unknown>>}
 */
export async function verifyClaims(token, key) {
  const header = jwsHeader(token);
  if (header.alg !== SIG_ALG || Object.hasOwn(header, "crit")) throw new Rejected("bad_sig_alg");
  let payload;
  try {
    ({ payload } = await compactVerify(ascii.decode(token), key, { algorithms: [SIG_ALG] }));
  } catch {
    throw new Rejected("bad_signature");
  }
  return jsonObject(payload, "bad_claims");
}

// --- the user's identity and the proof in every open -------------------------------------------

/** the proof's JWS `typ` (docs/protocol.md, "Authorization held by the cluster") */
export const PROOF_TYP = "sealstream-open+jwt";
const ED25519 = { name: "Ed25519" };

/**
 * @typedef {object} Identity
 * @property {CryptoKey} privateKey Ed25519, non-extractable, usage sign
 * @property {CryptoKey} publicKey
 * @property {{kty: string, crv: string, x: string}} publicJwk key members only
 * @property {string} kid RFC 7638 thumbprint of publicJwk: the identity id a policy names
 */

/**
 * A new long-term Ed25519 identity key pair; the private half cannot be exported.
 * @returns {Promise<CryptoKeyPair>}
 */
export async function generateIdentityKeys() {
  return /** @type {CryptoKeyPair} */ (
    await crypto.subtle.generateKey(ED25519, false, ["sign", "verify"])
  );
}

/**
 * The identity of a stored key pair (as IndexedDB gives it back); refuses a private key that
 * is not a non-extractable Ed25519 signing key.
 * @param {CryptoKey} privateKey
 * @param {CryptoKey} publicKey
 * @returns {Promise<Identity>}
 */
export async function identityFromKeys(privateKey, publicKey) {
  if (
    privateKey.type !== "private" ||
    privateKey.algorithm.name !== "Ed25519" ||
    privateKey.extractable ||
    !privateKey.usages.includes("sign") ||
    publicKey.type !== "public" ||
    publicKey.algorithm.name !== "Ed25519"
  ) {
    throw new TypeError("an identity is a non-extractable Ed25519 key pair");
  }
  const jwk = await crypto.subtle.exportKey("jwk", publicKey);
  if (typeof jwk.x !== "string") throw new TypeError("an Ed25519 public key has x");
  const publicJwk = { kty: "OKP", crv: "Ed25519", x: jwk.x };
  return { privateKey, publicKey, publicJwk, kid: await thumbprint(publicJwk) };
}

/**
 * An identity from a private JWK, imported non-extractable (tests and vectors only).
 * @param {JsonWebKey} jwk
 * @returns {Promise<Identity>}
 */
export async function importIdentity(jwk) {
  const { kty, crv, x, d } = jwk;
  const priv = await crypto.subtle.importKey("jwk", { kty, crv, x, d }, ED25519, false, ["sign"]);
  const pub = await crypto.subtle.importKey("jwk", { kty, crv, x }, ED25519, true, ["verify"]);
  return identityFromKeys(priv, pub);
}

/**
 * @typedef {object} ProofClaims
 * @property {string} cluster
 * @property {string} session the session id being opened (the thumbprint of the open's jwk)
 * @property {string[]} streams
 * @property {string} keyMode "session" or "per-message", as sent in the open
 * @property {boolean} [zip] the open asks for compressed bodies (then the claim is required:
 *   the relay must not turn compression on)
 * @property {number} [now] Unix seconds (default: the clock)
 * @property {string} [jti] default: 16 random bytes, base64url
 */

/**
 * The proof for one open: a JWS compact by the identity key (alg Ed25519, typ
 * sealstream-open+jwt, kid, jwk) over the open's cluster, session, streams, key mode, `zip`
 * when the open asks for it, `iat` and a fresh random `jti`. A new one for every open.
 * @param {Identity} identity
 * @param {ProofClaims} claims
 * @returns {Promise<string>}
 */
export async function prove(identity, claims) {
  const payload = {
    cluster: claims.cluster,
    session: claims.session,
    streams: [...claims.streams],
    key_mode: claims.keyMode,
    ...(claims.zip ? { zip: true } : {}),
    iat: Math.floor(claims.now ?? Date.now() / 1000),
    jti: claims.jti ?? b64uEncode(crypto.getRandomValues(new Uint8Array(16))),
  };
  return new CompactSign(new TextEncoder().encode(JSON.stringify(payload)))
    .setProtectedHeader({
      alg: SIG_ALG,
      typ: PROOF_TYP,
      kid: identity.kid,
      jwk: { ...identity.publicJwk },
    })
    .sign(identity.privateKey);
}
