/**
 * The broker's waiting table: clients that sent a `GET_PAIR` and wait for a
 * partner with the same key, a compatible mode and the same socket type, and
 * protocol v2 listeners, which serve every compatible request for their key.
 *
 * Every operation takes constant time however many clients wait (the C
 * broker scans them all), waiters with the same key and mode are served
 * oldest first, listeners on one key in turn (before any waiter), and a
 * waiter that disconnects is removed in constant time. There is one table
 * per (type, mode) for requests and one for listeners: a request looks for
 * a listener only while one is filed in its peer table, so brokers without
 * listeners pay one property read for them.
 *
 * It allocates nothing per pairing: what waits is the caller's own object (a
 * {@link Waiting}, which the broker's connections extend), linked in place;
 * the per-key queues, with their copy of the key, are kept for reuse; keys
 * are read straight out of the caller's receive buffer; the bucket arrays
 * are the matcher's own, grown and shrunk by powers of two.
 *
 * @example Usage
 * ```ts
 * import { Matcher, Waiting } from "./matcher.ts";
 * import assert from "node:assert/strict";
 *
 * const key = new TextEncoder().encode("vhost-user-1");
 * const matcher = new Matcher<Waiting>();
 * const server = new Waiting();
 * assert.equal(matcher.take(server, key, 0, key.length, "server"), undefined);
 * assert.equal(server.isWaiting, true);
 * assert.equal(matcher.take(new Waiting(), key, 0, key.length, "client"), server);
 * assert.equal(matcher.size, 0);
 * ```
 *
 * @module
 */

import { type Mode, MODES } from "../client/protocol.ts";

/**
 * The scope of a key that is not scoped: keys are matched by their bytes
 * alone. Any other scope (a uid under `isolateUids`) is part of the key: only
 * requests with the same scope and the same bytes match.
 *
 * @example Usage
 * ```ts
 * import { Matcher, NO_SCOPE, Waiting } from "./matcher.ts";
 * import assert from "node:assert/strict";
 *
 * const key = new Uint8Array([1]);
 * const matcher = new Matcher<Waiting>();
 * matcher.take(new Waiting(), key, 0, 1, "none", 1000);
 * assert.equal(matcher.take(new Waiting(), key, 0, 1, "none", NO_SCOPE), undefined);
 * assert.equal(matcher.size, 2);
 * ```
 */
export const NO_SCOPE = -1;

/**
 * What can wait in a {@link Matcher}: the broker's connections extend it, so
 * that filing a client links the client itself rather than allocating a node.
 * Its fields belong to the matcher.
 *
 * @example Usage
 * ```ts
 * import { Matcher, Waiting } from "./matcher.ts";
 * import assert from "node:assert/strict";
 *
 * const matcher = new Matcher<Waiting>();
 * const waiting = new Waiting();
 * matcher.take(waiting, new Uint8Array([7, 8, 9]), 1, 2, "client");
 * assert.deepEqual(waiting.waitingKey, new Uint8Array([8, 9]));
 * assert.equal(waiting.waitingMode, "client");
 * assert.equal(waiting.stopWaiting(), true);
 * assert.equal(waiting.isWaiting, false);
 * ```
 */
export class Waiting {
  /** @internal The queue of its key while it waits. */
  keyQueue: KeyQueue | undefined = undefined;
  /** @internal The waiter filed just before it on the same key and mode. */
  olderOnKey: Waiting | undefined = undefined;
  /** @internal The waiter filed just after it on the same key and mode. */
  newerOnKey: Waiting | undefined = undefined;

  /** Whether it waits: false before it is filed and once matched or cancelled. */
  get isWaiting(): boolean {
    return this.keyQueue !== undefined;
  }

  /** The key it waits on, as a fresh copy (for listings, not hot paths). */
  get waitingKey(): Uint8Array | undefined {
    const queue = this.keyQueue;
    return queue?.key.slice(0, queue.length);
  }

  /** The mode it waits in. */
  get waitingMode(): Mode | undefined {
    return this.keyQueue?.table.mode;
  }

  /** Whether it is filed as a listener ({@link Matcher.listen}) rather than a one-shot request. */
  get isListening(): boolean {
    return this.keyQueue?.table.listening === true;
  }

  /** The scope of the key it waits on ({@link NO_SCOPE} if none). */
  get waitingScope(): number | undefined {
    return this.keyQueue?.scope;
  }

  /**
   * Stops waiting, e.g. because the client disconnected. Idempotent.
   *
   * @returns `true` if it was waiting, `false` if it was not.
   */
  stopWaiting(): boolean {
    if (this.keyQueue === undefined) return false;
    unlink(this);
    return true;
  }
}

/**
 * The waiters of one (key, scope, mode), oldest first, with its own copy of
 * the key: the caller's buffer is reused for the next request. Emptied queues
 * go back to their matcher's spares, store and all.
 */
class KeyQueue {
  key: Uint8Array;
  length = 0;
  scope = NO_SCOPE;
  hash = 0;
  head: Waiting | undefined = undefined;
  tail: Waiting | undefined = undefined;
  /** The next queue in the same bucket. */
  chain: KeyQueue | undefined = undefined;
  table: Table;

  constructor(capacity: number, table: Table) {
    this.key = new Uint8Array(capacity);
    this.table = table;
  }
}

/** Smallest bucket array: tables shrink back to it once their keys are gone. */
const MIN_BUCKETS = 16;
/** Smallest key store: most keys fit, so that a spare queue fits most keys. */
const MIN_KEY_CAPACITY = 64;
/**
 * Emptied queues kept for reuse: enough for every key of a busy broker's
 * pairings in flight, few enough that a flood of keys leaves little behind.
 */
const MAX_SPARE_QUEUES = 1024;

/**
 * The queues of one (socket type, mode), of one-shot requests or of
 * listeners, in a power-of-two array of buckets chained through the queues.
 */
class Table {
  readonly mode: Mode;
  /** Whether it holds listeners. */
  readonly listening: boolean;
  /** The one-shot requests of the mode it pairs with and the same type: itself for `none`. */
  peer: Table = this;
  /** The listeners of the mode it pairs with and the same type (for tables of requests). */
  peerListeners: Table = this;
  readonly spares: KeyQueue[];
  buckets: (KeyQueue | undefined)[] = emptyBuckets(MIN_BUCKETS);
  /** Its queues, i.e. distinct keys. */
  keys = 0;
  /** Its waiters. */
  count = 0;

  constructor(mode: Mode, listening: boolean, spares: KeyQueue[]) {
    this.mode = mode;
    this.listening = listening;
    this.spares = spares;
  }
}

/** The tables of one kind (requests or listeners), indexed by `type * 3 + mode`. */
function tables(listening: boolean, spares: KeyQueue[]): Table[] {
  return Array.from({ length: 9 }, (_, i) => new Table(MODES[i % 3], listening, spares));
}

function emptyBuckets(size: number): (KeyQueue | undefined)[] {
  return Array.from({ length: size }, () => undefined);
}

/** Puts `queue` at the head of its bucket's chain. */
function insertQueue(table: Table, queue: KeyQueue): void {
  const index = queue.hash & (table.buckets.length - 1);
  queue.chain = table.buckets[index];
  table.buckets[index] = queue;
}

/** Moves every queue into a fresh array of `size` buckets, rehashing it first if asked. */
function resize(table: Table, size: number, rehash?: (queue: KeyQueue) => number): void {
  const old = table.buckets;
  table.buckets = emptyBuckets(size);
  for (let i = 0; i < old.length; i++) {
    for (let queue = old[i]; queue !== undefined;) {
      const next: KeyQueue | undefined = queue.chain;
      if (rehash !== undefined) queue.hash = rehash(queue);
      insertQueue(table, queue);
      queue = next;
    }
  }
}

function removeQueue(table: Table, queue: KeyQueue): void {
  const index = queue.hash & (table.buckets.length - 1);
  let before = table.buckets[index]!;
  if (before === queue) table.buckets[index] = queue.chain;
  else {
    while (before.chain !== queue) before = before.chain!;
    before.chain = queue.chain;
  }
  queue.chain = undefined;
  table.keys--;
  if (table.spares.length < MAX_SPARE_QUEUES) table.spares.push(queue);
  // At a quarter full, halve: a flood of keys must not hold its buckets forever.
  if (table.keys * 4 < table.buckets.length && table.buckets.length > MIN_BUCKETS) {
    resize(table, table.buckets.length / 2);
  }
}

function unlink(waiting: Waiting): void {
  const queue = waiting.keyQueue!;
  const older = waiting.olderOnKey, newer = waiting.newerOnKey;
  if (older !== undefined) older.newerOnKey = newer;
  else queue.head = newer;
  if (newer !== undefined) newer.olderOnKey = older;
  else queue.tail = older;
  waiting.olderOnKey = waiting.newerOnKey = waiting.keyQueue = undefined;
  queue.table.count--;
  // Keys come and go with their clients; an emptied queue must not linger.
  if (queue.head === undefined) removeQueue(queue.table, queue);
}

function sameKey(
  queue: KeyQueue,
  bytes: Uint8Array,
  offset: number,
  length: number,
  scope: number,
): boolean {
  if (queue.length !== length || queue.scope !== scope) return false;
  const key = queue.key;
  for (let i = 0; i < length; i++) if (key[i] !== bytes[offset + i]) return false;
  return true;
}

/** The queue of `table` holding exactly this key and scope, if any. */
function find(
  table: Table,
  hash: number,
  bytes: Uint8Array,
  offset: number,
  length: number,
  scope: number,
): KeyQueue | undefined {
  let queue = table.buckets[hash & (table.buckets.length - 1)];
  while (
    queue !== undefined && !(queue.hash === hash && sameKey(queue, bytes, offset, length, scope))
  ) {
    queue = queue.chain;
  }
  return queue;
}

/** The head of a queue of listeners, moved to its tail: listeners on one key take turns. */
function takeTurn(queue: KeyQueue): Waiting {
  const head = queue.head!;
  const next = head.newerOnKey;
  if (next === undefined) return head;
  next.olderOnKey = undefined;
  queue.head = next;
  head.newerOnKey = undefined;
  head.olderOnKey = queue.tail;
  queue.tail!.newerOnKey = head;
  queue.tail = head;
  return head;
}

/**
 * How the matcher hashes a key (`length` bytes of `bytes` from `offset`) in
 * a scope under a seed of two 32-bit words, to 30 bits: {@linkcode hashKey}'s
 * shape (a test's hash may ignore any of the arguments).
 */
export type KeyHash = typeof hashKey;

const rotate = (x: number, bits: number) => (x << bits) | (x >>> (32 - bits));

// The hash state lives at module level: a closure or array per call would be
// garbage on every request, and every call runs to completion on one thread.
let v0 = 0, v1 = 0, v2 = 0, v3 = 0;

function absorb(word: number, rounds: number): void {
  v3 ^= word;
  for (let i = 0; i < rounds; i++) {
    v0 = (v0 + v1) | 0;
    v1 = rotate(v1, 5) ^ v0;
    v0 = rotate(v0, 16);
    v2 = (v2 + v3) | 0;
    v3 = rotate(v3, 8) ^ v2;
    v0 = (v0 + v3) | 0;
    v3 = rotate(v3, 7) ^ v0;
    v2 = (v2 + v1) | 0;
    v1 = rotate(v1, 13) ^ v2;
    v2 = rotate(v2, 16);
  }
  v0 ^= word;
}

/**
 * HalfSipHash (by default -1-3, the Linux kernel's `hsiphash` for hash
 * tables) of a key under the seed `(seed0, seed1)`, kept to 30 bits so that
 * V8 handles it as a small integer. A scope other than {@link NO_SCOPE} is
 * hashed as four little-endian bytes before the key. Keyed, so that clients
 * cannot choose keys that share a bucket: keys found to collide under one
 * broker's seed are unrelated under another's.
 *
 * @internal Exported for the tests, which also check the -2-4 reference vectors.
 */
export function hashKey(
  bytes: Uint8Array,
  offset: number,
  length: number,
  scope: number,
  seed0: number,
  seed1: number,
  rounds = 1,
  finalRounds = 3,
): number {
  v0 = seed0 | 0;
  v1 = seed1 | 0;
  v2 = 0x6c796765 ^ v0;
  v3 = 0x74656462 ^ v1;
  let total = length;
  if (scope !== NO_SCOPE) {
    absorb(scope | 0, rounds);
    total += 4;
  }
  const end = offset + length;
  const whole = offset + (length & ~3);
  for (let i = offset; i < whole; i += 4) {
    absorb(bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24), rounds);
  }
  let last = total << 24;
  for (let i = whole; i < end; i++) last |= bytes[i] << (8 * (i - whole));
  absorb(last, rounds);
  v2 ^= 0xff;
  // Finalization: the rounds alone, with nothing absorbed.
  absorb(0, finalRounds);
  return (v1 ^ v3) & 0x3fffffff;
}

/**
 * Distinct keys with one full hash a table may hold before the matcher picks
 * a new seed. With a secret seed and 2^30 hashes this never happens by
 * chance; reaching it means the seed has somehow been learnt, and a new one
 * ends the attack.
 */
const MAX_SAME_HASH = 8;

function randomWord(): number {
  return crypto.getRandomValues(new Int32Array(1))[0];
}

/**
 * The waiting table. Keys are compared byte for byte (same length, same
 * bytes, same scope); `none` pairs with `none`, `client` with `server`.
 * Among several compatible waiters the oldest is matched first.
 *
 * The matcher neither validates keys nor keeps the arrays it is given.
 *
 * @typeParam T What waits, e.g. the broker's connections.
 *
 * @example Usage
 * ```ts
 * import { Matcher, Waiting } from "./matcher.ts";
 * import assert from "node:assert/strict";
 *
 * const frame = new Uint8Array([0, 0, 1, 2, 3]); // the key at offset 2
 * const matcher = new Matcher<Waiting>();
 *
 * // The broker's hot path: pair with a waiting partner, or wait.
 * const server = new Waiting();
 * assert.equal(matcher.take(server, frame, 2, 3, "server"), undefined); // filed
 * const client = new Waiting();
 * assert.equal(matcher.take(client, frame, 2, 3, "client"), server); // matched
 * assert.equal(client.isWaiting, false);
 * ```
 */
export class Matcher<T extends Waiting> {
  readonly #spares: KeyQueue[] = [];
  /** One-shot requests by `type * 3 + mode`. */
  readonly #requests: Table[] = tables(false, this.#spares);
  /** Listeners by `type * 3 + mode`. */
  readonly #listeners: Table[] = tables(true, this.#spares);
  readonly #hash: KeyHash;
  #seed0 = randomWord();
  #seed1 = randomWord();
  #reseeds = 0;

  /**
   * An empty waiting table.
   *
   * @param hash The bucket hash; default {@linkcode hashKey}. Only tests
   * give another, to show what a bucket full of colliding keys does.
   */
  constructor(hash: KeyHash = hashKey) {
    this.#hash = hash;
    for (let type = 0; type < 9; type += 3) {
      // Wire mode values: 0 none, 1 client, 2 server.
      const [none, client, server] = this.#requests.slice(type, type + 3);
      const [noneListeners, clientListeners, serverListeners] = this.#listeners.slice(
        type,
        type + 3,
      );
      client.peer = server;
      server.peer = client;
      none.peerListeners = noneListeners;
      client.peerListeners = serverListeners;
      server.peerListeners = clientListeners;
      noneListeners.peer = none;
      clientListeners.peer = server;
      serverListeners.peer = client;
    }
  }

  /**
   * How often keys with one hash piled up and the matcher picked a new seed:
   * 0 unless someone found keys that collide under the secret one.
   *
   * @example Usage
   * ```ts
   * import { Matcher } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * assert.equal(new Matcher().reseeds, 0);
   * ```
   */
  get reseeds(): number {
    return this.#reseeds;
  }

  // A switch rather than an object lookup: an untyped caller's "__proto__"
  // must not reach a table.
  #table(kind: Table[], mode: Mode, type: number): Table {
    if (type !== 0 && type !== 1 && type !== 2) throw new TypeError(`invalid socket type ${type}`);
    switch (mode) {
      case "none":
        return kind[type * 3];
      case "client":
        return kind[type * 3 + 1];
      case "server":
        return kind[type * 3 + 2];
    }
    throw new TypeError(`invalid mode ${JSON.stringify(mode)}`);
  }

  /**
   * Pairs a request with a compatible listener (in turn, if several) or
   * else the oldest compatible waiting request, removing that one, or files
   * the request's `item` as waiting behind any others with the same key,
   * scope, type and mode. A listener returned stays filed, now behind the
   * other listeners of its key.
   *
   * @param item What waits if no partner does; it must not be waiting already.
   * @param bytes A buffer holding the request's key, e.g. the received frame; not retained.
   * @param offset Where in `bytes` the key starts.
   * @param length The key's length in bytes.
   * @param mode The request's mode; waiters in its peer mode match.
   * @param scope The key's scope (a uid, say); default {@link NO_SCOPE}.
   * @param type The socket type's wire value (0 stream, 1 seqpacket, 2 dgram); default 0.
   * @returns The partner (no longer waiting, unless it is a listener); or
   * `undefined`, and `item` waits.
   *
   * @example Usage
   * ```ts
   * import { Matcher, Waiting } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const key = new Uint8Array([9]);
   * const matcher = new Matcher<Waiting>();
   * const first = new Waiting();
   * assert.equal(matcher.take(first, key, 0, 1, "none"), undefined);
   * assert.equal(matcher.take(new Waiting(), key, 0, 1, "none"), first);
   * ```
   */
  take(
    item: T,
    bytes: Uint8Array,
    offset: number,
    length: number,
    mode: Mode,
    scope: number = NO_SCOPE,
    type = 0,
  ): T | undefined {
    if (item.keyQueue !== undefined) throw new Error("take: this item is already waiting");
    const own = this.#table(this.#requests, mode, type);
    const hash = this.#hash(bytes, offset, length, scope, this.#seed0, this.#seed1);
    if (own.peerListeners.count > 0) {
      const queue = find(own.peerListeners, hash, bytes, offset, length, scope);
      if (queue !== undefined) return takeTurn(queue) as T;
    }
    const queue = find(own.peer, hash, bytes, offset, length, scope);
    if (queue !== undefined) {
      const partner = queue.head!;
      unlink(partner);
      return partner as T;
    }
    this.#file(own, item, bytes, offset, length, scope, hash);
    return undefined;
  }

  /**
   * The oldest one-shot request a listener with this key, mode, scope and
   * type would serve, left filed: the caller delivers it first, then
   * {@link Waiting.stopWaiting stops} its wait (closing it does), so that a
   * delivery that fails on the listener's side loses the request nothing.
   *
   * @param bytes A buffer holding the listener's key; not retained.
   * @param offset Where in `bytes` the key starts.
   * @param length The key's length in bytes.
   * @param mode The listener's mode; requests in its peer mode match.
   * @param scope The key's scope; default {@link NO_SCOPE}.
   * @param type The socket type's wire value; default 0.
   * @returns The request, still waiting, or `undefined`.
   *
   * @example Usage
   * ```ts
   * import { Matcher, Waiting } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const key = new Uint8Array([1, 2]);
   * const matcher = new Matcher<Waiting>();
   * const client = new Waiting();
   * matcher.take(client, key, 0, 2, "client");
   * assert.equal(matcher.oldestRequest(key, 0, 2, "server"), client);
   * client.stopWaiting();
   * assert.equal(matcher.oldestRequest(key, 0, 2, "server"), undefined);
   * ```
   */
  oldestRequest(
    bytes: Uint8Array,
    offset: number,
    length: number,
    mode: Mode,
    scope: number = NO_SCOPE,
    type = 0,
  ): T | undefined {
    const peers = this.#table(this.#listeners, mode, type).peer;
    const hash = this.#hash(bytes, offset, length, scope, this.#seed0, this.#seed1);
    return find(peers, hash, bytes, offset, length, scope)?.head as T | undefined;
  }

  /**
   * Files `item` as a listener on a key: {@link take} then hands it
   * compatible requests, in turn with the key's other listeners, until it
   * {@link Waiting.stopWaiting stops}. Requests already waiting are not
   * matched here: serve them from {@link oldestRequest} first.
   *
   * @param item The listener; it must not be filed already.
   * @param bytes A buffer holding the key; not retained.
   * @param offset Where in `bytes` the key starts.
   * @param length The key's length in bytes.
   * @param mode The listener's mode; requests in its peer mode match.
   * @param scope The key's scope; default {@link NO_SCOPE}.
   * @param type The socket type's wire value; default 0.
   *
   * @example Usage
   * ```ts
   * import { Matcher, Waiting } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const key = new Uint8Array([5]);
   * const matcher = new Matcher<Waiting>();
   * const listener = new Waiting();
   * matcher.listen(listener, key, 0, 1, "server");
   * assert.equal(matcher.take(new Waiting(), key, 0, 1, "client"), listener);
   * assert.equal(matcher.take(new Waiting(), key, 0, 1, "client"), listener);
   * assert.equal(listener.isListening, true);
   * ```
   */
  listen(
    item: T,
    bytes: Uint8Array,
    offset: number,
    length: number,
    mode: Mode,
    scope: number = NO_SCOPE,
    type = 0,
  ): void {
    if (item.keyQueue !== undefined) throw new Error("listen: this item is already filed");
    const table = this.#table(this.#listeners, mode, type);
    const hash = this.#hash(bytes, offset, length, scope, this.#seed0, this.#seed1);
    this.#file(table, item, bytes, offset, length, scope, hash);
  }

  #file(
    table: Table,
    item: Waiting,
    bytes: Uint8Array,
    offset: number,
    length: number,
    scope: number,
    hash: number,
  ): void {
    let sameHash = 0;
    let queue = table.buckets[hash & (table.buckets.length - 1)];
    for (; queue !== undefined; queue = queue.chain) {
      if (queue.hash !== hash) continue;
      if (sameKey(queue, bytes, offset, length, scope)) break;
      sameHash++;
    }
    if (queue === undefined) {
      queue = this.#newQueue(table, bytes, offset, length, scope, hash);
      if (sameHash >= MAX_SAME_HASH) this.#reseed();
    }
    item.keyQueue = queue;
    const tail = queue.tail;
    item.olderOnKey = tail;
    if (tail !== undefined) tail.newerOnKey = item;
    else queue.head = item;
    queue.tail = item;
    table.count++;
  }

  #newQueue(
    table: Table,
    bytes: Uint8Array,
    offset: number,
    length: number,
    scope: number,
    hash: number,
  ): KeyQueue {
    let queue = this.#spares.pop();
    if (queue === undefined || queue.key.length < length) {
      queue = new KeyQueue(Math.max(MIN_KEY_CAPACITY, length), table);
    }
    queue.table = table;
    const key = queue.key;
    for (let i = 0; i < length; i++) key[i] = bytes[offset + i];
    queue.length = length;
    queue.scope = scope;
    queue.hash = hash;
    table.keys++;
    // At one key per bucket, double: chains stay about one long.
    if (table.keys > table.buckets.length) resize(table, table.buckets.length * 2);
    insertQueue(table, queue);
    return queue;
  }

  /** Rehashes every queue under a new seed: linear in the keys, and never by chance. */
  #reseed(): void {
    this.#seed0 = randomWord();
    this.#seed1 = randomWord();
    this.#reseeds++;
    const rehash = (queue: KeyQueue) =>
      this.#hash(queue.key, 0, queue.length, queue.scope, this.#seed0, this.#seed1);
    for (const table of [...this.#requests, ...this.#listeners]) {
      resize(table, table.buckets.length, rehash);
    }
  }

  /**
   * How many one-shot requests wait, in all modes and types (listeners not
   * counted: see {@link listeners}).
   *
   * @example Usage
   * ```ts
   * import { Matcher } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * assert.equal(new Matcher().size, 0);
   * ```
   */
  get size(): number {
    let count = 0;
    for (const table of this.#requests) count += table.count;
    return count;
  }

  /**
   * How many listeners are filed (with credit to take a request).
   *
   * @example Usage
   * ```ts
   * import { Matcher, Waiting } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<Waiting>();
   * matcher.listen(new Waiting(), new Uint8Array([1]), 0, 1, "server");
   * assert.equal(matcher.listeners, 1);
   * assert.equal(matcher.size, 0);
   * ```
   */
  get listeners(): number {
    let count = 0;
    for (const table of this.#listeners) count += table.count;
    return count;
  }

  /**
   * How many distinct (key, scope, type, mode) have waiting requests: an
   * emptied key is forgotten at once.
   *
   * @example Usage
   * ```ts
   * import { Matcher, Waiting } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<Waiting>();
   * const waiting = new Waiting();
   * matcher.take(waiting, new Uint8Array([1]), 0, 1, "none");
   * assert.equal(matcher.keys, 1);
   * waiting.stopWaiting();
   * assert.equal(matcher.keys, 0);
   * ```
   */
  get keys(): number {
    let count = 0;
    for (const table of this.#requests) count += table.keys;
    return count;
  }

  /**
   * How many one-shot requests wait in each mode, all types together.
   *
   * @returns A fresh record with a count for every mode.
   *
   * @example Usage
   * ```ts
   * import { Matcher, Waiting } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<Waiting>();
   * matcher.take(new Waiting(), new Uint8Array([1]), 0, 1, "server");
   * assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 1 });
   * ```
   */
  countByMode(): Record<Mode, number> {
    const counts = { none: 0, client: 0, server: 0 };
    for (const table of this.#requests) counts[table.mode] += table.count;
    return counts;
  }
}
