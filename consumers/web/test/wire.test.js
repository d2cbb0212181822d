import assert from "node:assert/strict";
import { test } from "node:test";
import { encode } from "@msgpack/msgpack";
import { b64uDecode, b64uEncode } from "../src/crypto.js";
import {
  ERROR_CODES,
  KEEPALIVE_MAX_S,
  KEEPALIVE_MIN_S,
  MAX_MESSAGE,
  WireError,
  WireFloat,
  decodeMap,
  decodeReply,
  encodeOpenRequest,
  encodeResume,
  encodeSessionRef,
  parseJson,
} from "../src/wire.js";

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

// --- session control: the consumer's side of sealstream/control.py ---------------------------

const hex = (/** @type {string} */ h) => Uint8Array.from(Buffer.from(h, "hex"));
/** a session id at both edges of its alphabet */
const SESSION = `-${"A".repeat(41)}_`;

test("requests are the bytes sealstream.control encodes", () => {
  // the hex strings are sealstream.control.encode(...) of the same values, in Python
  const open = encodeOpenRequest({
    cluster: "c1",
    streams: ["a", "b"],
    jwk: { kty: "OKP", crv: "X25519", x: "x".repeat(43) },
    keyMode: "per-message",
    token: "tok",
    zip: false,
    proof: "p.r.f",
  });
  assert.deepEqual(
    open,
    hex(
      "88a17601a5746f6b656ea3746f6ba7636c7573746572a26331a773747265616d7392a161a162a36a776b83" +
        "a36b7479a34f4b50a3637276a6583235353139a178d92b" +
        "78".repeat(43) +
        "a86b65795f6d6f6465ab7065722d6d657373616765a37a6970c2a570726f6f66a5702e722e66",
    ),
  );
  assert.deepEqual(
    encodeSessionRef({ session: SESSION, token: "tok" }),
    hex(`83a17601a5746f6b656ea3746f6ba773657373696f6ed92b2d${"41".repeat(41)}5f`),
  );
});

test("replies decode to typed values, a refusal whatever was asked", () => {
  const opened = decodeReply(
    hex(
      `84a26f6bc3a773657373696f6ed92b2d${"41".repeat(41)}5fa5696e626f78d93c` +
        `7365616c73747265616d2e696e626f782e2d${"41".repeat(41)}5f` +
        "ab6b656570616c6976655f73cb4024000000000000",
    ),
    "opened",
  );
  assert.deepEqual(opened, {
    type: "opened",
    session: SESSION,
    inbox: `sealstream.inbox.${SESSION}`,
    keepaliveS: 10,
    store: false,
  });
  assert.deepEqual(decodeReply(hex("82a26f6bc3ab6b656570616c6976655f730a"), "keptAlive"), {
    type: "keptAlive",
    keepaliveS: 10,
  });
  assert.deepEqual(decodeReply(encode({ ok: true }), "keptAlive"), {
    type: "keptAlive",
    keepaliveS: null,
  });
  const busy = hex(
    "82a26f6bc2a56572726f7283a4636f6465ae6c696d69745f6578636565646564a76d657373616765a462757379a57265747279c3",
  );
  for (const kind of /** @type {const} */ (["ok", "opened", "keptAlive"])) {
    assert.deepEqual(decodeReply(busy, kind), {
      type: "refusal",
      code: "limit_exceeded",
      message: "busy",
      retry: true,
    });
  }
  const plain = decodeReply(encode({ ok: false, error: { code: "forbidden", message: "m" } }), "ok");
  assert.deepEqual(plain, { type: "refusal", code: "forbidden", message: "m", retry: false });
  const long = encode({ ok: false, error: { code: "bad_request", message: "x".repeat(10000) } });
  const cut = decodeReply(long, "ok");
  assert.equal(cut.type === "refusal" && cut.message.length, MAX_MESSAGE);
});

test("the resume request and its answer are sealstream.control's bytes", () => {
  const session = `a7${"73657373696f6e"}d92b2d${"41".repeat(41)}5f`;
  assert.deepEqual(
    encodeResume({ session: SESSION, token: "tok", after: 5n }),
    hex(`84a17601a5746f6b656ea3746f6b${session}a5616674657205`),
  );
  assert.deepEqual(
    encodeResume({ session: SESSION, token: "tok", after: -1n }),
    hex(`84a17601a5746f6b656ea3746f6b${session}a56166746572ff`),
  );
  // a group member's page: the limit, then the group, as the Python client writes them
  assert.deepEqual(
    encodeResume({ session: SESSION, token: "tok", after: 5n, limit: 1000, group: "records" }),
    hex(`86a17601a5746f6b656ea3746f6b${session}a5616674657205a56c696d6974cd03e8a567726f7570a77265636f726473`),
  );
  assert.deepEqual(decodeReply(hex("82a26f6bc3a87265706c6179656403"), "replayed"), {
    type: "replayed",
    replayed: 3n,
    more: false,
  });
  assert.deepEqual(decodeReply(hex("83a26f6bc3a87265706c6179656403a46d6f7265c3"), "replayed"), {
    type: "replayed",
    replayed: 3n,
    more: true,
  });
  assert.throws(() => decodeReply(encode({ ok: true, replayed: 1, more: 1 }), "replayed"));
  const stored = decodeReply(hex(`84a26f6bc3${session}a5696e626f78a169a573746f7265c3`), "opened");
  assert.equal(stored.type === "opened" && stored.store, true);
  for (const bad of [{ ok: true }, { ok: true, replayed: -1 }, { ok: true, replayed: 1.5 }]) {
    assert.throws(() => decodeReply(encode(bad), "replayed"), WireError);
  }
  const notBool = encode({ ok: true, session: SESSION, inbox: "i", store: 1 });
  assert.throws(() => decodeReply(notBool, "opened"), WireError);
});

test("the relay's keepalive interval is clamped to [1, 3600] s", () => {
  /** @param {unknown} v */
  const interval = (v) => {
    const reply = decodeReply(encode({ ok: true, keepalive_s: v }), "keptAlive");
    return reply.type === "keptAlive" ? reply.keepaliveS : undefined;
  };
  // 1e-9 s would send keepalives back to back; 3e6 s overflows setTimeout, which fires at once
  assert.equal(interval(1e-9), KEEPALIVE_MIN_S);
  assert.equal(interval(0.5), 1);
  assert.equal(interval(3_000_000), KEEPALIVE_MAX_S);
  assert.equal(interval(1e300), 3600);
  assert.equal(interval(2 ** 53 + 1), 3600);
  assert.equal(interval(1), 1);
  assert.equal(interval(2.5), 2.5);
  assert.equal(interval(3600), 3600);
  const opened = encode({ ok: true, session: SESSION, inbox: "i", keepalive_s: 1e7 });
  const reply = decodeReply(opened, "opened");
  assert.equal(reply.type === "opened" && reply.keepaliveS, 3600);
});

test("malformed replies are WireErrors, as in sealstream.control", () => {
  /** @type {Array<[Record<string, unknown>, "ok" | "opened" | "keptAlive"]>} */
  const cases = [
    [{}, "ok"],
    [{ ok: 1 }, "ok"],
    [{ ok: false }, "ok"],
    [{ ok: false, error: "forbidden" }, "ok"],
    [{ ok: false, error: { message: "no code" } }, "ok"],
    [{ ok: false, error: { code: "teapot", message: "m" } }, "ok"],
    [{ ok: false, error: { code: "forbidden" } }, "ok"],
    [{ ok: false, error: { code: "forbidden", message: "m", retry: 1 } }, "ok"],
    [{ ok: true, inbox: "i" }, "opened"],
    [{ ok: true, session: "short", inbox: "i" }, "opened"],
    [{ ok: true, session: SESSION, inbox: 5 }, "opened"],
    [{ ok: true, session: SESSION, inbox: "i", keepalive_s: true }, "opened"],
    [{ ok: true, keepalive_s: -1 }, "keptAlive"],
    [{ ok: true, keepalive_s: "10" }, "keptAlive"],
  ];
  for (const [m, kind] of cases) {
    assert.throws(() => decodeReply(encode(m), kind), WireError, JSON.stringify(m));
  }
  assert.equal(ERROR_CODES.size, 5);
});
