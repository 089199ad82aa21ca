// The v2 codec on bytes: golden messages, every validation rule, and the
// boundaries between v1 and v2.
import assert from "node:assert/strict";
import { encodeGetPair, ProtocolError, type ProtocolErrorField } from "../client/protocol.ts";
import {
  CREDIT_SIZE,
  decodeHello,
  decodeRefused,
  decodeReply,
  decodeRequest,
  decodeSetPair,
  encodeCredit,
  encodeHello,
  encodeRefused,
  encodeRequest,
  encodeSetPair,
  HEADER_SIZE,
  MAX_REFUSED_REASON,
  MAX_REQUEST_SIZE,
  messageVersion,
  replyLength,
  requestLength,
  type SetPair,
  validateCredit,
  validateRequest,
} from "../client/protocol_v2.ts";

const fixture = (name: string) =>
  Deno.readFileSync(new URL(`./fixtures/v2/${name}`, import.meta.url));

// Written independently of the encoder, so the tests do not share its mistakes.
function u32(frame: Uint8Array, offset: number): number {
  return new DataView(frame.buffer, frame.byteOffset, frame.byteLength).getUint32(offset, true);
}
function set16(frame: Uint8Array, offset: number, value: number): Uint8Array {
  new DataView(frame.buffer, frame.byteOffset).setUint16(offset, value, true);
  return frame;
}
function set32(frame: Uint8Array, offset: number, value: number): Uint8Array {
  new DataView(frame.buffer, frame.byteOffset).setUint32(offset, value, true);
  return frame;
}

const listenerReply: SetPair = {
  delivery: "socketpair",
  type: "seqpacket",
  descriptors: 2,
  peer: { pid: 4242, uid: 1000, gid: 1000 },
  peerListener: false,
  peerVersion: 1,
  capabilities: 0xf,
  peerId: 7,
};

Deno.test("v2 golden messages: the encoder still produces them, the decoders accept them", () => {
  const get = fixture("get_pair_client_vhost-user-1.bin");
  assert.deepEqual(encodeRequest("get_pair", "vhost-user-1", { mode: "client" }), get);
  assert.deepEqual(
    [u32(get, 0), u32(get, 4), u32(get, 8), get.length],
    [1, 2, 24, 36],
    "request 1, version 2, size 12 + key",
  );
  const listen = fixture("listen_server_seqpacket_memif-ctl.bin");
  assert.deepEqual(
    encodeRequest("listen", "memif-ctl", {
      mode: "server",
      type: "seqpacket",
      pidfd: true,
      backlog: 32,
    }),
    listen,
  );
  const decoded = decodeRequest(listen);
  assert.deepEqual(
    { ...decoded, key: new TextDecoder().decode(decoded.key) },
    {
      request: "listen",
      mode: "server",
      type: "seqpacket",
      pidfd: true,
      backlog: 32,
      key: "memif-ctl",
    },
  );
  assert.deepEqual(encodeHello(0xf, 32), fixture("hello_listener.bin"));
  assert.deepEqual(decodeHello(fixture("hello_listener.bin")), { capabilities: 0xf, backlog: 32 });
  assert.deepEqual(encodeSetPair(listenerReply), fixture("set_pair_listener.bin"));
  assert.deepEqual(decodeSetPair(fixture("set_pair_listener.bin")), listenerReply);
  assert.deepEqual(encodeCredit(1), fixture("credit_1.bin"));
  assert.equal(validateCredit(fixture("credit_1.bin")), undefined);
  assert.deepEqual(encodeRefused("policy"), fixture("refused_policy.bin"));
  assert.equal(decodeRefused(fixture("refused_policy.bin")), "policy");
});

Deno.test("v2: the version is told by the first 8 bytes; v1 frames are not v2 requests", () => {
  assert.equal(messageVersion(encodeGetPair("k", "none")), 1);
  assert.equal(messageVersion(encodeRequest("get_pair", "k")), 2);
  const v1 = encodeGetPair("k", "none");
  assert.equal((requestLength(v1) as ProtocolError).field, "flags");
});

function expectField(frame: Uint8Array, field: ProtocolErrorField, length = frame.length): void {
  const error = validateRequest(frame, length);
  assert.ok(error instanceof ProtocolError, `expected a ${field} error`);
  assert.equal(error.field, field, error.message);
}

Deno.test("v2 requests: every rule, in wire order", () => {
  const good = () => encodeRequest("get_pair", "key");
  assert.equal(validateRequest(good(), good().length), undefined);
  expectField(set32(good(), 0, 2), "request"); // SET_PAIR from a client
  expectField(set32(good(), 0, 4), "request");
  expectField(set32(good(), 4, 0x12), "flags");
  expectField(set32(good(), 8, 12), "size"); // no room for a key
  expectField(set32(good(), 8, MAX_REQUEST_SIZE), "size");
  expectField(good(), "length", good().length - 1);
  expectField(set16(good(), 12, 3), "mode");
  expectField(set16(good(), 14, 3), "type");
  expectField(set32(good(), 16, 2), "options");
  expectField(set16(good(), 20, 2), "key_len");
  expectField(set16(good(), 20, 0), "key_len");
  expectField(set16(good(), 22, 1), "backlog"); // a GET_PAIR has none
  const listen = encodeRequest("listen", "key", { backlog: 65535 });
  assert.equal(validateRequest(listen, listen.length), undefined);
  assert.equal(encodeRequest("get_pair", "x".repeat(1024)).length, MAX_REQUEST_SIZE);
  assert.throws(() => encodeRequest("get_pair", "k", { backlog: 1 }), RangeError);
  assert.throws(() => encodeRequest("listen", "k", { backlog: 65536 }), RangeError);
  assert.throws(() => encodeRequest("get_pair", ""), RangeError);
});

Deno.test("v2 replies: lengths, headers and fields are checked", () => {
  const setPair = encodeSetPair(listenerReply);
  assert.equal(replyLength(setPair), setPair.length);
  assert.equal(
    (replyLength(set32(encodeSetPair(listenerReply), 0, 1)) as ProtocolError).field,
    "request",
  );
  assert.equal(
    (replyLength(set32(encodeSetPair(listenerReply), 8, 0)) as ProtocolError).field,
    "size",
  );
  assert.throws(() => decodeSetPair(setPair.subarray(0, 43)), { name: "ProtocolError" });
  assert.throws(() => decodeSetPair(set16(encodeSetPair(listenerReply), 16, 3)), ProtocolError);
  assert.throws(() => decodeSetPair(set16(encodeSetPair(listenerReply), 12, 2)), ProtocolError);
  assert.throws(() => decodeSetPair(set16(encodeSetPair(listenerReply), 18, 4)), ProtocolError);
  assert.equal(decodeReply(encodeHello(1, 0)).request, "hello");
  assert.throws(() => decodeReply(set32(encodeHello(1, 0), 0, 5)), ProtocolError);
  // A reason is cut at a character boundary, never inside one.
  const long = encodeRefused("é".repeat(200));
  assert.ok(long.length - HEADER_SIZE <= MAX_REFUSED_REASON);
  assert.equal(decodeRefused(long), "é".repeat((MAX_REFUSED_REASON / 2) | 0));
});

Deno.test("v2 CREDIT: only a well-formed count of 1..65535", () => {
  assert.equal(encodeCredit(65535).length, CREDIT_SIZE);
  assert.equal(validateCredit(set32(encodeCredit(1), 12, 0))?.field, "count");
  assert.equal(validateCredit(set32(encodeCredit(1), 12, 65536))?.field, "count");
  assert.equal(validateCredit(set32(encodeCredit(1), 8, 5))?.field, "size");
  assert.equal(validateCredit(set32(encodeCredit(1), 4, 1))?.field, "flags");
  assert.equal(validateCredit(encodeRequest("get_pair", "k"))?.field, "request");
  assert.throws(() => encodeCredit(0), RangeError);
});
