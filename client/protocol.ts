/**
 * The SocketPair Broker protocol, version 1: constants, encoders and
 * validating decoders for the two messages, on plain `Uint8Array`s.
 *
 * Interoperates with the C implementation (`one-socket`, `libspbroker`):
 * every message is 1044 bytes on the wire, little-endian, although the
 * protocol text describes 1040; see `docs/protocol.md`.
 *
 * @example Usage
 * ```ts
 * import { decodeGetPair, encodeGetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeGetPair("vhost-user-1", "server");
 * const request = decodeGetPair(frame);
 * assert.equal(request.mode, "server");
 * assert.equal(new TextDecoder().decode(request.key), "vhost-user-1");
 * ```
 *
 * @module
 */

import { putU16, putU32, u16, u32 } from "./bytes.ts";

/**
 * Bytes of every message on the wire, in both directions.
 *
 * The C implementation pads its payload union from 1028 to 1032 bytes, so it
 * sends 1044 bytes and its client rejects a `SET_PAIR` of any other length.
 *
 * @example Usage
 * ```ts
 * import { MESSAGE_SIZE, encodeSetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeSetPair().length, MESSAGE_SIZE);
 * ```
 */
export const MESSAGE_SIZE = 1044;

/**
 * Bytes of a `GET_PAIR` a broker needs before acting on it.
 *
 * A client following the protocol text literally sends only these 1040
 * bytes; one built on the C library sends 4 more, which are ignored.
 *
 * @example Usage
 * ```ts
 * import { GET_PAIR_MIN_SIZE, decodeGetPair, encodeGetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const literal = encodeGetPair("k", "none").subarray(0, GET_PAIR_MIN_SIZE);
 * assert.equal(decodeGetPair(literal).mode, "none");
 * ```
 */
export const GET_PAIR_MIN_SIZE = 1040;

/**
 * The protocol version, carried in the low 4 bits of `flags`.
 *
 * @example Usage
 * ```ts
 * import { PROTOCOL_VERSION, encodeSetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeSetPair()[4], PROTOCOL_VERSION);
 * ```
 */
export const PROTOCOL_VERSION = 1;

/**
 * Longest key in bytes; keys are 1 to 1024 bytes long.
 *
 * @example Usage
 * ```ts
 * import { MAX_KEY_LENGTH, keyBytes } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.throws(() => keyBytes("x".repeat(MAX_KEY_LENGTH + 1)), RangeError);
 * ```
 */
export const MAX_KEY_LENGTH = 1024;

/**
 * `request` value of the message a client sends.
 *
 * @example Usage
 * ```ts
 * import { REQUEST_GET_PAIR, encodeGetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeGetPair("k", "client")[0], REQUEST_GET_PAIR);
 * ```
 */
export const REQUEST_GET_PAIR = 1;

/**
 * `request` value of the reply the broker sends with the descriptor.
 *
 * @example Usage
 * ```ts
 * import { REQUEST_SET_PAIR, encodeSetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeSetPair()[0], REQUEST_SET_PAIR);
 * ```
 */
export const REQUEST_SET_PAIR = 2;

/**
 * `size` field of a `GET_PAIR`: mode (2) + key_len (2) + key (1024).
 *
 * @example Usage
 * ```ts
 * import { GET_PAIR_PAYLOAD_SIZE } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(GET_PAIR_PAYLOAD_SIZE, 2 + 2 + 1024);
 * ```
 */
export const GET_PAIR_PAYLOAD_SIZE = 1028;

/**
 * `size` field of a `SET_PAIR`: one 64-bit zero.
 *
 * @example Usage
 * ```ts
 * import { SET_PAIR_PAYLOAD_SIZE, encodeSetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeSetPair()[8], SET_PAIR_PAYLOAD_SIZE);
 * ```
 */
export const SET_PAIR_PAYLOAD_SIZE = 8;

const MODE_OFFSET = 12;
const KEY_LEN_OFFSET = 14;
const KEY_OFFSET = 16;

/**
 * How a client wants to be paired: `none` pairs with `none`, `client` with
 * `server`, `server` with `client`.
 *
 * @example Usage
 * ```ts
 * import type { Mode } from "./protocol.ts";
 *
 * const mode: Mode = "server";
 * ```
 */
export type Mode = "none" | "client" | "server";

/**
 * The modes indexed by their wire value (0, 1, 2).
 *
 * @example Usage
 * ```ts
 * import { MODES } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(MODES[2], "server");
 * assert.equal(MODES.indexOf("client"), 1);
 * ```
 */
export const MODES: readonly ["none", "client", "server"] = Object.freeze(
  ["none", "client", "server"] as const,
);

/**
 * Parses a mode name, as given on a command line or in a configuration.
 *
 * @param s The name: exactly `none`, `client` or `server`.
 * @returns The mode.
 * @throws {TypeError} If `s` names no mode; the message quotes `s`.
 *
 * @example Usage
 * ```ts
 * import { parseMode } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(parseMode("client"), "client");
 * assert.throws(() => parseMode("Client"), TypeError);
 * ```
 */
export function parseMode(s: string): Mode {
  if (s === "none" || s === "client" || s === "server") return s;
  throw new TypeError(`invalid mode ${JSON.stringify(s)} (expected none, client or server)`);
}

/**
 * The mode a request pairs with.
 *
 * @param mode A request's mode.
 * @returns `none` for `none`, `server` for `client`, `client` for `server`.
 *
 * @example Usage
 * ```ts
 * import { peerMode } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(peerMode("client"), "server");
 * assert.equal(peerMode("none"), "none");
 * ```
 */
export function peerMode(mode: Mode): Mode {
  return mode === "client" ? "server" : mode === "server" ? "client" : "none";
}

/**
 * A pairing key: a string (sent UTF-8 encoded) or raw bytes.
 *
 * @example Usage
 * ```ts
 * import type { Key } from "./protocol.ts";
 *
 * const keys: Key[] = ["vhost-user-1", new Uint8Array([0, 1, 2])];
 * ```
 */
export type Key = string | Uint8Array;

const utf8 = new TextEncoder();

/**
 * The bytes a key is sent as, checked against the protocol's length limits.
 *
 * Strings are UTF-8 encoded (a lone surrogate becomes U+FFFD, so such strings
 * are better passed as bytes); byte arrays are returned as they are, not
 * copied.
 *
 * @param key The key.
 * @returns The key's bytes, 1 to 1024 of them.
 * @throws {RangeError} If the key is empty or longer than 1024 bytes.
 *
 * @example Usage
 * ```ts
 * import { keyBytes } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(keyBytes("é"), new Uint8Array([0xc3, 0xa9]));
 * assert.throws(() => keyBytes(""), RangeError);
 * ```
 */
export function keyBytes(key: Key): Uint8Array {
  let bytes: Uint8Array;
  if (typeof key === "string") bytes = utf8.encode(key);
  else if (key instanceof Uint8Array) bytes = key;
  else throw new TypeError(`invalid key: expected a string or a Uint8Array, got ${typeof key}`);
  if (bytes.length === 0 || bytes.length > MAX_KEY_LENGTH) {
    throw new RangeError(
      `invalid key: length ${bytes.length} bytes (must be 1..${MAX_KEY_LENGTH})`,
    );
  }
  return bytes;
}

/**
 * Which part of a message broke the protocol. `descriptors` (a request came
 * with descriptors) and `sequence` (a second request on one connection) are
 * not visible in the bytes; the broker reports them. `type`, `options`,
 * `backlog` and `count` exist only in protocol v2 (`protocol_v2.ts`).
 *
 * @example Usage
 * ```ts
 * import type { ProtocolErrorField } from "./protocol.ts";
 *
 * const field: ProtocolErrorField = "key_len";
 * ```
 */
export type ProtocolErrorField =
  | "length"
  | "request"
  | "flags"
  | "size"
  | "mode"
  | "key_len"
  | "descriptors"
  | "sequence"
  | "type"
  | "options"
  | "backlog"
  | "count";

/**
 * A message that breaks the protocol. The peer's connection is closed; it may
 * reconnect and start over.
 *
 * @example Usage
 * ```ts
 * import { ProtocolError, decodeGetPair, encodeGetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeGetPair("k", "client");
 * frame[12] = 7; // mode
 * assert.throws(() => decodeGetPair(frame), (e: unknown) => {
 *   assert.ok(e instanceof ProtocolError);
 *   assert.equal(e.field, "mode");
 *   assert.equal(e.value, 7);
 *   return true;
 * });
 *
 * const broker = new ProtocolError("GET_PAIR", "descriptors", 2, "must be 0");
 * assert.equal(broker.message, "invalid GET_PAIR: descriptors 2 (must be 0)");
 * ```
 */
export class ProtocolError extends Error {
  /** The offending field. */
  readonly field: ProtocolErrorField;
  /** The offending value (`flags` as its full 32-bit unsigned value). */
  readonly value: number;
  /** What the field must be, as in the message. */
  readonly expected: string;

  /**
   * Builds the message `invalid <message>: <field> <value> (<expected>)`.
   *
   * @param message The kind of message that broke the protocol, e.g. `GET_PAIR`.
   * @param field The offending field.
   * @param value The offending value.
   * @param expected What the field must be, e.g. `must be 1..1024`.
   * @param options Standard error options, such as `cause`.
   */
  constructor(
    message: string,
    field: ProtocolErrorField,
    value: number,
    expected: string,
    options?: ErrorOptions,
  ) {
    const shown = field === "flags" ? `0x${value.toString(16)}` : String(value);
    super(`invalid ${message}: ${field} ${shown} (${expected})`, options);
    this.name = "ProtocolError";
    this.field = field;
    this.value = value;
    this.expected = expected;
  }
}

function header(
  request: number,
  size: number,
  frame: Uint8Array = new Uint8Array(MESSAGE_SIZE),
): Uint8Array {
  putU32(frame, 0, request);
  putU32(frame, 4, PROTOCOL_VERSION);
  putU32(frame, 8, size);
  return frame;
}

/**
 * A decoded `GET_PAIR` request.
 *
 * @example Usage
 * ```ts
 * import { type GetPair, decodeGetPair, encodeGetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const request: GetPair = decodeGetPair(encodeGetPair("k", "none"));
 * assert.deepEqual(request.key, new Uint8Array([0x6b]));
 * ```
 */
export interface GetPair {
  /** The mode the client asked for. */
  mode: Mode;
  /** The key's `key_len` bytes: a view into the decoded frame, not a copy. */
  key: Uint8Array;
}

/**
 * Encodes the `GET_PAIR` a client sends: 1044 bytes, as the C client library
 * sends them.
 *
 * @param key The pairing key, 1 to 1024 bytes (strings UTF-8 encoded).
 * @param mode The mode to be paired in.
 * @param into A 1044-byte buffer to write the message into (every byte is
 * written), for a caller that sends it at once and reuses the buffer;
 * default a fresh one.
 * @returns The 1044-byte message: `into`, or a fresh buffer.
 * @throws {RangeError} If the key is empty or longer than 1024 bytes.
 * @throws {TypeError} If `mode` is not a mode.
 *
 * @example Usage
 * ```ts
 * import { MESSAGE_SIZE, encodeGetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeGetPair("vhost-user-1", "server");
 * assert.equal(frame.length, MESSAGE_SIZE);
 * assert.equal(frame[12], 2); // mode server
 * assert.equal(frame[14], 12); // key_len
 *
 * const reused = new Uint8Array(MESSAGE_SIZE);
 * assert.equal(encodeGetPair("k", "none", reused), reused);
 * ```
 */
export function encodeGetPair(key: Key, mode: Mode, into?: Uint8Array): Uint8Array {
  const wireMode = MODES.indexOf(mode);
  if (wireMode < 0) throw new TypeError(`invalid mode ${JSON.stringify(mode)}`);
  const bytes = keyBytes(key);
  if (into !== undefined && into.length !== MESSAGE_SIZE) {
    throw new RangeError(
      `encodeGetPair: the buffer must be ${MESSAGE_SIZE} bytes, not ${into.length}`,
    );
  }
  // A reused buffer keeps no byte of its last message: the padding after the key is zeros.
  into?.fill(0, KEY_OFFSET + bytes.length);
  const frame = header(REQUEST_GET_PAIR, GET_PAIR_PAYLOAD_SIZE, into);
  putU16(frame, MODE_OFFSET, wireMode);
  putU16(frame, KEY_LEN_OFFSET, bytes.length);
  frame.set(bytes, KEY_OFFSET);
  return frame;
}

/**
 * Validates a `GET_PAIR` in place, as a broker does once 1040 bytes of it
 * arrived: nothing is allocated for a valid request, so that the broker's
 * pairing path makes no garbage. {@linkcode decodeGetPair} is the same check
 * with a decoded result.
 *
 * Checks every rule visible in the bytes, in wire order: `request` (1; a
 * `SET_PAIR` from a client is refused too), `flags` (exactly version 1),
 * `size` (1028), `mode` (0..2), `key_len` (1..1024). Bytes past `key_len`
 * and the 4 trailing padding bytes are ignored.
 *
 * @param frame A buffer holding the message from its first byte.
 * @param length How many bytes of `frame` hold it: 1040 (the protocol text)
 * to 1044 (the C client).
 * @returns `undefined` if it is valid, otherwise the first rule broken.
 *
 * @example Usage
 * ```ts
 * import {
 *   encodeGetPair,
 *   GET_PAIR_KEY_OFFSET,
 *   getPairKeyLength,
 *   getPairMode,
 *   MESSAGE_SIZE,
 *   validateGetPair,
 * } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeGetPair("key", "server");
 * assert.equal(validateGetPair(frame, MESSAGE_SIZE), undefined);
 * assert.equal(getPairMode(frame), "server");
 * const key = frame.subarray(GET_PAIR_KEY_OFFSET, GET_PAIR_KEY_OFFSET + getPairKeyLength(frame));
 * assert.equal(new TextDecoder().decode(key), "key");
 *
 * frame[12] = 3; // mode
 * assert.equal(validateGetPair(frame, MESSAGE_SIZE)?.field, "mode");
 * ```
 */
export function validateGetPair(frame: Uint8Array, length: number): ProtocolError | undefined {
  const field = getPairFault(frame, length);
  if (field === undefined) return undefined;
  switch (field) {
    case "length":
      return new ProtocolError(
        "GET_PAIR",
        field,
        length,
        `must be ${GET_PAIR_MIN_SIZE}..${MESSAGE_SIZE} bytes`,
      );
    case "request": {
      const request = u32(frame, 0);
      return new ProtocolError(
        "GET_PAIR",
        field,
        request,
        request === REQUEST_SET_PAIR
          ? "SET_PAIR is sent only by the broker; a client must send 1, GET_PAIR"
          : "must be 1, GET_PAIR",
      );
    }
    case "flags":
      return new ProtocolError(
        "GET_PAIR",
        field,
        u32(frame, 4),
        "must be 0x1: version 1, no other bits",
      );
    case "size":
      return new ProtocolError(
        "GET_PAIR",
        field,
        u32(frame, 8),
        `must be ${GET_PAIR_PAYLOAD_SIZE}`,
      );
    case "mode":
      return new ProtocolError(
        "GET_PAIR",
        field,
        u16(frame, MODE_OFFSET),
        "must be 0 none, 1 client or 2 server",
      );
    default:
      return new ProtocolError(
        "GET_PAIR",
        "key_len",
        u16(frame, KEY_LEN_OFFSET),
        `must be 1..${MAX_KEY_LENGTH}`,
      );
  }
}

/**
 * The first rule a `GET_PAIR` breaks, as {@linkcode validateGetPair} checks
 * them, without building an error: a broker under a flood of malformed
 * requests counts them all and describes only those it logs.
 *
 * @param frame A buffer holding the message from its first byte.
 * @param length How many bytes of `frame` hold it.
 * @returns The offending field, or `undefined` if the request is valid.
 *
 * @example Usage
 * ```ts
 * import { encodeGetPair, getPairFault, MESSAGE_SIZE } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeGetPair("k", "none");
 * assert.equal(getPairFault(frame, MESSAGE_SIZE), undefined);
 * frame[4] = 2; // flags
 * assert.equal(getPairFault(frame, MESSAGE_SIZE), "flags");
 * ```
 */
export function getPairFault(
  frame: Uint8Array,
  length: number,
): "length" | "request" | "flags" | "size" | "mode" | "key_len" | undefined {
  if (length < GET_PAIR_MIN_SIZE || length > MESSAGE_SIZE || length > frame.length) return "length";
  if (u32(frame, 0) !== REQUEST_GET_PAIR) return "request";
  if (u32(frame, 4) !== PROTOCOL_VERSION) return "flags";
  if (u32(frame, 8) !== GET_PAIR_PAYLOAD_SIZE) return "size";
  if (u16(frame, MODE_OFFSET) > 2) return "mode";
  const keyLength = u16(frame, KEY_LEN_OFFSET);
  if (keyLength === 0 || keyLength > MAX_KEY_LENGTH) return "key_len";
  return undefined;
}

/**
 * Where a `GET_PAIR`'s key starts in the frame.
 *
 * @example Usage
 * ```ts
 * import { encodeGetPair, GET_PAIR_KEY_OFFSET } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeGetPair("k", "none")[GET_PAIR_KEY_OFFSET], 0x6b);
 * ```
 */
export const GET_PAIR_KEY_OFFSET: number = KEY_OFFSET;

/**
 * The mode of a `GET_PAIR` that {@linkcode validateGetPair} passed.
 *
 * @param frame The validated message.
 * @returns Its mode.
 *
 * @example Usage
 * ```ts
 * import { encodeGetPair, getPairMode } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(getPairMode(encodeGetPair("k", "client")), "client");
 * ```
 */
export function getPairMode(frame: Uint8Array): Mode {
  return MODES[u16(frame, MODE_OFFSET)];
}

/**
 * The key length of a `GET_PAIR` that {@linkcode validateGetPair} passed.
 *
 * @param frame The validated message.
 * @returns Its `key_len`.
 *
 * @example Usage
 * ```ts
 * import { encodeGetPair, getPairKeyLength } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(getPairKeyLength(encodeGetPair("four", "none")), 4);
 * ```
 */
export function getPairKeyLength(frame: Uint8Array): number {
  return u16(frame, KEY_LEN_OFFSET);
}

/**
 * Decodes and validates a `GET_PAIR`, as {@linkcode validateGetPair} checks it.
 *
 * @param frame The message: 1040 (the protocol text) to 1044 (the C client) bytes.
 * @returns The mode and the key; the key is a view into `frame`.
 * @throws {ProtocolError} On the first rule broken; `field` names it.
 *
 * @example Usage
 * ```ts
 * import { ProtocolError, decodeGetPair, encodeGetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeGetPair("k", "client");
 * assert.equal(decodeGetPair(frame).mode, "client");
 *
 * frame[14] = 0; // key_len
 * assert.throws(() => decodeGetPair(frame), ProtocolError);
 * ```
 */
export function decodeGetPair(frame: Uint8Array): GetPair {
  const error = validateGetPair(frame, frame.length);
  if (error !== undefined) throw error;
  return {
    mode: getPairMode(frame),
    key: frame.subarray(KEY_OFFSET, KEY_OFFSET + getPairKeyLength(frame)),
  };
}

/**
 * Encodes the `SET_PAIR` a broker sends along with the descriptor: 1044
 * bytes, as the C broker sends them.
 *
 * @returns A fresh 1044-byte message, so callers may keep or reuse it freely.
 *
 * @example Usage
 * ```ts
 * import { decodeSetPair, encodeSetPair } from "./protocol.ts";
 *
 * decodeSetPair(encodeSetPair());
 * ```
 */
export function encodeSetPair(): Uint8Array {
  return header(REQUEST_SET_PAIR, SET_PAIR_PAYLOAD_SIZE);
}

/**
 * Validates a `SET_PAIR` reply as the C client library does: exactly 1044
 * bytes, `request` 2, `flags` exactly version 1, `size` 8. The payload is
 * not checked. (The reply must also carry exactly one descriptor, which is
 * not visible in the bytes.)
 *
 * @param frame The reply.
 * @throws {ProtocolError} On the first rule broken; `field` names it.
 *
 * @example Usage
 * ```ts
 * import { ProtocolError, decodeSetPair, encodeSetPair } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * decodeSetPair(encodeSetPair());
 * assert.throws(() => decodeSetPair(encodeSetPair().subarray(0, 1040)), ProtocolError);
 * ```
 */
export function decodeSetPair(frame: Uint8Array): void {
  if (frame.length !== MESSAGE_SIZE) {
    throw new ProtocolError(
      "SET_PAIR",
      "length",
      frame.length,
      `must be exactly ${MESSAGE_SIZE} bytes`,
    );
  }
  const request = u32(frame, 0);
  if (request !== REQUEST_SET_PAIR) {
    throw new ProtocolError("SET_PAIR", "request", request, "must be 2, SET_PAIR");
  }
  const flags = u32(frame, 4);
  if (flags !== PROTOCOL_VERSION) {
    throw new ProtocolError("SET_PAIR", "flags", flags, "must be 0x1: version 1, no other bits");
  }
  const size = u32(frame, 8);
  if (size !== SET_PAIR_PAYLOAD_SIZE) {
    throw new ProtocolError("SET_PAIR", "size", size, `must be ${SET_PAIR_PAYLOAD_SIZE}`);
  }
}

const DESCRIBE_LIMIT = 128;

/**
 * A key made printable for log lines: printable ASCII as it is, except `\`
 * and `"` which are escaped so the result can be quoted; every other byte as
 * `\xNN`. Keys longer than 128 bytes are cut there and marked with their
 * full length.
 *
 * @param key The key's bytes.
 * @returns A printable ASCII string (plus `…` when cut).
 *
 * @example Usage
 * ```ts
 * import { describeKey } from "./protocol.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(describeKey(new TextEncoder().encode('a"b\\')), 'a\\"b\\\\');
 * assert.equal(describeKey(new Uint8Array([0, 0xff])), "\\x00\\xff");
 * assert.equal(describeKey(new Uint8Array(200).fill(0x61)), "a".repeat(128) + "…(200 bytes)");
 * ```
 */
export function describeKey(key: Uint8Array): string {
  const end = Math.min(key.length, DESCRIBE_LIMIT);
  let out = "";
  for (let i = 0; i < end; i++) {
    const b = key[i];
    if (b === 0x5c) out += "\\\\";
    else if (b === 0x22) out += '\\"';
    else if (b >= 0x20 && b < 0x7f) out += String.fromCharCode(b);
    else out += (b < 0x10 ? "\\x0" : "\\x") + b.toString(16);
  }
  return key.length > DESCRIBE_LIMIT ? `${out}…(${key.length} bytes)` : out;
}
