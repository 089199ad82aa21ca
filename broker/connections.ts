/**
 * The broker's connection table: every open client connection by id, the
 * ones still sending their request and the ones waiting for a partner (each
 * in arrival order, for deadlines), and what each uid holds, for fairness.
 * {@link ConnectionTable.close} is where every client descriptor is closed.
 *
 * A client that pairs at accept is never counted against its uid: only
 * connections that stay (incomplete or waiting) hold capacity. Incomplete
 * ones are always counted; waiting ones from a size on (see the
 * constructor), since counting them costs a `getsockopt` per waiting client,
 * which is one in every pairing.
 *
 * @module
 */

import { MESSAGE_SIZE, type Mode } from "../client/protocol.ts";
import { Reactor, type Registrant } from "../ffi/reactor.ts";
import { closeDescriptor, peerCredentials, peerUid } from "../ffi/socket.ts";
import type { PeerCredentials } from "../ffi/structs.ts";
import type { HandoverRecord } from "./handover_wire.ts";
import type { Registration } from "./listeners.ts";
import { Waiting } from "./matcher.ts";

// Where a connection is in its life, and so which of the table's lists it is on:
// closed, or open and on none (its request is being read for the first time);
// still sending its request after its first read; filed in the matcher; a listener.
const ON_NO_LIST = 0;
const HANDSHAKING = 1;
const WAITING = 2;
const LISTENING = 3;

/**
 * One client connection, from accept to close. It is its own reactor
 * registration and its own entry in the matcher: one object per client, no
 * watch, closure or node beside it. The table keeps it for the next client
 * that gets its descriptor number, so that a pairing allocates nothing.
 */
export class Connection extends Waiting implements Registrant {
  /** The broker's id for it: ids only grow. */
  id = 0;
  /** Its descriptor, owned by the table. */
  fd = -1;
  /** Whether it is open: a closed connection is a spare of the table's. */
  isOpen = false;
  /** The reactor's registration tag. */
  tag = 0;
  /** `performance.now()` at accept, then when it started waiting. */
  since = 0;
  /** Bytes of the request frame received so far. */
  received = 0;
  /** Holds a request that arrived in pieces; most arrive whole and never need it. */
  frame: Uint8Array | undefined = undefined;
  /** The protocol version of its request: 1 until its first bytes say 2. */
  version: 1 | 2 = 1;
  /** Bytes its request takes: v1's fixed size, until a v2 header gives the length. */
  expected: number = MESSAGE_SIZE;
  /** Its request's socket type (wire value: 0 stream, 1 seqpacket, 2 dgram). */
  socketType = 0;
  /** Whether its (v2) request asked for the partner's pidfd. */
  wantsPidfd = false;
  /**
   * Whether it is told why it is closed (`REFUSED`): a v2 client once its
   * request proved valid. Before that, as in v1, a malformed request is closed
   * without a word.
   */
  hearsReasons = false;
  /** Its registration, once it is a listener. */
  registration: Registration | undefined = undefined;
  /**
   * While it is being adopted from another broker, what that broker said of
   * it: it was greeted there already, and a listener keeps its credit.
   */
  adopted: HandoverRecord | undefined = undefined;
  /** Its uid's account, while it counts there (as incomplete or waiting). */
  account: UidAccount | undefined = undefined;
  /** What it counts as in its account, if anything. */
  countedAs: "incomplete" | "waiting" | undefined = undefined;
  /** The next older and newer connection its uid holds. */
  olderOfUid: Connection | undefined = undefined;
  newerOfUid: Connection | undefined = undefined;
  /** @internal Neighbours among the open connections, in accept order. */
  previousOpen: Connection | undefined = undefined;
  nextOpen: Connection | undefined = undefined;
  /** @internal Which list of the table's it is on, and its neighbours there. */
  stage = ON_NO_LIST;
  previousInStage: Connection | undefined = undefined;
  nextInStage: Connection | undefined = undefined;
  /** The broker's handler, shared by every connection. */
  readonly #onReadable: (connection: Connection) => void;
  #peer: PeerCredentials | undefined = undefined;
  #uid: number | undefined = undefined;

  constructor(onReadable: (connection: Connection) => void) {
    super();
    this.#onReadable = onReadable;
  }

  /** Makes this spare the connection of a client just accepted. */
  reopen(id: number, fd: number, now: number): void {
    this.id = id;
    this.fd = fd;
    this.isOpen = true;
    this.tag = 0;
    this.since = now;
    this.received = 0;
    this.frame = undefined;
    this.version = 1;
    this.expected = MESSAGE_SIZE;
    this.socketType = 0;
    this.wantsPidfd = false;
    this.hearsReasons = false;
    this.registration = undefined;
    this.adopted = undefined;
    this.#peer = undefined;
    this.#uid = undefined;
  }

  /** Readable, hung up or in error: the broker reads to find out which. */
  onReady(): void {
    this.#onReadable(this);
  }

  /** `SO_PEERCRED`, read on first use: the kernel keeps the values from connect time. */
  get peer(): PeerCredentials {
    return this.#peer ??= peerCredentials(this.fd);
  }

  /** Its uid, read on first use like {@link peer} but without building an object. */
  get uid(): number {
    return this.#uid ??= this.#peer?.uid ?? peerUid(this.fd);
  }

  /** The key it waits on, as the client sent it. */
  get key(): Uint8Array {
    return this.waitingKey!;
  }

  /** The mode it waits in. */
  get mode(): Mode {
    return this.waitingMode!;
  }
}

/** The ends of one of the table's intrusive lists. */
class StageList {
  oldest: Connection | undefined = undefined;
  newest: Connection | undefined = undefined;
  /** Connections on it. */
  size = 0;

  append(connection: Connection): void {
    this.size++;
    connection.previousInStage = this.newest;
    connection.nextInStage = undefined;
    if (this.newest !== undefined) this.newest.nextInStage = connection;
    else this.oldest = connection;
    this.newest = connection;
  }

  remove(connection: Connection): void {
    this.size--;
    const previous = connection.previousInStage, next = connection.nextInStage;
    if (previous !== undefined) previous.nextInStage = next;
    else this.oldest = next;
    if (next !== undefined) next.previousInStage = previous;
    else this.newest = previous;
    connection.previousInStage = connection.nextInStage = undefined;
  }

  /** Oldest first; the connection yielded may be closed before the walk goes on. */
  *[Symbol.iterator](): Generator<Connection> {
    for (let connection = this.oldest; connection !== undefined;) {
      const next: Connection | undefined = connection.nextInStage;
      yield connection;
      connection = next;
    }
  }
}

/**
 * Spare connection objects kept beyond one per open connection: a few
 * descriptor numbers above the highest in use come and go all the time.
 */
const SPARE_SLACK = 64;

/** What one uid holds now: its incomplete and waiting connections, oldest first. */
export class UidAccount {
  /** The uid. */
  readonly uid: number;
  /** Its connections still sending their request. */
  incomplete = 0;
  /** Its connections waiting for a partner. */
  waiting = 0;
  /** Its oldest held connection: the one shed first. */
  oldest?: Connection;
  /** Its newest held connection. */
  newest?: Connection;
  /** The accounts holding as many connections as this one. */
  previousSameHeld?: UidAccount;
  nextSameHeld?: UidAccount;

  constructor(uid: number) {
    this.uid = uid;
  }

  /** Connections it holds. */
  get held(): number {
    return this.incomplete + this.waiting;
  }
}

/** See the module documentation. */
export class ConnectionTable {
  /** Connections still sending their request, in arrival order. */
  readonly handshaking: StageList = new StageList();
  /** Connections waiting for a partner, in the order they started waiting. */
  readonly waiting: StageList = new StageList();
  /** Listeners, in the order they registered. */
  readonly listening: StageList = new StageList();
  /** Connection objects by descriptor number, open ones and spares. */
  readonly #byFd: (Connection | undefined)[] = [];
  #oldestOpen: Connection | undefined = undefined;
  #newestOpen: Connection | undefined = undefined;
  #size = 0;
  #nextId = 1;
  readonly #onReadable: (connection: Connection) => void;
  readonly #accounts = new Map<number, UidAccount>();
  /**
   * The first account holding each number of connections (a list through
   * the accounts), so that the heaviest is found at once and a count changes
   * without allocating. Counts move by one, so the array only ever grows by
   * one at its end and stays dense.
   */
  readonly #byHeld: (UidAccount | undefined)[] = [undefined];
  #mostHeld = 0;
  readonly #countWaitingFrom: number;
  #countingWaiting: boolean;
  /**
   * Whether client descriptors are shared with another broker (during a
   * hand-over): epoll keeps watching a descriptor closed here while another
   * process holds the same socket, so closing must unregister it first.
   */
  sharing = false;

  /**
   * @param onReadable The broker's handler for a connection's readiness.
   * @param countWaitingFrom From how many open connections on waiting ones
   * count for their uid too (0: always), until the table is back under half
   * that. Per-uid waiting limits need 0; shedding at capacity needs the
   * counts only near it.
   */
  constructor(onReadable: (connection: Connection) => void, countWaitingFrom = 0) {
    this.#onReadable = onReadable;
    this.#countWaitingFrom = countWaitingFrom;
    this.#countingWaiting = countWaitingFrom === 0;
  }

  /** Open connections. */
  get size(): number {
    return this.#size;
  }

  /** The open connection with `id`: a walk, for the control API rather than for pairings. */
  get(id: number): Connection | undefined {
    for (const connection of this.values()) if (connection.id === id) return connection;
    return undefined;
  }

  /** Open connections by ascending id; the one yielded may be closed before the walk goes on. */
  *values(): Generator<Connection> {
    for (let connection = this.#oldestOpen; connection !== undefined;) {
      const next: Connection | undefined = connection.nextOpen;
      yield connection;
      connection = next;
    }
  }

  /** The id the next connection opened gets. */
  get nextId(): number {
    return this.#nextId;
  }

  /** Ids go on from `id` at least (after those of a broker handing over). */
  raiseNextId(id: number): void {
    this.#nextId = Math.max(this.#nextId, id);
  }

  /**
   * Takes in the descriptor of a client just accepted, or of one adopted
   * from another broker with the `id` it had there.
   */
  open(fd: number, now: number, id: number = this.#nextId++): Connection {
    let connection = this.#byFd[fd];
    if (connection === undefined || connection.isOpen) {
      connection = new Connection(this.#onReadable);
      this.#byFd[fd] = connection;
    }
    connection.reopen(id, fd, now);
    connection.previousOpen = this.#newestOpen;
    connection.nextOpen = undefined;
    if (this.#newestOpen !== undefined) this.#newestOpen.nextOpen = connection;
    else this.#oldestOpen = connection;
    this.#newestOpen = connection;
    this.#size++;
    if (!this.#countingWaiting && this.#size >= this.#countWaitingFrom) {
      // Getting full: count every waiting client from now on, and those waiting already.
      this.#countingWaiting = true;
      for (const waiting of this.waiting) this.#countWaiting(waiting);
      for (const listener of this.listening) this.#countWaiting(listener);
    }
    return connection;
  }

  /**
   * Lets go of spare connection objects above the descriptors in use, so
   * that a burst of clients does not hold its objects forever.
   */
  trimSpares(): void {
    const byFd = this.#byFd;
    while (byFd.length > this.#size + SPARE_SLACK && !byFd[byFd.length - 1]?.isOpen) byFd.pop();
  }

  /** The account of `uid`, if it holds any connection. */
  account(uid: number): UidAccount | undefined {
    return this.#accounts.get(uid);
  }

  /** The account holding the most connections (any one of them on a tie). */
  heaviest(): UidAccount | undefined {
    return this.#byHeld[this.#mostHeld];
  }

  /** `connection` still sends its request after its first read: it counts for its uid. */
  startHandshake(connection: Connection): void {
    connection.stage = HANDSHAKING;
    this.handshaking.append(connection);
    this.#recount(this.#hold(connection, "incomplete"), 1, 0);
  }

  /** `connection` completed its request. */
  endHandshake(connection: Connection): void {
    if (connection.stage !== HANDSHAKING) return;
    connection.stage = ON_NO_LIST;
    this.handshaking.remove(connection);
    this.#recount(connection.account!, -1, 0);
    this.#release(connection);
  }

  /** `connection`, just filed in the matcher, waits for a partner. */
  startWaiting(connection: Connection, now: number): void {
    connection.since = now;
    connection.stage = WAITING;
    this.waiting.append(connection);
    if (this.#countingWaiting) this.#countWaiting(connection);
  }

  /**
   * `connection` is a listener now, with its registration set: it holds a
   * place of its uid's like a waiting client, without a pair deadline.
   */
  startListening(connection: Connection, now: number): void {
    connection.since = now;
    connection.stage = LISTENING;
    this.listening.append(connection);
    if (this.#countingWaiting) this.#countWaiting(connection);
  }

  #countWaiting(connection: Connection): void {
    if (connection.countedAs !== undefined) return;
    this.#recount(this.#hold(connection, "waiting"), 0, 1);
  }

  #uncountWaiting(connection: Connection): void {
    if (connection.countedAs !== "waiting") return;
    this.#recount(connection.account!, 0, -1);
    this.#release(connection);
  }

  /**
   * Closes `connection`: cancels its wait, leaves every table, stops watching
   * it and closes its descriptor. Returns false if it was closed already.
   */
  close(connection: Connection): boolean {
    if (!this.#remove(connection, this.sharing)) return false;
    closeDescriptor(connection.fd);
    return true;
  }

  /**
   * Takes `connection` out of the table like {@link close} but leaves its
   * descriptor open and returns it: it is no client (a hand-over's).
   */
  detach(connection: Connection): number {
    this.#remove(connection, true);
    return connection.fd;
  }

  #remove(connection: Connection, unwatch: boolean): boolean {
    if (!connection.isOpen) return false;
    connection.isOpen = false;
    connection.frame = undefined; // a spare holds no partial request
    const previous = connection.previousOpen, next = connection.nextOpen;
    if (previous !== undefined) previous.nextOpen = next;
    else this.#oldestOpen = next;
    if (next !== undefined) next.previousOpen = previous;
    else this.#newestOpen = previous;
    connection.previousOpen = connection.nextOpen = undefined;
    this.#size--;
    this.endHandshake(connection);
    connection.stopWaiting();
    if (connection.stage === WAITING || connection.stage === LISTENING) {
      (connection.stage === WAITING ? this.waiting : this.listening).remove(connection);
      connection.stage = ON_NO_LIST;
      this.#uncountWaiting(connection);
    }
    if (this.#countingWaiting && this.#size < this.#countWaitingFrom / 2) {
      this.#countingWaiting = false;
      for (const waiting of this.waiting) this.#uncountWaiting(waiting);
      for (const listener of this.listening) this.#uncountWaiting(listener);
    }
    Reactor.instance().unregister(connection, !unwatch);
    return true;
  }

  /** Links `connection` into its uid's account as `what`, creating the account if need be. */
  #hold(connection: Connection, what: "incomplete" | "waiting"): UidAccount {
    connection.countedAs = what;
    const uid = connection.uid;
    let account = this.#accounts.get(uid);
    if (account === undefined) {
      account = new UidAccount(uid);
      this.#accounts.set(uid, account);
    }
    connection.account = account;
    connection.olderOfUid = account.newest;
    if (account.newest) account.newest.newerOfUid = connection;
    else account.oldest = connection;
    account.newest = connection;
    return account;
  }

  /** Unlinks a connection that no longer counts for its uid. */
  #release(connection: Connection): void {
    const account = connection.account!;
    if (connection.olderOfUid) connection.olderOfUid.newerOfUid = connection.newerOfUid;
    else account.oldest = connection.newerOfUid;
    if (connection.newerOfUid) connection.newerOfUid.olderOfUid = connection.olderOfUid;
    else account.newest = connection.olderOfUid;
    connection.olderOfUid = connection.newerOfUid = connection.account = undefined;
    connection.countedAs = undefined;
  }

  /**
   * Forgets the accounts of uids that hold nothing. Run now and then rather
   * than whenever a count reaches zero: a uid whose one waiter pairs would
   * otherwise cost an account per pairing.
   */
  forgetIdleAccounts(): void {
    for (const [uid, account] of this.#accounts) {
      if (account.held === 0) this.#accounts.delete(uid);
    }
  }

  /** Changes the account's counts and moves it to its new place by held count. */
  #recount(account: UidAccount, incomplete: number, waiting: number): void {
    const before = account.held;
    account.incomplete += incomplete;
    account.waiting += waiting;
    const after = account.held;
    const byHeld = this.#byHeld;
    if (before > 0) {
      // Out of the list of `before`.
      if (account.previousSameHeld) account.previousSameHeld.nextSameHeld = account.nextSameHeld;
      else byHeld[before] = account.nextSameHeld;
      if (account.nextSameHeld) account.nextSameHeld.previousSameHeld = account.previousSameHeld;
      account.previousSameHeld = account.nextSameHeld = undefined;
    }
    if (after > 0) {
      if (after === byHeld.length) byHeld.push(undefined);
      const first = byHeld[after];
      account.nextSameHeld = first;
      if (first) first.previousSameHeld = account;
      byHeld[after] = account;
    }
    if (after > this.#mostHeld) this.#mostHeld = after;
    while (this.#mostHeld > 0 && byHeld[this.#mostHeld] === undefined) this.#mostHeld--;
  }
}
