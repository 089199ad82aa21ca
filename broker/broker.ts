/**
 * {@link Broker}: owns the listening socket and every client connection.
 *
 * The life of one pairing, all synchronous once the reactor reports
 * readiness: accept → receive and frame the `GET_PAIR` → validate → admit
 * (policy, limits) → match → `socketpair` → `SET_PAIR` with one end to each
 * → close.
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
import { Reactor, type Registrant, type Watch } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  connectUnix,
  createSocketPair,
  listenUnix,
  peerCredentials,
  receiveMessage,
  sendMessage,
  setNonblocking,
  UnixSocket,
  unlinkPath,
} from "../ffi/socket.ts";
import { MessageHeader, type PeerCredentials } from "../ffi/structs.ts";
import { Matcher, type Waiter } from "./matcher.ts";
import { BrokerMetrics, type DropReason } from "./metrics.ts";

const logger = getLogger(["one-socket", "broker"]);

/** A request the broker is about to admit, for an {@link Authorizer}. */
export interface AccessRequest {
  /** The requested key. */
  key: Uint8Array;
  /** The requested mode. */
  mode: Mode;
  /** The client's credentials as of its `connect`. */
  peer: PeerCredentials;
}

/** What an {@link Authorizer} decided. */
export interface AccessDecision {
  /** Whether the request may wait or pair. */
  allowed: boolean;
  /** The rule that decided, for the log line. */
  rule: string;
  /** With `isolateUids`: this key may pair across uids. */
  crossUid?: boolean;
}

/** Decides whether a request is admitted (an access policy, say). */
export type Authorizer = (request: AccessRequest) => AccessDecision;

/** Options for {@link Broker.listen}. */
export interface BrokerOptions {
  /** Socket path to listen on; a leading `@` names a Linux abstract socket. */
  path: string;
  /**
   * An already listening socket to serve instead of binding `path` (systemd
   * socket activation). The broker then never removes the socket file.
   */
  listenFd?: number;
  /** Listen backlog (the kernel caps it at `net.core.somaxconn`). Default 4096. */
  backlog?: number;
  /**
   * Most client connections open at once; past it the broker stops accepting
   * until some leave (new clients wait in the listen backlog). Set it below the
   * descriptor limit so that the process keeps descriptors for its own needs
   * (logs, the control API, the runtime) when full. Default: no limit but the
   * kernel's.
   */
  maxConnections?: number;
  /** Milliseconds a connection has to complete its request. Default 5000. */
  handshakeTimeoutMs?: number;
  /** Milliseconds a request may wait for a partner; default forever. */
  pairTimeoutMs?: number;
  /** Most clients of one uid waiting at once; default unlimited. */
  maxWaitingPerUid?: number;
  /** Pair only clients of the same uid, unless the authorizer allows a key across uids. */
  isolateUids?: boolean;
  /** Admission check for every request (see `broker/policy.ts`). */
  authorize?: Authorizer;
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

/** A client waiting for its partner, as listed by {@link Broker.waitingClients}. */
export interface WaitingClient {
  /** The broker's id for the connection (for {@link Broker.kick}). */
  id: number;
  /** The requested key. */
  key: Uint8Array;
  /** The requested mode. */
  mode: Mode;
  /** When it started waiting. */
  since: Date;
  /** Its credentials as of its `connect`. */
  peer: PeerCredentials;
}

/** Where a listing of waiting clients starts and how long it may be. */
export interface ListingPage {
  /** Only clients with an id above this (the last id of the previous page). Default 0. */
  after?: number;
  /** Most clients in the answer; default and cap {@link MAX_LISTING_PAGE}. */
  limit?: number;
}

/** The longest page {@link Broker.waitingClients} returns. */
export const MAX_LISTING_PAGE = 1000;

/** How long accepting pauses when descriptors run out, so that we do not spin. */
const ACCEPT_PAUSE_MS = 100;
/** Descriptors accepted with a request; the kernel closes any beyond this. */
const MAX_RECEIVED_DESCRIPTORS = 8;
/** How often deadlines are checked: timeouts are honoured to within this. */
const SWEEP_INTERVAL_MS = 250;

/**
 * One client connection, from accept to close. It is its own reactor
 * registration: one object per client, no watch or closure beside it.
 */
class Connection implements Registrant {
  readonly id: number;
  readonly fd: number;
  tag = 0;
  /** `performance.now()` at accept, then when it started waiting. */
  since: number;
  /** The broker's handler, shared by every connection. */
  readonly #onReadable: (connection: Connection) => void;
  /** Bytes of the request frame received so far. */
  received = 0;
  /** Holds a request that arrived in pieces; most arrive whole and never need it. */
  frame?: Uint8Array;
  /** Set once its request is filed in the matcher. */
  waiter?: Waiter<Connection>;
  /** Its matcher key carries a uid prefix (`isolateUids`). */
  scoped = false;
  #peer?: PeerCredentials;

  constructor(id: number, fd: number, now: number, onReadable: (connection: Connection) => void) {
    this.id = id;
    this.fd = fd;
    this.since = now;
    this.#onReadable = onReadable;
  }

  /** Readable, hung up or in error: the broker reads to find out which. */
  onReady(): void {
    this.#onReadable(this);
  }

  /** `SO_PEERCRED`, read on first use: the kernel keeps the values from connect time. */
  get peer(): PeerCredentials {
    return this.#peer ??= peerCredentials(this.fd);
  }

  /** The key it waits on, as the client sent it. */
  get key(): Uint8Array {
    const key = this.waiter!.key;
    return this.scoped ? key.subarray(4) : key;
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
  /** Counters and histograms, for metrics. */
  readonly metrics: BrokerMetrics = new BrokerMetrics();
  /** When it started serving. */
  readonly startedAt: Date = new Date();
  /** The socket file this broker created, to remove at shutdown if it is still that file. */
  readonly #ownFile?: string;
  readonly #listener: UnixSocket;
  readonly #listenWatch: Watch;
  readonly #options: Required<Pick<BrokerOptions, "handshakeTimeoutMs">> & BrokerOptions;
  readonly #matcher = new Matcher<Connection>();
  readonly #connections = new Map<number, Connection>();
  // Both in arrival order, so a sweep stops at the first connection not yet due.
  readonly #handshaking = new Set<Connection>();
  readonly #waiting = new Set<Connection>();
  readonly #waitingPerUid = new Map<number, number>();
  // One receive and one send header for the whole broker: every call is synchronous.
  readonly #inbound = new MessageHeader(new Uint8Array(MESSAGE_SIZE), MAX_RECEIVED_DESCRIPTORS);
  readonly #outbound = new MessageHeader(encodeSetPair() as Uint8Array<ArrayBuffer>, 1);
  readonly #pair = new Int32Array(2);
  readonly #sweepTimer: ReturnType<typeof setInterval>;
  readonly #onReadableHandler = (connection: Connection) => this.#onReadable(connection);
  /** Whether debug lines are wanted, read once: asking on every pairing costs. */
  readonly #debug = logger.isEnabledFor("debug");
  #nextId = 1;
  #acceptPaused = false;
  /** `performance.now()` when descriptors ran out, until an accept succeeds again. */
  #exhaustedSince?: number;
  #closing?: Promise<void>;

  private constructor(options: BrokerOptions, listener: UnixSocket, ownFile?: string) {
    this.path = options.path;
    this.#options = { handshakeTimeoutMs: 5000, ...options };
    this.#listener = listener;
    this.#ownFile = ownFile;
    this.#listenWatch = Reactor.instance().watch(listener.fd, EPOLLIN, () => this.#acceptAll());
    // Deadlines alone must not keep the process alive.
    this.#sweepTimer = setInterval(() => this.#sweep(), SWEEP_INTERVAL_MS).unref();
  }

  /**
   * Binds `path` (or adopts `listenFd`) and starts serving. A stale socket
   * file (nobody listening) is replaced; a live broker's socket, or a path
   * that is not a socket, is not.
   */
  static async listen(options: BrokerOptions): Promise<Broker> {
    const { path, backlog = 4096, listenFd } = options;
    if (listenFd !== undefined) {
      setNonblocking(listenFd);
      logger.info("serving inherited socket {path} (fd {fd})", { path, fd: listenFd });
      return new Broker(options, new UnixSocket(listenFd));
    }
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
    return new Broker(options, listener, path.startsWith("@") ? undefined : fileIdentity(path));
  }

  /** Current counters. */
  get stats(): BrokerStats {
    return {
      accepted: this.metrics.accepted,
      paired: this.metrics.paired,
      rejected: this.metrics.rejected,
      open: this.#connections.size,
      waiting: this.#matcher.size,
    };
  }

  /** Waiting clients by mode. */
  waitingByMode(): Record<Mode, number> {
    return this.#matcher.countByMode();
  }

  /**
   * One page of the clients waiting for a partner, by ascending id (the order
   * they connected in). Pass the last id of a page as `after` for the next;
   * the work is bounded by the number of open connections, and the answer by
   * `limit` (default and most: {@link MAX_LISTING_PAGE}).
   */
  waitingClients(page: ListingPage = {}): WaitingClient[] {
    const after = page.after ?? 0;
    const limit = Math.min(page.limit ?? MAX_LISTING_PAGE, MAX_LISTING_PAGE);
    const clients: WaitingClient[] = [];
    // The table is a Map in insertion order, and ids only grow: it is sorted by id.
    for (const connection of this.#connections.values()) {
      if (clients.length >= limit) break;
      if (connection.id <= after || connection.waiter === undefined) continue;
      clients.push({
        id: connection.id,
        key: connection.key,
        mode: connection.waiter.mode,
        since: new Date(performance.timeOrigin + connection.since),
        peer: connection.peer,
      });
    }
    return clients;
  }

  /** Disconnects the client with `id`; false if no such connection is open. */
  kick(id: number): boolean {
    const connection = this.#connections.get(id);
    if (connection === undefined) return false;
    logger.info("disconnecting client {id} on request", { id });
    this.metrics.countDrop("kicked");
    this.#disconnect(connection);
    return true;
  }

  /**
   * Stops accepting, closes every client connection and removes the socket
   * file it created. Waiting clients see end of stream and may reconnect.
   */
  close(): Promise<void> {
    return this.#closing ??= Promise.resolve().then(() => this.#shutdown());
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #shutdown(): void {
    clearInterval(this.#sweepTimer);
    this.#listenWatch.cancel(true);
    this.#listener.close();
    if (this.#ownFile !== undefined) this.#removeOwnFile(this.#ownFile);
    const open = this.#connections.size;
    for (const connection of this.#connections.values()) this.#disconnect(connection);
    logger.info("stopped listening on {path}; closed {open} client connections", {
      path: this.path,
      open,
    });
  }

  // Someone may have replaced the file since (a newer broker on the same path): leave theirs alone.
  #removeOwnFile(identity: string): void {
    let current: string;
    try {
      current = fileIdentity(this.path);
    } catch {
      return; // already gone
    }
    if (current === identity) unlinkPath(this.path);
    else {logger.warn("{path} is no longer the socket file this broker created; leaving it", {
        path: this.path,
      });}
  }

  #acceptAll(): void {
    const now = performance.now();
    const capacity = this.#options.maxConnections ?? Infinity;
    for (;;) {
      if (this.#connections.size >= capacity) {
        this.#pauseAccepting(`at capacity (${capacity} connections)`);
        return;
      }
      const fd = acceptConnection(this.#listener.fd);
      if (fd >= 0) {
        if (this.#exhaustedSince !== undefined) this.#endExhaustion(now);
        this.#admit(fd, now);
        continue;
      }
      if (fd === -Errno.EAGAIN) return;
      if (fd === -Errno.ECONNABORTED || fd === -Errno.EINTR) continue;
      // Out of descriptors or memory, or anything unforeseen: a level-triggered listener
      // would report it again at once, so pause rather than spin.
      this.#pauseAccepting(`accept4: ${errnoName(-fd)}`);
      return;
    }
  }

  /**
   * Full, or out of descriptors: a level-triggered listener would spin. Serve
   * the clients already here and retry every ACCEPT_PAUSE_MS; log once per episode.
   */
  #pauseAccepting(cause: string): void {
    if (this.#acceptPaused) return;
    this.#acceptPaused = true;
    this.metrics.acceptPauses++;
    if (this.#exhaustedSince === undefined) {
      this.#exhaustedSince = performance.now();
      this.metrics.descriptorExhaustions++;
      logger.error(
        "not accepting on {path}: {cause}; serving the {open} clients here, retrying every {ms} ms",
        { path: this.path, cause, open: this.#connections.size, ms: ACCEPT_PAUSE_MS },
      );
    }
    this.#listenWatch.modify(0);
    setTimeout(() => {
      this.#acceptPaused = false;
      if (this.#closing === undefined) this.#listenWatch.modify(EPOLLIN);
    }, ACCEPT_PAUSE_MS).unref();
  }

  #endExhaustion(now: number): void {
    logger.info("accepting again after {ms} ms", {
      ms: Math.round(now - this.#exhaustedSince!),
    });
    this.#exhaustedSince = undefined;
  }

  #admit(fd: number, now: number): void {
    this.metrics.accepted++;
    const connection = new Connection(this.#nextId++, fd, now, this.#onReadableHandler);
    this.#connections.set(connection.id, connection);
    this.#handshaking.add(connection);
    // Clients send their request right after connecting, so it is usually here already:
    // one that pairs at once never costs an epoll registration or event.
    this.#onReadable(connection);
    if (!this.#connections.has(connection.id)) return;
    try {
      Reactor.instance().register(connection, EPOLLIN | EPOLLRDHUP);
    } catch (error) {
      // Unwatched, its hang-up would go unnoticed: better not to keep it.
      logger.error("closing client {id}: {error}", { id: connection.id, error });
      this.#disconnect(connection);
    }
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
    this.#handshaking.delete(connection);
    const key = this.#admitRequest(connection, request.key, request.mode);
    if (key !== undefined) this.#pairOrWait(connection, key, request.mode);
  }

  /**
   * Applies the authorizer and uid isolation. Returns the key as the matcher
   * should see it, or undefined when the client was dropped.
   */
  #admitRequest(connection: Connection, key: Uint8Array, mode: Mode): Uint8Array | undefined {
    const { authorize, isolateUids } = this.#options;
    if (authorize === undefined && !isolateUids) return key;
    let crossUid = false;
    if (authorize) {
      const decision = authorize({ key, mode, peer: connection.peer });
      if (!decision.allowed) {
        this.#drop(
          connection,
          "policy",
          `key "${describeKey(key)}" as ${mode} denied by ${decision.rule}`,
        );
        return undefined;
      }
      crossUid = decision.crossUid ?? false;
    }
    if (!isolateUids) return key;
    // Every key gets a prefix, cross-uid ones too: a raw key could otherwise be
    // crafted to equal another user's prefixed one.
    connection.scoped = true;
    return scoped(key, crossUid ? CROSS_UID_SCOPE : connection.peer.uid);
  }

  #pairOrWait(connection: Connection, key: Uint8Array, mode: Mode): void {
    for (;;) {
      const found = this.#matcher.take(key, mode, connection);
      if (found.waiting) {
        if (this.#overUidLimit(connection)) {
          found.cancel();
          this.#drop(
            connection,
            "uid_limit",
            `uid ${connection.peer.uid} already has ${this.#options.maxWaitingPerUid} clients waiting`,
          );
          return;
        }
        this.#startWaiting(connection, found);
        return;
      }
      // A partner that has gone away fails before anything was delivered: try the next.
      if (this.#deliver(found.item, connection, key)) return;
    }
  }

  /** Whether one more waiting client would exceed its uid's limit (a request that pairs never does). */
  #overUidLimit(connection: Connection): boolean {
    const limit = this.#options.maxWaitingPerUid;
    return limit !== undefined && (this.#waitingPerUid.get(connection.peer.uid) ?? 0) >= limit;
  }

  #startWaiting(connection: Connection, waiter: Waiter<Connection>): void {
    connection.waiter = waiter;
    connection.since = performance.now();
    this.#waiting.add(connection);
    if (this.#options.maxWaitingPerUid !== undefined) {
      const uid = connection.peer.uid;
      this.#waitingPerUid.set(uid, (this.#waitingPerUid.get(uid) ?? 0) + 1);
    }
    if (this.#debug) {
      logger.debug(`client {id} waits on key "{key}" as {mode}`, {
        id: connection.id,
        key: describeKey(connection.key),
        mode: waiter.mode,
      });
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
    const waited = performance.now() - partner.since;
    if (toPartner === 0 && toNewcomer === 0 && this.#debug) {
      logger.debug(
        `paired client {a} (pid {pidA}, uid {uidA}) and {b} (pid {pidB}, uid {uidB}) on key "{key}"`,
        {
          a: partner.id,
          pidA: partner.peer.pid,
          uidA: partner.peer.uid,
          b: newcomer.id,
          pidB: newcomer.peer.pid,
          uidB: newcomer.peer.uid,
          key: describeKey(key),
        },
      );
    }
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
    this.metrics.paired++;
    this.metrics.pairWait.observe(waited / 1000);
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
    this.metrics.countProtocolError(error.field);
    logger.warn("closing client {id}: {reason}", { id: connection.id, reason: error.message });
    this.#disconnect(connection);
  }

  #drop(connection: Connection, reason: DropReason, detail: string): void {
    this.metrics.countDrop(reason);
    logger.warn("closing client {id} (pid {pid}, uid {uid}): {detail}", {
      id: connection.id,
      pid: connection.peer.pid,
      uid: connection.peer.uid,
      detail,
    });
    this.#disconnect(connection);
  }

  /** Closes connections past their handshake or pair deadline. */
  #sweep(): void {
    const now = performance.now();
    const handshakeDeadline = now - this.#options.handshakeTimeoutMs;
    for (const connection of this.#handshaking) {
      if (connection.since > handshakeDeadline) break;
      this.#drop(
        connection,
        "handshake_timeout",
        `no complete request within ${this.#options.handshakeTimeoutMs} ms (${connection.received} bytes)`,
      );
    }
    const pairTimeout = this.#options.pairTimeoutMs;
    if (pairTimeout === undefined) return;
    for (const connection of this.#waiting) {
      if (connection.since > now - pairTimeout) break;
      this.#drop(connection, "pair_timeout", `no partner within ${pairTimeout} ms`);
    }
  }

  /** Where every client descriptor is closed: exactly once, leaving every table. */
  #disconnect(connection: Connection): void {
    if (!this.#connections.delete(connection.id)) return;
    this.#handshaking.delete(connection);
    if (connection.waiter !== undefined) {
      connection.waiter.cancel();
      this.#waiting.delete(connection);
      if (this.#options.maxWaitingPerUid !== undefined) {
        const uid = connection.peer.uid;
        const left = (this.#waitingPerUid.get(uid) ?? 1) - 1;
        if (left > 0) this.#waitingPerUid.set(uid, left);
        else this.#waitingPerUid.delete(uid);
      }
    }
    Reactor.instance().unregister(connection, true);
    closeDescriptor(connection.fd);
  }
}

/** The scope of keys a policy lets pair across uids: `(uid_t)-1` is nobody's uid. */
const CROSS_UID_SCOPE = 0xffffffff;

/** The key prefixed with a uid, so that only clients of one uid can match it. */
function scoped(key: Uint8Array, uid: number): Uint8Array {
  const result = new Uint8Array(4 + key.length);
  new DataView(result.buffer).setUint32(0, uid);
  result.set(key, 4);
  return result;
}

/**
 * What tells one file at `path` from a later one: the inode number alone is
 * reused at once on ext4 and tmpfs, the birth time is not.
 */
function fileIdentity(path: string): string {
  const info = Deno.lstatSync(path);
  return `${info.dev}:${info.ino}:${info.birthtime?.getTime()}`;
}

/** Throws unless a connect to `path` is refused, i.e. nobody listens behind the file. */
export async function assertStale(path: string): Promise<void> {
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
    if (error instanceof DOMException && error.name === "TimeoutError") {
      throw new Error(
        `${path}: a process holds this socket but accepts no connections ` +
          "(connect: EAGAIN for 1 s); refusing to replace it",
      );
    }
    throw error;
  }
  throw new Error(`another broker is already listening on ${path}`);
}
