/**
 * Throws random and mutated requests, v1 and v2, at a running broker for a
 * bounded time, while well-formed clients keep pairing through it. Set FUZZ_SEED to replay
 * a run and FUZZ_MS to run longer.
 */

import assert from "node:assert/strict";
import { getPair } from "../client/pair.ts";
import { encodeGetPair, type Mode } from "../client/protocol.ts";
import { encodeCredit, encodeRequest, SOCKET_TYPES } from "../client/protocol_v2.ts";
import { closeDescriptor, createSocketPair } from "../ffi/socket.ts";
import { countOpenDescriptors, eventually, RawClient, withBroker } from "./helpers.ts";

const seed = Number(Deno.env.get("FUZZ_SEED") ?? Date.now() % 2 ** 31);
const durationMs = Number(Deno.env.get("FUZZ_MS") ?? 2500);
const WORKERS = 12;

/** A small deterministic generator (mulberry32), so a failing seed replays. */
function generator(state: number) {
  const next = () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  const below = (n: number) => Math.floor(next() * n);
  const bytes = (n: number) => Uint8Array.from({ length: n }, () => below(256));
  return { below, bytes, pick: <T>(items: readonly T[]) => items[below(items.length)] };
}
type Random = ReturnType<typeof generator>;

const MODES: readonly Mode[] = ["none", "client", "server"];

/** One hostile input: what to send, and whether the broker must close it unanswered. */
interface Attack {
  name: string;
  chunks: Uint8Array[];
  attachDescriptor?: boolean;
  mustBeClosed: boolean;
}

function validFrame(random: Random): Uint8Array {
  const key = random.bytes(1 + random.below(random.pick([8, 64, 1024])));
  return encodeGetPair(key, random.pick(MODES));
}

/** Splits `bytes` into random pieces, as a slow or odd sender would write them. */
function fragments(random: Random, bytes: Uint8Array): Uint8Array[] {
  const pieces: Uint8Array[] = [];
  for (let at = 0; at < bytes.length;) {
    const size = 1 + random.below(Math.min(600, bytes.length - at));
    pieces.push(bytes.subarray(at, at + size));
    at += size;
  }
  return pieces;
}

const ATTACKS: ((random: Random) => Attack)[] = [
  (random) => ({
    name: "random bytes",
    chunks: [random.bytes(random.below(3000))],
    mustBeClosed: false,
  }),
  (random) => {
    const frame = validFrame(random);
    const view = new DataView(frame.buffer);
    // Each field set to a value the protocol forbids.
    random.pick([
      () => view.setUint32(0, random.pick([0, 2, 3, 0xffffffff]), true),
      () => view.setUint32(4, random.pick([0, 2, 0x11, 0x80000001]), true),
      () => view.setUint32(8, random.pick([0, 8, 1032, 0xffffffff]), true),
      () => view.setUint16(12, 3 + random.below(0xfffd), true),
      () => view.setUint16(14, random.pick([0, 1025, 0xffff]), true),
    ])();
    return { name: "field out of range", chunks: fragments(random, frame), mustBeClosed: true };
  },
  (random) => {
    const frame = validFrame(random);
    return {
      name: "truncated",
      chunks: [frame.subarray(0, random.below(1040))],
      mustBeClosed: false,
    };
  },
  (random) => ({
    name: "oversized",
    chunks: [new Uint8Array([...validFrame(random), ...random.bytes(1 + random.below(2000))])],
    mustBeClosed: false, // it may pair before the excess is read; either way it ends
  }),
  (random) => ({
    name: "two requests",
    chunks: [new Uint8Array([...validFrame(random), ...validFrame(random)])],
    mustBeClosed: false,
  }),
  (random) => ({
    name: "descriptor attached",
    chunks: [validFrame(random)],
    attachDescriptor: true,
    mustBeClosed: true,
  }),
  (random) => {
    const frame = validFrame(random);
    for (let flips = 1 + random.below(5); flips > 0; flips--) {
      frame[random.below(16)] ^= 1 << random.below(8);
    }
    return { name: "bit flips in the header", chunks: [frame], mustBeClosed: false };
  },
  (random) => {
    const frame = validV2Frame(random);
    const view = new DataView(frame.buffer);
    // Each v2 field set to a value the protocol forbids.
    random.pick([
      () => view.setUint32(0, random.pick([0, 2, 4, 5, 6, 0xffffffff]), true),
      () => view.setUint32(4, random.pick([0x12, 0x22, 0x80000002]), true),
      () => view.setUint32(8, random.pick([0, 12, 1037, 0xffffffff]), true),
      () => view.setUint16(12, 3 + random.below(0xfffd), true),
      () => view.setUint16(14, 3 + random.below(0xfffd), true),
      () => view.setUint32(16, 2 << random.below(30), true),
      () => view.setUint16(20, random.pick([0, frame.length - 23, 1025, 0xffff]), true),
    ])();
    return { name: "v2 field out of range", chunks: fragments(random, frame), mustBeClosed: true };
  },
  (random) => ({
    name: "v2 request, then more",
    chunks: [new Uint8Array([...validV2Frame(random), ...random.bytes(1 + random.below(64))])],
    mustBeClosed: false, // it may pair first; either way it ends
  }),
  (random) => ({
    name: "v2 truncated",
    chunks: [validV2Frame(random).subarray(0, random.below(24))],
    mustBeClosed: false,
  }),
  (random) => {
    // A listener on a random key that then sends garbage or too much credit.
    const listen = encodeRequest("listen", random.bytes(1 + random.below(32)), {
      mode: random.pick(MODES),
      backlog: random.below(100),
    });
    const after = random.pick([
      () => random.bytes(1 + random.below(64)),
      () => encodeCredit(1 + random.below(65535)),
      () => encodeRequest("get_pair", "again"),
    ])();
    return { name: "v2 listener misbehaving", chunks: [listen, after], mustBeClosed: false };
  },
];

function validV2Frame(random: Random): Uint8Array {
  const key = random.bytes(1 + random.below(random.pick([8, 64, 1024])));
  const listen = random.below(4) === 0;
  return encodeRequest(listen ? "listen" : "get_pair", key, {
    mode: random.pick(MODES),
    type: random.pick(SOCKET_TYPES),
    pidfd: random.below(2) === 0,
    backlog: listen ? random.below(100) : 0,
  });
}

async function attack(path: string, random: Random): Promise<void> {
  const { name, chunks, attachDescriptor, mustBeClosed } = random.pick(ATTACKS)(random);
  using client = await RawClient.connect(path);
  const pair = new Int32Array(2);
  if (attachDescriptor) assert.equal(createSocketPair(pair), 0);
  try {
    for (const [index, chunk] of chunks.entries()) {
      if (chunk.length === 0) continue;
      try {
        client.send(chunk, attachDescriptor && index === 0 ? [pair[0]] : []);
      } catch {
        return; // the broker already closed us: fine for every attack
      }
    }
    if (mustBeClosed) {
      const reply = await client.readToEnd(2000);
      reply.descriptors.forEach(closeDescriptor);
      assert.equal(reply.bytes.length, 0, `${name}: the broker answered instead of closing`);
    } else if (!(await client.stillOpenAfter(random.below(30)))) {
      return;
    }
  } finally {
    if (attachDescriptor) pair.forEach(closeDescriptor);
  }
}

Deno.test(`fuzz: hostile clients for ${durationMs} ms (seed ${seed}); well-formed ones still pair`, () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    const deadline = Date.now() + durationMs;
    let attacks = 0;
    let pairs = 0;
    const hostile = Array.from({ length: WORKERS }, async (_, worker) => {
      const random = generator(seed + worker);
      while (Date.now() < deadline) {
        await attack(path, random);
        attacks++;
      }
    });
    const wellFormed = (async () => {
      while (Date.now() < deadline) {
        const signal = AbortSignal.timeout(5000);
        const key = `honest-${pairs}`;
        const [a, b] = await Promise.all([
          getPair(key, { socket: path, mode: "server", signal }),
          getPair(key, { socket: path, mode: "client", signal }),
        ]);
        await a.write(new Uint8Array([pairs & 0xff]));
        const got = new Uint8Array(1);
        assert.equal(await b.read(got), 1);
        assert.equal(got[0], pairs & 0xff);
        a.close();
        b.close();
        pairs++;
      }
    })();
    await Promise.all([...hostile, wellFormed]);
    console.log(
      `fuzz seed ${seed}: ${attacks} hostile clients, ${pairs} honest pairs, ${broker.stats.rejected} rejected`,
    );
    assert.ok(pairs > 10, `only ${pairs} honest pairs got through`);
    assert.ok(broker.stats.rejected > 0);
    await eventually(() => broker.stats.open === 0, "every hostile connection to be closed");
    assert.equal(broker.stats.waiting, 0);
    assert.equal(countOpenDescriptors(), baseline, "a descriptor leaked");
  }));
