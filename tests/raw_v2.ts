/**
 * A raw protocol v2 client for tests: whole messages read with their
 * descriptors, requests sent as bytes, replies checked. Written against the
 * codec's encoders only, so that the broker's framing is what is tested.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { Broker } from "../broker/broker.ts";
import { encodeGetPair, type Mode } from "../client/protocol.ts";
import {
  decodeReply,
  encodeCredit,
  encodeRequest,
  HEADER_SIZE,
  type Reply,
  type RequestOptions,
  type SetPair,
} from "../client/protocol_v2.ts";
import { Errno } from "../ffi/errors.ts";
import { closeDescriptor, readInto, receiveMessage, sendFrom } from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import { RawClient } from "./helpers.ts";
import { sleep } from "./processes.ts";

const encoder = new TextEncoder();

/** A whole message from the broker and the descriptors that came with it. */
export interface Message {
  bytes: Uint8Array;
  descriptors: number[];
}

/** One whole message from the broker with its descriptors; `undefined` at end of stream. */
export async function readMessage(raw: RawClient, ms = 3000): Promise<Message | undefined> {
  const header = new MessageHeader(new Uint8Array(1100), 4);
  const bytes: number[] = [];
  const descriptors: number[] = [];
  const deadline = Date.now() + ms;
  let want = HEADER_SIZE;
  while (bytes.length < want) {
    header.prepareReceive(want - bytes.length);
    const count = receiveMessage(raw.socket.fd, header);
    if (count === -Errno.EAGAIN) {
      if (Date.now() > deadline) {
        descriptors.forEach(closeDescriptor);
        throw new Error(`no message from the broker within ${ms} ms`);
      }
      await Promise.race([raw.socket.readiness.readable(), sleep(20)]);
      continue;
    }
    if (count === 0 || count === -Errno.ECONNRESET) {
      assert.equal(bytes.length, 0, "end of stream inside a message");
      return undefined;
    }
    assert.ok(count > 0, `recvmsg: -${count}`);
    header.readDescriptors();
    descriptors.push(...header.descriptors);
    bytes.push(...header.data.subarray(0, count));
    if (bytes.length === HEADER_SIZE) {
      want = HEADER_SIZE + new DataView(new Uint8Array(bytes).buffer).getUint32(8, true);
    }
  }
  return { bytes: new Uint8Array(bytes), descriptors };
}

/** The next reply, decoded; fails at end of stream. */
export async function reply(
  raw: RawClient,
  ms?: number,
): Promise<{ reply: Reply; descriptors: number[] }> {
  const message = await readMessage(raw, ms);
  assert.ok(message, "a reply, not end of stream");
  return { reply: decodeReply(message.bytes), descriptors: message.descriptors };
}

/** A `SET_PAIR` and the descriptors that came with it. */
export type Delivery = { reply: SetPair; descriptors: number[] };

/** The next reply, which must be a `SET_PAIR` with the descriptors it announces. */
export async function expectSetPair(
  raw: RawClient,
  what = "a SET_PAIR",
  ms?: number,
): Promise<Delivery> {
  const { reply: answer, descriptors } = await reply(raw, ms);
  if (answer.request !== "set_pair") {
    descriptors.forEach(closeDescriptor);
    assert.fail(`${what}: got ${JSON.stringify(answer)}`);
  }
  assert.equal(descriptors.length, answer.descriptors, `${what}: descriptors as announced`);
  return { reply: answer, descriptors };
}

/** The next reply, which must be a `HELLO`; returns its backlog. */
export async function expectHello(raw: RawClient, what = "a HELLO"): Promise<number> {
  const { reply: answer, descriptors } = await reply(raw);
  descriptors.forEach(closeDescriptor);
  assert.equal(answer.request, "hello", `${what}: got ${JSON.stringify(answer)}`);
  return (answer as { backlog: number }).backlog;
}

/** The REFUSED reason, then end of stream. */
export async function expectRefused(raw: RawClient, what = "a REFUSED"): Promise<string> {
  const { reply: answer, descriptors } = await reply(raw);
  descriptors.forEach(closeDescriptor);
  assert.equal(answer.request, "refused", `${what}: got ${JSON.stringify(answer)}`);
  assert.equal(await readMessage(raw), undefined, `${what}: end of stream after it`);
  return (answer as { reason: string }).reason;
}

/** True if nothing at all came within `ms` (and the connection is still open). */
export async function silentFor(raw: RawClient, ms: number): Promise<boolean> {
  try {
    const message = await readMessage(raw, ms);
    message?.descriptors.forEach(closeDescriptor);
    return false;
  } catch {
    return true;
  }
}

/** A raw connection that has sent a v2 request. */
export async function request(
  path: string,
  kind: "get_pair" | "listen",
  key: string | Uint8Array,
  options: RequestOptions = {},
): Promise<RawClient> {
  const raw = await RawClient.connect(path);
  raw.send(encodeRequest(kind, key, options));
  return raw;
}

/** A listener that has heard its HELLO; returns it and the backlog granted. */
export async function listen(
  path: string,
  key: string | Uint8Array,
  options: RequestOptions = {},
): Promise<{ raw: RawClient; backlog: number }> {
  const raw = await request(path, "listen", key, options);
  const backlog = await expectHello(raw, `LISTEN ${key}`);
  return { raw, backlog };
}

/** A v1 client that has sent its whole request. */
export async function v1(path: string, key: string, mode: Mode): Promise<RawClient> {
  const raw = await RawClient.connect(path);
  raw.send(encodeGetPair(key, mode));
  return raw;
}

/** A `CREDIT` of `count`. */
export function credit(count: number): Uint8Array {
  return encodeCredit(count);
}

/** Writes through one end and reads through the other, both ways; closes neither. */
export function assertJoined(a: number, b: number, what = "the pair"): void {
  for (const [from, to] of [[a, b], [b, a]]) {
    const sent = encoder.encode(`ping-${from}`);
    assert.equal(sendFrom(from, sent), sent.length, `${what}: send`);
    const got = new Uint8Array(64);
    const count = readInto(to, got);
    assert.equal(count, sent.length, `${what}: bytes through (read ${count})`);
    assert.deepEqual(got.subarray(0, count), sent, what);
  }
}

/** Closes the descriptors of every delivery. */
export function closeAll(...deliveries: Delivery[]): void {
  for (const delivery of deliveries) delivery.descriptors.forEach(closeDescriptor);
}

/** The connection ids of the broker's listeners, from its own listing. */
export function listenerIds(broker: Broker): number[] {
  return broker.listeners().map((listener) => listener.id);
}
