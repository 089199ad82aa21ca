/**
 * A hostile review of the allocation-free pairing path (commits 0338e1e and
 * 101542c): pooled Connection objects reused per descriptor number, the
 * intrusive per-key queues with reused key stores, the power-of-two bucket
 * arrays that grow and shrink, validation in the shared receive buffer, and
 * the uid scope beside the key under `isolateUids`.
 *
 * Every test checks who got paired with whom by passing bytes through the
 * descriptors the broker handed out (and, for other uids, by the uid and pid
 * the peer writes into its end), that the broker's descriptors return to
 * their baseline, and that it still serves a fresh pair afterwards.
 *
 * @module
 */

import assert from "node:assert/strict";
import { AccessPolicy } from "../broker/policy.ts";
import type { Broker } from "../broker/broker.ts";
import { encodeGetPair, type Mode } from "../client/protocol.ts";
import { Errno } from "../ffi/errors.ts";
import { closeDescriptor, readInto, sendFrom, setNonblocking } from "../ffi/socket.ts";
import { countOpenDescriptors, eventually, RawClient, withBroker } from "./helpers.ts";
import { sleep, startBroker, withScope } from "./processes.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A request as the C client sends it: 1044 bytes. */
function request(key: string | Uint8Array, mode: Mode): Uint8Array {
  return encodeGetPair(key, mode);
}

/** A raw client that has sent its whole request. */
async function file(path: string, key: string | Uint8Array, mode: Mode): Promise<RawClient> {
  const client = await RawClient.connect(path);
  client.send(request(key, mode));
  return client;
}

/** The one descriptor the broker answered `client` with; fails if it closed without one. */
async function pairOf(client: RawClient, what: string): Promise<number> {
  const reply = await client.readToEnd(5000);
  if (reply.descriptors.length !== 1) {
    reply.descriptors.forEach(closeDescriptor);
    assert.fail(`${what}: expected one descriptor, got ${reply.descriptors.length}`);
  }
  assert.equal(reply.bytes.length, 1044, `${what}: SET_PAIR length`);
  return reply.descriptors[0];
}

/** Reads from a nonblocking descriptor until `length` bytes came or `ms` passed. */
async function readSome(fd: number, length: number, ms = 2000): Promise<Uint8Array> {
  const buffer = new Uint8Array(length);
  let filled = 0;
  const deadline = Date.now() + ms;
  while (filled < length && Date.now() < deadline) {
    const count = readInto(fd, buffer.subarray(filled) as Uint8Array<ArrayBuffer>);
    if (count === -Errno.EAGAIN) {
      await sleep(2);
      continue;
    }
    if (count <= 0) break;
    filled += count;
  }
  return buffer.subarray(0, filled);
}

let tokens = 0;

/**
 * Asserts that `a` and `b` are the two ends of one socketpair (bytes go
 * both ways between them), then closes both.
 */
async function assertSamePair(a: number, b: number, label: string): Promise<void> {
  try {
    setNonblocking(a);
    setNonblocking(b);
    const there = encoder.encode(`${label}#${++tokens}>`);
    const back = encoder.encode(`${label}#${++tokens}<`);
    assert.equal(sendFrom(a, there as Uint8Array<ArrayBuffer>), there.length);
    assert.equal(sendFrom(b, back as Uint8Array<ArrayBuffer>), back.length);
    assert.equal(decoder.decode(await readSome(b, there.length)), decoder.decode(there), label);
    assert.equal(decoder.decode(await readSome(a, back.length)), decoder.decode(back), label);
  } finally {
    closeDescriptor(a);
    closeDescriptor(b);
  }
}

/** Pairs `first` and `second` (already filed) and checks they got each other. */
async function assertPaired(first: RawClient, second: RawClient, label: string): Promise<void> {
  const [a, b] = await Promise.all([pairOf(first, `${label} (1)`), pairOf(second, `${label} (2)`)]);
  await assertSamePair(a, b, label);
}

/** A fresh pair through the broker at `path`, checked end to end. */
async function assertServes(path: string, label: string): Promise<void> {
  using server = await file(path, `fresh-${label}`, "server");
  using client = await file(path, `fresh-${label}`, "client");
  await assertPaired(server, client, `fresh pair after ${label}`);
}

/** Asserts that the broker has not answered `client` within `ms` (and consumes nothing if so). */
async function assertUnanswered(client: RawClient, ms: number, what: string): Promise<void> {
  assert.ok(await client.stillOpenAfter(ms), `${what}: the broker answered or closed it`);
}

/** Waits for the broker to hold exactly `open` connections and `waiting` waiters. */
async function settled(
  broker: Broker,
  open: number,
  waiting: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + 5000;
  while (broker.stats.open !== open || broker.stats.waiting !== waiting) {
    if (Date.now() > deadline) {
      assert.fail(
        `${what}: wanted open ${open} and waiting ${waiting}, have ${JSON.stringify(broker.stats)}`,
      );
    }
    await sleep(2);
  }
}

/** Descriptors of this process, once the broker has closed what it should. */
async function descriptorsSettle(baseline: number, what: string): Promise<void> {
  await eventually(
    () => countOpenDescriptors() <= baseline,
    `${what}: descriptors back to ${baseline} (now ${countOpenDescriptors()})`,
  );
}

// ---------------------------------------------------------------------------------------------
// Pooled Connection objects

Deno.test("reuse: a key filed by a closed connection never pairs the next client on its descriptor", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    for (let round = 0; round < 50; round++) {
      // Life 1 of the broker-side object: waits on old-key, then its client leaves.
      const first = await file(path, `old-key-${round}`, "server");
      await settled(broker, 1, 1, "first life waiting");
      first[Symbol.dispose]();
      await settled(broker, 0, 0, "first life closed");
      // Life 2, most likely the same descriptor number and object, on another key.
      using second = await file(path, `new-key-${round}`, "server");
      await settled(broker, 1, 1, "second life waiting");
      // A client for the old key must not get the second life.
      using late = await file(path, `old-key-${round}`, "client");
      await settled(broker, 2, 2, "the late client waits");
      using partner = await file(path, `new-key-${round}`, "client");
      await assertPaired(second, partner, `round ${round}: second life and its partner`);
      using oldPartner = await file(path, `old-key-${round}`, "server");
      await assertPaired(late, oldPartner, `round ${round}: the old key's own pair`);
      await settled(broker, 0, 0, "round done");
    }
    assert.equal(broker.stats.paired, 100);
    await descriptorsSettle(baseline, "after the reuse rounds");
    await assertServes(path, "reuse rounds");
  }));

Deno.test("reuse: kicking the id of a connection whose object was reused fails and leaves the new one", () =>
  withBroker(async (broker, path) => {
    const first = await file(path, "kick-1", "server");
    await settled(broker, 1, 1, "first waiting");
    const [{ id: oldId }] = broker.waitingClients();
    first[Symbol.dispose]();
    await settled(broker, 0, 0, "first gone");
    using second = await file(path, "kick-2", "server");
    await settled(broker, 1, 1, "second waiting");
    const [{ id: newId, key }] = broker.waitingClients();
    assert.notEqual(newId, oldId);
    assert.equal(decoder.decode(key), "kick-2");
    assert.equal(broker.kick(oldId), false, "the old id must be gone");
    await settled(broker, 1, 1, "the second still waits after the stale kick");
    using partner = await file(path, "kick-2", "client");
    await assertPaired(second, partner, "the second after a stale kick");
  }));

Deno.test("reuse: the handshake deadline of an object's new life starts at its new accept", () =>
  withBroker(async (broker, path) => {
    const silent = await RawClient.connect(path);
    await settled(broker, 1, 0, "silent connection accepted");
    await sleep(900);
    silent[Symbol.dispose]();
    await settled(broker, 0, 0, "silent connection closed");
    // The next life of that object sends half a request.
    using slow = await RawClient.connect(path);
    const frame = request("late-handshake", "server");
    slow.send(frame.subarray(0, 500));
    await settled(broker, 1, 0, "the slow one accepted");
    // Past the first life's deadline (1500 ms after its accept) plus a sweep, not the second's.
    await sleep(1000);
    assert.equal(broker.stats.open, 1, "the slow connection was swept on its predecessor's clock");
    slow.send(frame.subarray(500));
    await settled(broker, 1, 1, "the slow one waits");
    using partner = await file(path, "late-handshake", "client");
    await assertPaired(slow, partner, "the slow one");
  }, { handshakeTimeoutMs: 1500 }));

Deno.test("sweep: fifty silent and half-sent connections swept in one pass, none leaked", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    const stuck: RawClient[] = [];
    for (let i = 0; i < 50; i++) {
      const client = await RawClient.connect(path);
      if (i % 2 === 0) client.send(request(`half-${i}`, "server").subarray(0, 3 + i * 20));
      stuck.push(client);
    }
    // An honest waiter among them, and one that completes just in time.
    const honest = await file(path, "among-the-stuck", "server");
    const late = await RawClient.connect(path);
    late.send(request("among-the-stuck-2", "client").subarray(0, 1000));
    await settled(broker, 52, 1, "all accepted");
    late.send(request("among-the-stuck-2", "client").subarray(1000));
    await eventually(() => broker.metrics.dropped.handshake_timeout === 50, "the sweep", 5000);
    for (const client of stuck) assert.equal(await client.stillOpenAfter(1000), false);
    stuck.forEach((client) => client[Symbol.dispose]());
    await settled(broker, 2, 2, "the two honest ones remain");
    const partner = await file(path, "among-the-stuck", "client");
    await assertPaired(honest, partner, "honest after the sweep");
    const partner2 = await file(path, "among-the-stuck-2", "server");
    await assertPaired(late, partner2, "late after the sweep");
    [honest, partner, late, partner2].forEach((client) => client[Symbol.dispose]());
    await settled(broker, 0, 0, "all done");
    await descriptorsSettle(baseline, "after the sweep");
  }, { handshakeTimeoutMs: 400 }));

// ---------------------------------------------------------------------------------------------
// PartnerGone: waiters that left before the broker noticed

Deno.test("partner gone: a newcomer skips twenty departed waiters in one batch and pairs the live one", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    const departed: RawClient[] = [];
    for (let i = 0; i < 20; i++) departed.push(await file(path, "gone", "server"));
    const live = await file(path, "gone", "server");
    // The newcomer connects first and sends nothing yet, so its request arrives as an event.
    const newcomer = await RawClient.connect(path);
    await settled(broker, 22, 21, "everyone in place");
    // In one turn: the newcomer's request, then every older waiter leaves. The broker sees the
    // request before the hang-ups: each departed partner fails with EPIPE and is skipped.
    newcomer.send(request("gone", "client"));
    for (const client of departed) client[Symbol.dispose]();
    await assertPaired(live, newcomer, "newcomer and the live waiter");
    live[Symbol.dispose]();
    newcomer[Symbol.dispose]();
    assert.equal(broker.stats.paired, 1);
    await settled(broker, 0, 0, "everyone closed");
    assert.equal(broker.metrics.dropped.delivery_failed ?? 0, 0);
    await descriptorsSettle(baseline, "after the departed waiters");
    await assertServes(path, "partner gone");
  }));

Deno.test("partner gone: every waiter gone, the newcomer waits and the key's queue still works", () =>
  withBroker(async (broker, path) => {
    const departed: RawClient[] = [];
    for (let i = 0; i < 10; i++) departed.push(await file(path, "all-gone", "server"));
    using newcomer = await RawClient.connect(path);
    await settled(broker, 11, 10, "in place");
    newcomer.send(request("all-gone", "client"));
    for (const client of departed) client[Symbol.dispose]();
    await settled(broker, 1, 1, "the newcomer waits alone");
    assert.equal(broker.stats.paired, 0);
    using partner = await file(path, "all-gone", "server");
    await assertPaired(newcomer, partner, "newcomer after all partners left");
  }));

Deno.test("batch: fifty hang-ups and fifty requests in one turn; each request gets its own waiter", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    const leaving: RawClient[] = [];
    const staying: RawClient[] = [];
    const newcomers: RawClient[] = [];
    for (let i = 0; i < 50; i++) {
      leaving.push(await file(path, `batch-${i}`, "server"));
      staying.push(await file(path, `batch-${i}`, "server"));
      newcomers.push(await RawClient.connect(path));
    }
    await settled(broker, 150, 100, "all in place");
    // One turn: requests and hang-ups interleaved, so that the broker's next batch holds both,
    // each departed partner failing with EPIPE before its own hang-up event comes up.
    for (let i = 0; i < 50; i++) {
      newcomers[i].send(request(`batch-${i}`, "client"));
      leaving[i][Symbol.dispose]();
    }
    for (let i = 0; i < 50; i++) {
      await assertPaired(staying[i], newcomers[i], `batch ${i}`);
      staying[i][Symbol.dispose]();
      newcomers[i][Symbol.dispose]();
    }
    await settled(broker, 0, 0, "all done");
    assert.equal(broker.stats.paired, 50);
    await descriptorsSettle(baseline, "after the batch");
    await assertServes(path, "the batch");
  }));

// ---------------------------------------------------------------------------------------------
// Split requests and the shared receive buffer

Deno.test("split: a 1024-byte key sent a byte at a time while whole requests reuse the receive buffer", () =>
  withBroker(async (broker, path) => {
    const key = crypto.getRandomValues(new Uint8Array(1024));
    const frame = request(key, "server");
    using drip = await RawClient.connect(path);
    await settled(broker, 1, 0, "drip accepted");
    // Decoys with the same key except the last byte, filed whole between the drip's bytes.
    const decoy = key.slice();
    decoy[1023] ^= 1;
    let decoys = 0;
    for (let i = 0; i < frame.length; i++) {
      drip.send(frame.subarray(i, i + 1));
      if (i % 97 === 0) {
        using a = await file(path, decoy, "server");
        using b = await file(path, decoy, "client");
        await assertPaired(a, b, `decoy ${decoys++}`);
      }
      if (i % 13 === 0) await sleep(0);
    }
    await settled(broker, 1, 1, "the drip waits");
    using partner = await file(path, key, "client");
    await assertPaired(drip, partner, "the drip and its partner");
    assert.equal(broker.stats.paired, decoys + 1);
  }));

Deno.test("split: a request split at 1039/1, the padding later, still pairs; a byte more is refused", () =>
  withBroker(async (broker, path) => {
    const frame = request("split-edge", "server");
    using edge = await RawClient.connect(path);
    edge.send(frame.subarray(0, 1039));
    await settled(broker, 1, 0, "edge handshaking");
    edge.send(frame.subarray(1039, 1040));
    await settled(broker, 1, 1, "edge waits at 1040 bytes");
    edge.send(frame.subarray(1040));
    await assertUnanswered(edge, 100, "the padding");
    using partner = await file(path, "split-edge", "client");
    await assertPaired(edge, partner, "edge and partner");

    // 1040 + 4 + 1: one byte past the frame is a second request.
    using greedy = await RawClient.connect(path);
    greedy.send(frame.subarray(0, 1040));
    await settled(broker, 1, 1, "greedy waits");
    greedy.send(frame.subarray(1040));
    greedy.send(new Uint8Array([0]));
    const reply = await greedy.readToEnd();
    assert.equal(reply.descriptors.length, 0);
    await settled(broker, 0, 0, "greedy refused");
    // Its key must not linger: a client for it waits.
    using orphan = await file(path, "split-edge", "client");
    await settled(broker, 1, 1, "the orphan waits");
    await assertUnanswered(orphan, 100, "a client for the refused key");
  }));

Deno.test("split: a half-sent request's bytes never leak into the next life of its object", () =>
  withBroker(async (broker, path) => {
    // Life 1 sends 1039 bytes of a valid request for "leak-A" and leaves.
    const first = await RawClient.connect(path);
    first.send(request("leak-A", "server").subarray(0, 1039));
    await settled(broker, 1, 0, "first half-sent");
    first[Symbol.dispose]();
    await settled(broker, 0, 0, "first gone");
    // Life 2 sends one byte, then the rest of a request for "leak-B".
    using second = await RawClient.connect(path);
    const frame = request("leak-B", "server");
    second.send(frame.subarray(0, 1));
    await settled(broker, 1, 0, "second started");
    second.send(frame.subarray(1));
    await settled(broker, 1, 1, "second waits");
    using wrong = await file(path, "leak-A", "client");
    await assertUnanswered(wrong, 100, "a client of the first life's key");
    using right = await file(path, "leak-B", "client");
    await assertPaired(second, right, "second life by its own key");
  }));

// ---------------------------------------------------------------------------------------------
// Reused key stores

Deno.test("key stores: keys differing only past a reused store's old contents never match", () =>
  withBroker(async (broker, path) => {
    const long = new Uint8Array(1024).fill(0x78);
    // A 1024-byte key's queue goes to the spares when it pairs, holding 'y's.
    const old = new Uint8Array(1024).fill(0x79);
    {
      using a = await file(path, old, "server");
      using b = await file(path, old, "client");
      await assertPaired(a, b, "1024-byte key");
    }
    // Shorter keys now reuse that store, old bytes and all.
    for (const length of [1, 2, 63, 64, 65, 1023]) {
      using waiter = await file(path, long.subarray(0, length), "server");
      await settled(broker, 1, 1, `key of ${length} waits`);
      for (const other of [length - 1, length + 1, 1024].filter((n) => n > 0 && n !== length)) {
        using near = await file(path, long.subarray(0, other), "client");
        await assertUnanswered(near, 30, `key of ${other} against ${length}`);
      }
      // Same length, last byte different.
      const differing = long.slice(0, length);
      differing[length - 1] = 0x79;
      const off = await file(path, differing, "client");
      await assertUnanswered(off, 30, `key of ${length} with its last byte changed`);
      off[Symbol.dispose]();
      await settled(broker, 1, 1, `only the waiter of ${length} left`);
      using exact = await file(path, long.subarray(0, length), "client");
      await assertPaired(waiter, exact, `key of ${length}`);
    }
    // NUL keys of lengths 1 and 2 are different keys, whatever a store held before.
    using nul1 = await file(path, new Uint8Array(1), "none");
    await settled(broker, 1, 1, "NUL key waits");
    using nul2 = await file(path, new Uint8Array(2), "none");
    await settled(broker, 2, 2, "NUL NUL is another key");
    using nul1b = await file(path, new Uint8Array(1), "none");
    await assertPaired(nul1, nul1b, "NUL key");
    using nul2b = await file(path, new Uint8Array(2), "none");
    await assertPaired(nul2, nul2b, "NUL NUL key");
  }));

Deno.test("key stores: bytes past key_len in the frame are ignored for matching", () =>
  withBroker(async (broker, path) => {
    const dirty = request("ab", "server");
    dirty.fill(0x61, 18, 1040); // garbage after the 2-byte key
    using a = await RawClient.connect(path);
    a.send(dirty);
    await settled(broker, 1, 1, "dirty waits");
    using longer = await file(path, "ab" + "a".repeat(10), "client");
    await assertUnanswered(longer, 50, "a longer key made of the garbage");
    using b = await file(path, "ab", "client");
    await assertPaired(a, b, "dirty frame by its key_len");
  }));

// ---------------------------------------------------------------------------------------------
// Buckets growing and shrinking

Deno.test("buckets: 1500 distinct keys, most leave at once, every survivor still pairs by its key", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    for (let round = 0; round < 2; round++) {
      const waiters: RawClient[] = [];
      for (let i = 0; i < 1500; i++) {
        waiters.push(await file(path, `bucket-${round}-${i}`, i % 2 ? "server" : "none"));
      }
      await settled(broker, 1500, 1500, "all filed");
      // Mass disconnect in one turn: the tables shrink while the broker closes them one by one.
      const kept: number[] = [];
      for (let i = 0; i < 1500; i++) {
        if (i % 11 === 0) kept.push(i);
        else waiters[i][Symbol.dispose]();
      }
      await settled(broker, kept.length, kept.length, "survivors");
      // A client of a departed key waits rather than pairing with some survivor.
      using stray = await file(path, `bucket-${round}-1`, "client");
      await assertUnanswered(stray, 50, "a departed key");
      stray[Symbol.dispose]();
      await settled(broker, kept.length, kept.length, "stray gone");
      for (const i of kept) {
        using partner = await file(path, `bucket-${round}-${i}`, i % 2 ? "client" : "none");
        await assertPaired(waiters[i], partner, `survivor ${i}`);
        waiters[i][Symbol.dispose]();
      }
      await settled(broker, 0, 0, "round over");
    }
    await descriptorsSettle(baseline, "after the bucket rounds");
    await assertServes(path, "bucket rounds");
  }));

// ---------------------------------------------------------------------------------------------
// Capacity

Deno.test("capacity: a full broker refuses the same uid's newcomer but serves one that pairs", () =>
  withBroker(async (broker, path) => {
    const waiters: RawClient[] = [];
    for (let i = 0; i < 8; i++) waiters.push(await file(path, `full-${i}`, "server"));
    await settled(broker, 8, 8, "full");
    using extra = await file(path, "full-extra", "server");
    const refused = await extra.readToEnd();
    assert.equal(refused.descriptors.length, 0, "the newcomer should be closed");
    await settled(broker, 8, 8, "still full");
    // One that pairs at once is served even when full; its partner's object is reused next.
    using pairing = await file(path, "full-3", "client");
    await assertPaired(waiters[3], pairing, "pairing at capacity");
    using refill = await file(path, "full-3", "server");
    await settled(broker, 8, 8, "refilled");
    using refillPartner = await file(path, "full-3", "client");
    await assertPaired(refill, refillPartner, "refilled key");
    for (const [i, waiter] of waiters.entries()) {
      if (i === 3) continue;
      using partner = await file(path, `full-${i}`, "client");
      await assertPaired(waiter, partner, `waiter ${i}`);
    }
    waiters.forEach((waiter) => waiter[Symbol.dispose]());
    await settled(broker, 0, 0, "empty");
  }, { maxConnections: 8 }));

// ---------------------------------------------------------------------------------------------
// Other uids (python3 as a real second user)

const PEER_SCRIPT = `
import os, socket, struct, sys
path, key, mode = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
req = struct.pack("<IIIHH", 1, 1, 1028, {"none": 0, "client": 1, "server": 2}[mode], len(key)) + key
s.sendall(req + bytes(1044 - len(req)))
print("sent", flush=True)
data, fds, _, _ = socket.recv_fds(s, 2048, 4)
if len(fds) != 1:
    print("closed", flush=True)
    sys.exit(3)
p = socket.socket(fileno=fds[0])
p.sendall(("%d:%d\\n" % (os.getuid(), os.getpid())).encode())
p.recv(1)
print("paired", flush=True)
`;

const python = ["/usr/bin/python3", "/usr/local/bin/python3"].find((candidate) => {
  try {
    return Deno.statSync(candidate).isFile;
  } catch {
    return false;
  }
});
const otherUidsMissing = Deno.uid() !== 0
  ? "needs root to switch uids"
  : python === undefined
  ? "needs a python3 every uid can run"
  : undefined;
if (otherUidsMissing) console.warn(`hot_path_attack_test: ${otherUidsMissing}; uid tests ignored`);

const scriptDirectory = otherUidsMissing ? "" : Deno.makeTempDirSync({ prefix: "hot-path-peer-" });
if (!otherUidsMissing) {
  Deno.chmodSync(scriptDirectory, 0o755);
  Deno.writeTextFileSync(`${scriptDirectory}/peer.py`, PEER_SCRIPT, { mode: 0o644 });
  globalThis.addEventListener("unload", () => {
    Deno.removeSync(scriptDirectory, { recursive: true });
  });
}

function hex(key: string | Uint8Array): string {
  const bytes = typeof key === "string" ? encoder.encode(key) : key;
  return [...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** A peer process of another uid, filing `key` in `mode`. */
class Peer implements AsyncDisposable {
  readonly child: Deno.ChildProcess;
  output = "";
  readonly #done: Promise<void>;

  constructor(readonly uid: number, path: string, key: string | Uint8Array, mode: Mode) {
    const child = new Deno.Command("setpriv", {
      args: [
        `--reuid=${uid}`,
        `--regid=${uid}`,
        "--clear-groups",
        python!,
        `${scriptDirectory}/peer.py`,
        path,
        hex(key),
        mode,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.child = child;
    this.#done = (async () => {
      const streams = [child.stdout, child.stderr].map(async (stream) => {
        for await (const text of stream.pipeThrough(new TextDecoderStream())) this.output += text;
      });
      await Promise.all(streams);
    })();
  }

  async sent(): Promise<void> {
    await eventually(() => this.output.includes("sent"), `uid ${this.uid} peer to send`);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // already gone
    }
    await this.child.status;
    await this.#done;
  }
}

/** Reads "uid:pid\n" from the end a peer process got; closes it. */
async function identityOn(fd: number): Promise<string> {
  try {
    setNonblocking(fd);
    let text = "";
    const deadline = Date.now() + 3000;
    while (!text.includes("\n") && Date.now() < deadline) {
      text += decoder.decode(await readSome(fd, 32, 200));
    }
    return text.trim();
  } finally {
    closeDescriptor(fd);
  }
}

async function openToOthers(path: string): Promise<void> {
  await Deno.chmod(path.slice(0, path.lastIndexOf("/")), 0o755);
  await Deno.chmod(path, 0o666);
}

const policy = AccessPolicy.parse(
  JSON.stringify({
    rules: [
      { action: "allow", prefix: "shared-", cross_uid: true },
      { action: "allow", prefix: "" },
    ],
  }),
  "json",
  "hot path test policy",
);

for (const withPolicy of [false, true]) {
  Deno.test({
    name: `isolate-uids${withPolicy ? " + policy" : ""}: no key crafted by nobody reaches ` +
      "root's waiter; nobody pairs with nobody",
    ignore: otherUidsMissing !== undefined,
    fn: () =>
      withBroker(async (broker, path) => {
        await openToOthers(path);
        using rootWaiter = await file(path, "secret", "server");
        await settled(broker, 1, 1, "root waits");
        // The raw key, and the key prefixed with root's uid as the old scoped copy spelt it
        // (4 bytes, either byte order), and the cross-uid scope spelt out.
        const attempts = [
          encoder.encode("secret"),
          new Uint8Array([0, 0, 0, 0, ...encoder.encode("secret")]),
          new Uint8Array([0xff, 0xff, 0xff, 0xff, ...encoder.encode("secret")]),
        ];
        for (const [i, key] of attempts.entries()) {
          await using peer = new Peer(65534, path, key, "client");
          await peer.sent();
          await settled(broker, 2, 2, `attempt ${i} waits apart`);
          await sleep(50);
          assert.ok(!peer.output.includes("paired"), `attempt ${i} paired: ${peer.output}`);
        }
        await settled(broker, 1, 1, "attempts gone");
        // Nobody's own pair on the same key still works, beside root's waiter.
        await using nobodyServer = new Peer(65534, path, "secret", "server");
        await nobodyServer.sent();
        await settled(broker, 2, 2, "nobody's server waits");
        await using nobodyClient = new Peer(65534, path, "secret", "client");
        await eventually(
          () => nobodyServer.output.includes("paired") && nobodyClient.output.includes("paired"),
          "nobody's two peers to pair",
        );
        await settled(broker, 1, 1, "root still waits alone");
        using rootClient = await file(path, "secret", "client");
        await assertPaired(rootWaiter, rootClient, "root's own pair");
      }, { isolateUids: true, ...withPolicy ? { authorize: (r) => policy.decide(r) } : {} }),
  });
}

Deno.test({
  name: "isolate-uids: uids 2^31 and 2^32-2 are scopes of their own",
  ignore: otherUidsMissing !== undefined,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      const high = 2 ** 31, top = 2 ** 32 - 2;
      await using highServer = new Peer(high, path, "big", "server");
      await highServer.sent();
      await settled(broker, 1, 1, "high waits");
      await using topClient = new Peer(top, path, "big", "client");
      await topClient.sent();
      await settled(broker, 2, 2, "top waits apart");
      using rootClient = await file(path, "big", "client");
      await settled(broker, 3, 3, "root waits apart");
      await sleep(50);
      assert.ok(!highServer.output.includes("paired"), highServer.output);
      // Each pairs within its own uid.
      await using highClient = new Peer(high, path, "big", "client");
      await eventually(() => highServer.output.includes("paired"), "high's pair");
      await using topServer = new Peer(top, path, "big", "server");
      await eventually(() => topClient.output.includes("paired"), "top's pair");
      await settled(broker, 1, 1, "root alone");
      using rootServer = await file(path, "big", "server");
      await assertPaired(rootClient, rootServer, "root's pair");
      assert.ok(highClient.output.includes("paired") && topServer.output.includes("paired"));
    }, { isolateUids: true }),
});

Deno.test({
  name: "isolate-uids + policy: a cross-uid key pairs root with nobody, and the peer is nobody",
  ignore: otherUidsMissing !== undefined,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      // Several rounds, so that the objects and key stores are reused across scopes.
      for (let round = 0; round < 5; round++) {
        await using peer = new Peer(65534, path, `shared-${round}`, "server");
        await peer.sent();
        await settled(broker, 1, 1, "nobody waits on a shared key");
        // A root waiter on the same bytes but scoped to root must not take it…
        using rootServer = await file(path, `shared-${round}`, "server");
        await settled(broker, 2, 2, "root's server waits too");
        using rootClient = await file(path, `shared-${round}`, "client");
        const fd = await pairOf(rootClient, "root's client");
        // …oldest first across uids on a cross-uid key: nobody's server.
        const identity = await identityOn(fd);
        assert.match(identity, /^65534:\d+$/, `round ${round}: paired with ${identity}`);
        assert.equal(Number(identity.split(":")[1]), peer.child.pid, "setpriv execs the peer");
        await settled(broker, 1, 1, "root's server left");
        using rootClient2 = await file(path, `shared-${round}`, "client");
        await assertPaired(rootServer, rootClient2, "root's server on the shared key");
      }
    }, { isolateUids: true, authorize: (r) => policy.decide(r) }),
});

Deno.test({
  name: "capacity: nobody's newcomer sheds root's oldest waiter, and root pairs with it after",
  ignore: otherUidsMissing !== undefined,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      const waiters: RawClient[] = [];
      for (let i = 0; i < 6; i++) waiters.push(await file(path, `shed-${i}`, "server"));
      await settled(broker, 6, 6, "root fills the broker");
      await using peer = new Peer(65534, path, "shed-new", "server");
      await peer.sent();
      const shed = await waiters[0].readToEnd();
      assert.equal(shed.descriptors.length, 0, "root's oldest should be shed");
      await settled(broker, 6, 6, "nobody took the place");
      using rootClient = await file(path, "shed-new", "client");
      const identity = await identityOn(await pairOf(rootClient, "root's client"));
      assert.match(identity, /^65534:/);
      using lateForShed = await file(path, "shed-0", "client");
      await assertUnanswered(lateForShed, 50, "the shed waiter's key");
      lateForShed[Symbol.dispose]();
      for (let i = 1; i < 6; i++) {
        using partner = await file(path, `shed-${i}`, "client");
        await assertPaired(waiters[i], partner, `root waiter ${i}`);
      }
      waiters.forEach((waiter) => waiter[Symbol.dispose]());
      await settled(broker, 0, 0, "empty");
    }, { maxConnections: 6 }),
});

// ---------------------------------------------------------------------------------------------
// A real broker process: descriptors after everything

Deno.test("real broker: departed waiters, half-sent requests, mass disconnects, attached descriptors; descriptors at baseline", () =>
  withScope(async (scope) => {
    const broker = await startBroker(scope, ["--socket", scope.socket, "--handshake-timeout", "1"]);
    const path = scope.socket;
    await assertServes(path, "start");
    await sleep(300);
    const baseline = countOpenDescriptors(broker.pid);
    for (let round = 0; round < 3; round++) {
      // Departed waiters behind a newcomer.
      const departed: RawClient[] = [];
      for (let i = 0; i < 30; i++) departed.push(await file(path, `p-gone-${round}`, "none"));
      using newcomer = await RawClient.connect(path);
      await sleep(50);
      newcomer.send(request(`p-gone-${round}`, "none"));
      departed.forEach((client) => client[Symbol.dispose]());
      newcomer[Symbol.dispose]();
      // Split requests that stop halfway, and silent ones.
      const stuck: RawClient[] = [];
      for (let i = 0; i < 30; i++) {
        const client = await RawClient.connect(path);
        if (i % 3) client.send(request(`stuck-${i}`, "server").subarray(0, i * 30));
        stuck.push(client);
      }
      // Distinct keys, then a mass disconnect.
      const many: RawClient[] = [];
      for (let i = 0; i < 500; i++) many.push(await file(path, `many-${round}-${i}`, "server"));
      many.forEach((client) => client[Symbol.dispose]());
      // Descriptors attached to requests.
      for (let i = 0; i < 20; i++) {
        using bad = await RawClient.connect(path);
        bad.send(request("with-fd", "none"), [bad.socket.fd]);
        await bad.readToEnd();
      }
      await sleep(1500); // the handshake sweep
      stuck.forEach((client) => client[Symbol.dispose]());
      await assertServes(path, `round ${round}`);
    }
    await eventually(
      () => countOpenDescriptors(broker.pid) <= baseline,
      `broker descriptors back to ${baseline} (now ${countOpenDescriptors(broker.pid)})`,
    );
    await assertServes(path, "the churn");
  }));

Deno.test({
  name: "real broker, isolate-uids: a descriptor's next client never inherits the last one's uid",
  ignore: otherUidsMissing !== undefined,
  fn: () =>
    withScope(async (scope) => {
      await Deno.chmod(scope.dir, 0o755);
      const broker = await startBroker(scope, [
        "--socket",
        scope.socket,
        "--socket-mode",
        "0666",
        "--isolate-uids",
      ]);
      const path = scope.socket;
      await assertServes(path, "start");
      await sleep(300);
      const baseline = countOpenDescriptors(broker.pid);
      for (let round = 0; round < 6; round++) {
        // Nobody's connection leaves; root's next one most likely gets its descriptor and object.
        {
          const gone = new Peer(65534, path, `inherit-${round}`, "server");
          await gone.sent();
          await sleep(50);
          await gone[Symbol.asyncDispose]();
          await sleep(50);
        }
        using rootServer = await file(path, `inherit-${round}`, "server");
        await sleep(50);
        {
          await using nobodyClient = new Peer(65534, path, `inherit-${round}`, "client");
          await nobodyClient.sent();
          await sleep(200);
          assert.ok(
            !nobodyClient.output.includes("paired"),
            `round ${round}: nobody paired with root's server`,
          );
        }
        using rootClient = await file(path, `inherit-${round}`, "client");
        await assertPaired(rootServer, rootClient, `round ${round}: root's own pair`);

        // The other way: root's connection leaves, nobody's next one gets its object.
        const rootGone = await file(path, `inherit-rev-${round}`, "server");
        await sleep(50);
        rootGone[Symbol.dispose]();
        await sleep(50);
        await using nobodyServer = new Peer(65534, path, `inherit-rev-${round}`, "server");
        await nobodyServer.sent();
        await sleep(50);
        using rootProbe = await file(path, `inherit-rev-${round}`, "client");
        await assertUnanswered(rootProbe, 200, `round ${round}: root's client reached nobody`);
        rootProbe[Symbol.dispose]();
        await using nobodyPartner = new Peer(65534, path, `inherit-rev-${round}`, "client");
        await eventually(
          () => nobodyServer.output.includes("paired") && nobodyPartner.output.includes("paired"),
          `round ${round}: nobody's own pair`,
        );
      }
      await eventually(
        () => countOpenDescriptors(broker.pid) <= baseline,
        `broker descriptors back to ${baseline} (now ${countOpenDescriptors(broker.pid)})`,
      );
      await assertServes(path, "uid reuse rounds");
    }),
});

// ---------------------------------------------------------------------------------------------
// A model of the matching rules, against random traffic

Deno.test("model: 600 random requests, departures and split sends pair exactly as the rules say", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    // Keys sharing prefixes and lengths around the key stores' sizes.
    const base = new Uint8Array(1024).map((_, i) => 0x41 + (i % 7));
    const keys = [1, 2, 3, 63, 64, 65, 1023, 1024].flatMap((length) => {
      const other = base.slice(0, length);
      other[length - 1] ^= 0x20;
      return [base.slice(0, length), other];
    });
    const modes: Mode[] = ["none", "client", "server"];
    const peerOf = (mode: Mode): Mode =>
      mode === "none" ? "none" : mode === "client" ? "server" : "client";
    // The model: waiting clients per key and mode, oldest first.
    const waiting = new Map<string, RawClient[]>();
    const slot = (key: number, mode: Mode) => `${key}/${mode}`;
    // mulberry32: reproducible, and without the short low-bit cycles of a plain LCG.
    let seed = 12345;
    const random = (n: number) => {
      seed = (seed + 0x6d2b79f5) | 0;
      let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return (((t ^ (t >>> 14)) >>> 0) / 4294967296 * n) | 0;
    };
    let deepest = 0;
    let expectedPairs = 0;
    let count = 0;
    for (let step = 0; step < 600; step++) {
      const all = [...waiting.values()].flat();
      if (all.length > 0 && random(4) === 0) {
        // A waiter leaves.
        const victim = all[random(all.length)];
        for (const list of waiting.values()) {
          const at = list.indexOf(victim);
          if (at >= 0) list.splice(at, 1);
        }
        victim[Symbol.dispose]();
        count--;
      } else {
        const key = random(keys.length);
        const mode = modes[random(3)];
        const client = await RawClient.connect(path);
        const frame = request(keys[key], mode);
        if (random(3) === 0) {
          const cut = 1 + random(1039);
          client.send(frame.subarray(0, cut));
          await sleep(0);
          client.send(frame.subarray(cut));
        } else client.send(frame);
        const partners = waiting.get(slot(key, peerOf(mode))) ?? [];
        deepest = Math.max(deepest, partners.length);
        const partner = partners.shift();
        if (partner !== undefined) {
          expectedPairs++;
          count--;
          await assertPaired(partner, client, `step ${step}: key ${key} as ${mode}`);
          partner[Symbol.dispose]();
          client[Symbol.dispose]();
        } else {
          const list = waiting.get(slot(key, mode)) ?? [];
          list.push(client);
          waiting.set(slot(key, mode), list);
          count++;
        }
      }
      await settled(broker, count, count, `step ${step}`);
    }
    assert.equal(broker.stats.paired, expectedPairs);
    // The run must have exercised what it claims: many pairings, and queues of several waiters.
    assert.ok(expectedPairs > 100, `only ${expectedPairs} pairings`);
    assert.ok(deepest >= 3, `queues at most ${deepest} deep`);
    for (const client of [...waiting.values()].flat()) client[Symbol.dispose]();
    await settled(broker, 0, 0, "all gone");
    await descriptorsSettle(baseline, "after the model run");
    await assertServes(path, "the model run");
  }));
