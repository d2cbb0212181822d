// The proof the page sends in every open (docs/protocol.md, "Authorization held by the
// cluster"). With SEALSTREAM_PROOF_OUT set, the proofs are also written there for the Python
// producer's checks (tests/web/test_web_js.py verifies them with producers._authz).
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { test } from "node:test";
import { compactVerify } from "jose";
import {
  PROOF_TYP,
  b64uDecode,
  generateIdentityKeys,
  identityFromKeys,
  prove,
  thumbprint,
} from "../src/crypto.js";

const CLAIMS = {
  cluster: "c1",
  session: "h3mYqB0zHnb9y7vJ8cI6v1lQm6q3gGqG0u7Zl1b2c3A",
  streams: ["http_events", "host_metrics"],
  keyMode: "session",
};

/** @param {string} part */
const json = (part) => JSON.parse(new TextDecoder().decode(b64uDecode(part)));

test("the proof is a JWS by the identity key with exactly the contract's header and claims", async () => {
  const pair = await generateIdentityKeys();
  assert.equal(pair.privateKey.extractable, false);
  const identity = await identityFromKeys(pair.privateKey, pair.publicKey);
  assert.deepEqual(Object.keys(identity.publicJwk).sort(), ["crv", "kty", "x"]);
  assert.equal(identity.kid, await thumbprint(identity.publicJwk));
  const proof = await prove(identity, CLAIMS);
  const [h, p] = proof.split(".");
  assert.deepEqual(json(h), {
    alg: "Ed25519",
    typ: PROOF_TYP,
    kid: identity.kid,
    jwk: identity.publicJwk,
  });
  const claims = json(p);
  assert.deepEqual(Object.keys(claims).sort(), [
    "cluster",
    "iat",
    "jti",
    "key_mode",
    "session",
    "streams",
  ]);
  assert.equal(claims.key_mode, "session");
  assert.ok(Number.isInteger(claims.iat) && Math.abs(claims.iat - Date.now() / 1000) < 5);
  assert.match(claims.jti, /^[A-Za-z0-9_-]{22}$/);
  const { payload } = await compactVerify(proof, pair.publicKey, { algorithms: ["Ed25519"] });
  assert.equal(new TextDecoder().decode(payload), new TextDecoder().decode(b64uDecode(p)));
  // a fresh jti for every open
  const again = json((await prove(identity, CLAIMS)).split(".")[1]);
  assert.notEqual(again.jti, claims.jti);
  // zip only when the open asks for it, and then bound
  const zip = async (/** @type {boolean} */ on) =>
    json((await prove(identity, { ...CLAIMS, zip: on })).split(".")[1]).zip;
  assert.equal(await zip(false), undefined);
  assert.equal(await zip(true), true);
});

test("an identity must be a non-extractable Ed25519 signing key", async () => {
  const open = /** @type {CryptoKeyPair} */ (
    await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"])
  );
  await assert.rejects(identityFromKeys(open.privateKey, open.publicKey), TypeError);
});

test("proofs for the Python producer's checks", async (t) => {
  const out = process.env.SEALSTREAM_PROOF_OUT;
  if (!out) {
    t.skip("SEALSTREAM_PROOF_OUT not set (tests/web/test_web_js.py sets it)");
    return;
  }
  const request = JSON.parse(process.env.SEALSTREAM_PROOF_REQUEST ?? "{}");
  const pair = await generateIdentityKeys();
  const identity = await identityFromKeys(pair.privateKey, pair.publicKey);
  const claims = {
    cluster: request.cluster,
    session: request.session,
    streams: request.streams,
    keyMode: request.key_mode,
  };
  const proofs = [await prove(identity, claims), await prove(identity, claims)];
  const zipped = await prove(identity, { ...claims, zip: true });
  const made = { jwk: identity.publicJwk, kid: identity.kid, proofs, zipped };
  writeFileSync(out, JSON.stringify(made));
});
