/**
 * Asking the broker for a pair: {@link getPair} in one call, or the steps
 * ({@link connectBroker}, {@link BrokerConnection.request},
 * {@link BrokerConnection.receivePair}) for callers that drive them.
 *
 * {@link getPair} speaks protocol v2 (`docs/protocol-v2.md`) and falls back
 * to v1 by itself for a broker that speaks only v1, which it then remembers
 * for the rest of the process. The steps speak v1, as the C client does.
 *
 * @module
 */

import { Errno, OsError } from "../ffi/errors.ts";
import {
  closeDescriptor,
  connectUnix,
  receiveMessage,
  sendFrom,
  tryConnectUnix,
  UnixSocket,
} from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import { PairedSocket, type Peer } from "./paired_socket.ts";
import {
  decodeSetPair as decodeSetPairV1,
  describeKey,
  encodeGetPair,
  type Key,
  keyBytes,
  MESSAGE_SIZE,
  type Mode,
  MODES,
  ProtocolError,
} from "./protocol.ts";
import {
  decodeReply,
  encodeRequest,
  HEADER_SIZE,
  MAX_REPLY_SIZE,
  type Reply,
  replyLength,
  type RequestOptions,
  type SetPair,
  SOCKET_TYPES,
  type SocketType,
} from "./protocol_v2.ts";
import { guardFallbackDirectory, resolveSocketPath, unreadEnvironmentHint } from "./socket_path.ts";

/**
 * The broker closed the connection without a `SET_PAIR`: it rejected the
 * request (see its log), or it shut down while the client waited.
 *
 * @example
 * ```ts
 * import { BrokerClosedError, getPair } from "@one-socket/one-socket";
 * try {
 *   await getPair("k");
 * } catch (error) {
 *   if (error instanceof BrokerClosedError) console.log("retry later:", error.message);
 * }
 * ```
 */
export class BrokerClosedError extends Error {
  /** The broker socket path. */
  readonly path: string;

  /**
   * Describes a broker at `path` that hung up without answering.
   *
   * @param path the broker socket path
   * @param message what happened, if the broker said
   */
  constructor(path: string, message?: string) {
    super(
      message ?? `broker at ${path} closed the connection without a reply ` +
          "(request rejected, or the broker stopped; see its log)",
    );
    this.name = "BrokerClosedError";
    this.path = path;
  }
}

/**
 * A v2 broker that closed after its `HELLO`: protocol v2 says that means it
 * stopped (a refusal would have said why).
 */
export function brokerStopped(path: string): BrokerClosedError {
  return new BrokerClosedError(
    path,
    `broker at ${path} closed the connection: it stopped while the request waited ` +
      "(end of stream after its HELLO)",
  );
}

/**
 * The broker refused the request and said why (protocol v2's `REFUSED`):
 * `policy`, `uid_limit`, `pair_timeout`, `shutdown`, `listener_limit`…
 * It is a {@link BrokerClosedError} (a v1 broker closes such a request
 * without a word), so code that handles that handles this too.
 *
 * @example Tell a denial from a broker that went away
 * ```ts
 * import { BrokerRefusedError, getPair } from "@one-socket/one-socket";
 * try {
 *   await getPair("vhost-user-1", { mode: "client" });
 * } catch (error) {
 *   if (error instanceof BrokerRefusedError && error.reason === "policy") {
 *     console.error(`not allowed: ${error.message}`);
 *   } else throw error;
 * }
 * ```
 */
export class BrokerRefusedError extends BrokerClosedError {
  /** The key of the refused request. */
  readonly key: Uint8Array;
  /** The broker's reason, as it sent it. */
  readonly reason: string;

  /**
   * Describes `reason`, the broker at `path`'s answer to a request for `key`.
   *
   * @param path the broker socket path
   * @param key the key's bytes
   * @param reason the broker's reason
   */
  constructor(path: string, key: Uint8Array, reason: string) {
    super(path, `broker at ${path} refused key "${describeKey(key)}": ${reason}`);
    this.name = "BrokerRefusedError";
    this.key = key;
    this.reason = reason;
  }
}

/**
 * The broker speaks only protocol v1 (it closed a v2 request without a
 * word, as the C broker does), and what was asked needs v2: a `seqpacket`
 * or `dgram` pair, a listener, or `protocol: 2`.
 *
 * @example Settle for a stream pair
 * ```ts
 * import { BrokerVersionError, getPair } from "@one-socket/one-socket";
 * const socket = await getPair("memif-ctl", { type: "seqpacket" }).catch((error) => {
 *   if (!(error instanceof BrokerVersionError)) throw error;
 *   return getPair("memif-ctl");
 * });
 * socket.close();
 * ```
 */
export class BrokerVersionError extends Error {
  /** The broker socket path. */
  readonly path: string;

  /**
   * Describes the broker at `path`, which speaks only v1, and `what` needs v2.
   *
   * @param path the broker socket path
   * @param what what needs v2, e.g. `seqpacket pairs need v2`
   */
  constructor(path: string, what: string) {
    super(`broker at ${path} speaks only protocol v1: ${what}`);
    this.name = "BrokerVersionError";
    this.path = path;
  }
}

/** How long a broker found to speak only v1 is asked in v1 at once, before v2 is tried again. */
const V1_MEMORY_MS = 60_000;

/**
 * Socket paths of brokers found to speak only protocol v1: for a minute,
 * requests go to them in v1 at once. Not for longer, since a close without
 * an answer can also be a v2 broker that stopped, or refused a request before
 * it was whole, and the broker behind a path can be replaced.
 */
class V1OnlyBrokers {
  readonly #since = new Map<string, number>();

  /** Whether `path` was found v1-only within the last minute. */
  has(path: string): boolean {
    const since = this.#since.get(path);
    if (since === undefined) return false;
    if (performance.now() - since < V1_MEMORY_MS) return true;
    this.#since.delete(path);
    return false;
  }

  /** Remembers that the broker at `path` closed a v2 request unanswered. */
  add(path: string): void {
    this.#since.set(path, performance.now());
  }

  /** Forgets it: the broker at `path` has just answered in v2. */
  delete(path: string): void {
    this.#since.delete(path);
  }
}

/** The v1-only brokers of this process (see {@link V1OnlyBrokers}); exported for the tests. */
export const v1OnlyBrokers: V1OnlyBrokers = new V1OnlyBrokers();

/** Options of {@link getPair}. */
export interface PairOptions {
  /** Broker socket path; default `$ONE_SOCKET_PATH`, else {@link defaultSocketPath}. */
  socket?: string;
  /** `none` pairs with `none`; `client` with `server`. Default `none`. */
  mode?: Mode;
  /**
   * The pair's socket type: `stream` (the default), `seqpacket` or `dgram`.
   * Only requests of the same type pair. Other than `stream` needs a v2 broker.
   */
  type?: SocketType;
  /**
   * Ask for the partner's pidfd, as `peer.pidfd` (where the broker's kernel
   * has `SO_PEERPIDFD`); a v1 broker has none to give, and the wish is dropped.
   */
  pidfd?: boolean;
  /**
   * The protocol version to speak. Default: 2, and 1 for a broker that
   * closes a v2 request unanswered (remembered per socket path for the
   * process). `1` skips the attempt; `2` fails with {@link BrokerVersionError}
   * instead of falling back.
   */
  protocol?: 1 | 2;
  /** Gives up (rejecting with the signal's reason) and closes the broker connection. */
  signal?: AbortSignal;
}

/** Resolves with `promise`, or rejects with `signal`'s reason as soon as it aborts. */
export function abortable<T>(promise: Promise<T>, signal?: AbortSignal): Promise<T> {
  if (!signal) return promise;
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

// Every recvmsg below is synchronous, so one header serves all connections (made on first
// use: importing the library needs no FFI permission). Room for 8 descriptors: more than a
// reply carries, so that a broker sending too many is caught, and the extra ones closed.
let replyHeader: MessageHeader | undefined;
const receiveHeader = () => replyHeader ??= new MessageHeader(new Uint8Array(MESSAGE_SIZE), 8);
// Requests are encoded and sent synchronously (a rest that must wait is copied), so
// one frame serves all connections too.
const requestFrame = new Uint8Array(MESSAGE_SIZE);

/** Sends all of `frame` on a broker connection, waiting for room as needed. */
export async function sendRequest(
  socket: UnixSocket,
  path: string,
  frame: Uint8Array,
  signal?: AbortSignal,
): Promise<void> {
  let rest = frame as Uint8Array<ArrayBuffer>;
  while (rest.length > 0) {
    const sent = sendFrom(socket.fd, rest);
    if (sent >= 0) rest = rest.subarray(sent);
    else if (sent === -Errno.EAGAIN) {
      // Once we await, the shared frame is the next request's: keep our own rest.
      if (rest.buffer === requestFrame.buffer) rest = rest.slice();
      await abortable(socket.readiness.writable(), signal);
    } else if (sent === -Errno.EPIPE || sent === -Errno.ECONNRESET) {
      throw new BrokerClosedError(path);
    } else throw new OsError("send", -sent, path);
  }
}

/**
 * Waits for a v1 `SET_PAIR` on `socket` and returns the socket it carries.
 * The reply must be exactly what the C client accepts: 1044 bytes,
 * `SET_PAIR`, version 1, size 8, exactly one descriptor.
 */
async function receiveV1Pair(
  socket: UnixSocket,
  path: string,
  justSent: boolean,
  signal?: AbortSignal,
): Promise<PairedSocket> {
  // Built only when the reply comes in pieces; whole, it is checked where it landed.
  let frame: Uint8Array | undefined;
  const descriptors: number[] = [];
  let received = 0;
  try {
    // The broker answers within microseconds once the partner is there.
    if (justSent) await abortable(socket.readiness.readable(true), signal);
    const header = receiveHeader();
    while (received < MESSAGE_SIZE) {
      header.prepareReceive(MESSAGE_SIZE - received);
      const count = receiveMessage(socket.fd, header);
      if (count === -Errno.EAGAIN) {
        await abortable(socket.readiness.readable(true), signal);
        continue;
      }
      if (count === 0 || count === -Errno.ECONNRESET) {
        if (received === 0) throw new BrokerClosedError(path);
        throw new ProtocolError("SET_PAIR", "length", received, `must be ${MESSAGE_SIZE}`);
      }
      if (count < 0) throw new OsError("recvmsg", -count, path);
      header.readDescriptors();
      for (const fd of header.descriptors) descriptors.push(fd);
      if (count === MESSAGE_SIZE) {
        frame = header.data;
      } else {
        frame ??= new Uint8Array(MESSAGE_SIZE);
        frame.set(header.data.subarray(0, count), received);
      }
      received += count;
    }
    decodeSetPairV1(frame!);
    if (descriptors.length !== 1) {
      throw new ProtocolError("SET_PAIR", "descriptors", descriptors.length, "must be 1");
    }
    return new PairedSocket(descriptors.pop()!);
  } finally {
    for (const fd of descriptors) closeDescriptor(fd);
  }
}

/** A v2 broker message, with the descriptors that came with it (a `SET_PAIR`'s). */
export interface BrokerMessage {
  /** The message. */
  reply: Reply;
  /** The descriptors, as many as a `SET_PAIR` says; the caller owns them. */
  descriptors: number[];
}

const NO_DESCRIPTORS: number[] = [];

/**
 * Reads a v2 broker's messages off a connection, one whole message at a
 * time however the kernel splits or joins them, each `SET_PAIR` with its
 * descriptors. The kernel delivers a message's descriptors with the read
 * that holds its first byte and ends that read after the message, so a read
 * that brings descriptors holds the start of exactly one `SET_PAIR`: theirs.
 */
export class ReplyReader implements Disposable {
  /** Bytes received on the connection so far. */
  received = 0;
  readonly #fd: number;
  // Stream offset of the first byte not yet returned in a message.
  #parsed = 0;
  // Bytes from #parsed to received, when a read brought part of a message or more than one.
  #kept?: Uint8Array;
  // Descriptors of the last read that brought some, and the stream offsets it covered.
  #descriptors: number[] = [];
  #descriptorsFrom = 0;
  #descriptorsTo = 0;

  /** Reads from `fd`, a nonblocking broker connection the caller owns. */
  constructor(fd: number) {
    this.#fd = fd;
  }

  /**
   * The next whole message; `again` when it has not arrived yet (wait until
   * readable, then ask again); `end` at end of stream between messages.
   *
   * @throws {ProtocolError} when the broker breaks the protocol (any
   *   descriptors that came with the bad part are closed)
   */
  read(path: string): BrokerMessage | "again" | "end" {
    for (;;) {
      if (this.#kept !== undefined) {
        const message = this.#take(this.#kept, this.received - this.#parsed);
        if (message !== undefined) return message;
      }
      if (this.#descriptors.length > 0 && this.#parsed >= this.#descriptorsTo) {
        throw this.#dropDescriptors("only a SET_PAIR carries descriptors");
      }
      const header = receiveHeader();
      header.prepareReceive(MESSAGE_SIZE);
      const count = receiveMessage(this.#fd, header);
      if (count === -Errno.EAGAIN) return "again";
      if (count === 0 || count === -Errno.ECONNRESET) {
        if (this.received === this.#parsed) return "end";
        throw new ProtocolError(
          "reply",
          "length",
          this.received - this.#parsed,
          "the broker closed the connection inside a message",
        );
      }
      if (count < 0) throw new OsError("recvmsg", -count, path);
      const truncated = header.readDescriptors();
      if (header.descriptors.length > 0 || truncated) {
        const stale = this.#descriptors.length > 0;
        this.#descriptors.push(...header.descriptors);
        if (stale || truncated) throw this.#dropDescriptors("at most 2, for one SET_PAIR");
        this.#descriptorsFrom = this.received;
        this.#descriptorsTo = this.received + count;
      }
      if (this.#kept === undefined) {
        // The common case: whole messages, decoded where they landed.
        this.received += count;
        const message = this.#take(header.data, count);
        // The shared buffer is the next connection's once we return: keep what is left.
        if (this.received > this.#parsed) {
          const at = count - (this.received - this.#parsed);
          this.#kept = new Uint8Array(MESSAGE_SIZE + MAX_REPLY_SIZE);
          this.#kept.set(header.data.subarray(at, count));
        }
        if (message !== undefined) return message;
      } else {
        this.#kept.set(header.data.subarray(0, count), this.received - this.#parsed);
        this.received += count;
      }
    }
  }

  /** Decodes the message at the start of `bytes` (`length` of them) if it is all there. */
  #take(bytes: Uint8Array, length: number): BrokerMessage | undefined {
    if (length < HEADER_SIZE) return undefined;
    const total = replyLength(bytes);
    if (typeof total !== "number") throw total;
    if (length < total) return undefined;
    const reply = decodeReply(bytes.subarray(0, total));
    const start = this.#parsed;
    this.#parsed += total;
    if (bytes === this.#kept) bytes.copyWithin(0, total, length);
    if (reply.request !== "set_pair") return { reply, descriptors: NO_DESCRIPTORS };
    const ours = this.#descriptors.length > 0 && start >= this.#descriptorsFrom &&
      start < this.#descriptorsTo;
    const descriptors = ours ? this.#descriptors : NO_DESCRIPTORS;
    if (descriptors.length !== reply.descriptors) {
      throw this.#dropDescriptors(`must be ${reply.descriptors}, as the SET_PAIR says`);
    }
    this.#descriptors = [];
    return { reply, descriptors };
  }

  /** Closes the descriptors not yet handed out; the error to throw about them. */
  #dropDescriptors(expected: string): ProtocolError {
    const count = this.#descriptors.length;
    this.#closeDescriptors();
    return new ProtocolError("SET_PAIR", "descriptors", count, expected);
  }

  #closeDescriptors(): void {
    for (const fd of this.#descriptors) closeDescriptor(fd);
    this.#descriptors = [];
  }

  /** Closes the descriptors received and not yet handed out in a message. */
  [Symbol.dispose](): void {
    this.#closeDescriptors();
  }
}

/**
 * The {@link PairedSocket} of a v2 `SET_PAIR` and its descriptors, checked
 * against what was asked: its type, and a pidfd only if one was wished for.
 * The descriptors are the new object's, or closed when the reply is wrong.
 */
export function pairFromSetPair(
  reply: SetPair,
  descriptors: number[],
  type: SocketType,
  pidfd: boolean,
): PairedSocket {
  let error: ProtocolError | undefined;
  if (reply.type !== type) {
    error = new ProtocolError(
      "SET_PAIR",
      "type",
      SOCKET_TYPES.indexOf(reply.type),
      `must be ${SOCKET_TYPES.indexOf(type)}, ${type}, as asked`,
    );
  } else if (descriptors.length === 2 && !pidfd) {
    error = new ProtocolError("SET_PAIR", "descriptors", 2, "must be 1: no pidfd was asked for");
  }
  if (error !== undefined) {
    for (const fd of descriptors) closeDescriptor(fd);
    throw error;
  }
  const peer: Peer = {
    pid: reply.peer.pid,
    uid: reply.peer.uid,
    gid: reply.peer.gid,
    listener: reply.peerListener,
    version: reply.peerVersion,
    id: reply.peerId,
    ...(descriptors.length === 2 ? { pidfd: descriptors[1] } : {}),
  };
  return new PairedSocket(descriptors[0], { type, protocol: 2, peer });
}

/**
 * A connection to the broker, for one protocol v1 request. Owns its descriptor.
 *
 * @example The steps of {@link getPair}, one by one
 * ```ts
 * import { connectBroker } from "@one-socket/one-socket";
 * using connection = await connectBroker({ socket: "/run/one.socket" });
 * await connection.request("vhost-user-1", "server");
 * const socket = await connection.receivePair();
 * socket.close();
 * ```
 */
export class BrokerConnection implements Disposable {
  /** The broker socket path. */
  readonly path: string;
  readonly #socket: UnixSocket;
  // A request just sent cannot have its answer yet: the first receive waits, sparing a
  // recvmsg that would find EAGAIN.
  #justSent = false;

  /** Use {@link connectBroker}. */
  constructor(path: string, socket: UnixSocket) {
    this.path = path;
    this.#socket = socket;
  }

  /** Sends the `GET_PAIR` request for `key` in `mode`. */
  async request(key: Key, mode: Mode = "none", signal?: AbortSignal): Promise<void> {
    await sendRequest(this.#socket, this.path, encodeGetPair(key, mode, requestFrame), signal);
    this.#justSent = true;
  }

  /**
   * Waits for the `SET_PAIR` reply and returns the socket it carries. The
   * reply must be exactly what the C client accepts: 1044 bytes, `SET_PAIR`,
   * version 1, size 8, exactly one descriptor.
   */
  receivePair(signal?: AbortSignal): Promise<PairedSocket> {
    const justSent = this.#justSent;
    this.#justSent = false;
    return receiveV1Pair(this.#socket, this.path, justSent, signal);
  }

  /** Closes the connection to the broker (the paired socket is unaffected). */
  close(): void {
    this.#socket.close();
  }

  /** Same as {@link close}. */
  [Symbol.dispose](): void {
    this.close();
  }
}

const CONNECT_HINTS: Record<string, string> = {
  ENOENT: "no socket there; is the broker running?",
  ECONNREFUSED: "is the broker running?",
  EACCES: "no permission to use the broker socket",
};

/** The kinds of file that are not sockets, as {@link Deno.FileInfo} tells them. */
const FILE_KINDS: [flag: keyof Deno.FileInfo, name: string][] = [
  ["isFile", "a regular file"],
  ["isDirectory", "a directory"],
  ["isFifo", "a FIFO"],
  ["isCharDevice", "a character device"],
  ["isBlockDevice", "a block device"],
];

/**
 * What stands at `path` when it is not a socket (connect follows symlinks,
 * so this does too); undefined for a socket, an abstract name, or a path we
 * may not stat (wording an error is not worth a permission prompt).
 */
function notASocket(path: string): string | undefined {
  if (path.startsWith("@")) return undefined;
  if (Deno.permissions.querySync({ name: "read", path }).state !== "granted") return undefined;
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch {
    return undefined;
  }
  if (info.isSocket) return undefined;
  const kind = FILE_KINDS.find(([flag]) => info[flag] === true)?.[1] ?? "some other file";
  return `${path} is ${kind}, not a socket`;
}

/** The hint for a failed connect: what is at `path` instead of a broker. */
function connectHint(code: string, path: string): string | undefined {
  return (code === "ECONNREFUSED" ? notASocket(path) : undefined) ?? CONNECT_HINTS[code];
}

/** Options of {@link connectBroker}. */
export interface ConnectOptions {
  /** Broker socket path; default `$ONE_SOCKET_PATH`, else {@link defaultSocketPath}. */
  socket?: string;
  /** Gives up waiting out a full backlog (rejecting with the signal's reason). */
  signal?: AbortSignal;
}

/**
 * Connects to the broker (by default at `$ONE_SOCKET_PATH`, else
 * {@link defaultSocketPath}).
 *
 * @example
 * ```ts
 * import { connectBroker } from "@one-socket/one-socket";
 * using connection = await connectBroker({ socket: "/run/one.socket" });
 * console.log(`connected to ${connection.path}`);
 * ```
 */
export async function connectBroker(options: ConnectOptions = {}): Promise<BrokerConnection> {
  const broker = brokerAddress(options.socket, options.signal);
  const socket = connectTo(broker, options.signal);
  return new BrokerConnection(broker.path, socket instanceof UnixSocket ? socket : await socket);
}

/**
 * A failed connect to `path` with the hint of {@link connectHint}, if any,
 * and, for a default path, which variables went unread.
 */
function withHint(error: unknown, path: string, defaulted: boolean): unknown {
  if (!(error instanceof OsError)) return error;
  const hints = [connectHint(error.code, path), defaulted ? unreadEnvironmentHint() : undefined]
    .filter((hint) => hint !== undefined);
  return hints.length === 0 ? error : new OsError("connect", error.errno, path, hints.join("; "));
}

/** Where the broker is: the resolved socket path, and whether it is the default. */
export interface BrokerAddress {
  /** The socket path. */
  path: string;
  /** Whether no path was given (a failed connect then names the variables that went unread). */
  defaulted: boolean;
}

/** Resolves the broker's socket path (`explicit`, else the default) and guards a fallback. */
export function brokerAddress(explicit: string | undefined, signal?: AbortSignal): BrokerAddress {
  signal?.throwIfAborted();
  const path = resolveSocketPath(explicit);
  guardFallbackDirectory(path, false);
  return { path, defaulted: explicit === undefined };
}

/**
 * Connects to the broker, without a promise when it takes the connection at
 * once (it nearly always does); a full backlog is retried.
 */
export function connectTo(
  broker: BrokerAddress,
  signal?: AbortSignal,
): UnixSocket | Promise<UnixSocket> {
  const { path, defaulted } = broker;
  let socket;
  try {
    socket = tryConnectUnix(path);
  } catch (error) {
    throw withHint(error, path, defaulted);
  }
  if (socket !== undefined) return socket;
  return connectUnix(path, signal).catch((error) => {
    throw withHint(error, path, defaulted);
  });
}

/**
 * Checks what {@link getPair} and `listen` take that TypeScript cannot
 * check for plain JavaScript callers: the mode and the type.
 */
export function checkRequestOptions(operation: string, mode: Mode, type: SocketType): void {
  if (!MODES.includes(mode)) {
    throw new TypeError(`${operation}: invalid mode ${JSON.stringify(mode)}`);
  }
  if (!SOCKET_TYPES.includes(type)) {
    throw new TypeError(`${operation}: invalid socket type ${JSON.stringify(type)}`);
  }
}

/**
 * One v2 `GET_PAIR` on `socket`: the pair, or undefined when the broker
 * closed the connection before any reply (it speaks only v1).
 */
async function pairV2(
  socket: UnixSocket,
  path: string,
  key: Uint8Array,
  options: Required<Omit<RequestOptions, "backlog">>,
  signal?: AbortSignal,
): Promise<PairedSocket | undefined> {
  try {
    await sendRequest(socket, path, encodeRequest("get_pair", key, options), signal);
  } catch (error) {
    // Closed before it could have answered: the same sign as end of stream before a reply.
    if (error instanceof BrokerClosedError) return undefined;
    throw error;
  }
  using reader = new ReplyReader(socket.fd);
  // The broker answers at once, with the pair or a HELLO, and a request just sent cannot
  // have its answer yet: wait first, sparing a recvmsg that would find EAGAIN. After a
  // HELLO, the partner may be far off.
  await abortable(socket.readiness.readable(true), signal);
  let hello = false;
  for (;;) {
    const message = reader.read(path);
    if (message === "again") {
      await abortable(socket.readiness.readable(), signal);
      continue;
    }
    if (message === "end") {
      if (reader.received === 0) return undefined;
      throw brokerStopped(path);
    }
    const { reply, descriptors } = message;
    if (reply.request === "set_pair") {
      return pairFromSetPair(reply, descriptors, options.type, options.pidfd);
    }
    if (reply.request === "refused") throw new BrokerRefusedError(path, key, reply.reason);
    if (hello) throw new ProtocolError("reply", "sequence", 4, "one HELLO per connection");
    hello = true;
  }
}

/**
 * Asks the broker for a socket shared with the peer that sends the same key
 * in a compatible mode (and the same type), and waits for it. It speaks
 * protocol v2, and v1 to a broker that speaks only v1 (see
 * {@link PairOptions.protocol}); {@link PairedSocket.protocol} tells which.
 * The broker connection is closed before this returns or throws.
 *
 * @throws {BrokerRefusedError} when the broker refused the request, with its reason
 * @throws {BrokerClosedError} when the broker hung up without a pair (it stopped, or a v1
 *   broker rejected the request)
 * @throws {BrokerVersionError} when the broker speaks only v1 and the request needs v2
 *
 * @example Two peers meet on a key
 * ```ts
 * import { getPair } from "@one-socket/one-socket";
 * const [server, client] = await Promise.all([
 *   getPair("demo", { mode: "server", signal: AbortSignal.timeout(5000) }),
 *   getPair("demo", { mode: "client", signal: AbortSignal.timeout(5000) }),
 * ]);
 * await client.write(new TextEncoder().encode("ping"));
 * console.log(`paired with pid ${server.peer?.pid} over protocol ${server.protocol}`);
 * server.close();
 * client.close();
 * ```
 */
export async function getPair(key: Key, options: PairOptions = {}): Promise<PairedSocket> {
  const { socket, mode = "none", type = "stream", pidfd = false, protocol, signal } = options;
  // Bad arguments are the caller's error, whatever the broker's state.
  const bytes = keyBytes(key);
  checkRequestOptions("getPair", mode, type);
  if (protocol !== undefined && protocol !== 1 && protocol !== 2) {
    throw new TypeError(`getPair: invalid protocol ${protocol} (must be 1 or 2)`);
  }
  if (protocol === 1 && type !== "stream") {
    throw new TypeError(`getPair: protocol 1 pairs stream sockets only, not ${type}`);
  }
  const broker = brokerAddress(socket, signal);
  const v1Only = v1OnlyBrokers.has(broker.path);
  if (protocol !== 1 && !v1Only) {
    const connecting = connectTo(broker, signal);
    using connection = connecting instanceof UnixSocket ? connecting : await connecting;
    const pair = await pairV2(connection, broker.path, bytes, { mode, type, pidfd }, signal);
    if (pair !== undefined) return pair;
    v1OnlyBrokers.add(broker.path);
  }
  if (protocol === 2) {
    throw new BrokerVersionError(
      broker.path,
      v1Only ? "protocol 2 was asked for" : "it closed a protocol 2 request unanswered",
    );
  }
  if (type !== "stream") throw new BrokerVersionError(broker.path, `${type} pairs need v2`);
  const connecting = connectTo(broker, signal);
  using connection = new BrokerConnection(
    broker.path,
    connecting instanceof UnixSocket ? connecting : await connecting,
  );
  await connection.request(bytes, mode, signal);
  return await connection.receivePair(signal);
}
