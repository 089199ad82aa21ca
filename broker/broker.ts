/**
 * {@link Broker}: composes the pairing engine and owns the listening socket.
 *
 * The life of one pairing, all synchronous once the reactor reports
 * readiness: accept → receive and frame the `GET_PAIR` (here) → validate
 * (`client/protocol.ts`) → admit (`admission.ts`) → match (`matcher.ts`) →
 * deliver (`delivery.ts`) → close (`connections.ts`).
 *
 * @module
 */

import { getLogger } from "npm:@logtape/logtape@^2.4.2";
import { u32 } from "../client/bytes.ts";
import {
  describeKey,
  encodeGetPair,
  GET_PAIR_KEY_OFFSET,
  GET_PAIR_MIN_SIZE,
  getPairFault,
  getPairKeyLength,
  getPairMode,
  MESSAGE_SIZE,
  type Mode,
  ProtocolError,
  type ProtocolErrorField,
  validateGetPair,
} from "../client/protocol.ts";
import {
  CREDIT_SIZE,
  encodeRequest,
  HEADER_SIZE,
  isListen,
  MAX_REQUEST_SIZE,
  messageVersion,
  REQUEST_KEY_OFFSET,
  requestBacklog,
  requestKeyLength,
  requestLength,
  requestMode,
  requestType,
  requestWantsPidfd,
  SOCKET_TYPES,
  type SocketType,
  validateRequest,
  VERSION_2,
} from "../client/protocol_v2.ts";
import { Errno, errnoName, OsError } from "../ffi/errors.ts";
import { EPOLLIN, EPOLLRDHUP } from "../ffi/libc.ts";
import { Reactor, type Watch } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  connectUnix,
  currentUid,
  listenUnix,
  receiveMessage,
  setNonblocking,
  UnixSocket,
  unlinkPath,
} from "../ffi/socket.ts";
import { MessageHeader, type PeerCredentials } from "../ffi/structs.ts";
import { Admission, type Refusal, type UidLimits } from "./admission.ts";
import { type Connection, ConnectionTable } from "./connections.ts";
import { Delivered, Delivery } from "./delivery.ts";
import {
  handOver,
  HandoverLink,
  type OfferedConnection,
  requestTakeover,
  type TakeoverEnd,
} from "./handover.ts";
import {
  decodeTakeover,
  HANDOVER_VERSION,
  handoverMessageLength,
  type HandoverRecord,
  REQUEST_TAKEOVER,
} from "./handover_wire.ts";
import { Listeners } from "./listeners.ts";
import { LogLimit } from "./log_limit.ts";
import { Matcher } from "./matcher.ts";
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
  /** Whether it asks to listen on the key (protocol v2) rather than to pair once; default false. */
  listen?: boolean;
  /** The socket type asked for (`stream`, the default, for every v1 request). */
  type?: SocketType;
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

export type { UidLimits } from "./admission.ts";

/** Options for {@link Broker.listen}. */
export interface BrokerOptions {
  /** Socket path to listen on; a leading `@` names a Linux abstract socket. */
  socket: string;
  /**
   * An already listening socket to serve instead of binding `socket` (systemd
   * socket activation). The broker then never removes the socket file.
   */
  listenFd?: number;
  /** Listen backlog (the kernel caps it at `net.core.somaxconn`). Default 4096. */
  backlog?: number;
  /**
   * Most client connections open at once. When full, a newcomer that must
   * stay takes the place of the oldest connection of the uid holding the
   * most, or is closed if that is its own uid; one that pairs at once is
   * always served. Set it below the descriptor limit so that the process keeps
   * descriptors for its own needs (logs, the control API, the runtime) when
   * full. Default: no limit but the kernel's.
   */
  maxConnections?: number;
  /** Milliseconds a connection has to complete its request. Default 5000. */
  handshakeTimeoutMs?: number;
  /** Milliseconds a request may wait for a partner; default forever. */
  pairTimeoutMs?: number;
  /** Most clients of one uid waiting at once; default unlimited. */
  maxWaitingPerUid?: number;
  /**
   * Most connections of one uid still sending their request; default 64
   * (dbus-daemon's choice). Together with `handshakeTimeoutMs` it bounds what
   * silent connections can hold.
   */
  maxIncompletePerUid?: number;
  /**
   * Most listeners (protocol v2) of one uid at once; default 16. Each may
   * hold up to 64 descriptors in flight, which the kernel counts against the
   * broker's own limit until the listener reads them.
   */
  maxListenersPerUid?: number;
  /** Limits for single uids, overriding `maxWaitingPerUid` and `maxIncompletePerUid`. */
  uidLimits?: ReadonlyMap<number, UidLimits>;
  /** Pair only clients of the same uid, unless the authorizer allows a key across uids. */
  isolateUids?: boolean;
  /** Admission check for every request (see `broker/policy.ts`). */
  authorize?: Authorizer;
  /**
   * Permission bits and group of the socket file, in place before the
   * socket listens (not for `listenFd` or an abstract socket). Default: as
   * `bind` makes it, the umask deciding.
   */
  socketAccess?: { mode?: number; gid?: number };
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
  /** Listeners registered now (protocol v2). */
  listeners: number;
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
  /** The socket type it asked for. */
  type: SocketType;
  /** The protocol version it spoke. */
  version: 1 | 2;
}

/** A registered listener, as listed by {@link Broker.listeners}. */
export interface ListenerInfo {
  /** The broker's id for the connection (for {@link Broker.kick}). */
  id: number;
  /** The key it listens on. */
  key: Uint8Array;
  /** Its mode: requests in the peer mode are served. */
  mode: Mode;
  /** The socket type it serves. */
  type: SocketType;
  /** Connections it may have in flight. */
  backlog: number;
  /** Connections delivered and not yet credited back. */
  inFlight: number;
  /** Connections delivered to it since it registered. */
  served: number;
  /** When it registered. */
  since: Date;
  /** Its credentials as of its `connect`. */
  peer: PeerCredentials;
}

/** Where a broker's connections came from, when it took them over from another (`--takeover`). */
export interface TakeoverInfo {
  /** The pid of the broker that handed over. */
  pid: number;
  /** When the hand-over ended. */
  at: Date;
  /** When the first broker of the chain of hand-overs started serving the socket. */
  servingSince: Date;
  /** Milliseconds pairing paused: from the `TAKEOVER` to the first accept here. */
  pauseMs: number;
  /** Connections received and adopted. */
  adopted: number;
  /** Whether the old broker died before it had sent everything. */
  oldDied: boolean;
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
/**
 * Connections accepted per readiness report: a connect flood must not keep
 * the loop from timers, signals and the control API. The listener is
 * level-triggered, so the rest are accepted on the next turn.
 */
const ACCEPT_BATCH = 256;
/** Descriptors accepted with a request; the kernel closes any beyond this. */
const MAX_RECEIVED_DESCRIPTORS = 8;
/** How often deadlines are checked: timeouts are honoured to within this. */
const SWEEP_INTERVAL_MS = 250;

/**
 * The SocketPair broker: pairs clients that send the same key in compatible
 * modes and hands each one end of a fresh `socketpair`.
 *
 * @example Serve, pair two clients, stop
 * ```ts
 * import { Broker, getPair } from "@one-socket/one-socket";
 * const path = `/tmp/example-${Deno.pid}.socket`;
 * await using broker = await Broker.listen({ socket: path });
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
  /** Set when it took over from another broker. */
  tookOver?: TakeoverInfo;
  /**
   * Resolves with the new broker's pid once this one has handed everything
   * over (`--takeover`); it then only has to stop.
   */
  readonly handedOver: Promise<number>;
  readonly #handedOver = Promise.withResolvers<number>();
  /** The socket file this broker created, to remove at shutdown if it is still that file. */
  readonly #ownFile?: string;
  readonly #listener: UnixSocket;
  readonly #listenWatch: Watch;
  readonly #options: Required<Pick<BrokerOptions, "handshakeTimeoutMs">> & BrokerOptions;
  readonly #matcher = new Matcher<Connection>();
  readonly #table: ConnectionTable;
  readonly #admission: Admission;
  readonly #delivery = new Delivery();
  readonly #listeners: Listeners;
  /** Warnings about clients are budgeted per cause: a flood of bad ones must not fill the log. */
  readonly #logLimit = new LogLimit();
  // One receive header for the whole broker: every call is synchronous.
  readonly #inbound = new MessageHeader(
    new Uint8Array(Math.max(MESSAGE_SIZE, MAX_REQUEST_SIZE)),
    MAX_RECEIVED_DESCRIPTORS,
  );
  readonly #sweepTimer: ReturnType<typeof setInterval>;
  /** Whether debug lines are wanted, read once: asking on every pairing costs. */
  readonly #debug = logger.isEnabledFor("debug");
  #acceptPaused = false;
  /** `performance.now()` when descriptors ran out, until an accept succeeds again. */
  #exhaustedSince?: number;
  #closing?: Promise<void>;
  /** The hand-over under way, if one is (this broker handing over). */
  #handingOver?: Promise<void>;
  /** Connections that reported readiness during a hand-over, unwatched until it ends. */
  #held: Connection[] = [];
  /** Kept open until the process exits: its end of stream tells the new broker we are gone. */
  #handoverLink?: HandoverLink;
  #previousGone: Promise<void> = Promise.resolve();
  /** Where a handed-over v1 request is rebuilt, one at a time. */
  readonly #adoptedRequest = new Uint8Array(MESSAGE_SIZE);

  private constructor(
    options: BrokerOptions,
    listener: UnixSocket,
    ownFile?: string,
    accepting = true,
  ) {
    this.handedOver = this.#handedOver.promise;
    this.path = options.socket;
    this.#options = { handshakeTimeoutMs: 5000, ...options };
    // The reactor's reports carry no clock reading: #onReadable takes one if it needs it.
    this.#table = new ConnectionTable(
      (connection) => this.#onReadable(connection, undefined),
      countWaitingFrom(options),
    );
    this.#admission = new Admission(options, this.#table);
    this.#listeners = new Listeners(
      this.#matcher,
      this.#table,
      this.#delivery,
      (first, second, now, key) => this.#pair(first, second, now, key),
    );
    this.#listener = listener;
    this.#ownFile = ownFile;
    this.#listenWatch = Reactor.instance().watch(
      listener.fd,
      accepting ? EPOLLIN : 0,
      () => this.#acceptAll(),
    );
    // Deadlines alone must not keep the process alive.
    this.#sweepTimer = setInterval(() => this.#sweep(), SWEEP_INTERVAL_MS).unref();
  }

  /**
   * Binds `socket` (or adopts `listenFd`) and starts serving. A stale socket
   * file (nobody listening) is replaced; a live broker's socket, or a path
   * that is not a socket, is not.
   */
  static async listen(options: BrokerOptions): Promise<Broker> {
    const { socket: path, backlog = 4096, listenFd, socketAccess } = options;
    if (listenFd !== undefined) {
      setNonblocking(listenFd);
      logger.info("serving inherited socket {path} (fd {fd})", { path, fd: listenFd });
      return new Broker(options, new UnixSocket(listenFd));
    }
    let listener: UnixSocket;
    try {
      listener = listenUnix(path, backlog, socketAccess);
    } catch (error) {
      if (!(error instanceof OsError && error.code === "EADDRINUSE") || path.startsWith("@")) {
        throw error;
      }
      await assertStale(path);
      logger.info("replacing stale socket file {path}", { path });
      unlinkPath(path);
      listener = listenUnix(path, backlog, socketAccess);
    }
    logger.info("listening on {path}", { path });
    return new Broker(options, listener, path.startsWith("@") ? undefined : fileIdentity(path));
  }

  /**
   * Takes over from the broker serving `options.socket` (see
   * `docs/handover.md`): its listening socket and every connection waiting,
   * listening or still sending, which this broker's own options and policy
   * then apply to. Starts as {@link listen} does when nobody serves the path.
   * Resolves once this broker accepts; {@link previousGone} tells when the
   * old one has exited.
   *
   * @throws {Error} when a broker serves the path and cannot or will not hand
   * over, or gave up half-way (it then serves on, and this one holds nothing).
   */
  static async takeOver(options: BrokerOptions): Promise<Broker> {
    const path = options.socket;
    const began = performance.now();
    const session = await requestTakeover(path);
    if (session === undefined) {
      logger.info("--takeover: nobody serves {path}, so starting afresh", { path });
      return Broker.listen(options);
    }
    const { offer } = session;
    let ownFile: string | undefined;
    if (offer.ownsSocketFile && !path.startsWith("@")) {
      try {
        ownFile = fileIdentity(path);
      } catch {
        ownFile = undefined; // removed meanwhile: nothing of ours to remove at shutdown
      }
    }
    let broker: Broker;
    try {
      setNonblocking(session.listenerFd);
      broker = new Broker(options, new UnixSocket(session.listenerFd), ownFile, false);
    } catch (error) {
      closeDescriptor(session.listenerFd);
      session[Symbol.dispose]();
      throw error;
    }
    logger.info("taking over {path} from pid {pid} ({records} connections)", {
      path,
      pid: offer.pid,
      records: offer.records,
    });
    let end: TakeoverEnd;
    let adopted = 0;
    try {
      broker.#table.raiseNextId(offer.nextId);
      broker.#table.sharing = true;
      for (;;) {
        const next = await session.nextBatch();
        if (typeof next === "string") {
          end = next;
          break;
        }
        const now = performance.now();
        for (let index = 0; index < next.records.length; index++) {
          broker.#adopt(next.records[index], next.fds[index], now);
        }
        adopted += next.records.length;
        await session.acknowledge(next.records.length);
      }
      if (end === "old-gave-up") {
        throw new Error(`the broker (pid ${offer.pid}) gave up the hand-over and serves on`);
      }
    } catch (error) {
      broker.#abandon();
      session[Symbol.dispose]();
      throw new Error(
        `taking over ${path}: ${error instanceof Error ? error.message : String(error)}`,
      );
    }
    broker.#table.sharing = false;
    broker.#listenWatch.modify(EPOLLIN);
    const pauseMs = performance.now() - began;
    broker.tookOver = {
      pid: offer.pid,
      at: new Date(),
      servingSince: new Date(offer.startedMs),
      pauseMs,
      adopted,
      oldDied: end === "old-died",
    };
    const stats = broker.stats;
    const properties = {
      path,
      pid: offer.pid,
      adopted,
      waiting: stats.waiting,
      listeners: stats.listeners,
      open: stats.open,
      ms: Math.round(pauseMs * 10) / 10,
    };
    if (end === "old-died") {
      logger.warn(
        "took over {path} from pid {pid}, which died half-way: serving the {adopted} connections " +
          "it had sent ({open} kept, {waiting} waiting, {listeners} listeners); pairing paused {ms} ms",
        properties,
      );
      session[Symbol.dispose]();
    } else {
      logger.info(
        "took over {path} from pid {pid}: {adopted} connections, {open} kept ({waiting} waiting, " +
          "{listeners} listeners); pairing paused {ms} ms",
        properties,
      );
      broker.#previousGone = session.oldBrokerGone().finally(() => session[Symbol.dispose]());
    }
    return broker;
  }

  /**
   * After {@link takeOver}: resolves once the old broker has exited (and so
   * let go of its pidfile and control socket), or after ten seconds.
   */
  get previousGone(): Promise<void> {
    return this.#previousGone;
  }

  /** Current counters. */
  get stats(): BrokerStats {
    return {
      accepted: this.metrics.accepted,
      paired: this.metrics.paired,
      rejected: this.metrics.rejected,
      open: this.#table.size,
      waiting: this.#matcher.size,
      listeners: this.#table.listening.size,
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
    for (const connection of this.#table.values()) {
      if (clients.length >= limit) break;
      if (connection.id <= after || !connection.isWaiting || connection.isListening) continue;
      clients.push({
        id: connection.id,
        key: connection.key,
        mode: connection.mode,
        since: new Date(performance.timeOrigin + connection.since),
        peer: connection.peer,
        type: SOCKET_TYPES[connection.socketType],
        version: connection.version,
      });
    }
    return clients;
  }

  /**
   * One page of the registered listeners, by ascending id, as
   * {@link waitingClients} pages: bounded by the number of open connections.
   */
  listeners(page: ListingPage = {}): ListenerInfo[] {
    const after = page.after ?? 0;
    const limit = Math.min(page.limit ?? MAX_LISTING_PAGE, MAX_LISTING_PAGE);
    const listeners: ListenerInfo[] = [];
    // By id, as pages go: the listening list is in registration order.
    for (const connection of this.#table.values()) {
      if (listeners.length >= limit) break;
      const registration = connection.registration;
      if (connection.id <= after || registration === undefined) continue;
      listeners.push({
        id: connection.id,
        key: registration.key.slice(),
        mode: registration.mode,
        type: SOCKET_TYPES[registration.type],
        backlog: registration.backlog,
        inFlight: registration.backlog - registration.credit,
        served: registration.served,
        since: new Date(performance.timeOrigin + connection.since),
        peer: connection.peer,
      });
    }
    return listeners;
  }

  /** Disconnects the client with `id`; false if no such connection is open. */
  kick(id: number): boolean {
    const connection = this.#table.get(id);
    if (connection === undefined) return false;
    logger.info("disconnecting client {id} on request", { id });
    this.metrics.countDrop("kicked");
    this.#close(connection, "kicked");
    return true;
  }

  /**
   * Stops accepting, closes every client connection and removes the socket
   * file it created. Waiting clients see end of stream and may reconnect.
   */
  close(): Promise<void> {
    // A hand-over under way finishes first: stopping half-way would leave both brokers half.
    return this.#closing ??= (this.#handingOver ?? Promise.resolve()).then(() => this.#shutdown());
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #shutdown(): void {
    clearInterval(this.#sweepTimer);
    const handedOver = this.#handoverLink !== undefined;
    // Handed over, the listening socket lives on in the new broker: epoll must be told.
    this.#listenWatch.cancel(!handedOver);
    this.#listener.close();
    if (handedOver) {
      logger.info("stopped: {path} and its clients are served by the new broker", {
        path: this.path,
      });
      return;
    }
    if (this.#ownFile !== undefined) this.#removeOwnFile(this.#ownFile);
    const open = this.#table.size;
    // No REFUSED: a client seeing end of stream after its HELLO knows the broker stopped.
    for (const connection of this.#table.values()) this.#table.close(connection);
    this.#logLimit.report(performance.now(), this.#reportHeldBack, true);
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
    // A report fetched with the TAKEOVER's, in the same epoll batch: the backlog is the new broker's.
    if (this.#handingOver !== undefined || this.#handoverLink !== undefined) return;
    const now = performance.now();
    for (let accepted = 0; accepted < ACCEPT_BATCH; accepted++) {
      const fd = acceptConnection(this.#listener.fd);
      if (fd >= 0) {
        if (this.#exhaustedSince !== undefined) this.#endExhaustion(now);
        this.#admit(fd, now);
        // That was a TAKEOVER: the rest of the backlog is the new broker's to accept.
        if (this.#handingOver !== undefined) return;
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
   * Out of descriptors: a level-triggered listener would spin. Serve the
   * clients already here and retry every ACCEPT_PAUSE_MS; log once per episode.
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
        { path: this.path, cause, open: this.#table.size, ms: ACCEPT_PAUSE_MS },
      );
    }
    this.#listenWatch.modify(0);
    setTimeout(() => {
      this.#acceptPaused = false;
      if (this.#closing === undefined && this.#handingOver === undefined) {
        this.#listenWatch.modify(EPOLLIN);
      }
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
    const connection = this.#table.open(fd, now);
    // Clients send their request right after connecting, so it is usually here already:
    // one that pairs at once never costs an epoll registration, an event or a uid's account.
    this.#onReadable(connection, now);
    this.#settle(connection);
  }

  /** After its first bytes: a connection that stays is accounted for and watched. */
  #settle(connection: Connection): void {
    if (!connection.isOpen) return;
    // A listener out of credit is not filed in the matcher, yet it has made its request.
    if (!connection.isWaiting && connection.registration === undefined) {
      const refusal = this.#admission.refuseIncomplete(connection);
      if (refusal !== undefined) return this.#refuse(connection, refusal);
      this.#table.startHandshake(connection);
    }
    try {
      Reactor.instance().register(connection, EPOLLIN | EPOLLRDHUP);
    } catch (error) {
      // Unwatched, its hang-up would go unnoticed: better not to keep it.
      logger.error("closing client {id}: {error}", { id: connection.id, error });
      this.#table.close(connection);
      return;
    }
    if (this.#admission.overCapacity) this.#makeRoom(connection);
  }

  /** Full, and `newcomer` stays: close the oldest connection of the heaviest uid, or the newcomer. */
  #makeRoom(newcomer: Connection): void {
    const victim = this.#admission.victim(newcomer);
    const capacity = this.#admission.capacity;
    if (victim === newcomer) {
      this.#drop(
        newcomer,
        "capacity",
        `broker full (${capacity} connections) and uid ${newcomer.uid} holds the most`,
      );
      return;
    }
    const heaviest = victim.account!;
    this.#drop(
      victim,
      "shed",
      `broker full (${capacity} connections): making room for uid ${newcomer.uid}, ` +
        `as uid ${heaviest.uid} holds the most (${heaviest.held})`,
    );
  }

  /** `now` is the caller's clock reading, if it has one: readings cost, and a batch shares one. */
  #onReadable(connection: Connection, now: number | undefined): void {
    if (this.#handingOver !== undefined) return this.#hold(connection);
    const listening = connection.registration !== undefined;
    const requested = listening || connection.isWaiting;
    // After the request, read one byte past the frame to tell a hang-up from extra data.
    const want = listening
      ? CREDIT_SIZE - connection.received
      : requested
      ? Math.max(connection.expected - connection.received, 1)
      : connection.expected - connection.received;
    const inbound = this.#inbound;
    inbound.prepareReceive(want);
    const count = receiveMessage(connection.fd, inbound);
    if (count === -Errno.EAGAIN) return;
    if (count <= 0) {
      if (this.#debug) {
        logger.debug("client {id} left ({reason})", {
          id: connection.id,
          reason: count === 0 ? "end of stream" : errnoName(-count),
        });
      }
      this.#table.close(connection);
      return;
    }
    if (inbound.readDescriptors() || inbound.descriptors.length > 0) {
      const attached = inbound.descriptors.length;
      for (const fd of inbound.descriptors) closeDescriptor(fd);
      this.#reject(
        connection,
        new ProtocolError("request", "descriptors", attached, "a request carries none"),
      );
      return;
    }
    if (listening) {
      const error = this.#listeners.receive(
        connection,
        inbound.data,
        count,
        now ?? performance.now(),
      );
      if (error !== undefined) this.#reject(connection, error);
      return;
    }
    if (requested) {
      connection.received += count;
      if (connection.received > connection.expected) {
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
    this.#onRequestBytes(connection, inbound.data, count, now);
  }

  /**
   * The next `count` bytes of `connection`'s request, in `bytes`: read just
   * now, or handed over by another broker.
   */
  #onRequestBytes(
    connection: Connection,
    bytes: Uint8Array,
    count: number,
    now: number | undefined,
  ): void {
    // A request that arrived whole is validated and matched where it was received.
    let frame: Uint8Array = bytes;
    if (connection.received > 0 || !arrivedWhole(frame, count)) {
      frame = connection.frame ??= new Uint8Array(this.#inbound.data.length);
      frame.set(bytes.subarray(0, count), connection.received);
    }
    connection.received += count;
    if (connection.version === 1) {
      if (connection.received >= 8 && messageVersion(frame) === VERSION_2) {
        if (connection.received < HEADER_SIZE) return;
        const takeover = u32(frame, 0) === REQUEST_TAKEOVER;
        // Told why, if refused: a broker asking to take over speaks v2.
        if (takeover) connection.hearsReasons = true;
        const length = takeover ? handoverMessageLength(frame) : requestLength(frame);
        if (typeof length !== "number") return this.#reject(connection, length);
        connection.version = 2;
        connection.expected = length;
      } else {
        if (connection.received < GET_PAIR_MIN_SIZE) return;
        const fault = getPairFault(frame, connection.received);
        if (fault !== undefined) {
          // Described only if the log takes it: a flood of these must cost no more than it must.
          const received = connection.received;
          return this.#reject(connection, fault, () => validateGetPair(frame, received)!);
        }
        this.#onRequest(
          connection,
          frame,
          GET_PAIR_KEY_OFFSET,
          getPairKeyLength(frame),
          getPairMode(frame),
          now,
        );
        return;
      }
    }
    if (connection.received < connection.expected) return;
    if (u32(frame, 0) === REQUEST_TAKEOVER) return this.#onTakeover(connection, frame);
    const error = connection.received > connection.expected
      ? new ProtocolError(
        isListen(frame) ? "LISTEN" : "GET_PAIR",
        "sequence",
        connection.received,
        `${connection.expected} bytes, then nothing until the reply`,
      )
      : validateRequest(frame, connection.received);
    if (error !== undefined) return this.#reject(connection, error);
    connection.socketType = SOCKET_TYPES.indexOf(requestType(frame));
    connection.wantsPidfd = requestWantsPidfd(frame);
    connection.hearsReasons = true;
    this.#onRequest(
      connection,
      frame,
      REQUEST_KEY_OFFSET,
      requestKeyLength(frame),
      requestMode(frame),
      now,
    );
  }

  /** A whole, valid request is in `frame`: admit it, then pair it, file it or register it. */
  #onRequest(
    connection: Connection,
    frame: Uint8Array,
    keyOffset: number,
    keyLength: number,
    mode: Mode,
    now: number | undefined,
  ): void {
    connection.frame = undefined;
    this.#table.endHandshake(connection);
    const listen = connection.version === 2 && isListen(frame);
    const scope = this.#admission.scopeFor(connection, frame, keyOffset, keyLength, mode, listen);
    if (typeof scope !== "number") return this.#refuse(connection, scope);
    if (!listen) return this.#pairOrWait(connection, frame, keyOffset, keyLength, mode, scope, now);
    const refusal = this.#admission.refuseWaiting(connection) ??
      this.#admission.refuseListening(connection);
    if (refusal !== undefined) return this.#refuse(connection, refusal);
    now ??= performance.now();
    if (
      !this.#listeners.register(
        connection,
        frame,
        keyOffset,
        keyLength,
        mode,
        scope,
        requestBacklog(frame),
        now,
      )
    ) {
      return;
    }
    logger.info(
      `client {id} (pid {pid}, uid {uid}) listens on key "{key}" as {mode} ({type}, backlog {backlog})`,
      {
        id: connection.id,
        pid: connection.peer.pid,
        uid: connection.peer.uid,
        key: describeKey(connection.registration!.key),
        mode,
        type: SOCKET_TYPES[connection.socketType],
        backlog: connection.registration!.backlog,
      },
    );
  }

  /** Matches the request whose key is in `frame`, delivering or filing it. */
  #pairOrWait(
    connection: Connection,
    frame: Uint8Array,
    keyOffset: number,
    keyLength: number,
    mode: Mode,
    scope: number,
    now: number | undefined,
  ): void {
    for (;;) {
      const partner = this.#matcher.take(
        connection,
        frame,
        keyOffset,
        keyLength,
        mode,
        scope,
        connection.socketType,
      );
      if (partner === undefined) {
        const refusal = this.#admission.refuseWaiting(connection);
        if (refusal !== undefined) {
          connection.stopWaiting();
          this.#refuse(connection, refusal);
          return;
        }
        this.#startWaiting(connection, now ?? performance.now());
        return;
      }
      now ??= performance.now();
      // A partner that has gone away fails before anything was delivered: try the next.
      if (partner.registration !== undefined) {
        if (this.#listeners.serve(partner, connection, now)) return;
        continue;
      }
      const outcome = this.#pair(partner, connection, now, frame, keyOffset, keyLength);
      if (outcome === Delivered.PartnerGone) {
        this.#table.close(partner);
        continue;
      }
      if (outcome === Delivered.Failed) {
        // Both start over; a v2 side that got no SET_PAIR is told why.
        const reason = "delivery_failed";
        if (this.#delivery.failedSide !== connection) this.#delivery.refuse(partner, reason);
        this.#delivery.refuse(connection, reason);
      }
      this.#table.close(partner);
      this.#table.close(connection);
      return;
    }
  }

  #startWaiting(connection: Connection, now: number): void {
    this.#table.startWaiting(connection, now);
    // One handed over had its HELLO from the broker before: a second would be a protocol error.
    if (
      connection.version === 2 && connection.adopted === undefined &&
      !this.#delivery.sendHello(connection, 0)
    ) {
      this.#table.close(connection);
      return;
    }
    if (this.#debug) {
      logger.debug(`client {id} waits on key "{key}" as {mode} ({type}, protocol v{version})`, {
        id: connection.id,
        key: describeKey(connection.key),
        mode: connection.mode,
        type: SOCKET_TYPES[connection.socketType],
        version: connection.version,
      });
    }
  }

  /**
   * Hands `first` and `second` their pair, counting and logging the
   * outcome; the caller closes what it no longer needs. The key, for the
   * log, is `keyLength` bytes of `bytes` from `keyOffset` (the newcomer's
   * request, or a listener's key: a waiting partner's copy left with its wait).
   */
  #pair(
    first: Connection,
    second: Connection,
    now: number,
    bytes: Uint8Array,
    keyOffset = 0,
    keyLength = bytes.length,
  ): Delivered {
    const outcome = this.#delivery.deliver(first, second);
    if (outcome === Delivered.PartnerGone) {
      if (this.#debug) logger.debug("client {id} left before its pair arrived", { id: first.id });
      return outcome;
    }
    if (outcome === Delivered.Failed) {
      this.metrics.countDrop("delivery_failed");
      this.#warn("delivery", "no pair for key {key} between clients {a} and {b}: {failure}", {
        key: `"${describeKey(bytes.subarray(keyOffset, keyOffset + keyLength))}"`,
        failure: this.#delivery.failure,
        a: first.id,
        b: second.id,
      });
      return outcome;
    }
    this.metrics.paired++;
    // A batch's reading may precede a partner that started waiting within that batch.
    const waiting = first.registration === undefined ? first : second;
    this.metrics.pairWait.observe(Math.max(0, now - waiting.since) / 1000);
    if (first.registration !== undefined || second.registration !== undefined) {
      this.metrics.listenerDeliveries++;
    }
    if (this.#debug) {
      this.#logPaired(first, second, describeKey(bytes.subarray(keyOffset, keyOffset + keyLength)));
    }
    return outcome;
  }

  #logPaired(partner: Connection, newcomer: Connection, key: string): void {
    logger.debug(
      `paired client {a} (pid {pidA}, uid {uidA}) and {b} (pid {pidB}, uid {uidB}) on key "{key}"`,
      {
        a: partner.id,
        pidA: partner.peer.pid,
        uidA: partner.peer.uid,
        b: newcomer.id,
        pidB: newcomer.peer.pid,
        uidB: newcomer.peer.uid,
        key,
      },
    );
  }

  /** A warning about a client, within its cause's budget of log lines. */
  #warn(cause: string, message: string, properties: Record<string, unknown>): void {
    if (this.#logLimit.allow(cause, performance.now())) logger.warn(message, properties);
  }

  readonly #reportHeldBack = (cause: string, dropped: number, seconds: number) => {
    logger.warn("held back {dropped} similar warnings ({cause}) in the last {seconds} s", {
      dropped,
      cause,
      seconds,
    });
  };

  /**
   * Closes a client that broke the protocol: `error`, or (for a v1 request)
   * the field at fault and how to describe it if the log or the client is
   * told.
   */
  #reject(
    connection: Connection,
    error: ProtocolError | ProtocolErrorField,
    describe?: () => ProtocolError,
  ): void {
    const field = typeof error === "string" ? error : error.field;
    this.metrics.countProtocolError(field);
    const logged = this.#logLimit.allow(`protocol:${field}`, performance.now());
    if (!logged && !connection.hearsReasons) {
      this.#table.close(connection);
      return;
    }
    const described = typeof error === "string" ? describe!() : error;
    if (logged) {
      logger.warn("closing client {id}: {reason}", {
        id: connection.id,
        reason: described.message,
      });
    }
    this.#close(connection, described.message);
  }

  /** Closes a client, telling a v2 one why first. */
  #close(connection: Connection, reason: string): void {
    this.#delivery.refuse(connection, reason);
    this.#table.close(connection);
  }

  #refuse(connection: Connection, refusal: Refusal): void {
    this.#drop(connection, refusal.reason, refusal.detail);
  }

  #drop(connection: Connection, reason: DropReason, detail: string): void {
    this.metrics.countDrop(reason);
    if (this.#logLimit.allow(`drop:${reason}`, performance.now())) {
      logger.warn("closing client {id} (pid {pid}, uid {uid}): {detail}", {
        id: connection.id,
        pid: connection.peer.pid,
        uid: connection.peer.uid,
        detail,
      });
    }
    this.#close(connection, reason);
  }

  // --- hand-over: this broker's side (docs/handover.md) --------------------------------------

  /** A `TAKEOVER`, whole in `frame`: hand everything to the asker, if it may have it. */
  #onTakeover(connection: Connection, frame: Uint8Array): void {
    let request: { version: number; pid: number };
    try {
      request = decodeTakeover(frame.subarray(0, connection.received));
    } catch (error) {
      return this.#reject(connection, error as ProtocolError);
    }
    // The broker's own user may take over, and root; nobody else (they could not stop it either).
    const asker = connection.uid;
    const refusal = request.version !== HANDOVER_VERSION
      ? `takeover: version ${request.version} not supported`
      : asker !== 0 && asker !== currentUid()
      ? "takeover: not the broker's user"
      : this.#handingOver !== undefined || this.#handoverLink !== undefined
      ? "takeover: a hand-over is under way"
      : this.#closing !== undefined
      ? "takeover: the broker is stopping"
      : undefined;
    if (refusal !== undefined) {
      logger.warn("refusing to hand over to client {id} (pid {pid}, uid {uid}): {refusal}", {
        id: connection.id,
        pid: connection.peer.pid,
        uid: connection.uid,
        refusal,
      });
      this.metrics.countDrop("takeover_refused");
      return this.#close(connection, refusal);
    }
    logger.info("handing {path} over to pid {pid} ({open} client connections)", {
      path: this.path,
      pid: request.pid,
      open: this.#table.size - 1,
    });
    const link = new HandoverLink(new UnixSocket(this.#table.detach(connection)));
    this.#handingOver = this.#handOver(link, request.pid);
  }

  async #handOver(link: HandoverLink, pid: number): Promise<void> {
    const began = performance.now();
    this.#listenWatch.modify(0); // connects queue in the kernel's backlog meanwhile
    this.#table.sharing = true;
    const offered = this.#offered(began);
    const connections = offered.map((entry) => entry.connection);
    const failure = await handOver(link, {
      offer: {
        pid: Deno.pid,
        records: offered.length,
        nextId: this.#table.nextId,
        startedMs: (this.tookOver?.servingSince ?? this.startedAt).getTime(),
        ownsSocketFile: this.#ownFile !== undefined,
      },
      listenerFd: this.#listener.fd,
      connections: offered,
      isOpen: (index) => connections[index].isOpen,
      release: (indexes) => {
        for (const index of indexes) this.#table.close(connections[index]);
      },
    });
    this.#handingOver = undefined;
    if (failure === undefined) {
      this.#handoverLink = link;
      logger.info("handed {path} over to pid {pid}: {count} connections in {ms} ms", {
        path: this.path,
        pid,
        count: offered.length,
        ms: Math.round(performance.now() - began),
      });
      this.#handedOver.resolve(pid);
      return;
    }
    link.close();
    this.#table.sharing = false;
    for (const connection of this.#held.splice(0)) {
      if (connection.isOpen) Reactor.instance().register(connection, EPOLLIN | EPOLLRDHUP);
    }
    if (this.#closing === undefined) this.#listenWatch.modify(EPOLLIN);
    logger.warn("hand-over of {path} to pid {pid} failed ({failure}); serving on", {
      path: this.path,
      pid,
      failure,
    });
  }

  /** During a hand-over: a connection with news is left alone (and unwatched, or it would spin). */
  #hold(connection: Connection): void {
    Reactor.instance().unregister(connection, false);
    this.#held.push(connection);
  }

  /** Every client connection as a hand-over record, by ascending id. */
  #offered(now: number): (OfferedConnection & { connection: Connection })[] {
    const offered: (OfferedConnection & { connection: Connection })[] = [];
    for (const connection of this.#table.values()) {
      const registration = connection.registration;
      const record: HandoverRecord = {
        kind: registration !== undefined
          ? "listener"
          : connection.isWaiting
          ? "waiting"
          : "incomplete",
        version: connection.version,
        type: registration?.type ?? connection.socketType,
        mode: registration?.mode ?? (connection.isWaiting ? connection.mode : "none"),
        wantsPidfd: connection.wantsPidfd,
        hearsReasons: connection.hearsReasons,
        id: connection.id,
        ageMs: now - connection.since,
        key: registration?.key ?? (connection.isWaiting ? connection.key : new Uint8Array(0)),
        partial: connection.isWaiting ? new Uint8Array(0) : partialBytes(connection),
        listener: registration && {
          backlog: registration.backlog,
          credit: registration.credit,
          served: registration.served,
        },
      };
      offered.push({ record, fd: connection.fd, connection });
    }
    return offered;
  }

  // --- hand-over: the new broker's side -----------------------------------------------------

  /** Takes in a connection handed over, as if it had just sent what it had sent. */
  #adopt(record: HandoverRecord, fd: number, now: number): void {
    this.metrics.adopted++;
    const connection = this.#table.open(fd, now - record.ageMs, record.id);
    connection.adopted = record;
    if (record.kind === "incomplete") {
      if (record.partial.length > 0) {
        this.#onRequestBytes(connection, record.partial, record.partial.length, now);
      }
    } else {
      const request = requestOf(record, this.#adoptedRequest);
      this.#onRequestBytes(connection, request, request.length, now);
      if (connection.isOpen && (connection.isWaiting || connection.registration !== undefined)) {
        connection.since = now - record.ageMs;
      }
      if (connection.registration !== undefined && record.partial.length > 0) {
        const error = this.#listeners.receive(
          connection,
          record.partial,
          record.partial.length,
          now,
        );
        if (error !== undefined) this.#reject(connection, error);
      }
    }
    connection.adopted = undefined;
    this.#settle(connection);
  }

  /**
   * Lets go of everything taken over so far, without a word to the clients:
   * the old broker still holds them and serves on.
   */
  #abandon(): void {
    this.#closing = Promise.resolve();
    clearInterval(this.#sweepTimer);
    for (const connection of this.#table.values()) this.#table.close(connection);
    this.#listenWatch.cancel(false);
    this.#listener.close();
  }

  /** Closes connections past their handshake or pair deadline; says what the log held back. */
  #sweep(): void {
    // Deadlines are the new broker's business once a hand-over has begun.
    if (this.#handingOver !== undefined) return;
    const now = performance.now();
    this.#logLimit.report(now, this.#reportHeldBack);
    this.#table.forgetIdleAccounts();
    this.#table.trimSpares();
    const handshakeDeadline = now - this.#options.handshakeTimeoutMs;
    for (const connection of this.#table.handshaking) {
      if (connection.since > handshakeDeadline) break;
      this.#drop(
        connection,
        "handshake_timeout",
        `no complete request within ${this.#options.handshakeTimeoutMs} ms (${connection.received} bytes)`,
      );
    }
    const pairTimeout = this.#options.pairTimeoutMs;
    if (pairTimeout === undefined) return;
    for (const connection of this.#table.waiting) {
      if (connection.since > now - pairTimeout) break;
      this.#drop(connection, "pair_timeout", `no partner within ${pairTimeout} ms`);
    }
  }
}

/**
 * From how many open connections waiting clients count for their uid: always
 * under per-uid waiting limits; otherwise from three quarters of the
 * capacity, early enough for shedding at capacity to see every uid's share.
 */
function countWaitingFrom(options: BrokerOptions): number {
  if (options.maxWaitingPerUid !== undefined || options.uidLimits !== undefined) return 0;
  const capacity = options.maxConnections ?? Infinity;
  return capacity === Infinity ? Infinity : Math.floor(capacity * 3 / 4);
}

/**
 * What tells one file at `path` from a later one: the inode number alone is
 * reused at once on ext4 and tmpfs, the birth time is not.
 */
export function fileIdentity(path: string): string {
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

/** The bytes of its request (or a listener's `CREDIT`) a connection has sent so far. */
function partialBytes(connection: Connection): Uint8Array {
  if (connection.received === 0 || connection.frame === undefined) return new Uint8Array(0);
  return connection.frame.slice(0, connection.received);
}

/** The request a waiting client or a listener made, as the broker it is handed to reads it. */
function requestOf(record: HandoverRecord, v1Frame: Uint8Array): Uint8Array {
  if (record.version === 1) return encodeGetPair(record.key, record.mode, v1Frame);
  return encodeRequest(record.kind === "listener" ? "listen" : "get_pair", record.key, {
    mode: record.mode,
    type: SOCKET_TYPES[record.type],
    pidfd: record.wantsPidfd,
    backlog: record.listener?.backlog ?? 0,
  });
}

/**
 * Whether a request's first read, `count` bytes of `frame`, holds all of it:
 * v1's 1040 bytes, or a v2 request as long as its header says (or a header
 * already known to be bad).
 */
function arrivedWhole(frame: Uint8Array, count: number): boolean {
  if (count >= 8 && messageVersion(frame) === VERSION_2) {
    if (count < HEADER_SIZE) return false;
    const length = requestLength(frame);
    return typeof length !== "number" || count >= length;
  }
  return count >= GET_PAIR_MIN_SIZE;
}
