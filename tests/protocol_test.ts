import assert from "node:assert/strict";
import {
  decodeGetPair,
  decodeSetPair,
  describeKey,
  encodeGetPair,
  encodeSetPair,
  GET_PAIR_KEY_OFFSET,
  GET_PAIR_MIN_SIZE,
  GET_PAIR_PAYLOAD_SIZE,
  getPairKeyLength,
  getPairMode,
  keyBytes,
  MAX_KEY_LENGTH,
  MESSAGE_SIZE,
  type Mode,
  MODES,
  parseMode,
  peerMode,
  PROTOCOL_VERSION,
  ProtocolError,
  type ProtocolErrorField,
  REQUEST_GET_PAIR,
  REQUEST_SET_PAIR,
  SET_PAIR_PAYLOAD_SIZE,
  validateGetPair,
} from "../client/protocol.ts";

const fixture = (name: string) => Deno.readFile(new URL(`./fixtures/${name}`, import.meta.url));
const goldenServer = () => fixture("get_pair_server_vhost-user-1.bin");
const goldenClient = () => fixture("get_pair_client_vhost-user-1.bin");
const goldenSetPair = () => fixture("set_pair.bin");

// Written independently of the encoder, so the tests do not share its mistakes.
function setU32(frame: Uint8Array, offset: number, value: number): Uint8Array {
  new DataView(frame.buffer, frame.byteOffset, frame.byteLength).setUint32(offset, value, true);
  return frame;
}

function setU16(frame: Uint8Array, offset: number, value: number): Uint8Array {
  new DataView(frame.buffer, frame.byteOffset, frame.byteLength).setUint16(offset, value, true);
  return frame;
}

function assertProtocolError(
  fn: () => unknown,
  field: ProtocolErrorField,
  value: number,
): ProtocolError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof ProtocolError, `expected a ProtocolError, got ${caught}`);
  assert.equal(caught.field, field);
  assert.equal(caught.value, value);
  assert.equal(caught.name, "ProtocolError");
  assert.match(caught.message, new RegExp(`\\b${field}\\b`));
  return caught;
}

const text = new TextEncoder();

Deno.test("constants match the wire facts", () => {
  assert.equal(MESSAGE_SIZE, 1044);
  assert.equal(GET_PAIR_MIN_SIZE, 1040);
  assert.equal(PROTOCOL_VERSION, 1);
  assert.equal(MAX_KEY_LENGTH, 1024);
  assert.equal(REQUEST_GET_PAIR, 1);
  assert.equal(REQUEST_SET_PAIR, 2);
  assert.equal(GET_PAIR_PAYLOAD_SIZE, 1028);
  assert.equal(SET_PAIR_PAYLOAD_SIZE, 8);
});

Deno.test("MODES is in wire order and frozen", () => {
  assert.deepEqual([...MODES], ["none", "client", "server"]);
  assert.ok(Object.isFrozen(MODES));
});

Deno.test("parseMode accepts the three names and names a bad one", () => {
  for (const mode of MODES) assert.equal(parseMode(mode), mode);
  for (const bad of ["", "Server", "both", " none"]) {
    assert.throws(() => parseMode(bad), (e: unknown) => {
      assert.ok(e instanceof TypeError);
      assert.ok(e.message.includes(JSON.stringify(bad)), e.message);
      return true;
    });
  }
});

Deno.test("peerMode pairs none with none and client with server", () => {
  assert.equal(peerMode("none"), "none");
  assert.equal(peerMode("client"), "server");
  assert.equal(peerMode("server"), "client");
});

Deno.test("encodeGetPair reproduces the golden server message", async () => {
  assert.deepEqual(encodeGetPair("vhost-user-1", "server"), await goldenServer());
  assert.deepEqual(encodeGetPair(text.encode("vhost-user-1"), "server"), await goldenServer());
});

Deno.test("encodeGetPair reproduces the golden client message", async () => {
  assert.deepEqual(encodeGetPair("vhost-user-1", "client"), await goldenClient());
});

Deno.test("encodeGetPair in mode none differs from the golden files only in mode", async () => {
  const expected = await goldenServer();
  expected[12] = 0;
  assert.deepEqual(encodeGetPair("vhost-user-1", "none"), expected);
});

Deno.test("encodeGetPair rejects an unknown mode at run time", () => {
  assert.throws(() => encodeGetPair("k", "both" as Mode), TypeError);
});

Deno.test("encodeSetPair reproduces the golden set_pair.bin, fresh each time", async () => {
  const first = encodeSetPair();
  assert.deepEqual(first, await goldenSetPair());
  first.fill(0xff);
  assert.deepEqual(encodeSetPair(), await goldenSetPair());
});

Deno.test("decodeGetPair accepts the golden messages", async () => {
  const server = decodeGetPair(await goldenServer());
  assert.equal(server.mode, "server");
  assert.deepEqual(server.key, text.encode("vhost-user-1"));
  const client = decodeGetPair(await goldenClient());
  assert.equal(client.mode, "client");
  assert.deepEqual(client.key, text.encode("vhost-user-1"));
});

Deno.test("decodeGetPair returns the key as a view into the frame", async () => {
  const frame = await goldenServer();
  const { key } = decodeGetPair(frame);
  assert.equal(key.buffer, frame.buffer);
  assert.equal(key.byteOffset, frame.byteOffset + 16);
  assert.equal(key.length, 12);
});

Deno.test("decodeGetPair reads a frame that is a view into a larger buffer", async () => {
  const buffer = new Uint8Array(3000).fill(0xee);
  buffer.set(await goldenClient(), 500);
  const request = decodeGetPair(buffer.subarray(500, 500 + MESSAGE_SIZE));
  assert.equal(request.mode, "client");
  assert.deepEqual(request.key, text.encode("vhost-user-1"));
});

Deno.test("decodeGetPair accepts a 1040-byte frame written from the protocol text", () => {
  const frame = new Uint8Array(1040);
  setU32(frame, 0, 1); // request GET_PAIR
  setU32(frame, 4, 1); // flags: version 1
  setU32(frame, 8, 1028); // size
  setU16(frame, 12, 0); // mode none
  setU16(frame, 14, 3); // key_len
  frame.set([0x61, 0x00, 0x62], 16);
  const request = decodeGetPair(frame);
  assert.equal(request.mode, "none");
  assert.deepEqual(request.key, new Uint8Array([0x61, 0x00, 0x62]));
});

Deno.test("decodeGetPair accepts every length from 1040 to 1044", async () => {
  const golden = await goldenServer();
  for (let length = GET_PAIR_MIN_SIZE; length <= MESSAGE_SIZE; length++) {
    assert.equal(decodeGetPair(golden.subarray(0, length)).mode, "server");
  }
});

Deno.test("decodeGetPair ignores bytes past key_len and the padding", async () => {
  const frame = (await goldenServer()).fill(0xaa, 16 + 12);
  const request = decodeGetPair(frame);
  assert.deepEqual(request.key, text.encode("vhost-user-1"));
});

Deno.test("decodeGetPair rejects a frame shorter than 1040 bytes: length", async () => {
  const golden = await goldenServer();
  assertProtocolError(() => decodeGetPair(golden.subarray(0, 1039)), "length", 1039);
  assertProtocolError(() => decodeGetPair(new Uint8Array(0)), "length", 0);
});

Deno.test("decodeGetPair rejects a frame longer than 1044 bytes: length", () => {
  const frame = new Uint8Array(1045);
  frame.set(encodeGetPair("k", "none"));
  assertProtocolError(() => decodeGetPair(frame), "length", 1045);
});

Deno.test("decodeGetPair rejects request 0: request", async () => {
  const frame = setU32(await goldenServer(), 0, 0);
  assertProtocolError(() => decodeGetPair(frame), "request", 0);
});

Deno.test("decodeGetPair rejects request 3 and above: request", async () => {
  for (const request of [3, 4, 0x101, 0xffffffff]) {
    const frame = setU32(await goldenServer(), 0, request);
    assertProtocolError(() => decodeGetPair(frame), "request", request);
  }
});

Deno.test("decodeGetPair rejects a SET_PAIR sent by a client: request", async () => {
  const error = assertProtocolError(
    () => decodeGetPair(encodeSetPair()),
    "request",
    2,
  );
  assert.match(error.message, /SET_PAIR/);
  // A SET_PAIR-shaped frame otherwise valid as GET_PAIR is still refused.
  const frame = setU32(await goldenServer(), 0, 2);
  assertProtocolError(() => decodeGetPair(frame), "request", 2);
});

Deno.test("decodeGetPair rejects a version other than 1: flags", async () => {
  for (const flags of [0x0, 0x2, 0xf]) {
    const frame = setU32(await goldenServer(), 4, flags);
    assertProtocolError(() => decodeGetPair(frame), "flags", flags);
  }
});

Deno.test("decodeGetPair rejects any other flag bit set: flags", async () => {
  for (const flags of [0x11, 0x101, 0x80000001, 0xffffffff]) {
    const frame = setU32(await goldenServer(), 4, flags);
    const error = assertProtocolError(() => decodeGetPair(frame), "flags", flags);
    assert.ok(error.message.includes(`0x${flags.toString(16)}`), error.message);
  }
});

Deno.test("decodeGetPair rejects a size other than 1028: size", async () => {
  for (const size of [0, 8, 1027, 1029, 1032, 1040]) {
    const frame = setU32(await goldenServer(), 8, size);
    assertProtocolError(() => decodeGetPair(frame), "size", size);
  }
});

Deno.test("decodeGetPair rejects mode 3 and above: mode", async () => {
  for (const mode of [3, 0x100, 0xffff]) {
    const frame = setU16(await goldenServer(), 12, mode);
    assertProtocolError(() => decodeGetPair(frame), "mode", mode);
  }
});

Deno.test("decodeGetPair rejects key_len 0: key_len", async () => {
  const frame = setU16(await goldenServer(), 14, 0);
  const error = assertProtocolError(() => decodeGetPair(frame), "key_len", 0);
  assert.equal(error.message, "invalid GET_PAIR: key_len 0 (must be 1..1024)");
});

Deno.test("decodeGetPair rejects key_len above 1024: key_len", async () => {
  for (const keyLength of [1025, 0xffff]) {
    const frame = setU16(await goldenServer(), 14, keyLength);
    assertProtocolError(() => decodeGetPair(frame), "key_len", keyLength);
  }
});

Deno.test("decodeGetPair reports the first broken rule in wire order", async () => {
  const frame = await goldenServer();
  setU16(frame, 14, 0);
  setU16(frame, 12, 9);
  assertProtocolError(() => decodeGetPair(frame), "mode", 9);
  setU32(frame, 8, 8);
  assertProtocolError(() => decodeGetPair(frame), "size", 8);
  setU32(frame, 4, 2);
  assertProtocolError(() => decodeGetPair(frame), "flags", 2);
  setU32(frame, 0, 7);
  assertProtocolError(() => decodeGetPair(frame), "request", 7);
  assertProtocolError(() => decodeGetPair(frame.subarray(0, 100)), "length", 100);
});

Deno.test("validateGetPair judges a frame in a larger buffer exactly as decodeGetPair", async () => {
  const golden = await goldenServer();
  // The broker's receive buffer: the frame at its start, `length` bytes of it received.
  const buffer = new Uint8Array(MESSAGE_SIZE + 16);
  buffer.set(golden);
  assert.equal(validateGetPair(buffer, MESSAGE_SIZE), undefined);
  assert.equal(validateGetPair(buffer, GET_PAIR_MIN_SIZE), undefined);
  assert.equal(getPairMode(buffer), "server");
  const keyLength = getPairKeyLength(buffer);
  assert.equal(
    new TextDecoder().decode(buffer.subarray(GET_PAIR_KEY_OFFSET, GET_PAIR_KEY_OFFSET + keyLength)),
    "vhost-user-1",
  );
  for (const length of [0, GET_PAIR_MIN_SIZE - 1, MESSAGE_SIZE + 1]) {
    assert.equal(validateGetPair(buffer, length)?.field, "length", `length ${length}`);
  }
  // A length beyond the buffer is refused rather than read past its end.
  assert.equal(validateGetPair(golden.subarray(0, 1041), 1042)?.field, "length");
  const breakages: [number, number, number, ProtocolErrorField][] = [
    [0, 4, 2, "request"],
    [4, 4, 0x11, "flags"],
    [8, 4, 1032, "size"],
    [12, 2, 3, "mode"],
    [14, 2, 0, "key_len"],
    [14, 2, MAX_KEY_LENGTH + 1, "key_len"],
  ];
  for (const [offset, width, value, field] of breakages) {
    const frame = buffer.slice();
    (width === 4 ? setU32 : setU16)(frame, offset, value);
    const error = validateGetPair(frame, MESSAGE_SIZE);
    assert.ok(error instanceof ProtocolError, field);
    assert.equal(error.field, field);
    assert.equal(error.value, value);
    assert.equal(
      error.message,
      assertProtocolError(() => decodeGetPair(frame.subarray(0, MESSAGE_SIZE)), field, value)
        .message,
    );
  }
});

Deno.test("decodeSetPair accepts the golden set_pair.bin and encodeSetPair()", async () => {
  decodeSetPair(await goldenSetPair());
  decodeSetPair(encodeSetPair());
});

Deno.test("decodeSetPair ignores the payload, as the C client does", () => {
  decodeSetPair(encodeSetPair().fill(0x55, 12));
});

Deno.test("decodeSetPair requires exactly 1044 bytes: length", async () => {
  const golden = await goldenSetPair();
  assertProtocolError(() => decodeSetPair(golden.subarray(0, 1040)), "length", 1040);
  assertProtocolError(() => decodeSetPair(golden.subarray(0, 1043)), "length", 1043);
  const long = new Uint8Array(1045);
  long.set(golden);
  assertProtocolError(() => decodeSetPair(long), "length", 1045);
});

Deno.test("decodeSetPair requires request 2: request", async () => {
  assertProtocolError(() => decodeSetPair(setU32(encodeSetPair(), 0, 0)), "request", 0);
  assertProtocolError(() => decodeSetPair(setU32(encodeSetPair(), 0, 3)), "request", 3);
  const getPair = await goldenServer();
  assertProtocolError(() => decodeSetPair(getPair), "request", 1);
});

Deno.test("decodeSetPair requires flags exactly version 1: flags", () => {
  for (const flags of [0, 2, 0x11, 0x80000001]) {
    assertProtocolError(() => decodeSetPair(setU32(encodeSetPair(), 4, flags)), "flags", flags);
  }
});

Deno.test("decodeSetPair requires size 8: size", () => {
  for (const size of [0, 4, 1028]) {
    assertProtocolError(() => decodeSetPair(setU32(encodeSetPair(), 8, size)), "size", size);
  }
});

Deno.test("keyBytes encodes strings as UTF-8 and passes bytes through", () => {
  assert.deepEqual(keyBytes("a"), new Uint8Array([0x61]));
  assert.deepEqual(keyBytes("é€"), new Uint8Array([0xc3, 0xa9, 0xe2, 0x82, 0xac]));
  const bytes = new Uint8Array([0, 1, 0]);
  assert.equal(keyBytes(bytes), bytes);
});

Deno.test("keyBytes accepts 1 and 1024 bytes and rejects 0 and 1025, naming the length", () => {
  assert.equal(keyBytes("x").length, 1);
  assert.equal(keyBytes("x".repeat(1024)).length, 1024);
  assert.equal(keyBytes("é".repeat(512)).length, 1024);
  for (
    const [key, length] of [["", 0], ["x".repeat(1025), 1025], ["é".repeat(513), 1026]] as const
  ) {
    assert.throws(() => keyBytes(key), (e: unknown) => {
      assert.ok(e instanceof RangeError);
      assert.ok(e.message.includes(`length ${length}`), e.message);
      return true;
    });
  }
  assert.throws(() => keyBytes(new Uint8Array(0)), RangeError);
  assert.throws(() => keyBytes(new Uint8Array(1025)), RangeError);
});

Deno.test("a 1-byte key round-trips", () => {
  const frame = encodeGetPair("x", "client");
  assert.equal(frame[14], 1);
  assert.ok(frame.subarray(17).every((b) => b === 0));
  assert.deepEqual(decodeGetPair(frame).key, new Uint8Array([0x78]));
});

Deno.test("a 1024-byte key fills the key field and round-trips", () => {
  const key = new Uint8Array(1024).map((_, i) => (i * 7 + 1) & 0xff);
  const frame = encodeGetPair(key, "server");
  assert.equal(frame.length, MESSAGE_SIZE);
  assert.deepEqual(frame.subarray(16, 1040), key);
  assert.deepEqual([...frame.subarray(1040)], [0, 0, 0, 0]);
  assert.deepEqual(decodeGetPair(frame).key, key);
  assert.deepEqual(decodeGetPair(frame.subarray(0, 1040)).key, key);
});

Deno.test("a 1025-byte key is rejected by the encoder", () => {
  assert.throws(() => encodeGetPair(new Uint8Array(1025), "none"), RangeError);
  assert.throws(() => encodeGetPair("", "none"), RangeError);
});

Deno.test("binary keys with zero bytes round-trip exactly", () => {
  for (const key of [[0], [0, 0, 0], [0x61, 0], [0xff, 0, 0x80, 0, 0x7f]]) {
    const bytes = new Uint8Array(key);
    const request = decodeGetPair(encodeGetPair(bytes, "none"));
    assert.deepEqual(request.key, bytes);
  }
});

Deno.test("ProtocolError names the field, the value and what was expected", () => {
  const error = new ProtocolError("GET_PAIR", "descriptors", 2, "must be 0");
  assert.ok(error instanceof Error);
  assert.equal(error.name, "ProtocolError");
  assert.equal(error.field, "descriptors");
  assert.equal(error.value, 2);
  assert.equal(error.expected, "must be 0");
  assert.equal(error.message, "invalid GET_PAIR: descriptors 2 (must be 0)");
  const cause = new Error("x");
  const sequence = new ProtocolError("GET_PAIR", "sequence", 2, "one request per connection", {
    cause,
  });
  assert.equal(sequence.cause, cause);
  assert.equal(
    new ProtocolError("SET_PAIR", "flags", 0x11, "must be 0x1").message,
    "invalid SET_PAIR: flags 0x11 (must be 0x1)",
  );
});

Deno.test("describeKey shows printable ASCII and escapes the rest", () => {
  assert.equal(describeKey(text.encode("vhost-user-1")), "vhost-user-1");
  assert.equal(describeKey(text.encode(" ~")), " ~");
  assert.equal(describeKey(text.encode('say "hi"\\')), 'say \\"hi\\"\\\\');
  assert.equal(
    describeKey(new Uint8Array([0x00, 0x0a, 0x1f, 0x7f, 0x80, 0xff, 0x41])),
    "\\x00\\x0a\\x1f\\x7f\\x80\\xffA",
  );
  assert.equal(describeKey(new Uint8Array(0)), "");
});

Deno.test("describeKey cuts keys beyond 128 bytes and gives their length", () => {
  const at = (n: number) => new Uint8Array(n).fill(0x62);
  assert.equal(describeKey(at(128)), "b".repeat(128));
  assert.equal(describeKey(at(129)), "b".repeat(128) + "…(129 bytes)");
  assert.equal(describeKey(new Uint8Array(1024)), "\\x00".repeat(128) + "…(1024 bytes)");
});

Deno.test("encodeGetPair into a reused buffer writes every byte: nothing of a longer earlier key remains", () => {
  const buffer = new Uint8Array(MESSAGE_SIZE).fill(0xee);
  encodeGetPair("a much longer key than the next one", "server", buffer);
  assert.equal(encodeGetPair("short", "client", buffer), buffer);
  assert.deepEqual(buffer, encodeGetPair("short", "client"));
  assert.throws(() => encodeGetPair("k", "none", new Uint8Array(GET_PAIR_MIN_SIZE)), RangeError);
});
