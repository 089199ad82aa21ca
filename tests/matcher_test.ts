import assert from "node:assert/strict";
import { hashKey, type HashSeed, Matcher, randomSeed } from "../broker/matcher.ts";
import type { Mode } from "../client/protocol.ts";
import { fnv1a, fnvMulticollision } from "./collisions.ts";

const bytes = (s: string) => new TextEncoder().encode(s);
const KEY = bytes("vhost-user-1");

Deno.test("none matches none", () => {
  const matcher = new Matcher<string>();
  assert.equal(matcher.match(KEY, "none"), undefined);
  matcher.wait(KEY, "none", "first");
  assert.equal(matcher.match(KEY, "none"), "first");
  assert.equal(matcher.size, 0);
});

Deno.test("none never matches client or server, nor they none", () => {
  const matcher = new Matcher<string>();
  matcher.wait(KEY, "none", "n");
  assert.equal(matcher.match(KEY, "client"), undefined);
  assert.equal(matcher.match(KEY, "server"), undefined);
  matcher.wait(KEY, "client", "c");
  matcher.wait(KEY, "server", "s");
  // The client and server waiting side by side shows wait() never pairs.
  assert.equal(matcher.size, 3);
  assert.equal(matcher.match(KEY, "none"), "n");
  assert.equal(matcher.match(KEY, "none"), undefined);
});

Deno.test("a waiting client matches an arriving server", () => {
  const matcher = new Matcher<string>();
  matcher.wait(KEY, "client", "c");
  assert.equal(matcher.match(KEY, "server"), "c");
  assert.equal(matcher.size, 0);
});

Deno.test("a waiting server matches an arriving client", () => {
  const matcher = new Matcher<string>();
  matcher.wait(KEY, "server", "s");
  assert.equal(matcher.match(KEY, "client"), "s");
  assert.equal(matcher.size, 0);
});

Deno.test("two clients never match, nor two servers", () => {
  for (const mode of ["client", "server"] as const) {
    const matcher = new Matcher<string>();
    assert.equal(matcher.take(KEY, mode, "a").waiting, true);
    assert.equal(matcher.take(KEY, mode, "b").waiting, true);
    assert.equal(matcher.match(KEY, mode), undefined);
    assert.equal(matcher.size, 2);
  }
});

Deno.test("different keys never match, including different lengths", () => {
  const pairs: [Uint8Array, Uint8Array][] = [
    [bytes("a"), bytes("b")],
    [bytes("a"), bytes("a\0")],
    [bytes("a\0"), bytes("a")],
    [bytes("\0"), bytes("\0\0")],
    [bytes("vhost-user-1"), bytes("vhost-user-10")],
    [new Uint8Array([0x80]), new Uint8Array([0xc2, 0x80])],
    [new Uint8Array([0xff]), bytes("ÿ")],
  ];
  for (const [waiting, arriving] of pairs) {
    const matcher = new Matcher<string>();
    matcher.wait(waiting, "server", "s");
    assert.equal(matcher.match(arriving, "client"), undefined, `${waiting} vs ${arriving}`);
    assert.equal(matcher.match(waiting, "client"), "s");
  }
});

Deno.test("equal keys match whatever array or offset holds them", () => {
  const matcher = new Matcher<string>();
  const frame = new Uint8Array(1044).fill(0xee);
  frame.set([0, 1, 2, 0], 16);
  matcher.wait(frame.subarray(16, 20), "none", "framed");
  assert.equal(matcher.match(new Uint8Array([0, 1, 2, 0]), "none"), "framed");
});

Deno.test("the matcher does not keep the key array it was given", () => {
  const matcher = new Matcher<string>();
  const key = bytes("abc");
  const waiter = matcher.wait(key, "none", "w");
  key.fill(0x7a);
  assert.deepEqual(waiter.key, bytes("abc"));
  assert.equal(matcher.match(key, "none"), undefined);
  assert.equal(matcher.match(bytes("abc"), "none"), "w");
});

Deno.test("long binary keys compare on every byte, including beyond 4096", () => {
  const matcher = new Matcher<number>();
  const a = new Uint8Array(10_000).map((_, i) => i & 0xff);
  const b = a.slice();
  b[9_999] ^= 1;
  matcher.wait(a, "server", 1);
  assert.equal(matcher.match(b, "client"), undefined);
  assert.equal(matcher.match(a.slice(), "client"), 1);
});

Deno.test("several waiters on one key and mode are served oldest first", () => {
  const matcher = new Matcher<string>();
  matcher.wait(KEY, "server", "s1");
  matcher.wait(KEY, "server", "s2");
  matcher.wait(KEY, "server", "s3");
  assert.equal(matcher.match(KEY, "client"), "s1");
  assert.equal(matcher.match(KEY, "client"), "s2");
  assert.equal(matcher.match(KEY, "client"), "s3");
  assert.equal(matcher.match(KEY, "client"), undefined);
});

Deno.test("cancel removes a waiter from the middle of a FIFO, once", () => {
  const matcher = new Matcher<string>();
  const w1 = matcher.wait(KEY, "none", "n1");
  const w2 = matcher.wait(KEY, "none", "n2");
  const w3 = matcher.wait(KEY, "none", "n3");
  assert.equal(w2.waiting, true);
  assert.equal(w2.cancel(), true);
  assert.equal(w2.waiting, false);
  assert.equal(w2.cancel(), false);
  assert.equal(matcher.size, 2);
  assert.equal(matcher.match(KEY, "none"), "n1");
  assert.equal(w1.waiting, false);
  assert.equal(w1.cancel(), false, "a matched waiter can no longer be cancelled");
  assert.equal(w3.waiting, true);
  assert.equal(matcher.match(KEY, "none"), "n3");
  assert.equal(matcher.match(KEY, "none"), undefined);
  assert.equal(matcher.size, 0);
});

Deno.test("cancelling the head and the tail keeps the FIFO linked", () => {
  const matcher = new Matcher<number>();
  const waiters = [1, 2, 3, 4].map((n) => matcher.wait(KEY, "client", n));
  assert.equal(waiters[0].cancel(), true);
  assert.equal(waiters[3].cancel(), true);
  matcher.wait(KEY, "client", 5);
  assert.deepEqual([...matcher].map((w) => w.item), [2, 3, 5]);
  assert.equal(matcher.match(KEY, "server"), 2);
  assert.equal(matcher.match(KEY, "server"), 3);
  assert.equal(matcher.match(KEY, "server"), 5);
  assert.equal(matcher.size, 0);
});

Deno.test("take pairs with a waiting partner or files the newcomer", () => {
  const matcher = new Matcher<string>();
  const filed = matcher.take(KEY, "server", "s");
  assert.equal(filed.waiting, true);
  assert.equal(filed.item, "s");
  assert.equal(matcher.take(KEY, "server", "s2").waiting, true);
  const partner = matcher.take(KEY, "client", "c");
  assert.equal(partner.waiting, false);
  assert.equal(partner.item, "s");
  assert.equal(partner, filed);
  assert.equal(filed.cancel(), false);
  assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 1 });
});

Deno.test("size and countByMode follow waits, matches and cancels", () => {
  const matcher = new Matcher<number>();
  assert.equal(matcher.size, 0);
  assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 0 });
  matcher.wait(bytes("a"), "none", 1);
  matcher.wait(bytes("b"), "none", 2);
  const c = matcher.wait(bytes("a"), "client", 3);
  matcher.wait(bytes("a"), "server", 4);
  matcher.wait(bytes("c"), "server", 5);
  assert.equal(matcher.size, 5);
  assert.deepEqual(matcher.countByMode(), { none: 2, client: 1, server: 2 });
  c.cancel();
  c.cancel();
  matcher.match(bytes("a"), "client");
  matcher.match(bytes("b"), "none");
  assert.equal(matcher.size, 2);
  assert.deepEqual(matcher.countByMode(), { none: 1, client: 0, server: 1 });
  const counts = matcher.countByMode();
  counts.none = 99;
  assert.equal(matcher.countByMode().none, 1, "countByMode returns a copy");
});

Deno.test("iterating lists item, key and mode of every waiter", () => {
  const matcher = new Matcher<string>();
  matcher.wait(bytes("k1"), "server", "s");
  matcher.wait(new Uint8Array([0, 0xff]), "client", "c");
  matcher.wait(bytes("k1"), "none", "n1");
  matcher.wait(bytes("k2"), "none", "n2");
  matcher.wait(bytes("k1"), "none", "n3");
  const listed = [...matcher].map(({ item, key, mode }) => ({ item, key: [...key], mode }));
  assert.deepEqual(listed, [
    { item: "n1", key: [...bytes("k1")], mode: "none" },
    { item: "n3", key: [...bytes("k1")], mode: "none" },
    { item: "n2", key: [...bytes("k2")], mode: "none" },
    { item: "c", key: [0, 0xff], mode: "client" },
    { item: "s", key: [...bytes("k1")], mode: "server" },
  ]);
});

Deno.test("waiters may be cancelled while iterating", () => {
  const matcher = new Matcher<number>();
  for (let i = 0; i < 10; i++) matcher.wait(KEY, "server", i);
  const seen: number[] = [];
  for (const waiter of matcher) {
    seen.push(waiter.item);
    waiter.cancel();
    // Cancelling the next one as well must not end or derail the walk.
    [...matcher].find((w) => w.item === waiter.item + 1)?.cancel();
  }
  assert.deepEqual(seen, [0, 2, 4, 6, 8]);
  assert.equal(matcher.size, 0);
});

Deno.test("an emptied key is removed, not left behind", () => {
  const matcher = new Matcher<string>();
  const a = matcher.wait(bytes("a"), "none", "a1");
  matcher.wait(bytes("b"), "none", "b1");
  a.cancel();
  matcher.wait(bytes("a"), "none", "a2");
  // Listing follows first arrival per key: "a" behind "b" shows its old entry went.
  assert.deepEqual([...matcher].map((w) => w.item), ["b1", "a2"]);
  matcher.match(bytes("b"), "none");
  matcher.wait(bytes("b"), "none", "b2");
  assert.deepEqual([...matcher].map((w) => w.item), ["a2", "b2"]);
});

Deno.test("size returns to 0 after many waits and cancels", () => {
  const matcher = new Matcher<number>();
  const modes: Mode[] = ["none", "client", "server"];
  for (let round = 0; round < 20; round++) {
    const waiters = [];
    for (let i = 0; i < 1000; i++) {
      waiters.push(matcher.wait(bytes(`key-${i % 50}`), modes[i % 3], i));
    }
    assert.equal(matcher.size, 1000);
    // Cancel in an order unlike filing, to hit heads, middles and tails.
    for (let i = 0; i < 1000; i++) assert.equal(waiters[(i * 7) % 1000].cancel(), true);
    assert.equal(matcher.size, 0);
  }
  assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 0 });
  assert.deepEqual([...matcher], []);
});

Deno.test("invalid modes from untyped callers are refused", () => {
  const matcher = new Matcher<number>();
  for (const mode of ["both", "__proto__", "toString"]) {
    assert.throws(() => matcher.wait(KEY, mode as Mode, 1), TypeError);
    assert.throws(() => matcher.match(KEY, mode as Mode), TypeError);
  }
  assert.equal(matcher.size, 0);
});

Deno.test("100,000 distinct waiting keys are filed and matched", () => {
  const matcher = new Matcher<number>();
  const n = 100_000;
  const key = (i: number) => bytes(`pair-${i}`);
  for (let i = 0; i < n; i++) matcher.wait(key(i), i % 2 ? "client" : "server", i);
  assert.equal(matcher.size, n);
  assert.deepEqual(matcher.countByMode(), { none: 0, client: n / 2, server: n / 2 });
  // Match in an order unrelated to filing.
  for (let j = 0; j < n; j++) {
    const i = (j * 7919) % n;
    assert.equal(matcher.match(key(i), i % 2 ? "server" : "client"), i);
  }
  assert.equal(matcher.size, 0);
  assert.deepEqual([...matcher], []);
});

Deno.test("keys whose hashes collide stay apart, and a shared bucket empties cleanly", () => {
  // A hash that puts every key of one length in one bucket.
  const matcher = new Matcher<string>((key) => key.length);
  const [a, b] = [bytes("key-a"), bytes("key-b")];
  const waitingA = matcher.wait(a, "server", "a");
  matcher.wait(b, "server", "b");
  matcher.wait(a, "server", "a2");
  assert.equal(matcher.match(b, "client"), "b", "one bucket, two keys: each finds only its own");
  assert.equal(matcher.match(b, "client"), undefined);
  assert.equal(waitingA.cancel(), true);
  assert.equal(matcher.match(a, "client"), "a2");
  assert.equal(matcher.size, 0);
  // Both orders of filing, and removal of the first queue in the chain.
  matcher.wait(b, "none", "b");
  matcher.wait(a, "none", "a");
  assert.equal(matcher.match(b, "none"), "b");
  assert.equal(matcher.match(a, "none"), "a");
  assert.deepEqual([...matcher], []);
  assert.equal(matcher.reseeds, 0);
});

Deno.test("the bucket hash is HalfSipHash: the reference vectors of HalfSipHash-2-4", () => {
  // From the reference implementation: key bytes 0..7, message bytes 0..n-1.
  const expected = [0x5b9f35a9, 0xb85a4727, 0x03a662fa, 0x04e7fe8a, 0x89466e2a, 0x69b6fac5];
  const seed: HashSeed = [0x03020100, 0x07060504];
  expected.forEach((value, n) => {
    const message = Uint8Array.from({ length: n }, (_, i) => i);
    assert.equal(hashKey(message, seed, 2, 4), value & 0x3fffffff, `${n} bytes`);
  });
});

Deno.test("keys crafted to share the old unkeyed bucket cost what any keys cost", () => {
  const crafted = fnvMulticollision(12);
  assert.equal(new Set(crafted.map(fnv1a)).size, 1, "the attack works on the old hash");
  assert.equal(new Set(crafted.map((key) => key.toHex())).size, 4096);
  const random = crafted.map(() => crypto.getRandomValues(new Uint8Array(96)));
  const fileAll = (keys: Uint8Array[]) => {
    const matcher = new Matcher<number>();
    const started = performance.now();
    keys.forEach((key, i) => matcher.wait(key, "server", i));
    keys.forEach((key, i) => assert.equal(matcher.match(key, "client"), i));
    return { ms: performance.now() - started, reseeds: matcher.reseeds };
  };
  fileAll(random); // warm up
  const times = { crafted: [] as number[], random: [] as number[] };
  for (let run = 0; run < 5; run++) {
    const attack = fileAll(crafted);
    assert.equal(attack.reseeds, 0, "the keyed hash spreads them: no bucket ever fills");
    times.crafted.push(attack.ms);
    times.random.push(fileAll(random).ms);
  }
  const median = (values: number[]) => values.sort((x, y) => x - y)[2];
  // One long chain makes this quadratic: 4096 keys took seconds with the old hash.
  assert.ok(
    median(times.crafted) < 4 * median(times.random) + 5,
    `crafted ${median(times.crafted)} ms vs random ${median(times.random)} ms`,
  );
});

Deno.test("keys that collide under one process's seed do not under another's", () => {
  const [mine, theirs] = [randomSeed(), randomSeed()];
  assert.notDeepEqual(mine, theirs);
  // A birthday search for 30-bit collisions under a seed the attacker somehow knows.
  const seen = new Map<number, Uint8Array>();
  const collisions: [Uint8Array, Uint8Array][] = [];
  for (let i = 0; collisions.length < 3; i++) {
    const key = bytes(`probe-${i}`);
    const hash = hashKey(key, mine);
    const earlier = seen.get(hash);
    if (earlier === undefined) seen.set(hash, key);
    else collisions.push([earlier, key]);
  }
  const stillColliding = collisions.filter(([a, b]) => hashKey(a, theirs) === hashKey(b, theirs));
  assert.equal(stillColliding.length, 0);
});

Deno.test("a bucket past its bound makes the matcher pick a new seed, and nothing is lost", () => {
  // A hash that is weak under one seed only: the first seed puts every key in bucket 0.
  let firstSeed: HashSeed | undefined;
  const matcher = new Matcher<number>((key, seed) => {
    firstSeed ??= seed;
    return seed === firstSeed ? 0 : hashKey(key, seed);
  });
  const keys = Array.from({ length: 40 }, (_, i) => bytes(`k${i}`));
  keys.forEach((key, i) => matcher.wait(key, i % 2 ? "client" : "server", i));
  assert.equal(matcher.reseeds, 1, "the ninth key in one bucket triggers it, once");
  assert.equal(matcher.size, 40);
  keys.forEach((key, i) => assert.equal(matcher.match(key, i % 2 ? "server" : "client"), i));
  assert.equal(matcher.size, 0);
});
