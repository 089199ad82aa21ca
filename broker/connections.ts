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

import type { Mode } from "../client/protocol.ts";
import { Reactor, type Registrant } from "../ffi/reactor.ts";
import { closeDescriptor, peerCredentials, peerUid } from "../ffi/socket.ts";
import type { PeerCredentials } from "../ffi/structs.ts";
import type { Waiter } from "./matcher.ts";

/**
 * One client connection, from accept to close. It is its own reactor
 * registration: one object per client, no watch or closure beside it.
 */
export class Connection implements Registrant {
  /** The broker's id for it: ids only grow. */
  readonly id: number;
  /** Its descriptor, owned by the table. */
  readonly fd: number;
  /** The reactor's registration tag. */
  tag = 0;
  /** `performance.now()` at accept, then when it started waiting. */
  since: number;
  /** Bytes of the request frame received so far. */
  received = 0;
  /** Holds a request that arrived in pieces; most arrive whole and never need it. */
  frame?: Uint8Array;
  /** Set once its request is filed in the matcher. */
  waiter?: Waiter<Connection>;
  /** Its matcher key carries a uid prefix (`isolateUids`). */
  scoped = false;
  /** Its uid's account, while it counts there (as incomplete or waiting). */
  account?: UidAccount;
  /** What it counts as in its account, if anything. */
  countedAs?: "incomplete" | "waiting";
  /** The next older and newer connection its uid holds. */
  olderOfUid?: Connection;
  newerOfUid?: Connection;
  /** The broker's handler, shared by every connection. */
  readonly #onReadable: (connection: Connection) => void;
  #peer?: PeerCredentials;
  #uid?: number;

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

  /** Its uid, read on first use like {@link peer} but without building an object. */
  get uid(): number {
    return this.#uid ??= this.#peer?.uid ?? peerUid(this.fd);
  }

  /** The key it waits on, as the client sent it. */
  get key(): Uint8Array {
    const key = this.waiter!.key;
    return this.scoped ? key.subarray(4) : key;
  }

  /** The mode it waits in. */
  get mode(): Mode {
    return this.waiter!.mode;
  }
}

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
  readonly handshaking: Set<Connection> = new Set();
  /** Connections waiting for a partner, in the order they started waiting. */
  readonly waiting: Set<Connection> = new Set();
  // A Map keeps insertion order and ids only grow: iteration is by ascending id.
  readonly #byId = new Map<number, Connection>();
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
   * @param countWaitingFrom From how many open connections on waiting ones
   * count for their uid too (0: always), until the table is back under half
   * that. Per-uid waiting limits need 0; shedding at capacity needs the
   * counts only near it.
   */
  constructor(countWaitingFrom = 0) {
    this.#countWaitingFrom = countWaitingFrom;
    this.#countingWaiting = countWaitingFrom === 0;
  }

  /** Open connections. */
  get size(): number {
    return this.#byId.size;
  }

  /** The open connection with `id`. */
  get(id: number): Connection | undefined {
    return this.#byId.get(id);
  }

  /** Open connections by ascending id. */
  values(): IterableIterator<Connection> {
    return this.#byId.values();
  }

  /** Whether `connection` is still open. */
  has(connection: Connection): boolean {
    return this.#byId.has(connection.id);
  }

  /** Takes in a connection just accepted. */
  add(connection: Connection): void {
    this.#byId.set(connection.id, connection);
    if (!this.#countingWaiting && this.#byId.size >= this.#countWaitingFrom) {
      // Getting full: count every waiting client from now on, and those waiting already.
      this.#countingWaiting = true;
      for (const waiting of this.waiting) this.#countWaiting(waiting);
    }
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
    this.handshaking.add(connection);
    this.#recount(this.#hold(connection, "incomplete"), 1, 0);
  }

  /** `connection` completed its request. */
  endHandshake(connection: Connection): void {
    if (!this.handshaking.delete(connection)) return;
    this.#recount(connection.account!, -1, 0);
    this.#release(connection);
  }

  /** `connection` waits for a partner as `waiter`. */
  startWaiting(connection: Connection, waiter: Waiter<Connection>, now: number): void {
    connection.waiter = waiter;
    connection.since = now;
    this.waiting.add(connection);
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
    if (!this.#byId.delete(connection.id)) return false;
    this.endHandshake(connection);
    if (connection.waiter !== undefined) {
      connection.waiter.cancel();
      if (this.waiting.delete(connection)) this.#uncountWaiting(connection);
    }
    if (this.#countingWaiting && this.#byId.size < this.#countWaitingFrom / 2) {
      this.#countingWaiting = false;
      for (const waiting of this.waiting) this.#uncountWaiting(waiting);
    }
    Reactor.instance().unregister(connection, true);
    closeDescriptor(connection.fd);
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
