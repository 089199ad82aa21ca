// The hand-over protocol's messages on bytes (docs/handover.md): round trips, the batch
// limits, and every record rule a malformed or hostile peer could break.
import assert from "node:assert/strict";
import { ProtocolError } from "../client/protocol.ts";
import {
  batches,
  decodeAck,
  decodeBatch,
  decodeEnd,
  decodeOffer,
  decodeTakeover,
  encodeAck,
  encodeBatch,
  encodeEnd,
  encodeOffer,
  encodeTakeover,
  handoverMessageLength,
  type HandoverRecord,
  MAX_BATCH_BYTES,
  MAX_BATCH_RECORDS,
} from "../broker/handover_wire.ts";

const bytes = (text: string) => new TextEncoder().encode(text);

function waiting(id: number, key = `key-${id}`): HandoverRecord {
  return {
    kind: "waiting",
    version: 1,
    type: 0,
    mode: "server",
    wantsPidfd: false,
    hearsReasons: false,
    id,
    ageMs: 1234,
    key: bytes(key),
    partial: new Uint8Array(0),
  };
}

const listener: HandoverRecord = {
  kind: "listener",
  version: 2,
  type: 1,
  mode: "server",
  wantsPidfd: true,
  hearsReasons: true,
  id: 2 ** 40 + 7, // ids grow past 32 bits on a long-lived broker
  ageMs: 86_400_000,
  key: bytes("memif-ctl"),
  partial: new Uint8Array(0),
  listener: { backlog: 32, credit: 5, served: 123_456 },
};

const incomplete: HandoverRecord = {
  kind: "incomplete",
  version: 1,
  type: 0,
  mode: "none",
  wantsPidfd: false,
  hearsReasons: false,
  id: 99,
  ageMs: 40,
  key: new Uint8Array(0),
  partial: Uint8Array.from({ length: 700 }, (_, i) => i & 0xff),
};

Deno.test("hand-over: TAKEOVER, OFFER, ACK and END round-trip", () => {
  assert.deepEqual(decodeTakeover(encodeTakeover(4242)), { version: 1, pid: 4242 });
  const offer = {
    pid: 17,
    records: 10_000,
    nextId: 2 ** 33 + 5,
    startedMs: Date.UTC(2026, 11, 3),
    ownsSocketFile: true,
  };
  assert.deepEqual(decodeOffer(encodeOffer(offer)), offer);
  assert.equal(decodeAck(encodeAck(9_999)), 9_999);
  decodeEnd(encodeEnd());
  for (const frame of [encodeTakeover(1), encodeOffer(offer), encodeAck(1), encodeEnd()]) {
    assert.equal(handoverMessageLength(frame), frame.length);
  }
});

Deno.test("hand-over: a BATCH carries every kind of record intact, in order", () => {
  const records = [waiting(1), listener, incomplete, { ...waiting(3), mode: "none" as const }];
  const frame = encodeBatch(records);
  assert.equal(handoverMessageLength(frame), frame.length);
  assert.deepEqual(decodeBatch(frame), records);
});

Deno.test("hand-over: batches keep to 64 records and 64 KiB, oldest first", () => {
  const many = Array.from({ length: 10_000 }, (_, i) => waiting(i + 1));
  const split = batches(many);
  assert.equal(split.length, Math.ceil(10_000 / MAX_BATCH_RECORDS));
  assert.deepEqual(split.flat().map((record) => record.id), many.map((record) => record.id));
  const big = Array.from({ length: 200 }, (_, i) => waiting(i + 1, "k".repeat(1024)));
  for (const batch of batches(big)) {
    assert.ok(encodeBatch(batch).length - 12 <= MAX_BATCH_BYTES);
  }
  assert.throws(() => encodeBatch([]), RangeError);
  assert.throws(() => encodeBatch(many.slice(0, MAX_BATCH_RECORDS + 1)), RangeError);
});

Deno.test("hand-over: records that break a rule are refused on both sides", () => {
  const bad: [string, HandoverRecord][] = [
    ["a waiter without a key", { ...waiting(1), key: new Uint8Array(0) }],
    ["a key over 1024 bytes", waiting(1, "k".repeat(1025))],
    ["a waiter with request bytes", { ...waiting(1), partial: new Uint8Array(3) }],
    ["an incomplete one with a key", { ...incomplete, key: bytes("k") }],
    ["a listener without its state", { ...listener, listener: undefined }],
    ["credit over the backlog", { ...listener, listener: { backlog: 4, credit: 5, served: 0 } }],
  ];
  for (const [what, record] of bad) {
    assert.throws(() => encodeBatch([record]), RangeError, what);
  }
  // The same, and more, as bytes a hostile old broker could send.
  const mutate = (offset: number, value: number) => {
    const frame = encodeBatch([waiting(1)]);
    frame[offset] = value;
    return frame;
  };
  const record = 16; // the first record's offset in the frame
  const frames: [string, Uint8Array][] = [
    ["kind 0", mutate(record, 0)],
    ["kind 4", mutate(record, 4)],
    ["version 3", mutate(record + 1, 3)],
    ["type 3", mutate(record + 2, 3)],
    ["mode 3", mutate(record + 3, 3)],
    ["unknown flag", mutate(record + 4, 4)],
    ["key_len 0", mutate(record + 20, 0)],
    ["key_len past the end", mutate(record + 20, 200)],
    ["count 0", mutate(12, 0)],
    ["count 2 for one record", mutate(12, 2)],
    ["an id past 2^53", mutate(record + 15, 0xff)],
    ["size not the bytes that follow", mutate(8, 99)],
    ["flags 1", mutate(4, 1)],
  ];
  for (const [what, frame] of frames) {
    assert.throws(() => decodeBatch(frame), ProtocolError, what);
  }
  const trailing = encodeBatch([waiting(1)]);
  const longer = new Uint8Array(trailing.length + 1);
  longer.set(trailing);
  new DataView(longer.buffer).setUint32(8, longer.length - 12, true);
  assert.throws(() => decodeBatch(longer), /bytes after the last record/);
});

Deno.test("hand-over: framing refuses other requests, flags and oversized messages", () => {
  const header = (request: number, flags: number, size: number) => {
    const frame = new Uint8Array(12);
    const view = new DataView(frame.buffer);
    view.setUint32(0, request, true);
    view.setUint32(4, flags, true);
    view.setUint32(8, size, true);
    return frame;
  };
  assert.equal((handoverMessageLength(header(1, 2, 24)) as ProtocolError).field, "request");
  assert.equal((handoverMessageLength(header(21, 2, 0)) as ProtocolError).field, "request");
  assert.equal((handoverMessageLength(header(18, 1, 16)) as ProtocolError).field, "flags");
  assert.equal(
    (handoverMessageLength(header(18, 2, MAX_BATCH_BYTES + 1)) as ProtocolError).field,
    "size",
  );
  assert.equal((handoverMessageLength(header(16, 2, 1000)) as ProtocolError).field, "size");
  assert.equal(handoverMessageLength(header(18, 2, MAX_BATCH_BYTES)), 12 + MAX_BATCH_BYTES);
  const offer = encodeOffer({ pid: 1, records: 0, nextId: 1, startedMs: 0, ownsSocketFile: false });
  offer[12] = 2; // a hand-over version this broker does not speak
  assert.throws(() => decodeOffer(offer), /hand-over version must be 1/);
});
