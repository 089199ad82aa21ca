/**
 * The hand-over protocol between an old and a new broker (`--takeover`), on
 * plain `Uint8Array`s: encoders and validating decoders for its five
 * messages and the connection records a `BATCH` carries. See
 * `docs/handover.md`; the descriptors travel beside these bytes.
 *
 * @module
 */

import { putU16, putU32, u16, u32 } from "../client/bytes.ts";
import { MAX_KEY_LENGTH, type Mode, MODES, ProtocolError } from "../client/protocol.ts";
import { CREDIT_SIZE, HEADER_SIZE, MAX_REQUEST_SIZE, VERSION_2 } from "../client/protocol_v2.ts";

/** The hand-over protocol's own version. */
export const HANDOVER_VERSION = 1;

/** `request` of the new broker's first message. */
export const REQUEST_TAKEOVER = 16;
/** `request` of the old broker's answer, with the listening socket. */
export const REQUEST_OFFER = 17;
/** `request` of a batch of connection records, with their descriptors. */
export const REQUEST_BATCH = 18;
/** `request` of the new broker's running count of records adopted. */
export const REQUEST_ACK = 19;
/** `request` of the old broker's last message. */
export const REQUEST_END = 20;

/** Most records in one `BATCH` (so, descriptors in one `SCM_RIGHTS`; the kernel allows 253). */
export const MAX_BATCH_RECORDS = 64;
/** Most payload bytes of one `BATCH`. */
export const MAX_BATCH_BYTES = 65536;

const RECORD_FIELDS = 24;
const LISTENER_FIELDS = 8;
const TAKEOVER_SIZE = 8;
const OFFER_SIZE = 28;
const ACK_SIZE = 4;

/** What a handed-over connection was doing. */
export type RecordKind = "waiting" | "listener" | "incomplete";
const KINDS: readonly (RecordKind | undefined)[] = [undefined, "waiting", "listener", "incomplete"];

/** A listener's state, in a record of kind `listener`. */
export interface ListenerState {
  /** Connections it may have in flight. */
  backlog: number;
  /** Connections it may be sent now. */
  credit: number;
  /** Connections delivered to it so far. */
  served: number;
}

/** One connection handed over, without its descriptor (which travels beside it). */
export interface HandoverRecord {
  /** What it was doing. */
  kind: RecordKind;
  /** The protocol version it spoke. */
  version: 1 | 2;
  /** Its socket type's wire value (0 stream, 1 seqpacket, 2 dgram). */
  type: number;
  /** Its mode (`none` for a connection still sending its request). */
  mode: Mode;
  /** Whether it asked for the partner's pidfd. */
  wantsPidfd: boolean;
  /** Whether it is told why it is closed (a v2 client whose request was valid). */
  hearsReasons: boolean;
  /** Its connection id. */
  id: number;
  /** Milliseconds it has waited, or been sending its request. */
  ageMs: number;
  /** Its key (empty for a connection still sending). */
  key: Uint8Array;
  /**
   * The bytes of its request received so far (while still sending), or of a
   * listener's next `CREDIT` (a listener may be caught between two reads of
   * one).
   */
  partial: Uint8Array;
  /** A listener's state. */
  listener?: ListenerState;
}

/** The old broker's `OFFER`. */
export interface Offer {
  /** The old broker's pid. */
  pid: number;
  /** Records it will send. */
  records: number;
  /** The id its next connection would have had. */
  nextId: number;
  /** When it started serving, in milliseconds since the epoch. */
  startedMs: number;
  /**
   * Whether it created the socket file (and so removes it at shutdown): the
   * new broker takes that over too, unless the socket came from systemd.
   */
  ownsSocketFile: boolean;
}

/** `OFFER` flags bit: the old broker created the socket file. */
const OFFER_OWNS_SOCKET_FILE = 1;

function message(request: number, size: number): Uint8Array {
  const frame = new Uint8Array(HEADER_SIZE + size);
  putU32(frame, 0, request);
  putU32(frame, 4, VERSION_2);
  putU32(frame, 8, size);
  return frame;
}

/** A 53-bit safe integer as two 32-bit halves. */
function putU64(frame: Uint8Array, offset: number, value: number): void {
  putU32(frame, offset, value % 2 ** 32);
  putU32(frame, offset + 4, Math.floor(value / 2 ** 32));
}

function u64(frame: Uint8Array, offset: number, name: string): number {
  const value = u32(frame, offset) + u32(frame, offset + 4) * 2 ** 32;
  if (!Number.isSafeInteger(value)) {
    throw new ProtocolError(name, "size", value, "a 64-bit field must be below 2^53");
  }
  return value;
}

/** Throws unless `frame` is one whole message of `request` with a payload of `size` bytes. */
function expect(frame: Uint8Array, request: number, name: string, size?: number): void {
  if (frame.length < HEADER_SIZE) {
    throw new ProtocolError(name, "length", frame.length, `must be at least ${HEADER_SIZE}`);
  }
  const got = u32(frame, 0);
  if (got !== request) throw new ProtocolError(name, "request", got, `must be ${request}`);
  const flags = u32(frame, 4);
  if (flags !== VERSION_2) throw new ProtocolError(name, "flags", flags, "must be 0x2");
  const declared = u32(frame, 8);
  if (declared !== frame.length - HEADER_SIZE || (size !== undefined && declared !== size)) {
    throw new ProtocolError(
      name,
      "size",
      declared,
      `must be ${size ?? frame.length - HEADER_SIZE}, the bytes that follow`,
    );
  }
}

/**
 * How long the hand-over message whose first 12 bytes are in `frame` is,
 * for framing a stream: `request` 16..20, `flags` 2, a `size` within
 * bounds.
 *
 * @param frame At least the message's first 12 bytes.
 * @returns Its total length, or the first rule broken.
 */
export function handoverMessageLength(frame: Uint8Array): number | ProtocolError {
  const request = u32(frame, 0);
  if (request < REQUEST_TAKEOVER || request > REQUEST_END) {
    return new ProtocolError("hand-over", "request", request, "must be 16..20");
  }
  const flags = u32(frame, 4);
  if (flags !== VERSION_2) return new ProtocolError("hand-over", "flags", flags, "must be 0x2");
  const size = u32(frame, 8);
  const most = request === REQUEST_BATCH ? MAX_BATCH_BYTES : OFFER_SIZE;
  if (size > most) return new ProtocolError("hand-over", "size", size, `must be 0..${most}`);
  return HEADER_SIZE + size;
}

/**
 * The new broker's `TAKEOVER`.
 *
 * @param pid The new broker's pid.
 * @returns The message.
 */
export function encodeTakeover(pid: number): Uint8Array {
  const frame = message(REQUEST_TAKEOVER, TAKEOVER_SIZE);
  putU16(frame, 12, HANDOVER_VERSION);
  putU32(frame, 16, pid);
  return frame;
}

/**
 * Decodes a `TAKEOVER`.
 *
 * @param frame Exactly the message.
 * @returns The hand-over version asked for and the new broker's pid.
 * @throws {ProtocolError} If it is not a well-formed `TAKEOVER`.
 */
export function decodeTakeover(frame: Uint8Array): { version: number; pid: number } {
  expect(frame, REQUEST_TAKEOVER, "TAKEOVER", TAKEOVER_SIZE);
  return { version: u16(frame, 12), pid: u32(frame, 16) };
}

/**
 * The old broker's `OFFER`.
 *
 * @param offer What it offers.
 * @returns The message; the listening socket goes beside it.
 */
export function encodeOffer(offer: Offer): Uint8Array {
  const frame = message(REQUEST_OFFER, OFFER_SIZE);
  putU16(frame, 12, HANDOVER_VERSION);
  putU16(frame, 14, offer.ownsSocketFile ? OFFER_OWNS_SOCKET_FILE : 0);
  putU32(frame, 16, offer.pid);
  putU32(frame, 20, offer.records);
  putU64(frame, 24, offer.nextId);
  putU64(frame, 32, offer.startedMs);
  return frame;
}

/**
 * Decodes an `OFFER`.
 *
 * @param frame Exactly the message.
 * @returns The offer.
 * @throws {ProtocolError} If it is not a well-formed `OFFER` of this version.
 */
export function decodeOffer(frame: Uint8Array): Offer {
  expect(frame, REQUEST_OFFER, "OFFER", OFFER_SIZE);
  const version = u16(frame, 12);
  if (version !== HANDOVER_VERSION) {
    throw new ProtocolError(
      "OFFER",
      "flags",
      version,
      `hand-over version must be ${HANDOVER_VERSION}`,
    );
  }
  const flags = u16(frame, 14);
  if ((flags & ~OFFER_OWNS_SOCKET_FILE) !== 0) {
    throw new ProtocolError(
      "OFFER",
      "flags",
      flags,
      "only bit 0 (owns the socket file) is defined",
    );
  }
  return {
    pid: u32(frame, 16),
    records: u32(frame, 20),
    nextId: u64(frame, 24, "OFFER"),
    startedMs: u64(frame, 32, "OFFER"),
    ownsSocketFile: (flags & OFFER_OWNS_SOCKET_FILE) !== 0,
  };
}

/** Bytes a record takes in a `BATCH`. */
function recordSize(record: HandoverRecord): number {
  return RECORD_FIELDS + record.key.length + record.partial.length +
    (record.kind === "listener" ? LISTENER_FIELDS : 0);
}

/**
 * Splits records, oldest first, into batches within {@link MAX_BATCH_RECORDS}
 * and {@link MAX_BATCH_BYTES}.
 *
 * @param records The records, in the order to send them.
 * @returns The batches, in order.
 */
export function batches(records: readonly HandoverRecord[]): HandoverRecord[][] {
  const out: HandoverRecord[][] = [];
  let batch: HandoverRecord[] = [];
  let bytes = 4;
  for (const record of records) {
    const size = recordSize(record);
    if (batch.length === MAX_BATCH_RECORDS || bytes + size > MAX_BATCH_BYTES) {
      out.push(batch);
      batch = [];
      bytes = 4;
    }
    batch.push(record);
    bytes += size;
  }
  if (batch.length > 0) out.push(batch);
  return out;
}

/**
 * A `BATCH` of records; their descriptors go beside it, in the same order.
 *
 * @param records At most {@link MAX_BATCH_RECORDS}, within {@link MAX_BATCH_BYTES}
 * (see {@linkcode batches}).
 * @returns The message.
 * @throws {RangeError} If the batch or a record is out of bounds.
 */
export function encodeBatch(records: readonly HandoverRecord[]): Uint8Array {
  if (records.length === 0 || records.length > MAX_BATCH_RECORDS) {
    throw new RangeError(`a batch holds 1..${MAX_BATCH_RECORDS} records, not ${records.length}`);
  }
  const size = 4 + records.reduce((sum, record) => sum + recordSize(record), 0);
  if (size > MAX_BATCH_BYTES) throw new RangeError(`a batch of ${size} bytes is too big`);
  const frame = message(REQUEST_BATCH, size);
  putU16(frame, 12, records.length);
  let at = HEADER_SIZE + 4;
  for (const record of records) at = putRecord(frame, at, record);
  return frame;
}

/** Writes `record` into `frame` at `at`; returns where the next one goes. */
function putRecord(frame: Uint8Array, at: number, record: HandoverRecord): number {
  checkRecord(record, RangeError);
  frame[at] = KINDS.indexOf(record.kind);
  frame[at + 1] = record.version;
  frame[at + 2] = record.type;
  frame[at + 3] = MODES.indexOf(record.mode);
  frame[at + 4] = (record.wantsPidfd ? 1 : 0) | (record.hearsReasons ? 2 : 0);
  putU64(frame, at + 8, record.id);
  putU32(frame, at + 16, Math.min(Math.max(0, Math.round(record.ageMs)), 0xffffffff));
  putU16(frame, at + 20, record.key.length);
  putU16(frame, at + 22, record.partial.length);
  at += RECORD_FIELDS;
  frame.set(record.key, at);
  at += record.key.length;
  frame.set(record.partial, at);
  at += record.partial.length;
  if (record.listener !== undefined) {
    putU16(frame, at, record.listener.backlog);
    putU16(frame, at + 2, record.listener.credit);
    putU32(frame, at + 4, record.listener.served);
    at += LISTENER_FIELDS;
  }
  return at;
}

/** The rules a record keeps, whichever side checks it. */
function checkRecord(
  record: HandoverRecord,
  Failure: new (message: string) => Error,
): void {
  const { kind, key, partial, listener } = record;
  const keyed = kind !== "incomplete";
  if (keyed ? key.length < 1 || key.length > MAX_KEY_LENGTH : key.length !== 0) {
    throw new Failure(`a ${kind} record with a key of ${key.length} bytes`);
  }
  const mostPartial = kind === "incomplete"
    ? MAX_REQUEST_SIZE - 1
    : kind === "listener"
    ? CREDIT_SIZE - 1
    : 0;
  if (partial.length > mostPartial) {
    throw new Failure(`a ${kind} record with ${partial.length} bytes of a request`);
  }
  if ((kind === "listener") !== (listener !== undefined)) {
    throw new Failure(`a ${kind} record ${listener ? "with" : "without"} a listener's state`);
  }
  if (listener !== undefined && listener.credit > listener.backlog) {
    throw new Failure(
      `a listener with credit ${listener.credit} over its backlog ${listener.backlog}`,
    );
  }
}

/**
 * Decodes a `BATCH`: every record checked, keys and partial requests copied
 * out of the frame.
 *
 * @param frame Exactly the message.
 * @returns Its records, in order; the descriptors that came with it match them one for one.
 * @throws {ProtocolError} If it is not a well-formed `BATCH`.
 */
export function decodeBatch(frame: Uint8Array): HandoverRecord[] {
  expect(frame, REQUEST_BATCH, "BATCH");
  const count = u16(frame, 12);
  if (count < 1 || count > MAX_BATCH_RECORDS) {
    throw new ProtocolError("BATCH", "count", count, `must be 1..${MAX_BATCH_RECORDS}`);
  }
  const records: HandoverRecord[] = [];
  let at = HEADER_SIZE + 4;
  for (let index = 0; index < count; index++) {
    const [record, next] = readRecord(frame, at, "BATCH");
    records.push(record);
    at = next;
  }
  if (at !== frame.length) {
    throw new ProtocolError("BATCH", "length", at, "bytes after the last record");
  }
  return records;
}

/**
 * Reads the record at `at` in `frame`, checked; keys and partial requests
 * are copied out.
 *
 * @returns The record and where the next one starts.
 * @throws {ProtocolError} (named `what`) if it is malformed or runs past the end.
 */
function readRecord(frame: Uint8Array, at: number, what: string): [HandoverRecord, number] {
  const bad = (detail: string) => new ProtocolError(what, "length", at, detail);
  if (at + RECORD_FIELDS > frame.length) throw bad("a record runs past the end");
  const kind = KINDS[frame[at]];
  const version = frame[at + 1];
  const type = frame[at + 2];
  const mode = MODES[frame[at + 3]];
  const flags = frame[at + 4];
  if (kind === undefined) throw new ProtocolError(what, "type", frame[at], "kind 1..3");
  if (version !== 1 && version !== 2) throw bad(`version ${version}`);
  if (type > 2 || mode === undefined || (flags & ~3) !== 0) throw bad("type, mode or flags");
  const keyLength = u16(frame, at + 20);
  const partialLength = u16(frame, at + 22);
  const id = u64(frame, at + 8, what);
  const ageMs = u32(frame, at + 16);
  at += RECORD_FIELDS;
  const tail = kind === "listener" ? LISTENER_FIELDS : 0;
  if (at + keyLength + partialLength + tail > frame.length) throw bad("a record runs past the end");
  const key = frame.slice(at, at + keyLength);
  at += keyLength;
  const partial = frame.slice(at, at + partialLength);
  at += partialLength;
  const record: HandoverRecord = {
    kind,
    version,
    type,
    mode,
    wantsPidfd: (flags & 1) !== 0,
    hearsReasons: (flags & 2) !== 0,
    id,
    ageMs,
    key,
    partial,
  };
  if (kind === "listener") {
    record.listener = {
      backlog: u16(frame, at),
      credit: u16(frame, at + 2),
      served: u32(frame, at + 4),
    };
    at += LISTENER_FIELDS;
  }
  try {
    checkRecord(record, Error);
  } catch (error) {
    throw bad((error as Error).message);
  }
  return [record, at];
}

/**
 * The new broker's `ACK`.
 *
 * @param adopted Records adopted so far, in all.
 * @returns The message.
 */
export function encodeAck(adopted: number): Uint8Array {
  const frame = message(REQUEST_ACK, ACK_SIZE);
  putU32(frame, 12, adopted);
  return frame;
}

/**
 * Decodes an `ACK`.
 *
 * @param frame Exactly the message.
 * @returns Records adopted so far.
 * @throws {ProtocolError} If it is not a well-formed `ACK`.
 */
export function decodeAck(frame: Uint8Array): number {
  expect(frame, REQUEST_ACK, "ACK", ACK_SIZE);
  return u32(frame, 12);
}

/**
 * The old broker's `END`.
 *
 * @returns The message.
 */
export function encodeEnd(): Uint8Array {
  return message(REQUEST_END, 0);
}

/**
 * Checks an `END`.
 *
 * @param frame Exactly the message.
 * @throws {ProtocolError} If it is not a well-formed `END`.
 */
export function decodeEnd(frame: Uint8Array): void {
  expect(frame, REQUEST_END, "END", 0);
}
