/**
 * Asking the broker for a pair: {@link getPair} in one call, or the steps
 * ({@link connectBroker}, {@link BrokerConnection.request},
 * {@link BrokerConnection.receivePair}) for callers that drive them.
 *
 * @module
 */

import { Errno, OsError } from "../ffi/errors.ts";
import {
  connectUnix,
  receiveMessage,
  sendFrom,
  tryConnectUnix,
  type UnixSocket,
} from "../ffi/socket.ts";
import { closeDescriptor } from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import { PairedSocket } from "./paired_socket.ts";
import {
  decodeSetPair,
  encodeGetPair,
  type Key,
  keyBytes,
  MESSAGE_SIZE,
  type Mode,
  ProtocolError,
} from "./protocol.ts";
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
   */
  constructor(path: string) {
    super(
      `broker at ${path} closed the connection without a reply ` +
        "(request rejected, or the broker stopped; see its log)",
    );
    this.name = "BrokerClosedError";
    this.path = path;
  }
}

/** Options of {@link getPair}. */
export interface PairOptions {
  /** Broker socket path; default `$ONE_SOCKET_PATH`, else {@link defaultSocketPath}. */
  socket?: string;
  /** `none` pairs with `none`; `client` with `server`. Default `none`. */
  mode?: Mode;
  /** Gives up (rejecting with the signal's reason) and closes the broker connection. */
  signal?: AbortSignal;
}

/** Resolves with `promise`, or rejects with `signal`'s reason as soon as it aborts. */
function abortable<T>(promise: Promise<T>, signal?: AbortSignal): Promise<T> {
  if (!signal) return promise;
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

// Every recvmsg below is synchronous, so one header serves all connections (made on first
// use: importing the library needs no FFI permission).
let replyHeader: MessageHeader | undefined;
// Requests are encoded and sent synchronously (a rest that must wait is copied), so
// one frame serves all connections too.
const requestFrame = new Uint8Array(MESSAGE_SIZE);

/**
 * A connection to the broker, for one request. Owns its descriptor.
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
    let rest = encodeGetPair(key, mode, requestFrame) as Uint8Array<ArrayBuffer>;
    while (rest.length > 0) {
      const sent = sendFrom(this.#socket.fd, rest);
      if (sent >= 0) rest = rest.subarray(sent);
      else if (sent === -Errno.EAGAIN) {
        // Once we await, the shared frame is the next request's: keep our own rest.
        if (rest.buffer === requestFrame.buffer) rest = rest.slice();
        await abortable(this.#socket.readiness.writable(), signal);
      } else if (sent === -Errno.EPIPE || sent === -Errno.ECONNRESET) {
        throw new BrokerClosedError(this.path);
      } else throw new OsError("send", -sent, this.path);
    }
    this.#justSent = true;
  }

  /**
   * Waits for the `SET_PAIR` reply and returns the socket it carries. The
   * reply must be exactly what the C client accepts: 1044 bytes, `SET_PAIR`,
   * version 1, size 8, exactly one descriptor.
   */
  async receivePair(signal?: AbortSignal): Promise<PairedSocket> {
    // Built only when the reply comes in pieces; whole, it is checked where it landed.
    let frame: Uint8Array | undefined;
    const descriptors: number[] = [];
    let received = 0;
    try {
      if (this.#justSent) {
        this.#justSent = false;
        // The broker answers within microseconds once the partner is there.
        await abortable(this.#socket.readiness.readable(true), signal);
      }
      replyHeader ??= new MessageHeader(new Uint8Array(MESSAGE_SIZE), 8);
      while (received < MESSAGE_SIZE) {
        replyHeader.prepareReceive(MESSAGE_SIZE - received);
        const count = receiveMessage(this.#socket.fd, replyHeader);
        if (count === -Errno.EAGAIN) {
          await abortable(this.#socket.readiness.readable(true), signal);
          continue;
        }
        if (count === 0 || count === -Errno.ECONNRESET) {
          if (received === 0) throw new BrokerClosedError(this.path);
          throw new ProtocolError("SET_PAIR", "length", received, `must be ${MESSAGE_SIZE}`);
        }
        if (count < 0) throw new OsError("recvmsg", -count, this.path);
        replyHeader.readDescriptors();
        for (const fd of replyHeader.descriptors) descriptors.push(fd);
        if (count === MESSAGE_SIZE) {
          frame = replyHeader.data;
        } else {
          frame ??= new Uint8Array(MESSAGE_SIZE);
          frame.set(replyHeader.data.subarray(0, count), received);
        }
        received += count;
      }
      decodeSetPair(frame!);
      if (descriptors.length !== 1) {
        throw new ProtocolError("SET_PAIR", "descriptors", descriptors.length, "must be 1");
      }
      return new PairedSocket(descriptors.pop()!);
    } finally {
      for (const fd of descriptors) closeDescriptor(fd);
    }
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
  return await openBrokerConnection(options.socket, options.signal);
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

/**
 * {@link connectBroker}'s work, without a promise when the broker takes the
 * connection at once (it nearly always does); a full backlog is retried.
 */
function openBrokerConnection(
  path: string | undefined,
  signal?: AbortSignal,
): BrokerConnection | Promise<BrokerConnection> {
  signal?.throwIfAborted();
  const resolved = resolveSocketPath(path);
  guardFallbackDirectory(resolved, false);
  let socket;
  try {
    socket = tryConnectUnix(resolved);
  } catch (error) {
    throw withHint(error, resolved, path === undefined);
  }
  if (socket !== undefined) return new BrokerConnection(resolved, socket);
  return connectUnix(resolved, signal).then(
    (connected) => new BrokerConnection(resolved, connected),
    (error) => {
      throw withHint(error, resolved, path === undefined);
    },
  );
}

/**
 * Asks the broker for a socket shared with the peer that sends the same key
 * in a compatible mode, and waits for it. The broker connection is closed
 * before this returns or throws.
 *
 * @example Two peers meet on a key
 * ```ts
 * import { getPair } from "@one-socket/one-socket";
 * const [server, client] = await Promise.all([
 *   getPair("demo", { mode: "server", signal: AbortSignal.timeout(5000) }),
 *   getPair("demo", { mode: "client", signal: AbortSignal.timeout(5000) }),
 * ]);
 * await client.write(new TextEncoder().encode("ping"));
 * server.close();
 * client.close();
 * ```
 */
export async function getPair(key: Key, options: PairOptions = {}): Promise<PairedSocket> {
  const { socket, mode = "none", signal } = options;
  const bytes = keyBytes(key); // a bad key is the caller's error, whatever the broker's state
  const connecting = openBrokerConnection(socket, signal);
  using connection = connecting instanceof BrokerConnection ? connecting : await connecting;
  await connection.request(bytes, mode, signal);
  return await connection.receivePair(signal);
}
