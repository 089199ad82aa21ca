/**
 * {@link Broker}: owns the listening socket and every client connection.
 *
 * The life of one pairing, all synchronous once the reactor reports
 * readiness: accept → receive and frame the `GET_PAIR` → validate →
 * match → `socketpair` → `SET_PAIR` with one end to each → close.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import {
  decodeGetPair,
  describeKey,
  encodeSetPair,
  GET_PAIR_MIN_SIZE,
  MESSAGE_SIZE,
  type Mode,
  ProtocolError,
} from "../client/protocol.ts";
import { Errno, errnoName, OsError } from "../ffi/errors.ts";
import { EPOLLIN, EPOLLRDHUP } from "../ffi/libc.ts";
import { Reactor, type Watch } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  connectUnix,
  createSocketPair,
  listenUnix,
  receiveMessage,
  sendMessage,
  type UnixSocket,
  unlinkPath,
} from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import { Matcher, type Waiter } from "./matcher.ts";

const logger = getLogger(["one-socket", "broker"]);

/** Options for {@link Broker.listen}. */
export interface BrokerOptions {
  /** Socket path to listen on; a leading `@` names a Linux abstract socket. */
  path: string;
  /** Listen backlog (the kernel caps it at `net.core.somaxconn`). Default 4096. */
  backlog?: number;
}

/** Counters of a running broker. */
export interface BrokerStats {
  /** Connections accepted since start. */
  accepted: number;
  /** Pairs delivered since start. */
  paired: number;
  /** Connections closed for breaking the protocol. */
  rejected: number;
  /** Client connections open now (waiting or still sending their request). */
  open: number;
  /** Clients waiting for a partner now. */
  waiting: number;
}

/** How long accepting pauses when descriptors run out, so that we do not spin. */
const ACCEPT_PAUSE_MS = 100;
/** Descriptors accepted with a request; the kernel closes any beyond this. */
const MAX_RECEIVED_DESCRIPTORS = 8;

/** One client connection, from accept to close. */
class Connection {
  readonly id: number;
  readonly fd: number;
  watch!: Watch;
  /** Bytes of the request frame received so far. */
  received = 0;
  /** Holds a request that arrived in pieces; most arrive whole and never need it. */
  frame?: Uint8Array;
  /** Set once its request is filed in the matcher. */
  waiter?: Waiter<Connection>;

  constructor(id: number, fd: number) {
    this.id = id;
    this.fd = fd;
  }
}

/**
 * The SocketPair broker: pairs clients that send the same key in compatible
 * modes and hands each one end of a fresh `socketpair`.
 *
 * @example Serve, pair two clients, stop
 * ```ts
 * import { Broker, getPair } from "./mod.ts";
 * const path = `/tmp/example-${Deno.pid}.socket`;
 * await using broker = await Broker.listen({ path });
 * const [server, client] = await Promise.all([
 *   getPair("greeting", { socket: path, mode: "server" }),
 *   getPair("greeting", { socket: path, mode: "client" }),
 * ]);
 * await client.write(new TextEncoder().encode("hi"));
 * server.close();
 * client.close();
 * console.log(broker.stats.paired); // 1
 * ```
 */
export class Broker implements AsyncDisposable {
  /** The socket path it listens on. */
  readonly path: string;
  readonly #listener: UnixSocket;
  readonly #listenWatch: Watch;
  readonly #matcher = new Matcher<Connection>();
  readonly #connections = new Set<Connection>();
  // One receive and one send header for the whole broker: every call is synchronous.
  readonly #inbound = new MessageHeader(new Uint8Array(MESSAGE_SIZE), MAX_RECEIVED_DESCRIPTORS);
  readonly #outbound = new MessageHeader(encodeSetPair() as Uint8Array<ArrayBuffer>, 1);
  readonly #pair = new Int32Array(2);
  #nextId = 1;
  #accepted = 0;
  #paired = 0;
  #rejected = 0;
  #acceptPaused = false;
  #closing?: Promise<void>;

  private constructor(path: string, listener: UnixSocket) {
    this.path = path;
    this.#listener = listener;
    this.#outbound.prepareSend(MESSAGE_SIZE, -1);
    this.#listenWatch = Reactor.instance().watch(listener.fd, EPOLLIN, () => this.#acceptAll());
  }

  /**
   * Binds `path` and starts serving. A stale socket file (nobody listening) is
   * replaced; a live broker's socket, or a path that is not a socket, is not.
   */
  static async listen(options: BrokerOptions): Promise<Broker> {
    const { path, backlog = 4096 } = options;
    let listener: UnixSocket;
    try {
      listener = listenUnix(path, backlog);
    } catch (error) {
      if (!(error instanceof OsError && error.code === "EADDRINUSE") || path.startsWith("@")) {
        throw error;
      }
      await assertStale(path);
      logger.info("replacing stale socket file {path}", { path });
      unlinkPath(path);
      listener = listenUnix(path, backlog);
    }
    logger.info("listening on {path}", { path });
    return new Broker(path, listener);
  }

  /** Current counters. */
  get stats(): BrokerStats {
    return {
      accepted: this.#accepted,
      paired: this.#paired,
      rejected: this.#rejected,
      open: this.#connections.size,
      waiting: this.#matcher.size,
    };
  }

  /**
   * Stops accepting, closes every client connection and removes the socket
   * file. Waiting clients see end of stream and may reconnect elsewhere.
   */
  close(): Promise<void> {
    return this.#closing ??= this.#shutdown();
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // deno-lint-ignore require-await
  async #shutdown(): Promise<void> {
    this.#listenWatch.cancel(true);
    this.#listener.close();
    if (!this.path.startsWith("@")) unlinkPath(this.path);
    const open = this.#connections.size;
    for (const connection of this.#connections) this.#disconnect(connection);
    logger.info("stopped listening on {path}; closed {open} client connections", {
      path: this.path,
      open,
    });
  }

  #acceptAll(): void {
    for (;;) {
      const fd = acceptConnection(this.#listener.fd);
      if (fd >= 0) {
        this.#admit(fd);
        continue;
      }
      if (fd === -Errno.EAGAIN) return;
      if (fd === -Errno.ECONNABORTED || fd === -Errno.EINTR) continue;
      if (fd === -Errno.EMFILE || fd === -Errno.ENFILE || fd === -Errno.ENOBUFS) {
        this.#pauseAccepting(-fd);
        return;
      }
      throw new OsError("accept4", -fd, this.path);
    }
  }

  // Out of descriptors: a level-triggered listener would spin. Wait for clients to leave.
  #pauseAccepting(errno: number): void {
    if (this.#acceptPaused) return;
    this.#acceptPaused = true;
    logger.error("accept4 {path}: {code}; pausing accepts for {ms} ms ({open} connections open)", {
      path: this.path,
      code: errnoName(errno),
      ms: ACCEPT_PAUSE_MS,
      open: this.#connections.size,
    });
    this.#listenWatch.modify(0);
    setTimeout(() => {
      this.#acceptPaused = false;
      if (this.#closing === undefined) this.#listenWatch.modify(EPOLLIN);
    }, ACCEPT_PAUSE_MS);
  }

  #admit(fd: number): void {
    this.#accepted++;
    const connection = new Connection(this.#nextId++, fd);
    connection.watch = Reactor.instance().watch(
      fd,
      EPOLLIN | EPOLLRDHUP,
      () => this.#onReadable(connection),
    );
    connection.watch.referenced = false;
    this.#connections.add(connection);
  }

  #onReadable(connection: Connection): void {
    const alreadyRequested = connection.waiter !== undefined;
    // After the request, read one byte past the frame to tell a hang-up from extra data.
    const want = alreadyRequested
      ? Math.max(MESSAGE_SIZE - connection.received, 1)
      : MESSAGE_SIZE - connection.received;
    const inbound = this.#inbound;
    inbound.prepareReceive(want);
    const count = receiveMessage(connection.fd, inbound);
    if (count === -Errno.EAGAIN) return;
    if (count <= 0) {
      logger.debug("client {id} left ({reason})", {
        id: connection.id,
        reason: count === 0 ? "end of stream" : errnoName(-count),
      });
      this.#disconnect(connection);
      return;
    }
    if (inbound.readDescriptors() || inbound.descriptors.length > 0) {
      const attached = inbound.descriptors.length;
      for (const fd of inbound.descriptors) closeDescriptor(fd);
      this.#reject(
        connection,
        new ProtocolError("GET_PAIR", "descriptors", attached, "a request carries none"),
      );
      return;
    }
    if (alreadyRequested) {
      connection.received += count;
      if (connection.received > MESSAGE_SIZE) {
        this.#reject(
          connection,
          new ProtocolError(
            "GET_PAIR",
            "sequence",
            connection.received,
            "one request per connection",
          ),
        );
      }
      return;
    }
    let frame: Uint8Array;
    if (connection.received === 0 && count >= GET_PAIR_MIN_SIZE) {
      frame = inbound.data.subarray(0, count);
    } else {
      connection.frame ??= new Uint8Array(MESSAGE_SIZE);
      connection.frame.set(inbound.data.subarray(0, count), connection.received);
      frame = connection.frame.subarray(0, connection.received + count);
    }
    connection.received += count;
    if (connection.received < GET_PAIR_MIN_SIZE) return;
    let request;
    try {
      request = decodeGetPair(frame);
    } catch (error) {
      if (!(error instanceof ProtocolError)) throw error;
      this.#reject(connection, error);
      return;
    }
    connection.frame = undefined;
    this.#pairOrWait(connection, request.key, request.mode);
  }

  #pairOrWait(connection: Connection, key: Uint8Array, mode: Mode): void {
    for (;;) {
      const found = this.#matcher.take(key, mode, connection);
      if (found.waiting) {
        connection.waiter = found;
        logger.debug(`client {id} waits on key "{key}" as {mode}`, {
          id: connection.id,
          key: describeKey(key),
          mode,
        });
        return;
      }
      // A partner that has gone away fails before anything was delivered: try the next.
      if (this.#deliver(found.item, connection, key)) return;
    }
  }

  /**
   * Sends one end of a new socketpair to each client, the waiting partner
   * first. Returns false when that partner turned out to be gone, so the
   * newcomer can be matched again; every other outcome ends both clients.
   */
  #deliver(partner: Connection, newcomer: Connection, key: Uint8Array): boolean {
    const pair = this.#pair;
    const created = createSocketPair(pair);
    if (created < 0) {
      logger.error(`socketpair for key "{key}": {code}; closing clients {a} and {b}`, {
        key: describeKey(key),
        code: errnoName(-created),
        a: partner.id,
        b: newcomer.id,
      });
      this.#disconnect(partner);
      this.#disconnect(newcomer);
      return true;
    }
    const toPartner = this.#sendSetPair(partner, pair[0]);
    const toNewcomer = toPartner < 0 ? 0 : this.#sendSetPair(newcomer, pair[1]);
    closeDescriptor(pair[0]);
    closeDescriptor(pair[1]);
    this.#disconnect(partner);
    if (toPartner < 0) {
      logger.debug("client {id} left before its pair arrived ({code})", {
        id: partner.id,
        code: errnoName(-toPartner),
      });
      return false;
    }
    this.#disconnect(newcomer);
    if (toNewcomer < 0) {
      logger.warn("SET_PAIR to client {id} failed ({code}); closed its partner {partner} too", {
        id: newcomer.id,
        code: errnoName(-toNewcomer),
        partner: partner.id,
      });
      return true;
    }
    this.#paired++;
    logger.debug(`paired clients {a} and {b} on key "{key}"`, {
      a: partner.id,
      b: newcomer.id,
      key: describeKey(key),
    });
    return true;
  }

  /** 0 when the whole reply went out with `fd`, otherwise -errno (a short send counts as EPIPE). */
  #sendSetPair(connection: Connection, fd: number): number {
    this.#outbound.prepareSend(MESSAGE_SIZE, fd);
    const sent = sendMessage(connection.fd, this.#outbound);
    if (sent < 0) return sent;
    return sent === MESSAGE_SIZE ? 0 : -Errno.EPIPE;
  }

  #reject(connection: Connection, error: ProtocolError): void {
    this.#rejected++;
    logger.warn("closing client {id}: {reason}", { id: connection.id, reason: error.message });
    this.#disconnect(connection);
  }

  /** Where every client descriptor is closed: exactly once, leaving the matcher too. */
  #disconnect(connection: Connection): void {
    if (!this.#connections.delete(connection)) return;
    connection.waiter?.cancel();
    connection.watch.cancel(true);
    closeDescriptor(connection.fd);
  }
}

/** Throws unless a connect to `path` is refused, i.e. nobody listens behind the file. */
async function assertStale(path: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch {
    return;
  }
  if (!info.isSocket) {
    throw new Error(`${path} exists and is not a socket; refusing to replace it`);
  }
  try {
    (await connectUnix(path, AbortSignal.timeout(1000))).close();
  } catch (error) {
    if (error instanceof OsError && error.code === "ECONNREFUSED") return;
    throw error;
  }
  throw new Error(`another broker is already listening on ${path}`);
}
