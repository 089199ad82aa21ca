import assert from "node:assert/strict";
import { Broker } from "../broker/broker.ts";
import { getPair } from "../client/pair.ts";
import type { PairedSocket } from "../client/paired_socket.ts";
import { encodeGetPair, type Mode } from "../client/protocol.ts";
import { closeDescriptor, createSocketPair } from "../ffi/socket.ts";
import {
  countOpenDescriptors,
  eventually,
  RawClient,
  temporarySocketPath,
  withBroker,
} from "./helpers.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const goldenSetPair = await Deno.readFile(new URL("./fixtures/set_pair.bin", import.meta.url));

async function readExactly(socket: PairedSocket, length: number): Promise<Uint8Array> {
  const buffer = new Uint8Array(length);
  let filled = 0;
  while (filled < length) {
    const count = await socket.read(buffer.subarray(filled));
    if (count === null) throw new Error(`end of stream after ${filled} of ${length} bytes`);
    filled += count;
  }
  return buffer;
}

/** Sends a message each way through a fresh pair and checks it arrives intact. */
async function assertConnected(a: PairedSocket, b: PairedSocket, label: string): Promise<void> {
  const there = encoder.encode(`${label}: a to b`);
  const back = encoder.encode(`${label}: b to a`);
  await Promise.all([a.write(there), b.write(back)]);
  assert.equal(decoder.decode(await readExactly(b, there.length)), `${label}: a to b`);
  assert.equal(decoder.decode(await readExactly(a, back.length)), `${label}: b to a`);
}

async function pairUp(path: string, key: string, modes: [Mode, Mode]) {
  return await Promise.all(modes.map((mode) => getPair(key, { socket: path, mode })));
}

/** Asserts that a request stays unpaired: it is still waiting after `ms`. */
async function assertStaysWaiting(path: string, key: string, mode: Mode, ms = 200) {
  const signal = AbortSignal.timeout(ms);
  await assert.rejects(getPair(key, { socket: path, mode, signal }), { name: "TimeoutError" });
}

for (const modes of [["none", "none"], ["client", "server"], ["server", "client"]] as const) {
  Deno.test(`${modes[0]} and ${modes[1]} pair, and bytes flow both ways`, () =>
    withBroker(async (broker, path) => {
      const [a, b] = await pairUp(path, "vhost-user-1", [...modes]);
      try {
        await assertConnected(a, b, modes.join("+"));
        assert.equal(broker.stats.paired, 1);
        assert.equal(broker.stats.waiting, 0);
      } finally {
        a.close();
        b.close();
      }
    }));
}

for (const [first, second] of [["client", "client"], ["server", "server"], ["none", "client"]]) {
  Deno.test(`${first} and ${second} never pair`, () =>
    withBroker(async (broker, path) => {
      const waiting = getPair("same-key", { socket: path, mode: first as Mode });
      await eventually(() => broker.stats.waiting === 1, "the first request to wait");
      await assertStaysWaiting(path, "same-key", second as Mode);
      assert.equal(broker.stats.paired, 0);
      // The first still pairs with a compatible peer afterwards.
      const peer = first === "none" ? "none" : first === "client" ? "server" : "client";
      const [a, b] = await Promise.all([
        waiting,
        getPair("same-key", { socket: path, mode: peer }),
      ]);
      await assertConnected(a, b, "late peer");
      a.close();
      b.close();
    }));
}

Deno.test("keys match byte for byte: a prefix or a trailing NUL is another key", () =>
  withBroker(async (broker, path) => {
    const waiting = getPair(encoder.encode("key"), { socket: path });
    await eventually(() => broker.stats.waiting === 1, "the first request to wait");
    await assertStaysWaiting(path, "ke", "none");
    await assertStaysWaiting(path, "key\0", "none");
    const exact = await getPair(new Uint8Array([0x6b, 0x65, 0x79]), { socket: path });
    const first = await waiting;
    await assertConnected(first, exact, "binary key");
    first.close();
    exact.close();
  }));

Deno.test("waiters on one key are served oldest first", () =>
  withBroker(async (broker, path) => {
    const servers: Promise<PairedSocket>[] = [];
    for (let i = 0; i < 3; i++) {
      servers.push(getPair("fifo", { socket: path, mode: "server" }));
      await eventually(() => broker.stats.waiting === i + 1, `server ${i} to wait`);
    }
    for (let i = 0; i < 3; i++) {
      const client = await getPair("fifo", { socket: path, mode: "client" });
      const server = await servers[i];
      await client.write(encoder.encode(`${i}`));
      assert.equal(decoder.decode(await readExactly(server, 1)), `${i}`);
      client.close();
      server.close();
    }
  }));

Deno.test("200 concurrent pairings each connect the right two peers", () =>
  withBroker(async (broker, path) => {
    const pairs = await Promise.all(
      Array.from({ length: 200 }, (_, i) => pairUp(path, `concurrent-${i}`, ["server", "client"])),
    );
    await Promise.all(pairs.map(([a, b], i) => assertConnected(a, b, `pair ${i}`)));
    pairs.flat().forEach((socket) => socket.close());
    assert.equal(broker.stats.paired, 200);
  }));

Deno.test("a GET_PAIR sent one byte at a time pairs", () =>
  withBroker(async (broker, path) => {
    const peer = getPair("drip", { socket: path, mode: "client" });
    await eventually(() => broker.stats.waiting === 1, "the peer to wait");
    using raw = await RawClient.connect(path);
    // The broker answers once 1040 bytes are in, so a drip stops there (as a spec-literal client does).
    const request = encodeGetPair("drip", "server").subarray(0, 1040);
    for (const byte of request) {
      raw.send(new Uint8Array([byte]));
      if (byte % 7 === 0) await new Promise((resolve) => setTimeout(resolve, 0));
    }
    const reply = await raw.readToEnd();
    const paired = await peer;
    try {
      assert.deepEqual(reply.bytes, goldenSetPair);
      assert.equal(reply.descriptors.length, 1);
    } finally {
      reply.descriptors.forEach(closeDescriptor);
      paired.close();
    }
  }));

Deno.test("a spec-literal 1040-byte GET_PAIR pairs; the 4 padding bytes may follow", () =>
  withBroker(async (_broker, path) => {
    using literal = await RawClient.connect(path);
    literal.send(encodeGetPair("literal", "none").subarray(0, 1040));
    using padded = await RawClient.connect(path);
    const full = encodeGetPair("literal", "none");
    padded.send(full.subarray(0, 1040));
    padded.send(full.subarray(1040));
    const replies = await Promise.all([literal.readToEnd(), padded.readToEnd()]);
    for (const reply of replies) {
      assert.deepEqual(reply.bytes, goldenSetPair);
      assert.equal(reply.descriptors.length, 1);
      reply.descriptors.forEach(closeDescriptor);
    }
  }));

Deno.test("the reply is byte for byte what the C broker sends, with one descriptor", () =>
  withBroker(async (_broker, path) => {
    using server = await RawClient.connect(path);
    server.send(
      await Deno.readFile(new URL("./fixtures/get_pair_server_vhost-user-1.bin", import.meta.url)),
    );
    using client = await RawClient.connect(path);
    client.send(
      await Deno.readFile(new URL("./fixtures/get_pair_client_vhost-user-1.bin", import.meta.url)),
    );
    for (const reply of await Promise.all([server.readToEnd(), client.readToEnd()])) {
      assert.equal(reply.bytes.length, 1044);
      assert.deepEqual(reply.bytes, goldenSetPair);
      assert.equal(reply.descriptors.length, 1);
      reply.descriptors.forEach(closeDescriptor);
    }
  }));

/** Malformed requests, each with what makes it so. */
function malformedRequests(): [string, Uint8Array][] {
  const mutate = (edit: (frame: Uint8Array, view: DataView) => void) => {
    const frame = encodeGetPair("victim", "none");
    edit(frame, new DataView(frame.buffer));
    return frame;
  };
  return [
    ["request 0", mutate((_, v) => v.setUint32(0, 0, true))],
    ["request SET_PAIR", mutate((_, v) => v.setUint32(0, 2, true))],
    ["request 3", mutate((_, v) => v.setUint32(0, 3, true))],
    ["version 2", mutate((_, v) => v.setUint32(4, 2, true))],
    ["an extra flag bit", mutate((_, v) => v.setUint32(4, 0x11, true))],
    ["size 1032", mutate((_, v) => v.setUint32(8, 1032, true))],
    ["mode 3", mutate((_, v) => v.setUint16(12, 3, true))],
    ["key_len 0", mutate((_, v) => v.setUint16(14, 0, true))],
    ["key_len 1025", mutate((_, v) => v.setUint16(14, 1025, true))],
    [
      "a second request",
      new Uint8Array([...encodeGetPair("x", "client"), ...encodeGetPair("x", "client")]),
    ],
    ["garbage after the request", new Uint8Array([...encodeGetPair("y", "client"), 1, 2, 3, 4, 5])],
  ];
}

Deno.test("each malformed request closes only its sender; others still pair", () =>
  withBroker(async (broker, path) => {
    const bystander = getPair("bystander", { socket: path, mode: "server" });
    await eventually(() => broker.stats.waiting === 1, "the bystander to wait");
    const cases = malformedRequests();
    for (const [what, bytes] of cases) {
      using raw = await RawClient.connect(path);
      raw.send(bytes);
      const reply = await raw.readToEnd();
      assert.equal(reply.bytes.length, 0, `${what}: no reply expected`);
      assert.equal(reply.descriptors.length, 0, what);
    }
    assert.equal(broker.stats.rejected, cases.length);
    const [a, b] = await Promise.all([
      bystander,
      getPair("bystander", { socket: path, mode: "client" }),
    ]);
    await assertConnected(a, b, "after the abuse");
    a.close();
    b.close();
    assert.equal(broker.stats.waiting, 0);
  }));

Deno.test("a request carrying a descriptor is rejected and the descriptor closed", () =>
  withBroker(async (broker, path) => {
    const pair = new Int32Array(2);
    assert.equal(createSocketPair(pair), 0);
    using raw = await RawClient.connect(path);
    raw.send(encodeGetPair("smuggler", "none"), [pair[0]]);
    const reply = await raw.readToEnd();
    assert.equal(reply.bytes.length, 0);
    assert.equal(broker.stats.rejected, 1);
    // Our end stays open only while some copy of the other end lives; the broker's was closed.
    closeDescriptor(pair[0]);
    const probe = new Uint8Array(1);
    const { libc } = await import("../ffi/libc.ts");
    assert.equal(libc.read(pair[1], probe, 1 as unknown as bigint), 0, "the broker kept a copy");
    closeDescriptor(pair[1]);
  }));

Deno.test("a waiter that disconnects frees its slot and is never handed to a peer", () =>
  withBroker(async (broker, path) => {
    const gone = await RawClient.connect(path);
    gone.send(encodeGetPair("ghost", "server"));
    await eventually(() => broker.stats.waiting === 1, "the waiter to be filed");
    gone[Symbol.dispose]();
    await eventually(
      () => broker.stats.waiting === 0 && broker.stats.open === 0,
      "the slot to free",
    );
    await assertStaysWaiting(path, "ghost", "client");
    const [a, b] = await pairUp(path, "ghost", ["server", "client"]);
    await assertConnected(a, b, "after the ghost");
    a.close();
    b.close();
  }));

Deno.test("a partner that vanished unnoticed is skipped; the newcomer pairs with the next", () =>
  withBroker(async (broker, path) => {
    // Two waiters; the first hangs up in the same instant the newcomer arrives.
    const vanishing = await RawClient.connect(path);
    vanishing.send(encodeGetPair("race", "server"));
    await eventually(() => broker.stats.waiting === 1, "the first waiter");
    const second = getPair("race", { socket: path, mode: "server" });
    await eventually(() => broker.stats.waiting === 2, "the second waiter");
    vanishing[Symbol.dispose]();
    const client = await getPair("race", { socket: path, mode: "client" });
    const server = await second;
    await assertConnected(client, server, "second waiter");
    client.close();
    server.close();
  }));

Deno.test("the broker's descriptors return to their baseline after 1,000 pairings", () =>
  withBroker(async (broker, path) => {
    // Warm up once so lazily opened descriptors (reactor, eventfd) are in the baseline.
    for (const socket of await pairUp(path, "warm-up", ["none", "none"])) socket.close();
    const baseline = countOpenDescriptors();
    for (let round = 0; round < 10; round++) {
      const pairs = await Promise.all(
        Array.from(
          { length: 100 },
          (_, i) => pairUp(path, `leak-${round}-${i}`, ["client", "server"]),
        ),
      );
      pairs.flat().forEach((socket) => socket.close());
    }
    assert.equal(broker.stats.paired, 1001);
    await eventually(() => broker.stats.open === 0, "every connection to close");
    assert.equal(countOpenDescriptors(), baseline);
  }));

Deno.test("a stale socket file is replaced; a live broker's socket is not stolen", async () => {
  const socket = await temporarySocketPath();
  try {
    const first = await Broker.listen({ socket: socket.path });
    await assert.rejects(
      Broker.listen({ socket: socket.path }),
      /another broker is already listening/,
    );
    // The first broker was not disturbed by the attempt.
    const [a, b] = await pairUp(socket.path, "still-here", ["none", "none"]);
    a.close();
    b.close();
    await first.close();
    // Leave a stale socket file behind: bind and close without unlinking.
    const stale = Deno.listen({ transport: "unix", path: socket.path });
    stale.close();
    if (!(await Deno.lstat(socket.path).then((info) => info.isSocket, () => false))) {
      const { listenUnix } = await import("../ffi/socket.ts");
      listenUnix(socket.path, 1).close();
    }
    const second = await Broker.listen({ socket: socket.path });
    await second.close();
    await assert.rejects(
      Deno.lstat(socket.path),
      Deno.errors.NotFound,
      "socket file removed on close",
    );
    await Deno.writeTextFile(socket.path, "not a socket");
    await assert.rejects(Broker.listen({ socket: socket.path }), /is not a socket/);
    assert.equal(await Deno.readTextFile(socket.path), "not a socket");
  } finally {
    await socket.remove();
  }
});

Deno.test("an abstract socket name works and leaves no file", async () => {
  const path = `@one-socket-test-${Deno.pid}`;
  const broker = await Broker.listen({ socket: path });
  try {
    const [a, b] = await pairUp(path, "abstract", ["client", "server"]);
    await assertConnected(a, b, "abstract");
    a.close();
    b.close();
  } finally {
    await broker.close();
  }
});

Deno.test("closing the broker closes waiting clients, which see it", () =>
  withBroker(async (broker, path) => {
    const waiting = getPair("orphan", { socket: path });
    await eventually(() => broker.stats.waiting === 1, "the request to wait");
    await broker.close();
    await assert.rejects(waiting, { name: "BrokerClosedError" });
  }));

Deno.test("a broker shutting down leaves alone a socket file that another broker created since", async () => {
  const socket = await temporarySocketPath();
  try {
    const first = await Broker.listen({ socket: socket.path });
    await Deno.remove(socket.path); // say, an operator cleaning up by hand
    const second = await Broker.listen({ socket: socket.path });
    await first.close();
    const [a, b] = await pairUp(socket.path, "still-served", ["none", "none"]);
    a.close();
    b.close();
    await second.close();
    await assert.rejects(Deno.lstat(socket.path), Deno.errors.NotFound);
  } finally {
    await socket.remove();
  }
});
