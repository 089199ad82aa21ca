import assert from "node:assert/strict";
import { hashKey, type KeyHash, Matcher, NO_SCOPE, Waiting } from "../broker/matcher.ts";
import type { Mode } from "../client/protocol.ts";
import { fnv1a, fnvMulticollision } from "./collisions.ts";

const bytes = (s: string) => new TextEncoder().encode(s);
const KEY = bytes("vhost-user-1");

/** A waiter with a name, as the broker's connections extend {@link Waiting}. */
class Item extends Waiting {
  constructor(readonly name: string) {
    super();
  }
}

/** Files or pairs a named item on the whole of `key`; returns the partner's name. */
function take(
  matcher: Matcher<Item>,
  name: string,
  key: Uint8Array,
  mode: Mode,
  scope: number = NO_SCOPE,
): string | undefined {
  return matcher.take(new Item(name), key, 0, key.length, mode, scope)?.name;
}

/** Files `item` on the whole of `key`, asserting that it found no partner. */
function file<T extends Item>(
  matcher: Matcher<Item>,
  item: T,
  key: Uint8Array,
  mode: Mode,
  scope: number = NO_SCOPE,
): T {
  assert.equal(matcher.take(item, key, 0, key.length, mode, scope), undefined, "filed");
  assert.equal(item.isWaiting, true);
  return item;
}

const randomWord = () => crypto.getRandomValues(new Int32Array(1))[0];

Deno.test("none matches none", () => {
  const matcher = new Matcher<Item>();
  const first = new Item("first");
  assert.equal(matcher.take(first, KEY, 0, KEY.length, "none"), undefined);
  assert.equal(first.isWaiting, true);
  assert.equal(matcher.size, 1);
  const second = new Item("second");
  assert.equal(matcher.take(second, KEY, 0, KEY.length, "none"), first);
  assert.equal(second.isWaiting, false, "the arriving item is not filed when it pairs");
  assert.equal(first.isWaiting, false);
  assert.equal(matcher.size, 0);
  assert.equal(matcher.keys, 0);
});

Deno.test("none never matches client or server, nor they none", () => {
  const matcher = new Matcher<Item>();
  file(matcher, new Item("n"), KEY, "none");
  const c = file(matcher, new Item("c"), KEY, "client");
  // The server pairs with the waiting client, not with the waiting none.
  assert.equal(take(matcher, "s", KEY, "server"), "c");
  assert.equal(c.isWaiting, false);
  const s = file(matcher, new Item("s2"), KEY, "server");
  const c2 = file(matcher, new Item("c2"), bytes("other"), "client");
  assert.equal(matcher.size, 3);
  assert.equal(take(matcher, "n2", KEY, "none"), "n");
  // The second none waits: the server and client on KEY never pair with it.
  assert.equal(take(matcher, "n3", KEY, "none"), undefined);
  assert.equal(s.isWaiting, true);
  assert.equal(c2.isWaiting, true);
  assert.deepEqual(matcher.countByMode(), { none: 1, client: 1, server: 1 });
});

Deno.test("a waiting client matches an arriving server", () => {
  const matcher = new Matcher<Item>();
  file(matcher, new Item("c"), KEY, "client");
  assert.equal(take(matcher, "s", KEY, "server"), "c");
  assert.equal(matcher.size, 0);
});

Deno.test("a waiting server matches an arriving client", () => {
  const matcher = new Matcher<Item>();
  file(matcher, new Item("s"), KEY, "server");
  assert.equal(take(matcher, "c", KEY, "client"), "s");
  assert.equal(matcher.size, 0);
});

Deno.test("two clients never match, nor two servers", () => {
  for (const mode of ["client", "server"] as const) {
    const matcher = new Matcher<Item>();
    const a = file(matcher, new Item("a"), KEY, mode);
    const b = file(matcher, new Item("b"), KEY, mode);
    assert.equal(take(matcher, "c", KEY, mode), undefined);
    assert.equal(matcher.size, 3);
    assert.equal(matcher.keys, 1);
    assert.equal(a.isWaiting && b.isWaiting, true);
    assert.equal(matcher.countByMode()[mode], 3);
  }
});

Deno.test("different keys never match, including different lengths", () => {
  const pairs: [Uint8Array, Uint8Array][] = [
    [bytes("a"), bytes("b")],
    [bytes("a"), bytes("a\0")],
    [bytes("a\0"), bytes("a")],
    [bytes("\0"), bytes("\0\0")],
    [new Uint8Array(0), bytes("\0")],
    [bytes("vhost-user-1"), bytes("vhost-user-10")],
    [new Uint8Array([0x80]), new Uint8Array([0xc2, 0x80])],
    [new Uint8Array([0xff]), bytes("ÿ")],
  ];
  for (const [waiting, arriving] of pairs) {
    const matcher = new Matcher<Item>();
    file(matcher, new Item("s"), waiting, "server");
    assert.equal(take(matcher, "c", arriving, "client"), undefined, `${waiting} vs ${arriving}`);
    assert.equal(take(matcher, "c2", waiting, "client"), "s");
    assert.equal(matcher.size, 1, "only the mismatched client is left");
  }
});

Deno.test("equal keys match whatever array or offset holds them", () => {
  const matcher = new Matcher<Item>();
  const frame = new Uint8Array(1044).fill(0xee);
  frame.set([0, 1, 2, 0], 17);
  const framed = new Item("framed");
  assert.equal(matcher.take(framed, frame, 17, 4, "none"), undefined);
  assert.deepEqual(framed.waitingKey, new Uint8Array([0, 1, 2, 0]));
  // Neither the bytes around the key nor a shorter or longer read match.
  assert.equal(matcher.take(new Item("x"), frame, 16, 4, "none"), undefined);
  assert.equal(matcher.take(new Item("y"), frame, 17, 5, "none"), undefined);
  assert.equal(take(matcher, "plain", new Uint8Array([0, 1, 2, 0]), "none"), "framed");
  // And a key in a plain array matches one read at an offset (and through a subarray).
  file(matcher, new Item("plain2"), new Uint8Array([9, 8, 7]), "server");
  const other = new Uint8Array([1, 1, 1, 9, 8, 7, 1]);
  assert.equal(matcher.take(new Item("c"), other.subarray(2), 1, 3, "client")?.name, "plain2");
});

Deno.test("the matcher copies a key read at an offset: the buffer may be reused at once", () => {
  const matcher = new Matcher<Item>();
  const buffer = new Uint8Array(64).fill(0x55);
  buffer.set(bytes("abc"), 10);
  const waiter = new Item("w");
  assert.equal(matcher.take(waiter, buffer, 10, 3, "none"), undefined);
  // The broker reads the next frame into the same buffer.
  buffer.fill(0x7a);
  assert.deepEqual(waiter.waitingKey, bytes("abc"));
  assert.equal(matcher.take(new Item("zzz"), buffer, 10, 3, "none"), undefined, "not by reference");
  assert.equal(matcher.size, 2);
  assert.equal(take(matcher, "abc", bytes("abc"), "none"), "w");
  // waitingKey is a fresh copy: changing it changes nothing.
  const zzz = new Item("z2");
  file(matcher, zzz, bytes("q"), "server");
  zzz.waitingKey!.fill(0);
  assert.deepEqual(zzz.waitingKey, bytes("q"));
  assert.equal(take(matcher, "c", bytes("q"), "client"), "z2");
});

Deno.test("long binary keys compare on every byte, including beyond 4096", () => {
  const matcher = new Matcher<Item>();
  const a = new Uint8Array(10_000).map((_, i) => i & 0xff);
  for (const flip of [0, 4_095, 4_096, 9_999]) {
    const b = a.slice();
    b[flip] ^= 1;
    file(matcher, new Item("s"), a, "server");
    assert.equal(take(matcher, "c", b, "client"), undefined, `byte ${flip}`);
    assert.equal(take(matcher, "c", a.slice(), "client"), "s");
    assert.equal(take(matcher, "s", b, "server"), "c", `byte ${flip}`);
    assert.equal(matcher.size, 0);
  }
});

Deno.test("keys of 1 and 1024 bytes are filed, listed and matched", () => {
  const matcher = new Matcher<Item>();
  const one = new Uint8Array([0xa5]);
  const long = new Uint8Array(1024).map((_, i) => (i * 31 + 7) & 0xff);
  const w1 = file(matcher, new Item("one"), one, "server");
  const w2 = file(matcher, new Item("long"), long, "server");
  assert.deepEqual(w1.waitingKey, one);
  assert.deepEqual(w2.waitingKey, long);
  assert.equal(matcher.keys, 2);
  const near = long.slice();
  near[1023] ^= 0x80;
  assert.equal(take(matcher, "c", near, "client"), undefined);
  assert.equal(take(matcher, "c", long.slice(0, 1023), "client"), undefined);
  assert.equal(take(matcher, "c", new Uint8Array([0xa4]), "client"), undefined);
  assert.equal(take(matcher, "c", long.slice(), "client"), "long");
  assert.equal(take(matcher, "c", new Uint8Array([0xa5]), "client"), "one");
  assert.equal(matcher.countByMode().client, 3);
});

Deno.test("several waiters on one key and mode are served oldest first", () => {
  // (A "none" key never holds two waiters: the second pairs with the first.)
  for (const [waits, arrives] of [["server", "client"], ["client", "server"]]) {
    const matcher = new Matcher<Item>();
    for (const name of ["w1", "w2", "w3"]) file(matcher, new Item(name), KEY, waits as Mode);
    // Another key's waiter in between changes nothing.
    file(matcher, new Item("other"), bytes("other"), waits as Mode);
    assert.equal(take(matcher, "a", KEY, arrives as Mode), "w1");
    file(matcher, new Item("w4"), KEY, waits as Mode);
    assert.equal(take(matcher, "a", KEY, arrives as Mode), "w2");
    assert.equal(take(matcher, "a", KEY, arrives as Mode), "w3");
    assert.equal(take(matcher, "a", KEY, arrives as Mode), "w4");
    assert.equal(matcher.size, 1);
    assert.equal(take(matcher, "a", bytes("other"), arrives as Mode), "other");
    assert.equal(matcher.size, 0);
  }
});

Deno.test("stopWaiting removes a waiter from the middle of a FIFO, once", () => {
  const matcher = new Matcher<Item>();
  const [w1, w2, w3] = ["n1", "n2", "n3"].map((name) =>
    file(matcher, new Item(name), KEY, "client")
  );
  assert.equal(w2.isWaiting, true);
  assert.equal(w2.stopWaiting(), true);
  assert.equal(w2.isWaiting, false);
  assert.equal(w2.waitingKey, undefined);
  assert.equal(w2.stopWaiting(), false);
  assert.equal(matcher.size, 2);
  assert.equal(matcher.keys, 1);
  const arriving = new Item("a");
  assert.equal(matcher.take(arriving, KEY, 0, KEY.length, "server"), w1);
  assert.equal(w1.isWaiting, false);
  assert.equal(w1.stopWaiting(), false, "a matched waiter can no longer stop waiting");
  assert.equal(matcher.size, 1, "stopWaiting on the matched partner removed nothing");
  assert.equal(w3.isWaiting, true);
  assert.equal(take(matcher, "b", KEY, "server"), "n3");
  assert.equal(take(matcher, "c", KEY, "server"), undefined);
  assert.equal(matcher.size, 1);
  assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 1 });
});

Deno.test("stopping the head and the tail keeps the FIFO linked", () => {
  const matcher = new Matcher<Item>();
  const waiters = ["1", "2", "3", "4"].map((name) => file(matcher, new Item(name), KEY, "client"));
  assert.equal(waiters[0].stopWaiting(), true);
  assert.equal(waiters[3].stopWaiting(), true);
  assert.equal(waiters[0].stopWaiting(), false);
  file(matcher, new Item("5"), KEY, "client");
  assert.equal(matcher.size, 3);
  assert.equal(take(matcher, "s", KEY, "server"), "2");
  assert.equal(take(matcher, "s", KEY, "server"), "3");
  assert.equal(take(matcher, "s", KEY, "server"), "5");
  assert.equal(matcher.size, 0);
  assert.equal(matcher.keys, 0);
  // Stopping a lone waiter (head and tail at once), then refiling it.
  const lone = file(matcher, new Item("lone"), KEY, "client");
  assert.equal(lone.stopWaiting(), true);
  assert.equal(matcher.keys, 0);
  file(matcher, lone, KEY, "client");
  assert.equal(take(matcher, "s", KEY, "server"), "lone");
});

Deno.test("a waiter that stopped waiting or was matched may be filed again", () => {
  const matcher = new Matcher<Item>();
  const w = file(matcher, new Item("w"), KEY, "server");
  assert.equal(take(matcher, "c", KEY, "client"), "w");
  file(matcher, w, bytes("again"), "none");
  assert.equal(w.waitingMode, "none");
  assert.deepEqual(w.waitingKey, bytes("again"));
  assert.equal(take(matcher, "n", bytes("again"), "none"), "w");
});

Deno.test("take pairs with a waiting partner or files the newcomer", () => {
  const matcher = new Matcher<Item>();
  const s = new Item("s");
  assert.equal(matcher.take(s, KEY, 0, KEY.length, "server"), undefined);
  assert.equal(s.isWaiting, true);
  assert.equal(s.waitingMode, "server");
  assert.equal(s.waitingScope, NO_SCOPE);
  assert.deepEqual(s.waitingKey, KEY);
  const s2 = file(matcher, new Item("s2"), KEY, "server");
  const c = new Item("c");
  const partner = matcher.take(c, KEY, 0, KEY.length, "client");
  assert.equal(partner, s);
  assert.equal(c.isWaiting, false);
  assert.equal(s.isWaiting, false);
  assert.equal(s.waitingKey, undefined);
  assert.equal(s.waitingMode, undefined);
  assert.equal(s.waitingScope, undefined);
  assert.equal(s.stopWaiting(), false);
  assert.equal(s2.isWaiting, true);
  assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 1 });
});

Deno.test("take of an item that already waits throws and changes nothing", () => {
  const matcher = new Matcher<Item>();
  const w = file(matcher, new Item("w"), KEY, "server");
  assert.throws(() => matcher.take(w, KEY, 0, KEY.length, "server"), Error);
  // Even where it would have found a partner.
  assert.throws(() => matcher.take(w, KEY, 0, KEY.length, "client"), Error);
  assert.throws(() => matcher.take(w, bytes("other"), 0, 5, "none"), Error);
  assert.equal(matcher.size, 1);
  assert.equal(w.isWaiting, true);
  assert.equal(w.waitingMode, "server");
  // It waits in another matcher: still refused there.
  const elsewhere = new Matcher<Item>();
  assert.throws(() => elsewhere.take(w, KEY, 0, KEY.length, "none"), Error);
  assert.equal(elsewhere.size, 0);
  assert.equal(take(matcher, "c", KEY, "client"), "w");
});

Deno.test("size, keys and countByMode follow takes, matches and stops", () => {
  const matcher = new Matcher<Item>();
  assert.equal(matcher.size, 0);
  assert.equal(matcher.keys, 0);
  assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 0 });
  file(matcher, new Item("1"), bytes("a"), "none");
  file(matcher, new Item("2"), bytes("b"), "none");
  const c = file(matcher, new Item("3"), bytes("a"), "client");
  file(matcher, new Item("4"), bytes("d"), "server");
  file(matcher, new Item("5"), bytes("c"), "server");
  file(matcher, new Item("6"), bytes("c"), "server");
  assert.equal(matcher.size, 6);
  assert.equal(matcher.keys, 5, "(a none) (b none) (a client) (d server) (c server)");
  assert.deepEqual(matcher.countByMode(), { none: 2, client: 1, server: 3 });
  c.stopWaiting();
  c.stopWaiting();
  assert.equal(take(matcher, "x", bytes("d"), "client"), "4");
  assert.equal(take(matcher, "y", bytes("b"), "none"), "2");
  assert.equal(matcher.size, 3);
  assert.equal(matcher.keys, 2);
  assert.deepEqual(matcher.countByMode(), { none: 1, client: 0, server: 2 });
  const counts = matcher.countByMode();
  counts.none = 99;
  assert.equal(matcher.countByMode().none, 1, "countByMode returns a copy");
});

Deno.test("each waiter tells its key, mode and scope", () => {
  const matcher = new Matcher<Item>();
  const s = file(matcher, new Item("s"), bytes("k1"), "server");
  const c = file(matcher, new Item("c"), new Uint8Array([0, 0xff]), "client", 1000);
  const n1 = file(matcher, new Item("n1"), bytes("k1"), "none", 0);
  const n2 = file(matcher, new Item("n2"), bytes("k2"), "none");
  const listed = [s, c, n1, n2].map((w) => ({
    name: w.name,
    key: [...w.waitingKey!],
    mode: w.waitingMode,
    scope: w.waitingScope,
  }));
  assert.deepEqual(listed, [
    { name: "s", key: [...bytes("k1")], mode: "server", scope: NO_SCOPE },
    { name: "c", key: [0, 0xff], mode: "client", scope: 1000 },
    { name: "n1", key: [...bytes("k1")], mode: "none", scope: 0 },
    { name: "n2", key: [...bytes("k2")], mode: "none", scope: NO_SCOPE },
  ]);
  const fresh = new Item("fresh");
  assert.equal(fresh.isWaiting, false);
  assert.equal(fresh.waitingKey, undefined);
  assert.equal(fresh.waitingMode, undefined);
  assert.equal(fresh.waitingScope, undefined);
  assert.equal(fresh.stopWaiting(), false);
});

Deno.test("waiters may stop waiting while the caller walks its own list of them", () => {
  const matcher = new Matcher<Item>();
  const waiters = Array.from(
    { length: 10 },
    (_, i) => file(matcher, new Item(`${i}`), KEY, "server"),
  );
  const seen: string[] = [];
  for (const [i, waiter] of waiters.entries()) {
    if (!waiter.isWaiting) continue;
    seen.push(waiter.name);
    assert.equal(waiter.stopWaiting(), true);
    waiters[i + 1]?.stopWaiting();
  }
  assert.deepEqual(seen, ["0", "2", "4", "6", "8"]);
  assert.equal(matcher.size, 0);
  assert.equal(matcher.keys, 0);
});

Deno.test("an emptied key is removed, not left behind", () => {
  const matcher = new Matcher<Item>();
  const a = file(matcher, new Item("a1"), bytes("a"), "none");
  file(matcher, new Item("b1"), bytes("b"), "none");
  assert.equal(matcher.keys, 2);
  a.stopWaiting();
  assert.equal(matcher.keys, 1, "stopping the last waiter forgets its key");
  file(matcher, new Item("a2"), bytes("a"), "none");
  assert.equal(matcher.keys, 2);
  assert.equal(take(matcher, "x", bytes("b"), "none"), "b1");
  assert.equal(matcher.keys, 1, "matching the last waiter forgets its key");
  file(matcher, new Item("b2"), bytes("b"), "none");
  assert.equal(take(matcher, "y", bytes("a"), "none"), "a2");
  assert.equal(take(matcher, "z", bytes("b"), "none"), "b2");
  assert.equal(matcher.keys, 0);
  assert.equal(matcher.size, 0);
});

Deno.test("size returns to 0 after many takes and stops", () => {
  const matcher = new Matcher<Item>();
  for (let round = 0; round < 20; round++) {
    const waiters = [];
    // One mode per key, client or server, so that nothing pairs and FIFOs grow long.
    for (let i = 0; i < 1000; i++) {
      waiters.push(
        file(matcher, new Item(`${i}`), bytes(`key-${i % 51}`), i % 51 % 2 ? "client" : "server"),
      );
    }
    assert.equal(matcher.size, 1000);
    assert.equal(matcher.keys, 51);
    // Stop in an order unlike filing, to hit heads, middles and tails.
    for (let i = 0; i < 1000; i++) assert.equal(waiters[(i * 7) % 1000].stopWaiting(), true);
    assert.equal(matcher.size, 0);
    assert.equal(matcher.keys, 0);
  }
  assert.deepEqual(matcher.countByMode(), { none: 0, client: 0, server: 0 });
});

Deno.test("invalid modes from untyped callers are refused with a TypeError", () => {
  const matcher = new Matcher<Item>();
  const n = file(matcher, new Item("n"), KEY, "none");
  for (const mode of ["both", "__proto__", "toString", "", "None", "constructor"]) {
    const item = new Item("bad");
    assert.throws(() => matcher.take(item, KEY, 0, KEY.length, mode as Mode), TypeError, mode);
    assert.equal(item.isWaiting, false);
  }
  assert.throws(
    () => matcher.take(new Item("u"), KEY, 0, 1, undefined as unknown as Mode),
    TypeError,
  );
  assert.equal(matcher.size, 1);
  assert.equal(n.isWaiting, true, "a refused request takes no partner");
});

Deno.test("scopes: same bytes in different scopes never match", () => {
  const matcher = new Matcher<Item>();
  file(matcher, new Item("s-1000"), KEY, "server", 1000);
  assert.equal(take(matcher, "c-1001", KEY, "client", 1001), undefined);
  assert.equal(take(matcher, "c-none", KEY, "client"), undefined);
  assert.equal(take(matcher, "c-0", KEY, "client", 0), undefined);
  assert.equal(matcher.keys, 4);
  assert.equal(take(matcher, "c-1000", KEY, "client", 1000), "s-1000");
  // Each of the waiting clients finds only its own scope's server.
  assert.equal(take(matcher, "s", KEY, "server", 0), "c-0");
  assert.equal(take(matcher, "s", KEY, "server", NO_SCOPE), "c-none");
  assert.equal(take(matcher, "s", KEY, "server", 1001), "c-1001");
  assert.equal(matcher.size, 0);
  // The default scope is NO_SCOPE.
  file(matcher, new Item("default"), KEY, "none");
  assert.equal(take(matcher, "n", KEY, "none", NO_SCOPE), "default");
});

Deno.test("scopes: NO_SCOPE and scope 0 differ, and neither is a 4-byte zero prefix", () => {
  const matcher = new Matcher<Item>();
  const zeroPrefixed = new Uint8Array([0, 0, 0, 0, ...KEY]);
  file(matcher, new Item("none-scope"), KEY, "none", NO_SCOPE);
  file(matcher, new Item("zero-prefixed"), zeroPrefixed, "none", NO_SCOPE);
  assert.equal(take(matcher, "scope-0", KEY, "none", 0), undefined);
  assert.equal(matcher.keys, 3);
  assert.equal(take(matcher, "a", KEY, "none", 0), "scope-0");
  assert.equal(take(matcher, "b", zeroPrefixed, "none"), "zero-prefixed");
  assert.equal(take(matcher, "c", KEY, "none"), "none-scope");
  assert.equal(matcher.size, 0);
  // Large uids are scopes like any other: 2^32 - 2 and 2^31 do not meet 0 or -2.
  for (const [a, b] of [[0xfffffffe, -2], [0x80000000, 0], [0xffffffff, NO_SCOPE]]) {
    file(matcher, new Item(`${a}`), KEY, "server", a);
    assert.equal(take(matcher, `${b}`, KEY, "client", b), undefined, `${a} vs ${b}`);
    assert.equal(take(matcher, "c", KEY, "client", a), `${a}`);
    assert.equal(take(matcher, "s", KEY, "server", b), `${b}`);
  }
  assert.equal(matcher.size, 0);
});

Deno.test("a scoped hash is HalfSipHash of the scope's 4 LE bytes followed by the key", () => {
  const [seed0, seed1] = [randomWord(), randomWord()];
  const scopes = [0, 1, 1000, 65534, 0x12345678, 0x7fffffff, 0x80000000, 0xfffffffe];
  for (const length of [0, 1, 2, 3, 4, 5, 7, 8, 12, 33, 1024]) {
    const key = crypto.getRandomValues(new Uint8Array(length));
    for (const scope of scopes) {
      const prefixed = new Uint8Array(4 + length);
      new DataView(prefixed.buffer).setUint32(0, scope >>> 0, true);
      prefixed.set(key, 4);
      for (const [rounds, finalRounds] of [[1, 3], [2, 4]]) {
        const expected = hashKey(
          prefixed,
          0,
          prefixed.length,
          NO_SCOPE,
          seed0,
          seed1,
          rounds,
          finalRounds,
        );
        const scoped = hashKey(key, 0, length, scope, seed0, seed1, rounds, finalRounds);
        assert.equal(
          scoped,
          expected,
          `scope ${scope}, ${length} bytes, -${rounds}-${finalRounds}`,
        );
      }
      assert.equal(
        hashKey(key, 0, length, scope, seed0, seed1),
        hashKey(prefixed, 0, prefixed.length, NO_SCOPE, seed0, seed1, 1, 3),
        "the defaults are -1-3",
      );
    }
    // And a key read at an odd offset hashes as the key alone.
    const framed = new Uint8Array(length + 9).fill(0xcc);
    framed.set(key, 5);
    assert.equal(
      hashKey(framed, 5, length, 7, seed0, seed1),
      hashKey(key, 0, length, 7, seed0, seed1),
    );
    assert.equal(
      hashKey(framed, 5, length, NO_SCOPE, seed0, seed1),
      hashKey(key, 0, length, NO_SCOPE, seed0, seed1),
    );
  }
});

Deno.test("100,000 distinct waiting keys are filed and matched", () => {
  const matcher = new Matcher<Item>();
  const n = 100_000;
  const key = (i: number) => bytes(`pair-${i}`);
  for (let i = 0; i < n; i++) file(matcher, new Item(`${i}`), key(i), i % 2 ? "client" : "server");
  assert.equal(matcher.size, n);
  assert.equal(matcher.keys, n);
  assert.deepEqual(matcher.countByMode(), { none: 0, client: n / 2, server: n / 2 });
  // Match in an order unrelated to filing.
  for (let j = 0; j < n; j++) {
    const i = (j * 7919) % n;
    assert.equal(take(matcher, "x", key(i), i % 2 ? "server" : "client"), `${i}`);
  }
  assert.equal(matcher.size, 0);
  assert.equal(matcher.keys, 0);
  assert.equal(matcher.reseeds, 0);
});

Deno.test("the table grows to many keys and shrinks back as they leave, matching throughout", () => {
  const matcher = new Matcher<Item>();
  const n = 50_000;
  const key = (i: number) => bytes(`grow-${i}`);
  for (let cycle = 0; cycle < 3; cycle++) {
    const waiters: Item[] = [];
    for (let i = 0; i < n; i++) {
      waiters.push(file(matcher, new Item(`${i}`), key(i), "server"));
      // Matching stays right while the buckets double: probe an older key now and then.
      if (i % 997 === 996) {
        const j = (i * 13) % i;
        file(matcher, new Item(`c${j}`), key(j), "none");
        assert.equal(take(matcher, "n", key(j), "none"), `c${j}`);
      }
    }
    assert.equal(matcher.keys, n);
    // All but a few leave in an order unlike filing; the buckets halve as they go.
    for (let k = 0; k < n; k++) {
      const i = (k * 7919) % n;
      if (i % 10_000 === 3) continue;
      assert.equal(waiters[i].stopWaiting(), true);
      if (k % 1009 === 0) {
        const j = (k * 31 + 3) % n;
        const expected = waiters[j].isWaiting ? `${j}` : undefined;
        const arriving = new Item("probe");
        const got = matcher.take(arriving, key(j), 0, key(j).length, "client");
        assert.equal(got?.name, expected, `probe ${j} at ${matcher.keys} keys`);
        if (got !== undefined) waiters[j] = file(matcher, new Item(`${j}`), key(j), "server");
        else assert.equal(arriving.stopWaiting(), true);
      }
    }
    assert.equal(matcher.keys, 5);
    assert.equal(matcher.size, 5);
    for (const i of [3, 10_003, 20_003, 30_003, 40_003]) {
      assert.equal(take(matcher, "c", key(i), "client"), `${i}`);
    }
    assert.equal(matcher.keys, 0);
    // Shrunk back: a handful of keys still file and match.
    for (let i = 0; i < 40; i++) file(matcher, new Item(`small${i}`), key(i), "client");
    for (let i = 39; i >= 0; i--) assert.equal(take(matcher, "s", key(i), "server"), `small${i}`);
    assert.equal(matcher.size, 0);
  }
  assert.equal(matcher.reseeds, 0);
});

Deno.test("50,000 keys filed, all cancelled, then filed and matched again", () => {
  const matcher = new Matcher<Item>();
  const n = 50_000;
  const key = (i: number) => bytes(`again-${i}`);
  const waiters = Array.from(
    { length: n },
    (_, i) => file(matcher, new Item(`${i}`), key(i), "none"),
  );
  for (const w of waiters) assert.equal(w.stopWaiting(), true);
  assert.equal(matcher.keys, 0);
  assert.equal(matcher.size, 0);
  for (let i = 0; i < n; i++) {
    assert.equal(take(matcher, "x", key(i), "none"), undefined, `nothing left of ${i}`);
  }
  assert.equal(matcher.keys, n);
  for (let i = n - 1; i >= 0; i--) assert.equal(take(matcher, "y", key(i), "none"), "x");
  assert.equal(matcher.size, 0);
});

Deno.test("spare queues: reused for other keys, modes and lengths, never too small", () => {
  const matcher = new Matcher<Item>();
  const short = bytes("ten-bytes!");
  const long = new Uint8Array(1000).map((_, i) => (i * 7) & 0xff);
  assert.equal(short.length, 10);
  // A 10-byte key, emptied: its queue is a spare.
  file(matcher, new Item("short"), short, "server");
  assert.equal(take(matcher, "c", short, "client"), "short");
  // A 1000-byte key does not fit the spare.
  const w = file(matcher, new Item("long"), long, "client");
  assert.deepEqual(w.waitingKey, long);
  const near = long.slice();
  near[999] ^= 1;
  assert.equal(take(matcher, "s", near, "server"), undefined);
  assert.equal(take(matcher, "s", long.slice(), "server"), "long");
  assert.equal(take(matcher, "c", near, "client"), "s", "the near key's server still waits");
  assert.equal(matcher.size, 0);
  // The long key's queue, reused for a short key: nothing of the long key is left.
  file(matcher, new Item("prefix"), long.subarray(0, 3), "none");
  assert.deepEqual(matcher.take(new Item("p"), long, 0, 3, "none")?.name, "prefix");
  file(matcher, new Item("short2"), short, "none", 5);
  const waitingShort = new Item("short3");
  file(matcher, waitingShort, short, "server", 5);
  assert.deepEqual(waitingShort.waitingKey, short);
  assert.equal(take(matcher, "n", long, "none", 5), undefined);
  assert.equal(take(matcher, "n", short, "none", 5), "short2");
  assert.equal(take(matcher, "c", short, "client", 5), "short3");
  assert.equal(take(matcher, "n2", long, "none", 5), "n");
  assert.equal(matcher.size, 0);
  assert.equal(matcher.keys, 0);
  // More emptied queues than are kept (1024), then all of them reused.
  for (let round = 0; round < 3; round++) {
    const len = [5, 100, 2000][round];
    const key = (i: number) => {
      const k = new Uint8Array(len).fill(round);
      new DataView(k.buffer).setUint32(0, i);
      return k;
    };
    for (let i = 0; i < 1500; i++) file(matcher, new Item(`${i}`), key(i), "client");
    for (let i = 0; i < 1500; i++) assert.equal(take(matcher, "s", key(i), "server"), `${i}`);
    assert.equal(matcher.keys, 0);
  }
});

Deno.test("keys whose hashes collide stay apart, byte for byte, and a shared bucket empties cleanly", () => {
  // A hash that puts every key of one length in one bucket, whatever the seed.
  const matcher = new Matcher<Item>((_b, _o, length) => length);
  const [a, b] = [bytes("key-a"), bytes("key-b")];
  const waitingA = file(matcher, new Item("a"), a, "server");
  file(matcher, new Item("b"), b, "server");
  file(matcher, new Item("a2"), a, "server");
  assert.equal(matcher.keys, 2);
  assert.equal(
    take(matcher, "c", b, "client"),
    "b",
    "one bucket, two keys: each finds only its own",
  );
  assert.equal(take(matcher, "c2", b, "client"), undefined);
  assert.equal(waitingA.stopWaiting(), true);
  assert.equal(take(matcher, "c3", a, "client"), "a2");
  assert.equal(take(matcher, "s", b, "server"), "c2");
  assert.equal(matcher.size, 0);
  // Both orders of filing, and removal of the first queue in the chain.
  file(matcher, new Item("b"), b, "none");
  file(matcher, new Item("a"), a, "none");
  assert.equal(take(matcher, "x", b, "none"), "b");
  assert.equal(take(matcher, "y", a, "none"), "a");
  // Keys of one length differing in their first, middle or last byte, or in scope only.
  const base = new Uint8Array(8).fill(0x41);
  const variants = [0, 3, 7].map((at) => {
    const k = base.slice();
    k[at] = 0x42;
    return k;
  });
  file(matcher, new Item("base"), base, "server");
  variants.forEach((k, i) => file(matcher, new Item(`v${i}`), k, "server"));
  file(matcher, new Item("scoped"), base, "server", 1);
  assert.equal(matcher.keys, 5);
  assert.equal(take(matcher, "c", variants[1], "client"), "v1");
  assert.equal(take(matcher, "c", base, "client", 1), "scoped");
  assert.equal(take(matcher, "c", variants[2], "client"), "v2");
  assert.equal(take(matcher, "c", base, "client"), "base");
  assert.equal(take(matcher, "c", variants[0], "client"), "v0");
  assert.equal(take(matcher, "c", base, "client", 2), undefined);
  assert.equal(matcher.countByMode().server, 0);
  assert.equal(matcher.reseeds, 0, "never more than 8 keys with one hash");
});

Deno.test("the bucket hash is HalfSipHash: the reference vectors of HalfSipHash-2-4", () => {
  // From the reference implementation: key bytes 0..7, message bytes 0..n-1.
  const expected = [0x5b9f35a9, 0xb85a4727, 0x03a662fa, 0x04e7fe8a, 0x89466e2a, 0x69b6fac5];
  const [seed0, seed1] = [0x03020100, 0x07060504];
  expected.forEach((value, n) => {
    const message = Uint8Array.from({ length: n }, (_, i) => i);
    assert.equal(
      hashKey(message, 0, n, NO_SCOPE, seed0, seed1, 2, 4),
      value & 0x3fffffff,
      `${n} bytes`,
    );
    // The same message inside a bigger buffer.
    const framed = new Uint8Array(n + 6).fill(0xff);
    framed.set(message, 3);
    assert.equal(hashKey(framed, 3, n, NO_SCOPE, seed0, seed1, 2, 4), value & 0x3fffffff);
    // Its first four bytes as a scope: 0x03020100 is 00 01 02 03 little-endian.
    if (n >= 4) {
      const rest = message.subarray(4);
      assert.equal(
        hashKey(rest, 0, n - 4, 0x03020100, seed0, seed1, 2, 4),
        value & 0x3fffffff,
        `scope + ${n - 4} bytes`,
      );
    }
  });
  // The default is -1-3, a different function.
  assert.notEqual(
    hashKey(new Uint8Array(0), 0, 0, NO_SCOPE, seed0, seed1),
    expected[0] & 0x3fffffff,
  );
});

Deno.test("keys crafted to share the old unkeyed bucket cost what any keys cost", () => {
  const crafted = fnvMulticollision(12);
  assert.equal(new Set(crafted.map(fnv1a)).size, 1, "the attack works on the old hash");
  assert.equal(new Set(crafted.map((key) => key.toHex())).size, 4096);
  const random = crafted.map(() => crypto.getRandomValues(new Uint8Array(96)));
  const fileAll = (keys: Uint8Array[]) => {
    const matcher = new Matcher<Item>();
    const started = performance.now();
    keys.forEach((key, i) => file(matcher, new Item(`${i}`), key, "server"));
    keys.forEach((key, i) => assert.equal(take(matcher, "c", key, "client"), `${i}`));
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
  const mine = [randomWord(), randomWord()] as const;
  const theirs = [randomWord(), randomWord()] as const;
  assert.notDeepEqual(mine, theirs);
  const hash = (key: Uint8Array, [s0, s1]: readonly [number, number]) =>
    hashKey(key, 0, key.length, NO_SCOPE, s0, s1);
  // A birthday search for 30-bit collisions under a seed the attacker somehow knows.
  const seen = new Map<number, Uint8Array>();
  const collisions: [Uint8Array, Uint8Array][] = [];
  for (let i = 0; collisions.length < 3; i++) {
    const key = bytes(`probe-${i}`);
    const h = hash(key, mine);
    assert.ok(h >= 0 && h < 2 ** 30 && Number.isInteger(h), "30 bits");
    const earlier = seen.get(h);
    if (earlier === undefined) seen.set(h, key);
    else collisions.push([earlier, key]);
  }
  const stillColliding = collisions.filter(([a, b]) => hash(a, theirs) === hash(b, theirs));
  assert.equal(stillColliding.length, 0);
  // The seed is used: both words change the hash.
  assert.notEqual(hash(KEY, [1, 2]), hash(KEY, [1, 3]));
  assert.notEqual(hash(KEY, [1, 2]), hash(KEY, [0, 2]));
});

/** A hash that is weak under the matcher's first seed only: it puts every key in one bucket. */
function weakUnderFirstSeed(): KeyHash {
  let first: [number, number] | undefined;
  return (bytes, offset, length, scope, seed0, seed1) => {
    first ??= [seed0, seed1];
    if (seed0 === first[0] && seed1 === first[1]) return 12345;
    return hashKey(bytes, offset, length, scope, seed0, seed1);
  };
}

Deno.test("a bucket past its bound makes the matcher pick a new seed, and nothing is lost", () => {
  const matcher = new Matcher<Item>(weakUnderFirstSeed());
  const keys = Array.from({ length: 40 }, (_, i) => bytes(`k${i}`));
  keys.forEach((key, i) => file(matcher, new Item(`${i}`), key, i % 2 ? "client" : "server"));
  assert.equal(matcher.reseeds, 1, "the ninth key in one bucket triggers it, once");
  assert.equal(matcher.size, 40);
  assert.equal(matcher.keys, 40);
  keys.forEach((key, i) =>
    assert.equal(take(matcher, "x", key, i % 2 ? "server" : "client"), `${i}`)
  );
  assert.equal(matcher.size, 0);
});

Deno.test("the reseed comes at the 9th distinct key with one hash, not before", () => {
  const matcher = new Matcher<Item>(weakUnderFirstSeed());
  const key = (i: number) => bytes(`same-${i}`);
  for (let i = 0; i < 8; i++) file(matcher, new Item(`${i}`), key(i), "server");
  // More waiters on those keys, and the same keys in other modes, are not new keys in the bucket.
  file(matcher, new Item("0b"), key(0), "server");
  for (let i = 0; i < 8; i++) file(matcher, new Item(`n${i}`), key(i), "none");
  assert.equal(matcher.reseeds, 0, "8 keys with one hash are tolerated");
  assert.equal(matcher.keys, 16);
  file(matcher, new Item("8"), key(8), "server");
  assert.equal(matcher.reseeds, 1, "the 9th is not");
  // Everything filed before and after is still found, in order.
  file(matcher, new Item("9"), key(9), "server");
  assert.equal(take(matcher, "c", key(0), "client"), "0");
  assert.equal(take(matcher, "c", key(0), "client"), "0b");
  for (let i = 1; i < 10; i++) assert.equal(take(matcher, "c", key(i), "client"), `${i}`);
  for (let i = 0; i < 8; i++) assert.equal(take(matcher, "n", key(i), "none"), `n${i}`);
  assert.equal(matcher.size, 0);
  assert.equal(matcher.reseeds, 1);
});

Deno.test("a hash that ignores the seed reseeds at every key past the 8th, and still matches", () => {
  const matcher = new Matcher<Item>((_b, _o, length) => length);
  const key = (i: number) => bytes(`k${String(i).padStart(3, "0")}`);
  for (let i = 0; i < 20; i++) file(matcher, new Item(`${i}`), key(i), "client");
  assert.equal(matcher.reseeds, 12, "keys 9 to 20 each found 8 or more with their hash");
  for (let i = 19; i >= 0; i--) assert.equal(take(matcher, "s", key(i), "server"), `${i}`);
  assert.equal(matcher.size, 0);
});
