/**
 * Both ends of a hand-over (`one-socket broker --takeover`, see
 * `docs/handover.md`): {@link HandoverLink} moves whole messages with their
 * descriptors over the hand-over connection, {@link handOver} is the old
 * broker's side, {@link requestTakeover} the new one's. What a record means
 * to a broker (a connection to adopt or to send) stays in `broker.ts`.
 *
 * @module
 */

import { u32 } from "../client/bytes.ts";
import { ProtocolError } from "../client/protocol.ts";
import { decodeRefused, HEADER_SIZE, replyLength, REQUEST_REFUSED } from "../client/protocol_v2.ts";
import { Errno, OsError } from "../ffi/errors.ts";
import { Readiness } from "../ffi/reactor.ts";
import {
  closeDescriptor,
  connectUnix,
  currentUid,
  peerPidfd,
  peerUid,
  readInto,
  receiveMessage,
  sendFrom,
  sendMessage,
  type UnixSocket,
} from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import {
  batches,
  decodeAck,
  decodeBatch,
  decodeEnd,
  decodeOffer,
  encodeAck,
  encodeBatch,
  encodeEnd,
  encodeOffer,
  encodeTakeover,
  handoverMessageLength,
  type HandoverRecord,
  MAX_BATCH_BYTES,
  MAX_BATCH_RECORDS,
  type Offer,
  REQUEST_BATCH,
  REQUEST_END,
} from "./handover_wire.ts";

/** How long either side waits for the other's next message before it gives up. */
export const HANDOVER_TIMEOUT_MS = 10_000;
/**
 * Batches sent before their `ACK`s: enough to keep the new broker adopting
 * while the old one releases, few enough that the descriptors in flight (64
 * a batch, counted against the sender's descriptor limit) stay far below it.
 */
const BATCH_WINDOW = 32;
/** After end of stream, how long the new broker waits to see the old one's process end. */
const EXIT_WAIT_MS = 2000;

/** A message received whole, with the descriptors that came with it. */
export interface HandoverMessage {
  /** The message, header included. */
  frame: Uint8Array;
  /** Its descriptors (close-on-exec), now the receiver's to close. */
  fds: number[];
}

/**
 * One hand-over connection: whole messages in and out, descriptors beside
 * them, nonblocking underneath and bounded in time.
 */
export class HandoverLink implements Disposable {
  readonly socket: UnixSocket;
  readonly #inbound = new MessageHeader(
    new Uint8Array(HEADER_SIZE + MAX_BATCH_BYTES),
    MAX_BATCH_RECORDS + 1,
  );
  readonly #outbound = new MessageHeader(
    new Uint8Array(HEADER_SIZE + MAX_BATCH_BYTES),
    MAX_BATCH_RECORDS + 1,
  );

  /** @param socket a connected, nonblocking stream socket, now the link's */
  constructor(socket: UnixSocket) {
    this.socket = socket;
  }

  /**
   * Sends `frame` with `fds` attached to its first byte. The descriptors stay
   * the caller's (the kernel passes duplicates).
   */
  async send(frame: Uint8Array, fds: readonly number[] = []): Promise<void> {
    const outbound = this.#outbound;
    outbound.data.set(frame);
    outbound.prepareSendDescriptors(frame.length, fds);
    let sent = await this.#retry(() => sendMessage(this.socket.fd, outbound), "sendmsg", true);
    while (sent < frame.length) {
      const rest = outbound.data.subarray(sent, frame.length);
      sent += await this.#retry(() => sendFrom(this.socket.fd, rest), "send", true);
    }
  }

  /**
   * The next whole message, its length told by `lengthOf` from its header;
   * undefined at end of stream before its first byte.
   *
   * @throws {ProtocolError} if `lengthOf` refuses the header.
   * @throws {OsError} on a receive error, or `ETIMEDOUT` after {@link HANDOVER_TIMEOUT_MS}.
   */
  async receive(
    lengthOf: (header: Uint8Array) => number | ProtocolError,
  ): Promise<HandoverMessage | undefined> {
    const inbound = this.#inbound;
    const fds: number[] = [];
    let frame = new Uint8Array(HEADER_SIZE);
    let received = 0;
    try {
      for (;;) {
        inbound.prepareReceive(frame.length - received);
        const count = await this.#retry(() => receiveMessage(this.socket.fd, inbound), "recvmsg");
        inbound.readDescriptors();
        fds.push(...inbound.descriptors);
        if (count === 0) {
          if (received === 0 && fds.length === 0) return undefined;
          throw new ProtocolError("hand-over", "length", received, "the message was cut short");
        }
        frame.set(inbound.data.subarray(0, count), received);
        received += count;
        if (received < frame.length) continue;
        if (frame.length > HEADER_SIZE || received > HEADER_SIZE) break;
        const length = lengthOf(frame);
        if (typeof length !== "number") throw length;
        if (length === HEADER_SIZE) break;
        const whole = new Uint8Array(length);
        whole.set(frame);
        frame = whole;
      }
    } catch (error) {
      for (const fd of fds) closeDescriptor(fd);
      throw error;
    }
    return { frame, fds };
  }

  /** Closes the connection. */
  close(): void {
    this.socket.close();
  }

  /** Same as {@link close}. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** Runs `call` until it does not say `EAGAIN`, waiting for readiness in between. */
  async #retry(call: () => number, syscall: string, write = false): Promise<number> {
    const deadline = performance.now() + HANDOVER_TIMEOUT_MS;
    for (;;) {
      const result = call();
      if (result >= 0) return result;
      if (result !== -Errno.EAGAIN && result !== -Errno.EINTR) throw new OsError(syscall, -result);
      const left = deadline - performance.now();
      if (left <= 0) throw new OsError(syscall, Errno.ETIMEDOUT);
      const ready = write ? this.socket.readiness.writable() : this.socket.readiness.readable();
      await withTimeout(ready, left);
    }
  }
}

/** Resolves when `promise` does or after `ms`, whichever is first. */
async function withTimeout(promise: Promise<void>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(false), ms));
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** One connection the old broker offers: its record, and its descriptor to send. */
export interface OfferedConnection {
  /** What the new broker needs to know of it. */
  record: HandoverRecord;
  /** Its descriptor (still the old broker's until acknowledged). */
  fd: number;
}

/** What the old broker's side of a hand-over needs from its broker. */
export interface HandoverSource {
  /** The offer to make, its listening socket and the connections to send, oldest first. */
  offer: Offer;
  /** The listening socket, sent with the `OFFER`. */
  listenerFd: number;
  /** The connections, oldest first; each is looked at once, when its batch is sent. */
  connections: readonly OfferedConnection[];
  /** Whether the connection at this index is still open (a kick may have closed it since). */
  isOpen(index: number): boolean;
  /** The new broker has the connections at these indexes: close the old broker's copies. */
  release(indexes: readonly number[]): void;
}

/**
 * The old broker's side: `OFFER`, then batches each sent when the previous
 * one is acknowledged, then `END`. Resolves to undefined once `END` is sent
 * (every connection acknowledged and released), or to why not if the new
 * broker went away or broke the protocol first: the connections not yet
 * released are then still the old broker's to serve.
 */
export async function handOver(
  link: HandoverLink,
  source: HandoverSource,
): Promise<string | undefined> {
  try {
    await link.send(encodeOffer(source.offer), [source.listenerFd]);
    const open = source.connections
      .map((_, index) => index)
      .filter((index) => source.isOpen(index));
    const groups = batches(open.map((index) => source.connections[index].record));
    const firsts: number[] = []; // where each batch starts in `open`
    for (let start = 0, index = 0; index < groups.length; start += groups[index++].length) {
      firsts.push(start);
    }
    const indexesOf = (batch: number) =>
      open.slice(firsts[batch], firsts[batch] + groups[batch].length);
    // Batches go out ahead of their ACKs, a window at a time: waiting for each ACK would
    // cost both processes a wake-up per batch, most of a 10,000-client hand-over.
    let sent = 0, acknowledged = 0, adopted = 0;
    while (acknowledged < groups.length) {
      while (sent < groups.length && sent - acknowledged < BATCH_WINDOW) {
        const fds = indexesOf(sent).map((index) => source.connections[index].fd);
        await link.send(encodeBatch(groups[sent++]), fds);
      }
      const reply = await link.receive(handoverMessageLength);
      if (reply === undefined) return "the new broker went away";
      for (const fd of reply.fds) closeDescriptor(fd);
      const count = decodeAck(reply.frame);
      const expected = adopted + groups[acknowledged].length;
      if (count !== expected) throw new ProtocolError("ACK", "count", count, `must be ${expected}`);
      adopted = count;
      source.release(indexesOf(acknowledged++));
    }
    await link.send(encodeEnd());
    return undefined;
  } catch (error) {
    if (error instanceof ProtocolError || error instanceof OsError) return error.message;
    throw error;
  }
}

/** A batch the new broker received: records and their descriptors, one for one. */
export interface ReceivedBatch {
  /** The records, oldest first. */
  records: HandoverRecord[];
  /** Their descriptors, now the new broker's. */
  fds: number[];
}

/** How a hand-over ended, for the new broker. */
export type TakeoverEnd =
  /** `END`: the old broker sent everything and is exiting. */
  | "end"
  /** The old broker's process ended before `END`: serve what it sent. */
  | "old-died"
  /** The old broker closed the hand-over but lives on: it serves again, so must we not. */
  | "old-gave-up";

/**
 * The new broker's side, from its `TAKEOVER` to the old broker's answer.
 * Then {@link nextBatch} until it says how the hand-over ended.
 */
export class TakeoverSession implements Disposable {
  /** The old broker's offer. */
  readonly offer: Offer;
  /** The listening socket it sent, now ours. */
  readonly listenerFd: number;
  readonly #link: HandoverLink;
  readonly #pidfd: number;
  #adopted = 0;

  private constructor(link: HandoverLink, offer: Offer, listenerFd: number, pidfd: number) {
    this.#link = link;
    this.offer = offer;
    this.listenerFd = listenerFd;
    this.#pidfd = pidfd;
  }

  /** @internal Use {@link requestTakeover}. */
  static async start(link: HandoverLink, path: string): Promise<TakeoverSession> {
    // Whatever serves the path gets our descriptors' worth of trust: it must be us (or root).
    const serving = peerUid(link.socket.fd);
    const ours = currentUid();
    if (serving !== ours && serving !== 0) {
      throw new Error(
        `${path} is served by uid ${serving}, not by this user (${ours}) or root; not taking over`,
      );
    }
    // The old broker's process, to tell its death from a hand-over it gave up.
    const pidfd = peerPidfd(link.socket.fd);
    let reply: HandoverMessage | undefined;
    try {
      await link.send(encodeTakeover(Deno.pid));
      reply = await link.receive(offerOrRefusal);
      if (reply === undefined) {
        throw new Error(
          `${path} is served by a broker that cannot hand over (it closed the connection); ` +
            "stop it and start this one without --takeover",
        );
      }
      if (u32(reply.frame, 0) === REQUEST_REFUSED) {
        throw new Error(`${path}: the broker refused to hand over: ${decodeRefused(reply.frame)}`);
      }
      const offer = decodeOffer(reply.frame);
      if (reply.fds.length !== 1) {
        throw new ProtocolError("OFFER", "descriptors", reply.fds.length, "must be 1");
      }
      return new TakeoverSession(link, offer, reply.fds[0], pidfd);
    } catch (error) {
      for (const fd of reply?.fds ?? []) closeDescriptor(fd);
      if (pidfd >= 0) closeDescriptor(pidfd);
      throw error;
    }
  }

  /** The next batch, or how the hand-over ended. */
  async nextBatch(): Promise<ReceivedBatch | TakeoverEnd> {
    let message: HandoverMessage | undefined;
    try {
      message = await this.#link.receive(handoverMessageLength);
    } catch (error) {
      if (!(error instanceof OsError) || error.code === "ETIMEDOUT") throw error;
      message = undefined; // reset by a dying peer: as end of stream
    }
    if (message === undefined) return await this.#oldExited() ? "old-died" : "old-gave-up";
    const request = u32(message.frame, 0);
    if (request === REQUEST_END) {
      for (const fd of message.fds) closeDescriptor(fd);
      decodeEnd(message.frame);
      return "end";
    }
    if (request !== REQUEST_BATCH) {
      for (const fd of message.fds) closeDescriptor(fd);
      throw new ProtocolError("hand-over", "request", request, "a BATCH or END");
    }
    let records: HandoverRecord[];
    try {
      records = decodeBatch(message.frame);
      if (records.length !== message.fds.length) {
        throw new ProtocolError(
          "BATCH",
          "descriptors",
          message.fds.length,
          `must be ${records.length}, one per record`,
        );
      }
    } catch (error) {
      for (const fd of message.fds) closeDescriptor(fd);
      throw error;
    }
    return { records, fds: message.fds };
  }

  /** Says that `count` more records were adopted. */
  acknowledge(count: number): Promise<void> {
    this.#adopted += count;
    return this.#link.send(encodeAck(this.#adopted));
  }

  /**
   * Resolves once the old broker's end of the hand-over closes (its process
   * exits after `END`), or after {@link HANDOVER_TIMEOUT_MS}: then it has
   * let go of its pidfile and control socket.
   */
  async oldBrokerGone(): Promise<void> {
    const deadline = performance.now() + HANDOVER_TIMEOUT_MS;
    const scratch = new Uint8Array(1);
    while (performance.now() < deadline) {
      if (readInto(this.#link.socket.fd, scratch) !== -Errno.EAGAIN) return;
      await withTimeout(this.#link.socket.readiness.readable(), deadline - performance.now());
    }
  }

  /** Whether the old broker's process has ended (or ends within {@link EXIT_WAIT_MS}). */
  async #oldExited(): Promise<boolean> {
    if (this.#pidfd < 0) return true; // no pidfd to ask: trust the end of stream
    // A pidfd turns readable when its process ends.
    const readiness = new Readiness(this.#pidfd);
    try {
      return await withTimeout(readiness.readable(), EXIT_WAIT_MS);
    } finally {
      readiness.cancel(false);
    }
  }

  /** Closes the hand-over connection and the pidfd. */
  [Symbol.dispose](): void {
    this.#link.close();
    if (this.#pidfd >= 0) closeDescriptor(this.#pidfd);
  }
}

/** The first answer to a `TAKEOVER`: an `OFFER`, or a `REFUSED` saying why not. */
function offerOrRefusal(header: Uint8Array): number | ProtocolError {
  return u32(header, 0) === REQUEST_REFUSED ? replyLength(header) : handoverMessageLength(header);
}

/**
 * Connects to the broker at `path` and asks it to hand over. Undefined when
 * nobody serves the path (`ECONNREFUSED`, `ENOENT`): the caller starts afresh.
 *
 * @throws {Error} when a broker serves the path and will not or cannot hand over.
 */
export async function requestTakeover(path: string): Promise<TakeoverSession | undefined> {
  let socket: UnixSocket;
  try {
    socket = await connectUnix(path, AbortSignal.timeout(HANDOVER_TIMEOUT_MS));
  } catch (error) {
    if (error instanceof OsError && (error.code === "ECONNREFUSED" || error.code === "ENOENT")) {
      return undefined;
    }
    throw error;
  }
  const link = new HandoverLink(socket);
  try {
    return await TakeoverSession.start(link, path);
  } catch (error) {
    link.close();
    throw error;
  }
}
