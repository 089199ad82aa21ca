/**
 * The SocketPair Broker protocol, version 2: constants, encoders and
 * validating decoders, on plain `Uint8Array`s (see `docs/protocol-v2.md` for
 * every byte).
 *
 * Version 2 keeps version 1's 12-byte header (`request`, `flags`, `size`,
 * little-endian) and its request numbers, puts 2 in the low 4 bits of
 * `flags`, and makes `size` the exact number of payload bytes that follow:
 * messages are as long as they need to be. A broker tells the versions apart
 * by the first 8 bytes; the C broker closes a connection whose first message
 * says version 2, which is how a client learns to fall back to version 1.
 *
 * @example A request and its decoding
 * ```ts
 * import { decodeRequest, encodeRequest } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeRequest("listen", "grpc-api", { mode: "server", type: "seqpacket" });
 * const request = decodeRequest(frame);
 * assert.equal(request.request, "listen");
 * assert.equal(request.type, "seqpacket");
 * assert.equal(new TextDecoder().decode(request.key), "grpc-api");
 * ```
 *
 * @module
 */

import { putU16, putU32, u16, u32 } from "./bytes.ts";
import {
  type Key,
  keyBytes,
  MAX_KEY_LENGTH,
  type Mode,
  MODES,
  ProtocolError,
  REQUEST_GET_PAIR,
  REQUEST_SET_PAIR,
} from "./protocol.ts";

export { type Key, type Mode, ProtocolError, type ProtocolErrorField } from "./protocol.ts";

/**
 * The version number in the low 4 bits of `flags` of every v2 message.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, VERSION_2 } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeRequest("get_pair", "k")[4], VERSION_2);
 * ```
 */
export const VERSION_2 = 2;

/**
 * Bytes of the header every message starts with: `request`, `flags`, `size`.
 *
 * @example Usage
 * ```ts
 * import { encodeCredit, HEADER_SIZE } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeCredit(1).length, HEADER_SIZE + 4);
 * ```
 */
export const HEADER_SIZE = 12;

/**
 * `request` of the message a server sends to register as a listener.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, REQUEST_LISTEN } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeRequest("listen", "k")[0], REQUEST_LISTEN);
 * ```
 */
export const REQUEST_LISTEN = 3;

/**
 * `request` of the broker's answer to a request it accepted but cannot
 * answer with a pair at once: its version and capabilities.
 *
 * @example Usage
 * ```ts
 * import { encodeHello, REQUEST_HELLO } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeHello(0, 0)[0], REQUEST_HELLO);
 * ```
 */
export const REQUEST_HELLO = 4;

/**
 * `request` of the message a listener sends to take more connections.
 *
 * @example Usage
 * ```ts
 * import { encodeCredit, REQUEST_CREDIT } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeCredit(1)[0], REQUEST_CREDIT);
 * ```
 */
export const REQUEST_CREDIT = 5;

/**
 * `request` of the broker's last message on a connection it closes without
 * a pair: why, as text.
 *
 * @example Usage
 * ```ts
 * import { encodeRefused, REQUEST_REFUSED } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeRefused("policy")[0], REQUEST_REFUSED);
 * ```
 */
export const REQUEST_REFUSED = 6;

/**
 * The kind of socket a pair is made of: `stream` (`SOCK_STREAM`, the
 * default and v1's only one), `seqpacket` (`SOCK_SEQPACKET`: a connection
 * that keeps message boundaries) or `dgram` (`SOCK_DGRAM`).
 *
 * @example Usage
 * ```ts
 * import type { SocketType } from "./protocol_v2.ts";
 *
 * const type: SocketType = "seqpacket";
 * ```
 */
export type SocketType = "stream" | "seqpacket" | "dgram";

/**
 * The socket types indexed by their wire value (0, 1, 2).
 *
 * @example Usage
 * ```ts
 * import { SOCKET_TYPES } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(SOCKET_TYPES.indexOf("dgram"), 2);
 * ```
 */
export const SOCKET_TYPES: readonly ["stream", "seqpacket", "dgram"] = Object.freeze(
  ["stream", "seqpacket", "dgram"] as const,
);

/**
 * Parses a socket type name, as given on a command line.
 *
 * @param s The name: exactly `stream`, `seqpacket` or `dgram`.
 * @returns The type.
 * @throws {TypeError} If `s` names no type; the message quotes it.
 *
 * @example Usage
 * ```ts
 * import { parseSocketType } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(parseSocketType("seqpacket"), "seqpacket");
 * assert.throws(() => parseSocketType("raw"), TypeError);
 * ```
 */
export function parseSocketType(s: string): SocketType {
  if (s === "stream" || s === "seqpacket" || s === "dgram") return s;
  throw new TypeError(
    `invalid socket type ${JSON.stringify(s)} (expected stream, seqpacket or dgram)`,
  );
}

/**
 * Request option bit: send the partner's pidfd (`SO_PEERPIDFD`) as a second
 * descriptor with the `SET_PAIR`, where the broker's kernel has it.
 *
 * @example Usage
 * ```ts
 * import { decodeRequest, encodeRequest, OPTION_PIDFD } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeRequest("get_pair", "k", { pidfd: true });
 * assert.equal(frame[16] & OPTION_PIDFD, OPTION_PIDFD);
 * assert.equal(decodeRequest(frame).pidfd, true);
 * ```
 */
export const OPTION_PIDFD = 1;

/**
 * Capability bits a broker announces in `HELLO` and `SET_PAIR`.
 *
 * @example Usage
 * ```ts
 * import { Capability, decodeHello, encodeHello } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const hello = decodeHello(encodeHello(Capability.Listen | Capability.Pidfd, 0));
 * assert.ok(hello.capabilities & Capability.Pidfd);
 * ```
 */
export const Capability = {
  /** `LISTEN` registrations. */
  Listen: 1,
  /** Partners' pidfds on request (the broker's kernel has `SO_PEERPIDFD`). */
  Pidfd: 2,
  /** `seqpacket` pairs. */
  Seqpacket: 4,
  /** `dgram` pairs. */
  Dgram: 8,
} as const;

/**
 * How the delivered socket reached the client, in a v2 `SET_PAIR`. Version 2
 * has one: `socketpair`, an end of a fresh `socketpair()` made by the broker.
 * Later kinds (a remote peer's connection, a relay) get new values.
 *
 * @example Usage
 * ```ts
 * import type { Delivery } from "./protocol_v2.ts";
 *
 * const delivery: Delivery = "socketpair";
 * ```
 */
export type Delivery = "socketpair";

/** Wire values of {@link Delivery}, from 1. */
const DELIVERIES: readonly (Delivery | undefined)[] = [undefined, "socketpair"];

/**
 * Bytes from the start of a v2 `GET_PAIR` or `LISTEN` to its key.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, REQUEST_KEY_OFFSET } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeRequest("get_pair", "k")[REQUEST_KEY_OFFSET], 0x6b);
 * ```
 */
export const REQUEST_KEY_OFFSET = 24;

/**
 * The longest v2 request: header, 12 bytes of fields, a 1024-byte key.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, MAX_REQUEST_SIZE } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeRequest("get_pair", "x".repeat(1024)).length, MAX_REQUEST_SIZE);
 * ```
 */
export const MAX_REQUEST_SIZE: number = REQUEST_KEY_OFFSET + MAX_KEY_LENGTH;

/**
 * Bytes of a v2 `SET_PAIR`: header and 32 bytes of payload.
 *
 * @example Usage
 * ```ts
 * import { encodeSetPair, SET_PAIR_SIZE } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const reply = encodeSetPair({
 *   delivery: "socketpair",
 *   type: "stream",
 *   descriptors: 1,
 *   peer: { pid: 1, uid: 0, gid: 0 },
 *   peerListener: false,
 *   peerVersion: 1,
 *   capabilities: 0,
 *   peerId: 7,
 * });
 * assert.equal(reply.length, SET_PAIR_SIZE);
 * ```
 */
export const SET_PAIR_SIZE: number = HEADER_SIZE + 32;

/**
 * Bytes of a `HELLO`: header and 8 bytes of payload.
 *
 * @example Usage
 * ```ts
 * import { encodeHello, HELLO_SIZE } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeHello(0, 0).length, HELLO_SIZE);
 * ```
 */
export const HELLO_SIZE: number = HEADER_SIZE + 8;

/**
 * Bytes of a `CREDIT`: header and a 32-bit count.
 *
 * @example Usage
 * ```ts
 * import { CREDIT_SIZE, encodeCredit } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeCredit(3).length, CREDIT_SIZE);
 * ```
 */
export const CREDIT_SIZE: number = HEADER_SIZE + 4;

/**
 * Longest reason a `REFUSED` carries, in bytes.
 *
 * @example Usage
 * ```ts
 * import { encodeRefused, HEADER_SIZE, MAX_REFUSED_REASON } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeRefused("x".repeat(1000)).length, HEADER_SIZE + MAX_REFUSED_REASON);
 * ```
 */
export const MAX_REFUSED_REASON = 256;

/**
 * The longest message a broker sends under v2 (a `REFUSED` with the longest
 * reason): what a client's receive buffer must hold.
 *
 * @example Usage
 * ```ts
 * import { MAX_REPLY_SIZE, SET_PAIR_SIZE } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.ok(MAX_REPLY_SIZE >= SET_PAIR_SIZE);
 * ```
 */
export const MAX_REPLY_SIZE: number = HEADER_SIZE + MAX_REFUSED_REASON;

/**
 * Most connections a listener may ask to have in flight (`backlog`).
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, MAX_BACKLOG } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.throws(() => encodeRequest("listen", "k", { backlog: MAX_BACKLOG + 1 }), RangeError);
 * ```
 */
export const MAX_BACKLOG = 65535;

/**
 * Most connections a listener may take with one `CREDIT`.
 *
 * @example Usage
 * ```ts
 * import { encodeCredit, MAX_CREDIT } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.throws(() => encodeCredit(MAX_CREDIT + 1), RangeError);
 * ```
 */
export const MAX_CREDIT: number = MAX_BACKLOG;

const MODE_OFFSET = 12;
const TYPE_OFFSET = 14;
const OPTIONS_OFFSET = 16;
const KEY_LEN_OFFSET = 20;
const BACKLOG_OFFSET = 22;

/**
 * The version a message says it speaks: the low 4 bits of `flags`, once its
 * first 8 bytes are in. A broker reads it to choose the codec.
 *
 * @param frame The message's first bytes, at least 8.
 * @returns The version number (1 for v1, 2 for v2).
 *
 * @example Usage
 * ```ts
 * import { encodeGetPair } from "./protocol.ts";
 * import { encodeRequest, messageVersion } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(messageVersion(encodeGetPair("k", "none")), 1);
 * assert.equal(messageVersion(encodeRequest("get_pair", "k")), 2);
 * ```
 */
export function messageVersion(frame: Uint8Array): number {
  return frame[4] & 0xf;
}

function header(
  frame: Uint8Array,
  request: number,
  size: number,
): Uint8Array {
  putU32(frame, 0, request);
  putU32(frame, 4, VERSION_2);
  putU32(frame, 8, size);
  return frame;
}

/**
 * Checks a v2 header (`flags` exactly 2 and `size` the expected payload
 * size) and reports the first rule broken.
 */
function checkHeader(
  frame: Uint8Array,
  name: string,
  size: number,
  expected: string,
  sizeOk: boolean,
): ProtocolError | undefined {
  const flags = u32(frame, 4);
  if (flags !== VERSION_2) {
    return new ProtocolError(name, "flags", flags, "must be 0x2: version 2, no other bits");
  }
  if (!sizeOk) return new ProtocolError(name, "size", size, expected);
  return undefined;
}

/** What a client asks for in its first v2 message. */
export type RequestKind = "get_pair" | "listen";

/**
 * Options of a v2 request, as {@linkcode encodeRequest} takes them.
 *
 * @example Usage
 * ```ts
 * import type { RequestOptions } from "./protocol_v2.ts";
 *
 * const options: RequestOptions = { mode: "server", type: "seqpacket", backlog: 64 };
 * ```
 */
export interface RequestOptions {
  /** The mode to be paired in; default `none`. */
  mode?: Mode;
  /** The socket type; default `stream`. */
  type?: SocketType;
  /** Ask for the partner's pidfd as a second descriptor; default false. */
  pidfd?: boolean;
  /**
   * `listen` only: most connections in flight to the listener (delivered,
   * not yet credited back), 1 to 65535; 0 or absent lets the broker choose.
   */
  backlog?: number;
}

/**
 * A decoded v2 `GET_PAIR` or `LISTEN`.
 *
 * @example Usage
 * ```ts
 * import { decodeRequest, encodeRequest, type Request } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const request: Request = decodeRequest(encodeRequest("get_pair", "k"));
 * assert.equal(request.mode, "none");
 * ```
 */
export interface Request {
  /** `get_pair` (request 1) or `listen` (request 3). */
  request: RequestKind;
  /** The mode. */
  mode: Mode;
  /** The socket type. */
  type: SocketType;
  /** Whether the partner's pidfd is asked for. */
  pidfd: boolean;
  /** `listen`: the backlog asked for (0: the broker's choice); `get_pair`: 0. */
  backlog: number;
  /** The key's bytes: a view into the frame, not a copy. */
  key: Uint8Array;
}

/**
 * Encodes a v2 `GET_PAIR` or `LISTEN`: `HEADER_SIZE + 12 + key_len` bytes.
 *
 * @param request What to ask for.
 * @param key The key, 1 to 1024 bytes (strings UTF-8 encoded).
 * @param options Mode, type, pidfd and (for `listen`) backlog.
 * @returns A fresh message.
 * @throws {RangeError} If the key or the backlog is out of range, or a
 * backlog is given for `get_pair`.
 * @throws {TypeError} If the mode or type is not one.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, REQUEST_KEY_OFFSET } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeRequest("get_pair", "vhost-user-1", { mode: "client" });
 * assert.equal(frame.length, REQUEST_KEY_OFFSET + 12);
 * ```
 */
export function encodeRequest(
  request: RequestKind,
  key: Key,
  options: RequestOptions = {},
): Uint8Array {
  const { mode = "none", type = "stream", pidfd = false, backlog = 0 } = options;
  const wireMode = MODES.indexOf(mode);
  if (wireMode < 0) throw new TypeError(`invalid mode ${JSON.stringify(mode)}`);
  const wireType = SOCKET_TYPES.indexOf(type);
  if (wireType < 0) throw new TypeError(`invalid socket type ${JSON.stringify(type)}`);
  if (request !== "get_pair" && request !== "listen") {
    throw new TypeError(`invalid request ${JSON.stringify(request)}`);
  }
  if (!Number.isInteger(backlog) || backlog < 0 || backlog > MAX_BACKLOG) {
    throw new RangeError(`invalid backlog ${backlog} (must be 0..${MAX_BACKLOG})`);
  }
  if (request === "get_pair" && backlog !== 0) {
    throw new RangeError("a backlog is for listen requests only");
  }
  const bytes = keyBytes(key);
  const frame = new Uint8Array(REQUEST_KEY_OFFSET + bytes.length);
  header(
    frame,
    request === "get_pair" ? REQUEST_GET_PAIR : REQUEST_LISTEN,
    frame.length - HEADER_SIZE,
  );
  putU16(frame, MODE_OFFSET, wireMode);
  putU16(frame, TYPE_OFFSET, wireType);
  putU32(frame, OPTIONS_OFFSET, pidfd ? OPTION_PIDFD : 0);
  putU16(frame, KEY_LEN_OFFSET, bytes.length);
  putU16(frame, BACKLOG_OFFSET, backlog);
  frame.set(bytes, REQUEST_KEY_OFFSET);
  return frame;
}

/**
 * How long the v2 request whose first 12 bytes are in `frame` is, checking
 * its header: `request` 1 or 3, `flags` exactly 2, `size` 13..1036. A broker
 * calls it once the header is in, to know how many bytes to wait for.
 *
 * @param frame At least the request's first 12 bytes.
 * @returns The request's total length in bytes, or the first rule broken.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, requestLength } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(requestLength(encodeRequest("get_pair", "abc")), 27);
 * ```
 */
export function requestLength(frame: Uint8Array): number | ProtocolError {
  const request = u32(frame, 0);
  if (request !== REQUEST_GET_PAIR && request !== REQUEST_LISTEN) {
    return new ProtocolError("request", "request", request, "must be 1, GET_PAIR, or 3, LISTEN");
  }
  const name = request === REQUEST_GET_PAIR ? "GET_PAIR" : "LISTEN";
  const size = u32(frame, 8);
  const error = checkHeader(
    frame,
    name,
    size,
    `must be 13..${MAX_REQUEST_SIZE - HEADER_SIZE}: 12 + key_len`,
    size > REQUEST_KEY_OFFSET - HEADER_SIZE && size <= MAX_REQUEST_SIZE - HEADER_SIZE,
  );
  return error ?? HEADER_SIZE + size;
}

/**
 * Validates a whole v2 request in place, without allocating for a valid
 * one: its header as {@linkcode requestLength} checks it, then `mode`
 * (0..2), `type` (0..2), `options` (only {@link OPTION_PIDFD}), `key_len`
 * (1..1024 and `size - 12`), `backlog` (0 for `GET_PAIR`).
 *
 * @param frame The request from its first byte.
 * @param length Its bytes in `frame`: exactly what {@linkcode requestLength} said.
 * @returns `undefined` if valid, otherwise the first rule broken.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, validateRequest } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeRequest("get_pair", "k");
 * assert.equal(validateRequest(frame, frame.length), undefined);
 * frame[14] = 9; // type
 * assert.equal(validateRequest(frame, frame.length)?.field, "type");
 * ```
 */
export function validateRequest(frame: Uint8Array, length: number): ProtocolError | undefined {
  if (length < HEADER_SIZE || length > frame.length) {
    return new ProtocolError("request", "length", length, "must hold the whole request");
  }
  const total = requestLength(frame);
  if (typeof total !== "number") return total;
  const name = u32(frame, 0) === REQUEST_GET_PAIR ? "GET_PAIR" : "LISTEN";
  if (length !== total) {
    return new ProtocolError(name, "length", length, `must be ${total}: 12 + size`);
  }
  const mode = u16(frame, MODE_OFFSET);
  if (mode > 2) {
    return new ProtocolError(name, "mode", mode, "must be 0 none, 1 client or 2 server");
  }
  const type = u16(frame, TYPE_OFFSET);
  if (type > 2) {
    return new ProtocolError(name, "type", type, "must be 0 stream, 1 seqpacket or 2 dgram");
  }
  const options = u32(frame, OPTIONS_OFFSET);
  if ((options & ~OPTION_PIDFD) !== 0) {
    return new ProtocolError(name, "options", options, "must be 0 or 1 (pidfd)");
  }
  const keyLength = u16(frame, KEY_LEN_OFFSET);
  if (keyLength === 0 || keyLength !== total - REQUEST_KEY_OFFSET) {
    return new ProtocolError(
      name,
      "key_len",
      keyLength,
      `must be 1..${MAX_KEY_LENGTH} and size - 12 (${total - REQUEST_KEY_OFFSET})`,
    );
  }
  const backlog = u16(frame, BACKLOG_OFFSET);
  if (name === "GET_PAIR" && backlog !== 0) {
    return new ProtocolError(name, "backlog", backlog, "must be 0 in a GET_PAIR");
  }
  return undefined;
}

/**
 * Whether a request that {@linkcode requestLength} passed is a `LISTEN`.
 *
 * @param frame The request.
 * @returns True for `LISTEN`, false for `GET_PAIR`.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, isListen } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(isListen(encodeRequest("listen", "k")), true);
 * ```
 */
export function isListen(frame: Uint8Array): boolean {
  return u32(frame, 0) === REQUEST_LISTEN;
}

/**
 * The mode of a request that {@linkcode validateRequest} passed.
 *
 * @param frame The request.
 * @returns Its mode.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, requestMode } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(requestMode(encodeRequest("get_pair", "k", { mode: "server" })), "server");
 * ```
 */
export function requestMode(frame: Uint8Array): Mode {
  return MODES[u16(frame, MODE_OFFSET)];
}

/**
 * The socket type of a request that {@linkcode validateRequest} passed.
 *
 * @param frame The request.
 * @returns Its type.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, requestType } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(requestType(encodeRequest("get_pair", "k", { type: "dgram" })), "dgram");
 * ```
 */
export function requestType(frame: Uint8Array): SocketType {
  return SOCKET_TYPES[u16(frame, TYPE_OFFSET)];
}

/**
 * Whether a request that {@linkcode validateRequest} passed asks for the
 * partner's pidfd.
 *
 * @param frame The request.
 * @returns True if {@link OPTION_PIDFD} is set.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, requestWantsPidfd } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(requestWantsPidfd(encodeRequest("get_pair", "k")), false);
 * ```
 */
export function requestWantsPidfd(frame: Uint8Array): boolean {
  return (u32(frame, OPTIONS_OFFSET) & OPTION_PIDFD) !== 0;
}

/**
 * The key length of a request that {@linkcode validateRequest} passed; the
 * key starts at {@link REQUEST_KEY_OFFSET}.
 *
 * @param frame The request.
 * @returns Its `key_len`.
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, requestKeyLength } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(requestKeyLength(encodeRequest("get_pair", "four")), 4);
 * ```
 */
export function requestKeyLength(frame: Uint8Array): number {
  return u16(frame, KEY_LEN_OFFSET);
}

/**
 * The backlog a `LISTEN` that {@linkcode validateRequest} passed asks for.
 *
 * @param frame The request.
 * @returns Its `backlog` (0: the broker's choice).
 *
 * @example Usage
 * ```ts
 * import { encodeRequest, requestBacklog } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(requestBacklog(encodeRequest("listen", "k", { backlog: 8 })), 8);
 * ```
 */
export function requestBacklog(frame: Uint8Array): number {
  return u16(frame, BACKLOG_OFFSET);
}

/**
 * Decodes and validates a v2 request, as {@linkcode validateRequest} checks it.
 *
 * @param frame Exactly the request's bytes.
 * @returns The request; its key is a view into `frame`.
 * @throws {ProtocolError} On the first rule broken.
 *
 * @example Usage
 * ```ts
 * import { ProtocolError } from "./protocol.ts";
 * import { decodeRequest, encodeRequest } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = encodeRequest("listen", "k", { backlog: 4 });
 * assert.equal(decodeRequest(frame).backlog, 4);
 * frame[20] = 2; // key_len no longer size - 12
 * assert.throws(() => decodeRequest(frame), ProtocolError);
 * ```
 */
export function decodeRequest(frame: Uint8Array): Request {
  const error = validateRequest(frame, frame.length);
  if (error !== undefined) throw error;
  return {
    request: isListen(frame) ? "listen" : "get_pair",
    mode: requestMode(frame),
    type: requestType(frame),
    pidfd: requestWantsPidfd(frame),
    backlog: requestBacklog(frame),
    key: frame.subarray(REQUEST_KEY_OFFSET, REQUEST_KEY_OFFSET + requestKeyLength(frame)),
  };
}

/**
 * A decoded `HELLO`.
 *
 * @example Usage
 * ```ts
 * import { decodeHello, encodeHello, type Hello } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const hello: Hello = decodeHello(encodeHello(1, 16));
 * assert.equal(hello.backlog, 16);
 * ```
 */
export interface Hello {
  /** {@link Capability} bits. */
  capabilities: number;
  /** After a `LISTEN`: the backlog granted; after a `GET_PAIR`: 0. */
  backlog: number;
}

/**
 * Encodes a `HELLO`.
 *
 * @param capabilities {@link Capability} bits.
 * @param backlog The backlog granted to a listener, 0 for a `GET_PAIR`.
 * @param into A buffer of at least {@link HELLO_SIZE} bytes to write into;
 * default a fresh one.
 * @returns The {@link HELLO_SIZE}-byte message (a view of `into`, if given).
 *
 * @example Usage
 * ```ts
 * import { encodeHello, HELLO_SIZE } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(encodeHello(15, 0).length, HELLO_SIZE);
 * ```
 */
export function encodeHello(
  capabilities: number,
  backlog: number,
  into: Uint8Array = new Uint8Array(HELLO_SIZE),
): Uint8Array {
  const frame = header(into.subarray(0, HELLO_SIZE), REQUEST_HELLO, HELLO_SIZE - HEADER_SIZE);
  putU32(frame, 12, capabilities);
  putU16(frame, 16, backlog);
  putU16(frame, 18, 0);
  return frame;
}

/**
 * Decodes a `HELLO`.
 *
 * @param frame Exactly the message.
 * @returns Its fields.
 * @throws {ProtocolError} If it is not a well-formed `HELLO`.
 *
 * @example Usage
 * ```ts
 * import { decodeHello, encodeHello } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(decodeHello(encodeHello(3, 0)).capabilities, 3);
 * ```
 */
export function decodeHello(frame: Uint8Array): Hello {
  expectMessage(frame, REQUEST_HELLO, "HELLO", HELLO_SIZE);
  return { capabilities: u32(frame, 12), backlog: u16(frame, 16) };
}

/**
 * Credentials of a partner as the broker read them (`SO_PEERCRED`) when the
 * partner connected to it.
 *
 * @example Usage
 * ```ts
 * import type { Credentials } from "./protocol_v2.ts";
 *
 * const peer: Credentials = { pid: 4242, uid: 1000, gid: 1000 };
 * ```
 */
export interface Credentials {
  /** Process id (0 if the broker could not tell, e.g. across pid namespaces). */
  pid: number;
  /** User id. */
  uid: number;
  /** Primary group id. */
  gid: number;
}

/**
 * A decoded v2 `SET_PAIR`.
 *
 * @example Usage
 * ```ts
 * import type { SetPair } from "./protocol_v2.ts";
 *
 * const reply: SetPair = {
 *   delivery: "socketpair",
 *   type: "stream",
 *   descriptors: 2,
 *   peer: { pid: 4242, uid: 1000, gid: 1000 },
 *   peerListener: true,
 *   peerVersion: 2,
 *   capabilities: 15,
 *   peerId: 12,
 * };
 * ```
 */
export interface SetPair {
  /** How the socket was made. */
  delivery: Delivery;
  /** Its socket type. */
  type: SocketType;
  /** Descriptors attached: 1, or 2 when the partner's pidfd follows the socket. */
  descriptors: 1 | 2;
  /** The partner's credentials, from its connect to the broker. */
  peer: Credentials;
  /** Whether the partner is a listener (it stays registered). */
  peerListener: boolean;
  /** The protocol version the partner spoke. */
  peerVersion: 1 | 2;
  /** {@link Capability} bits of the broker. */
  capabilities: number;
  /** The broker's connection id of the partner, low 32 bits (as in its log and `ctl`). */
  peerId: number;
}

const PEER_LISTENER = 1;
const PEER_V1 = 2;

/**
 * Encodes a v2 `SET_PAIR` ({@link SET_PAIR_SIZE} bytes).
 *
 * @param reply Its fields.
 * @param into A buffer of at least {@link SET_PAIR_SIZE} bytes to write into,
 * for a broker that reuses one; default a fresh one.
 * @returns The message (a view of `into`, if given).
 *
 * @example Usage
 * ```ts
 * import { decodeSetPair, encodeSetPair, type SetPair } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const reply: SetPair = {
 *   delivery: "socketpair",
 *   type: "seqpacket",
 *   descriptors: 1,
 *   peer: { pid: 10, uid: 1000, gid: 100 },
 *   peerListener: false,
 *   peerVersion: 1,
 *   capabilities: 15,
 *   peerId: 3,
 * };
 * assert.deepEqual(decodeSetPair(encodeSetPair(reply)), reply);
 * ```
 */
export function encodeSetPair(
  reply: SetPair,
  into: Uint8Array = new Uint8Array(SET_PAIR_SIZE),
): Uint8Array {
  const frame = header(into.subarray(0, SET_PAIR_SIZE), REQUEST_SET_PAIR, SET_PAIR_SIZE - 12);
  putU16(frame, 12, DELIVERIES.indexOf(reply.delivery));
  putU16(frame, 14, SOCKET_TYPES.indexOf(reply.type));
  putU16(frame, 16, reply.descriptors);
  putU16(
    frame,
    18,
    (reply.peerListener ? PEER_LISTENER : 0) | (reply.peerVersion === 1 ? PEER_V1 : 0),
  );
  putU32(frame, 20, reply.peer.pid);
  putU32(frame, 24, reply.peer.uid);
  putU32(frame, 28, reply.peer.gid);
  putU32(frame, 32, reply.capabilities);
  putU32(frame, 36, reply.peerId);
  putU32(frame, 40, 0);
  return frame;
}

/**
 * Decodes and checks a v2 `SET_PAIR`: length, header, a known delivery and
 * type, 1 or 2 descriptors, no unknown peer flag.
 *
 * @param frame Exactly the message.
 * @returns Its fields.
 * @throws {ProtocolError} On the first rule broken.
 *
 * @example Usage
 * ```ts
 * import { ProtocolError } from "./protocol.ts";
 * import { decodeSetPair } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.throws(() => decodeSetPair(new Uint8Array(44)), ProtocolError);
 * ```
 */
export function decodeSetPair(frame: Uint8Array): SetPair {
  expectMessage(frame, REQUEST_SET_PAIR, "SET_PAIR", SET_PAIR_SIZE);
  const delivery = DELIVERIES[u16(frame, 12)];
  if (delivery === undefined) {
    throw new ProtocolError("SET_PAIR", "type", u16(frame, 12), "delivery must be 1, socketpair");
  }
  const type = SOCKET_TYPES[u16(frame, 14)];
  if (type === undefined) {
    throw new ProtocolError("SET_PAIR", "type", u16(frame, 14), "must be 0, 1 or 2");
  }
  const descriptors = u16(frame, 16);
  if (descriptors !== 1 && descriptors !== 2) {
    throw new ProtocolError("SET_PAIR", "descriptors", descriptors, "must be 1 or 2");
  }
  const peerFlags = u16(frame, 18);
  if ((peerFlags & ~(PEER_LISTENER | PEER_V1)) !== 0) {
    throw new ProtocolError("SET_PAIR", "flags", peerFlags, "peer flags must be within 0x3");
  }
  return {
    delivery,
    type,
    descriptors,
    peer: { pid: u32(frame, 20) | 0, uid: u32(frame, 24), gid: u32(frame, 28) },
    peerListener: (peerFlags & PEER_LISTENER) !== 0,
    peerVersion: (peerFlags & PEER_V1) !== 0 ? 1 : 2,
    capabilities: u32(frame, 32),
    peerId: u32(frame, 36),
  };
}

/**
 * Encodes a `CREDIT`: the listener takes `count` more connections.
 *
 * @param count 1 to {@link MAX_CREDIT}.
 * @returns A fresh {@link CREDIT_SIZE}-byte message.
 * @throws {RangeError} If `count` is out of range.
 *
 * @example Usage
 * ```ts
 * import { creditCount, encodeCredit } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(creditCount(encodeCredit(5)), 5);
 * ```
 */
export function encodeCredit(count: number): Uint8Array {
  if (!Number.isInteger(count) || count < 1 || count > MAX_CREDIT) {
    throw new RangeError(`invalid credit ${count} (must be 1..${MAX_CREDIT})`);
  }
  const frame = header(new Uint8Array(CREDIT_SIZE), REQUEST_CREDIT, 4);
  putU32(frame, 12, count);
  return frame;
}

/**
 * Validates a message a listener sent after its `LISTEN`, once its first
 * {@link CREDIT_SIZE} bytes are in: it must be a `CREDIT` of 1..65535.
 *
 * @param frame The message from its first byte, at least {@link CREDIT_SIZE} bytes.
 * @returns `undefined` if valid, otherwise the first rule broken.
 *
 * @example Usage
 * ```ts
 * import { encodeCredit, validateCredit } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(validateCredit(encodeCredit(1)), undefined);
 * assert.equal(validateCredit(new Uint8Array(16))?.field, "request");
 * ```
 */
export function validateCredit(frame: Uint8Array): ProtocolError | undefined {
  const request = u32(frame, 0);
  if (request !== REQUEST_CREDIT) {
    return new ProtocolError(
      "CREDIT",
      "request",
      request,
      "a listener sends only 5, CREDIT, after its LISTEN",
    );
  }
  const size = u32(frame, 8);
  const error = checkHeader(frame, "CREDIT", size, "must be 4", size === 4);
  if (error !== undefined) return error;
  const count = u32(frame, 12);
  if (count < 1 || count > MAX_CREDIT) {
    return new ProtocolError("CREDIT", "count", count, `must be 1..${MAX_CREDIT}`);
  }
  return undefined;
}

/**
 * The count of a `CREDIT` that {@linkcode validateCredit} passed.
 *
 * @param frame The message.
 * @returns Its count.
 *
 * @example Usage
 * ```ts
 * import { creditCount, encodeCredit } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(creditCount(encodeCredit(64)), 64);
 * ```
 */
export function creditCount(frame: Uint8Array): number {
  return u32(frame, 12);
}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/**
 * Encodes a `REFUSED`: why the broker closes the connection. The reason is
 * cut to {@link MAX_REFUSED_REASON} bytes (at a character boundary).
 *
 * @param reason A short text, e.g. `policy: key "x" as server denied by rule 2`.
 * @returns A fresh message.
 *
 * @example Usage
 * ```ts
 * import { decodeRefused, encodeRefused } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(decodeRefused(encodeRefused("capacity")), "capacity");
 * ```
 */
export function encodeRefused(reason: string): Uint8Array {
  let text = utf8.encode(reason.length > 0 ? reason : "refused");
  if (text.length > MAX_REFUSED_REASON) {
    let end = MAX_REFUSED_REASON;
    while ((text[end] & 0xc0) === 0x80) end--; // not inside a UTF-8 sequence
    text = text.subarray(0, end);
  }
  const frame = header(new Uint8Array(HEADER_SIZE + text.length), REQUEST_REFUSED, text.length);
  frame.set(text, HEADER_SIZE);
  return frame;
}

/**
 * Decodes a `REFUSED`.
 *
 * @param frame Exactly the message.
 * @returns The reason.
 * @throws {ProtocolError} If it is not a well-formed `REFUSED`.
 *
 * @example Usage
 * ```ts
 * import { decodeRefused, encodeRefused } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(decodeRefused(encodeRefused("pair_timeout")), "pair_timeout");
 * ```
 */
export function decodeRefused(frame: Uint8Array): string {
  const size = frame.length - HEADER_SIZE;
  expectMessage(frame, REQUEST_REFUSED, "REFUSED", size >= 1 && size <= MAX_REFUSED_REASON);
  return fromUtf8.decode(frame.subarray(HEADER_SIZE));
}

/**
 * How long the broker message whose first 12 bytes are in `frame` is: for a
 * client reading its replies. Checks `flags` (version 2), a known `request`
 * (2, 4 or 6) and a `size` that fits {@link MAX_REPLY_SIZE}.
 *
 * @param frame At least the reply's first 12 bytes.
 * @returns The reply's total length, or the first rule broken.
 *
 * @example Usage
 * ```ts
 * import { encodeHello, HELLO_SIZE, replyLength } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.equal(replyLength(encodeHello(0, 0)), HELLO_SIZE);
 * ```
 */
export function replyLength(frame: Uint8Array): number | ProtocolError {
  const request = u32(frame, 0);
  if (request !== REQUEST_SET_PAIR && request !== REQUEST_HELLO && request !== REQUEST_REFUSED) {
    return new ProtocolError(
      "reply",
      "request",
      request,
      "must be 2 SET_PAIR, 4 HELLO or 6 REFUSED",
    );
  }
  const size = u32(frame, 8);
  const error = checkHeader(
    frame,
    "reply",
    size,
    `must be 1..${MAX_REPLY_SIZE - HEADER_SIZE}`,
    size >= 1 && size <= MAX_REPLY_SIZE - HEADER_SIZE,
  );
  return error ?? HEADER_SIZE + size;
}

/**
 * A broker message decoded by {@linkcode decodeReply}.
 *
 * @example Usage
 * ```ts
 * import { decodeReply, encodeRefused, type Reply } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * const reply: Reply = decodeReply(encodeRefused("policy"));
 * assert.equal(reply.request, "refused");
 * ```
 */
export type Reply =
  | ({ request: "set_pair" } & SetPair)
  | ({ request: "hello" } & Hello)
  | { request: "refused"; reason: string };

/**
 * Decodes any message a broker sends under v2.
 *
 * @param frame Exactly the message, as {@linkcode replyLength} measured it.
 * @returns The decoded message, tagged by `request`.
 * @throws {ProtocolError} If it is not well-formed.
 *
 * @example Usage
 * ```ts
 * import { decodeReply, encodeHello } from "./protocol_v2.ts";
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(decodeReply(encodeHello(1, 8)), {
 *   request: "hello",
 *   capabilities: 1,
 *   backlog: 8,
 * });
 * ```
 */
export function decodeReply(frame: Uint8Array): Reply {
  if (frame.length < HEADER_SIZE) {
    throw new ProtocolError("reply", "length", frame.length, `must be at least ${HEADER_SIZE}`);
  }
  switch (u32(frame, 0)) {
    case REQUEST_SET_PAIR:
      return { request: "set_pair", ...decodeSetPair(frame) };
    case REQUEST_HELLO:
      return { request: "hello", ...decodeHello(frame) };
    case REQUEST_REFUSED:
      return { request: "refused", reason: decodeRefused(frame) };
  }
  throw new ProtocolError(
    "reply",
    "request",
    u32(frame, 0),
    "must be 2 SET_PAIR, 4 HELLO or 6 REFUSED",
  );
}

/** Throws unless `frame` has the length, `request`, version and `size` of one message. */
function expectMessage(
  frame: Uint8Array,
  request: number,
  name: string,
  length: number | boolean,
): void {
  const lengthOk = typeof length === "boolean" ? length : frame.length === length;
  if (!lengthOk || frame.length < HEADER_SIZE) {
    throw new ProtocolError(
      name,
      "length",
      frame.length,
      typeof length === "number" ? `must be exactly ${length} bytes` : "out of range",
    );
  }
  const got = u32(frame, 0);
  if (got !== request) throw new ProtocolError(name, "request", got, `must be ${request}`);
  const size = u32(frame, 8);
  const error = checkHeader(
    frame,
    name,
    size,
    `must be ${frame.length - HEADER_SIZE}`,
    size === frame.length - HEADER_SIZE,
  );
  if (error !== undefined) throw error;
}
