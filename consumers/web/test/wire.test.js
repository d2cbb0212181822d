import assert from "node:assert/strict";
import { test } from "node:test";
import { encode } from "@msgpack/msgpack";
import { b64uDecode, b64uEncode } from "../src/crypto.js";
import { WireFloat, decodeMap, parseJson } from "../src/wire.js";

test("a msgpack float never passes for an int (the pinned decoder's float readers)", () => {
  const m = decodeMap(encode({ a: 1.5, b: 1 }));
  assert.ok(m.a instanceof WireFloat);
  assert.equal(m.b, 1);
  const f32 = new Uint8Array([0x81, 0xa1, 0x61, 0xca, 0x3f, 0x80, 0x00, 0x00]); // {a: 1.0f}
  assert.ok(decodeMap(f32).a instanceof WireFloat);
});

test("64-bit integers decode as BigInt, exactly", () => {
  const ts = 1790000000123456789n;
  assert.equal(decodeMap(encode({ ts }, { useBigInt64: true })).ts, ts);
});

test("maps with non-string keys are refused", () => {
  assert.throws(() => decodeMap(new Uint8Array([0x81, 0x01, 0x01])), { reason: "bad_key" });
});

test("JSON integers are BigInt, floats are numbers, duplicates refused", () => {
  assert.deepEqual(parseJson('{"ts":1790000000123456789,"f":1.0,"e":1e3}'), {
    __proto__: null,
    ts: 1790000000123456789n,
    f: 1,
    e: 1000,
  });
  assert.throws(() => parseJson('{"a":1,"a":2}'), SyntaxError);
  assert.throws(() => parseJson('{"a":01}'), SyntaxError);
  assert.throws(() => parseJson('{"a":1} x'), SyntaxError);
  assert.equal(parseJson('"a\\"b\\u00e9"'), 'a"bé');
});

test("base64url is canonical", () => {
  const data = new Uint8Array([1, 2, 3, 4, 250]);
  assert.deepEqual(b64uDecode(b64uEncode(data)), data);
  assert.throws(() => b64uDecode("AQ=="));
  assert.throws(() => b64uDecode("AR")); // unused low bits set
  assert.throws(() => b64uDecode("A+"));
  assert.throws(() => b64uDecode("A"));
});
