/**
 * The broker's waiting table: clients that sent a `GET_PAIR` and wait for a
 * partner with the same key and a compatible mode.
 *
 * Every operation takes constant time however many clients wait (the C
 * broker scans them all), waiters with the same key and mode are served
 * oldest first, and a waiter that disconnects is removed in constant time.
 *
 * @example Usage
 * ```ts
 * import { Matcher } from "./matcher.ts";
 * import assert from "node:assert/strict";
 *
 * const key = new TextEncoder().encode("vhost-user-1");
 * const matcher = new Matcher<string>();
 * assert.equal(matcher.match(key, "client"), undefined);
 * matcher.wait(key, "server", "connection 1");
 * assert.equal(matcher.match(key, "client"), "connection 1");
 * assert.equal(matcher.size, 0);
 * ```
 *
 * @module
 */

import { type Mode, peerMode } from "../client/protocol.ts";

/**
 * One filed client: what {@linkcode Matcher.wait} and
 * {@linkcode Matcher.take} return, and what iterating a matcher yields.
 *
 * @example Usage
 * ```ts
 * import { Matcher } from "./matcher.ts";
 * import assert from "node:assert/strict";
 *
 * const matcher = new Matcher<number>();
 * const waiter = matcher.wait(new Uint8Array([1]), "none", 42);
 * assert.equal(waiter.item, 42);
 * assert.equal(waiter.mode, "none");
 * assert.deepEqual(waiter.key, new Uint8Array([1]));
 * assert.equal(waiter.cancel(), true);
 * assert.equal(waiter.waiting, false);
 * ```
 */
export interface Waiter<T> {
  /** What was filed, e.g. the client's connection. */
  readonly item: T;
  /** The key it waits on: a fresh copy on every read, for listings rather than hot paths. */
  readonly key: Uint8Array;
  /** The mode it waits in. */
  readonly mode: Mode;
  /** Whether it still waits: false once matched or cancelled. */
  readonly waiting: boolean;
  /**
   * Stops waiting, e.g. because the client disconnected. Idempotent.
   *
   * @returns `true` if it was still waiting, `false` if it had already been
   * matched or cancelled.
   */
  cancel(): boolean;
}

// One per mode; `count` spares `size` a walk over the keys. Buckets are keyed
// by a hash of the key bytes: a small integer hashes and compares far faster
// than a string built per request. Keys that collide share a bucket's chain,
// which the keyed hash keeps short whatever keys clients choose.
interface Table<T> {
  readonly mode: Mode;
  readonly buckets: Map<number, Queue<T>>;
  count: number;
}

// The FIFO of one (key, mode). It keeps its own copy of the key, one char per
// byte: a V8 one-byte string costs a few dozen bytes where a typed array copy
// costs an ArrayBuffer, a malloc'd store and GC bookkeeping. Being a copy, it
// never retains the caller's (possibly much larger) frame buffer.
class Queue<T> {
  head: Entry<T> | undefined = undefined;
  tail: Entry<T> | undefined = undefined;
  /** The next queue in the same bucket (another key with the same hash). */
  chain: Queue<T> | undefined = undefined;
  constructor(readonly key: string, public hash: number, readonly table: Table<T>) {}
}

// A node of the intrusive list: the only allocation per waiter besides its
// key's queue, with no closures, so a waiting client costs a few dozen bytes
// here.
class Entry<T> implements Waiter<T> {
  prev: Entry<T> | undefined = undefined;
  next: Entry<T> | undefined = undefined;
  waiting = true;
  constructor(readonly item: T, readonly queue: Queue<T>) {}

  get key(): Uint8Array {
    return byteArray(this.queue.key);
  }

  get mode(): Mode {
    return this.queue.table.mode;
  }

  cancel(): boolean {
    if (!this.waiting) return false;
    unlink(this);
    return true;
  }
}

function unlink<T>(entry: Entry<T>): void {
  const queue = entry.queue;
  if (entry.prev) entry.prev.next = entry.next;
  else queue.head = entry.next;
  if (entry.next) entry.next.prev = entry.prev;
  else queue.tail = entry.prev;
  entry.prev = entry.next = undefined;
  entry.waiting = false;
  queue.table.count--;
  // Keys come and go with their clients; an emptied queue must not linger.
  if (queue.head === undefined) removeQueue(queue);
}

function removeQueue<T>(queue: Queue<T>): void {
  const buckets = queue.table.buckets;
  const first = buckets.get(queue.hash)!;
  if (first === queue) {
    if (queue.chain) buckets.set(queue.hash, queue.chain);
    else buckets.delete(queue.hash);
    return;
  }
  let before = first;
  while (before.chain !== queue) before = before.chain!;
  before.chain = queue.chain;
}

/** A hash key: two 32-bit words, secret to the process. */
export type HashSeed = readonly [number, number];

/** How the matcher hashes a key under a seed to a 30-bit bucket number. */
export type KeyHash = (key: Uint8Array, seed: HashSeed) => number;

/** A fresh secret seed from the system's random source. */
export function randomSeed(): HashSeed {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return [words[0], words[1]];
}

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
 * tables) of `key` under `seed`, kept to 30 bits so that V8 handles it as a
 * small integer. Keyed, so that clients cannot choose keys that share a
 * bucket: keys found to collide under one broker's seed are unrelated under
 * another's.
 *
 * @internal Exported for the tests, which also check the -2-4 reference vectors.
 */
export function hashKey(key: Uint8Array, seed: HashSeed, rounds = 1, finalRounds = 3): number {
  v0 = seed[0] | 0;
  v1 = seed[1] | 0;
  v2 = 0x6c796765 ^ v0;
  v3 = 0x74656462 ^ v1;
  const length = key.length;
  const whole = length & ~3;
  for (let i = 0; i < whole; i += 4) {
    absorb(key[i] | (key[i + 1] << 8) | (key[i + 2] << 16) | (key[i + 3] << 24), rounds);
  }
  let last = length << 24;
  for (let i = whole; i < length; i++) last |= key[i] << (8 * (i - whole));
  absorb(last, rounds);
  v2 ^= 0xff;
  // Finalization: the rounds alone, with nothing absorbed.
  absorb(0, finalRounds);
  return (v1 ^ v3) & 0x3fffffff;
}

/**
 * Distinct keys one bucket may hold before the matcher picks a new seed. With
 * a secret seed and 2^30 buckets this never happens by chance; reaching it
 * means the seed has somehow been learnt, and a new one ends the attack.
 */
const MAX_CHAIN = 8;

function sameBytes(filed: string, key: Uint8Array): boolean {
  if (filed.length !== key.length) return false;
  for (let i = 0; i < key.length; i++) if (filed.charCodeAt(i) !== key[i]) return false;
  return true;
}

// Chunks keep the argument count well inside engine limits for 1024-byte keys.
function byteString(key: Uint8Array): string {
  let text = "";
  for (let i = 0; i < key.length; i += 256) {
    text += String.fromCharCode.apply(null, key.subarray(i, i + 256) as unknown as number[]);
  }
  return text;
}

/** The bytes of a one-byte-per-char key string. */
function byteArray(key: string): Uint8Array {
  const bytes = new Uint8Array(key.length);
  for (let i = 0; i < key.length; i++) bytes[i] = key.charCodeAt(i);
  return bytes;
}

function* queuesOf<T>(table: Table<T>): Generator<Queue<T>> {
  for (const first of table.buckets.values()) {
    for (let queue: Queue<T> | undefined = first; queue; queue = queue.chain) yield queue;
  }
}

/** The queue of exactly `key` in `table`, if anyone waits on it. */
function findQueue<T>(table: Table<T>, key: Uint8Array, hash: number): Queue<T> | undefined {
  let queue = table.buckets.get(hash);
  while (queue !== undefined && !sameBytes(queue.key, key)) queue = queue.chain;
  return queue;
}

function chainLength<T>(queue: Queue<T> | undefined): number {
  let length = 0;
  for (; queue !== undefined; queue = queue.chain) length++;
  return length;
}

/** Puts `queue` at the head of its bucket's chain. */
function insertQueue<T>(queue: Queue<T>): void {
  const buckets = queue.table.buckets;
  queue.chain = buckets.get(queue.hash);
  buckets.set(queue.hash, queue);
}

/**
 * The waiting table. Keys are compared byte for byte (same length, same
 * bytes); `none` pairs with `none`, `client` with `server`. Among several
 * compatible waiters the oldest is matched first.
 *
 * The matcher neither validates keys nor keeps the arrays it is given.
 *
 * @typeParam T What is filed per client, e.g. its connection.
 *
 * @example Usage
 * ```ts
 * import { Matcher } from "./matcher.ts";
 * import assert from "node:assert/strict";
 *
 * const key = new Uint8Array([1, 2, 3]);
 * const matcher = new Matcher<string>();
 *
 * // The broker's hot path: pair with a waiting partner, or wait.
 * const first = matcher.take(key, "server", "server conn");
 * assert.equal(first.waiting, true); // filed: keep it to cancel on disconnect
 * const second = matcher.take(key, "client", "client conn");
 * assert.equal(second.waiting, false); // matched: this is the partner
 * assert.equal(second.item, "server conn");
 * ```
 */
export class Matcher<T> {
  #none: Table<T> = { mode: "none", buckets: new Map(), count: 0 };
  #client: Table<T> = { mode: "client", buckets: new Map(), count: 0 };
  #server: Table<T> = { mode: "server", buckets: new Map(), count: 0 };
  #seed: HashSeed = randomSeed();
  readonly #hash: KeyHash;
  #reseeds = 0;

  /**
   * An empty waiting table.
   *
   * @param hash The bucket hash; default {@linkcode hashKey}. Only tests
   * give another, to show what a bucket full of colliding keys does.
   */
  constructor(hash: KeyHash = hashKey) {
    this.#hash = hash;
  }

  /**
   * How often a bucket grew past its bound and the matcher picked a new
   * seed: 0 unless someone found keys that collide under the secret one.
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
  #table(mode: Mode): Table<T> {
    switch (mode) {
      case "none":
        return this.#none;
      case "client":
        return this.#client;
      case "server":
        return this.#server;
    }
    throw new TypeError(`invalid mode ${JSON.stringify(mode)}`);
  }

  #shift(key: Uint8Array, hash: number, mode: Mode): Entry<T> | undefined {
    // Checked first because peerMode() maps any unknown mode to "none".
    const own = this.#table(mode);
    const entry = findQueue(this.#table(peerMode(own.mode)), key, hash)?.head;
    if (entry) unlink(entry);
    return entry;
  }

  #file(key: Uint8Array, hash: number, mode: Mode, item: T): Entry<T> {
    const table = this.#table(mode);
    let queue = findQueue(table, key, hash);
    if (queue === undefined) {
      queue = new Queue(byteString(key), hash, table);
      const full = chainLength(table.buckets.get(hash)) >= MAX_CHAIN;
      insertQueue(queue);
      if (full) this.#reseed();
    }
    const entry = new Entry(item, queue);
    if (queue.tail) {
      entry.prev = queue.tail;
      queue.tail.next = entry;
    } else {
      queue.head = entry;
    }
    queue.tail = entry;
    table.count++;
    return entry;
  }

  /** Rehashes every queue under a new seed: linear in the keys, and never by chance. */
  #reseed(): void {
    this.#seed = randomSeed();
    this.#reseeds++;
    for (const table of [this.#none, this.#client, this.#server]) {
      const queues = [...queuesOf(table)];
      table.buckets.clear();
      for (const queue of queues) {
        queue.hash = this.#hash(byteArray(queue.key), this.#seed);
        insertQueue(queue);
      }
    }
  }

  /**
   * Removes and returns the oldest waiter compatible with a request.
   *
   * @param key The request's key.
   * @param mode The request's mode; waiters in {@linkcode peerMode}`(mode)` match.
   * @returns The partner's item, or `undefined` if no one compatible waits.
   *
   * @example Usage
   * ```ts
   * import { Matcher } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<string>();
   * matcher.wait(new Uint8Array([1]), "client", "c");
   * assert.equal(matcher.match(new Uint8Array([1]), "client"), undefined);
   * assert.equal(matcher.match(new Uint8Array([1]), "server"), "c");
   * ```
   */
  match(key: Uint8Array, mode: Mode): T | undefined {
    return this.#shift(key, this.#hash(key, this.#seed), mode)?.item;
  }

  /**
   * Files a request as waiting, behind any others with the same key and mode.
   * It does not look for a partner; see {@linkcode Matcher.take}.
   *
   * @param key The request's key; not retained.
   * @param mode The request's mode.
   * @param item What to hand out when it is matched.
   * @returns Its handle, to cancel it when the client goes away.
   *
   * @example Usage
   * ```ts
   * import { Matcher } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<string>();
   * const waiter = matcher.wait(new Uint8Array([1]), "none", "n");
   * assert.equal(matcher.size, 1);
   * waiter.cancel();
   * assert.equal(matcher.size, 0);
   * ```
   */
  wait(key: Uint8Array, mode: Mode, item: T): Waiter<T> {
    return this.#file(key, this.#hash(key, this.#seed), mode, item);
  }

  /**
   * {@linkcode Matcher.match} and, failing that, {@linkcode Matcher.wait} in
   * one step, converting the key once.
   *
   * @param key The request's key; not retained.
   * @param mode The request's mode.
   * @param item What to file if no partner waits.
   * @returns If a partner waited: the partner's handle, now removed (its
   * `waiting` is `false`; its `item` is the partner). Otherwise: the new
   * handle of `item`, filed (its `waiting` is `true`).
   *
   * @example Usage
   * ```ts
   * import { Matcher } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<string>();
   * const key = new Uint8Array([9]);
   * assert.equal(matcher.take(key, "none", "first").waiting, true);
   * const partner = matcher.take(key, "none", "second");
   * assert.equal(partner.waiting, false);
   * assert.equal(partner.item, "first");
   * ```
   */
  take(key: Uint8Array, mode: Mode, item: T): Waiter<T> {
    const hash = this.#hash(key, this.#seed);
    return this.#shift(key, hash, mode) ?? this.#file(key, hash, mode, item);
  }

  /**
   * How many requests wait, in all modes.
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
    return this.#none.count + this.#client.count + this.#server.count;
  }

  /**
   * How many requests wait in each mode.
   *
   * @returns A fresh record with a count for every mode.
   *
   * @example Usage
   * ```ts
   * import { Matcher } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<number>();
   * matcher.wait(new Uint8Array([1]), "server", 1);
   * assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 1 });
   * ```
   */
  countByMode(): Record<Mode, number> {
    return { none: this.#none.count, client: this.#client.count, server: this.#server.count };
  }

  /**
   * Lists the waiting requests: by mode (none, client, server), then key by
   * key (in no promised order), then oldest first within a key. The list is taken when
   * iteration starts; waiters matched or cancelled meanwhile are skipped.
   *
   * @returns The waiters' handles.
   *
   * @example Usage
   * ```ts
   * import { Matcher } from "./matcher.ts";
   * import assert from "node:assert/strict";
   *
   * const matcher = new Matcher<string>();
   * matcher.wait(new Uint8Array([1]), "client", "a");
   * matcher.wait(new Uint8Array([2]), "none", "b");
   * assert.deepEqual([...matcher].map((w) => w.item), ["b", "a"]);
   * ```
   */
  *[Symbol.iterator](): IterableIterator<Waiter<T>> {
    // A snapshot, so that the caller may cancel waiters while listing them
    // without breaking the walk along the links.
    const entries: Entry<T>[] = [];
    for (const table of [this.#none, this.#client, this.#server]) {
      for (const queue of queuesOf(table)) {
        for (let e = queue.head; e; e = e.next) entries.push(e);
      }
    }
    for (const entry of entries) if (entry.waiting) yield entry;
  }
}
