/**
 * The client library's protocol v2 against our real broker: negotiated
 * pairs with v2 and v1 partners and their attested peers (another process
 * and another uid too), pidfds and who owns them, seqpacket and dgram
 * messages, and listeners: many clients through one, shared between two,
 * backpressure, freeing the key, the broker ending a registration. Every test
 * counts this process's descriptors before and after.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { Broker } from "../broker/broker.ts";
import { listen, type Listener } from "../client/listen.ts";
import {
  BrokerClosedError,
  BrokerRefusedError,
  getPair,
  type PairOptions,
  v1OnlyBrokers,
} from "../client/pair.ts";
import { closeDescriptor, type PairedSocket } from "../client/paired_socket.ts";
import { OsError } from "../ffi/errors.ts";
import { Reactor } from "../ffi/reactor.ts";
import {
  buildCProgram,
  countOpenDescriptors,
  eventually,
  temporarySocketPath,
  withBroker,
} from "./helpers.ts";
import { asUser, NOBODY, otherUsersMissing } from "./other_users.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * Runs `body` with a broker, then checks that this process holds no more
 * descriptors than before (the reactor's own, made first, live as long as
 * the process).
 */
async function leakFree(
  body: (broker: Broker, path: string) => Promise<void>,
  options: Parameters<typeof withBroker>[1] = {},
): Promise<void> {
  Reactor.instance();
  const before = countOpenDescriptors();
  await withBroker(async (broker, path) => {
    await body(broker, path);
    assert.ok(!v1OnlyBrokers.has(path), "our broker speaks v2");
  }, options);
  assert.equal(countOpenDescriptors(), before, "descriptors left open");
}

/** The pid a pidfd refers to, from `/proc/self/fdinfo`. */
function pidOf(pidfd: number): number {
  const info = Deno.readTextFileSync(`/proc/self/fdinfo/${pidfd}`);
  const line = info.split("\n").find((entry) => entry.startsWith("Pid:"));
  assert.ok(line !== undefined, `fd ${pidfd} is not a pidfd:\n${info}`);
  return Number(line.slice(4).trim());
}

function isOpen(fd: number): boolean {
  try {
    Deno.statSync(`/proc/self/fd/${fd}`);
    return true;
  } catch {
    return false;
  }
}

/** `a` sends a byte to `b` and the other way round. */
async function assertConnected(a: PairedSocket, b: PairedSocket): Promise<void> {
  const buffer = new Uint8Array(1);
  await a.write(new Uint8Array([7]));
  assert.equal(await b.read(buffer), 1);
  await b.write(new Uint8Array([8]));
  assert.equal(await a.read(buffer), 1);
  assert.equal(buffer[0], 8);
}

const me = { pid: Deno.pid, uid: Deno.uid()!, gid: Deno.gid()! };

Deno.test("a v2 pair: both sides learn the other's credentials and version, and pair with a v1 client", () =>
  leakFree(async (_broker, socket) => {
    const [server, client] = await Promise.all([
      getPair("v2-v2", { socket, mode: "server" }),
      getPair("v2-v2", { socket, mode: "client" }),
    ]);
    for (const end of [server, client]) {
      assert.equal(end.protocol, 2);
      assert.equal(end.type, "stream");
      assert.equal(end.peer?.version, 2);
      assert.equal(end.peer?.listener, false);
      assert.deepEqual([end.peer?.pid, end.peer?.uid, end.peer?.gid], [me.pid, me.uid, me.gid]);
      assert.equal(end.peer?.pidfd, undefined, "no pidfd unless asked");
    }
    assert.notEqual(server.peer?.id, client.peer?.id);
    await assertConnected(server, client);
    server.close();
    client.close();

    const [v2, v1] = await Promise.all([
      getPair("v2-v1", { socket, mode: "server" }),
      getPair("v2-v1", { socket, mode: "client", protocol: 1 }),
    ]);
    assert.equal(v2.protocol, 2);
    assert.equal(v2.peer?.version, 1);
    assert.equal(v2.peer?.pid, me.pid);
    assert.equal(v1.protocol, 1);
    assert.equal(v1.peer, undefined);
    await assertConnected(v2, v1);
    v2.close();
    v1.close();
  }));

Deno.test("a pidfd refers to the partner's process and lives until close(), detach() or not", () =>
  leakFree(async (_broker, socket) => {
    const [server, client] = await Promise.all([
      getPair("pidfd", { socket, mode: "server", pidfd: true }),
      getPair("pidfd", { socket, mode: "client", pidfd: true }),
    ]);
    const pidfd = server.peer!.pidfd!;
    assert.ok(pidfd >= 0);
    assert.equal(pidOf(pidfd), Deno.pid);
    assert.equal(pidOf(client.peer!.pidfd!), Deno.pid);
    // detach() hands on the socket only: the pidfd stays with the object until close().
    const fd = server.detach();
    assert.ok(isOpen(pidfd));
    assert.equal(server.peer?.pidfd, pidfd);
    server.close();
    assert.ok(!isOpen(pidfd));
    assert.equal(server.peer?.pidfd, -1);
    server.close(); // again: nothing, and above all no close of a reused number
    closeDescriptor(fd);
    // using closes both.
    const clientPidfd = client.peer!.pidfd!;
    {
      using _owned = client;
    }
    assert.ok(!isOpen(clientPidfd));
    assert.equal(client.fd, -1);
  }));

const cClient = await buildCProgram("sp_client");

Deno.test({
  name: "the peer of a v1 C client running as another uid is that process: pid, uid, gid, pidfd",
  ignore: otherUsersMissing !== undefined || cClient === undefined,
  fn: async () => {
    Reactor.instance();
    const before = countOpenDescriptors();
    const socket = await temporarySocketPath();
    const directory = socket.path.slice(0, socket.path.lastIndexOf("/"));
    Deno.chmodSync(directory, 0o755);
    Deno.chmodSync(cClient!.slice(0, cClient!.lastIndexOf("/")), 0o755);
    const { Broker } = await import("../broker/broker.ts");
    const broker = await Broker.listen({ socket: socket.path, socketAccess: { mode: 0o666 } });
    try {
      const [command, ...args] = asUser(NOBODY, cClient!, socket.path, "other-uid", "client");
      const child = new Deno.Command(command, { args, stdout: "piped", stderr: "piped" }).spawn();
      await using server = await getPair("other-uid", {
        socket: socket.path,
        mode: "server",
        pidfd: true,
      });
      assert.deepEqual(
        { ...server.peer, pidfd: undefined, id: 0 },
        {
          pid: child.pid, // setpriv execs the client: one process
          uid: NOBODY,
          gid: NOBODY,
          listener: false,
          version: 1,
          id: 0,
          pidfd: undefined,
        },
      );
      assert.equal(pidOf(server.peer!.pidfd!), child.pid);
      const line = new Uint8Array(4);
      assert.equal(await server.read(line), 4);
      assert.equal(decoder.decode(line), "ping");
      await server.write(encoder.encode("Ping"));
      const done = await child.output();
      assert.ok(done.success, decoder.decode(done.stderr));
    } finally {
      await broker.close();
      await Reactor.instance().stopped;
      await socket.remove();
    }
    assert.equal(countOpenDescriptors(), before);
  },
});

Deno.test("seqpacket pairs keep message boundaries: whole messages in, whole messages out, then end", () =>
  leakFree(async (_broker, socket) => {
    const options: PairOptions = { socket, type: "seqpacket" };
    const [a, b] = await Promise.all([getPair("seq", options), getPair("seq", options)]);
    assert.equal(a.type, "seqpacket");
    assert.equal(a.protocol, 2);
    const big = new Uint8Array(100_000).map((_, i) => i % 251);
    await a.send(encoder.encode("hello"));
    await a.send(encoder.encode("world"));
    await a.send(big);
    await a.send(encoder.encode("after"));
    const buffer = new Uint8Array(64);
    const first = await b.receive(buffer);
    assert.equal(decoder.decode(first!), "hello");
    assert.equal(first!.buffer, buffer.buffer, "a message that fits lands in the buffer");
    assert.equal(decoder.decode((await b.receive())!), "world");
    const whole = await b.receive(buffer);
    assert.deepEqual(whole, big, "a message longer than the buffer comes whole, in its own array");
    assert.equal(decoder.decode((await b.receive(buffer))!), "after");
    // A receive that waits, answered later.
    const later = b.receive();
    await new Promise((resolve) => setTimeout(resolve, 20));
    await a.send(new Uint8Array([1]));
    assert.deepEqual(await later, new Uint8Array([1]));
    // A long message that arrives while a receive waits with nothing queued comes whole too.
    const laterBig = b.receive(buffer);
    await new Promise((resolve) => setTimeout(resolve, 20));
    await a.send(big);
    assert.deepEqual(await laterBig, big);
    await assert.rejects(a.send(new Uint8Array(0)), RangeError);
    a.close();
    assert.equal(await b.receive(buffer), null, "the peer's close is the end");
    assert.equal(await b.receive(), null);
    b.close();
  }));

Deno.test("dgram pairs carry datagrams, empty ones too; a closed peer refuses sends; close() ends a wait", () =>
  leakFree(async (_broker, socket) => {
    const options: PairOptions = { socket, type: "dgram", pidfd: true };
    const [a, b] = await Promise.all([getPair("dgram", options), getPair("dgram", options)]);
    assert.equal(a.type, "dgram");
    assert.equal(pidOf(a.peer!.pidfd!), Deno.pid);
    await a.send(encoder.encode("one"));
    await a.send(new Uint8Array(0));
    await a.send(encoder.encode("three"));
    assert.equal(decoder.decode((await b.receive())!), "one");
    assert.deepEqual(await b.receive(new Uint8Array(8)), new Uint8Array(0));
    assert.equal(decoder.decode((await b.receive(new Uint8Array(2)))!), "three");
    const waiting = b.receive();
    a.close();
    await new Promise((resolve) => setTimeout(resolve, 20));
    await assert.rejects(b.send(encoder.encode("x")), (error: unknown) => {
      assert.ok(error instanceof OsError);
      assert.equal(error.code, "ECONNREFUSED");
      return true;
    });
    b.close();
    await assert.rejects(waiting, Deno.errors.BadResource);
  }));

Deno.test("message calls on a stream socket say to use read and write", () =>
  leakFree(async (_broker, socket) => {
    const [a, b] = await Promise.all([getPair("s", { socket }), getPair("s", { socket })]);
    await assert.rejects(a.send(new Uint8Array(1)), {
      name: "TypeError",
      message: "send: a stream socket carries bytes, not messages; use write",
    });
    await assert.rejects(a.receive(), { name: "TypeError", message: /use read$/ });
    a.close();
    b.close();
  }));

Deno.test("requests of different types never pair, even on one key and compatible modes", () =>
  leakFree(async (broker, socket) => {
    const signal = AbortSignal.timeout(300);
    const attempts = (["stream", "seqpacket", "dgram"] as const).map((type) =>
      getPair("typed", { socket, type, signal })
    );
    await eventually(() => broker.stats.waiting === 3, "three waiters");
    for (const attempt of attempts) await assert.rejects(attempt, { name: "TimeoutError" });
    await eventually(() => broker.stats.waiting === 0, "the waiters to leave");
  }));

Deno.test("a refusal names the path, the key and the broker's reason", () =>
  leakFree(async (_broker, socket) => {
    await assert.rejects(getPair("forbidden", { socket }), (error: unknown) => {
      assert.ok(error instanceof BrokerRefusedError);
      assert.equal(error.reason, "policy");
      assert.equal(error.message, `broker at ${socket} refused key "forbidden": policy`);
      return true;
    });
    const listener = listen("forbidden", { socket });
    await assert.rejects(listener.ready, BrokerRefusedError);
    await assert.rejects(listener.accept(), { name: "BrokerRefusedError" });
    await listener[Symbol.asyncDispose]();
  }, {
    authorize: (request) => ({
      allowed: !decoder.decode(request.key).startsWith("forbidden"),
      rule: "test",
    }),
  }));

/** Serves every connection of `listener`: reads 4 bytes, answers them reversed, closes. */
async function serveReversed(listener: Listener, served: PairedSocket[] = []): Promise<void> {
  for await (const socket of listener) {
    served.push(socket);
    (async () => {
      const buffer = new Uint8Array(4);
      let got = 0;
      while (got < 4) {
        const count = await socket.read(buffer.subarray(got));
        if (count === null) break;
        got += count;
      }
      await socket.write(buffer.reverse());
      socket.close();
    })().catch(() => socket.close());
  }
}

/** A client of `key`: sends 4 bytes, expects them back reversed; returns its socket's protocol. */
async function reversedBy(path: string, key: string, i: number, protocol?: 1 | 2): Promise<1 | 2> {
  await using socket = await getPair(key, { socket: path, mode: "client", protocol });
  const word = new Uint8Array(new Uint32Array([i]).buffer);
  await socket.write(word);
  const back = new Uint8Array(4);
  let got = 0;
  while (got < 4) {
    const count = await socket.read(back.subarray(got));
    assert.ok(count !== null, `client ${i}: end of stream after ${got} bytes`);
    got += count;
  }
  assert.deepEqual(back, word.slice().reverse(), `client ${i}`);
  return socket.protocol;
}

Deno.test("one listener serves 1,000 clients, v1 and v2 mixed and concurrent, each its own bytes", () =>
  leakFree(async (broker, socket) => {
    const listener = listen("many", { socket, backlog: 32 });
    await listener.ready;
    assert.equal(listener.backlog, 32);
    assert.equal(listener.path, socket);
    assert.deepEqual(listener.key, encoder.encode("many"));
    const served: PairedSocket[] = [];
    const serving = serveReversed(listener, served);
    const protocols: (1 | 2)[] = [];
    const CONCURRENCY = 100;
    for (let start = 0; start < 1000; start += CONCURRENCY) {
      const batch = Array.from(
        { length: CONCURRENCY },
        (_, j) => reversedBy(socket, "many", start + j, (start + j) % 2 === 0 ? 1 : undefined),
      );
      protocols.push(...await Promise.all(batch));
    }
    assert.equal(protocols.filter((p) => p === 1).length, 500);
    assert.equal(protocols.filter((p) => p === 2).length, 500);
    assert.equal(served.length, 1000);
    assert.equal(served.filter((s) => s.peer?.version === 1).length, 500);
    assert.ok(served.every((s) => s.protocol === 2 && s.peer?.pid === Deno.pid));
    assert.equal(broker.listeners()[0].served, 1000);
    listener.close();
    await serving;
    await eventually(() => broker.stats.listeners === 0, "the key freed");
  }));

Deno.test("two listeners on one key share its clients", () =>
  leakFree(async (_broker, socket) => {
    const first = listen("shared", { socket, backlog: 4 });
    const second = listen("shared", { socket, backlog: 4 });
    await Promise.all([first.ready, second.ready]);
    const [servedFirst, servedSecond]: PairedSocket[][] = [[], []];
    const serving = [serveReversed(first, servedFirst), serveReversed(second, servedSecond)];
    await Promise.all(Array.from({ length: 40 }, (_, i) => reversedBy(socket, "shared", i)));
    assert.equal(servedFirst.length + servedSecond.length, 40);
    assert.ok(servedFirst.length > 0 && servedSecond.length > 0, "both took a share");
    first.close();
    second.close();
    await Promise.all(serving);
  }));

Deno.test("a listener that takes nothing holds at most its backlog; taking lets the others through", () =>
  leakFree(async (broker, socket) => {
    await using listener = listen("slow", { socket, backlog: 2 });
    await listener.ready;
    const clients = Array.from({ length: 5 }, () => getPair("slow", { socket, mode: "client" }));
    await eventually(
      () => broker.listeners()[0]?.inFlight === 2 && broker.stats.waiting === 3,
      "2 delivered and 3 waiting",
    );
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(broker.stats.waiting, 3, "still waiting: the listener took nothing");
    const taken: PairedSocket[] = [];
    for (let i = 0; i < 5; i++) taken.push((await listener.accept())!);
    const ends = await Promise.all(clients);
    assert.equal(broker.stats.waiting, 0);
    for (const [i, end] of ends.entries()) {
      assert.equal(end.peer?.listener, true);
      end.close();
      taken[i].close();
    }
  }));

Deno.test("aborting a listener frees the key: waiting clients go to the next one; untaken connections close", () =>
  leakFree(async (broker, socket) => {
    const controller = new AbortController();
    const first = listen("handover", { socket, backlog: 1, signal: controller.signal });
    await first.ready;
    // One delivered and never taken, one waiting at the broker.
    const untaken = getPair("handover", { socket, mode: "client" });
    const waiting = getPair("handover", { socket, mode: "client" });
    await eventually(() => broker.stats.waiting === 1, "one client waiting");
    controller.abort();
    for await (const _ of first) assert.fail("an aborted listener yields nothing");
    assert.equal(await first.accept(), null);
    const orphan = await untaken;
    assert.equal(await orphan.read(new Uint8Array(1)), null, "closed with the listener");
    orphan.close();
    await eventually(() => broker.stats.listeners === 0, "the key freed");
    await using second = listen("handover", { socket, backlog: 1 });
    await second.ready;
    const taken = await second.accept();
    const client = await waiting;
    assert.equal(client.peer?.id, broker.listeners()[0].id);
    await assertConnected(taken!, client);
    taken!.close();
    client.close();
  }));

Deno.test("the broker ending a registration ends iteration: kicked with a reason, stopped without one", async () => {
  await leakFree(async (broker, socket) => {
    const listener = listen("kicked", { socket });
    await listener.ready;
    const client = getPair("kicked", { socket, mode: "client" });
    await eventually(() => broker.listeners()[0]?.inFlight === 1, "one delivered");
    assert.ok(broker.kick(broker.listeners()[0].id));
    // The connection delivered before comes first; then the reason.
    const delivered = await listener.accept();
    assert.ok(delivered !== null);
    await assert.rejects(listener.accept(), (error: unknown) => {
      assert.ok(error instanceof BrokerRefusedError, String(error));
      assert.equal(error.reason, "kicked");
      return true;
    });
    delivered.close();
    (await client).close();
    await listener[Symbol.asyncDispose]();
  });
  Reactor.instance();
  const before = countOpenDescriptors();
  const socket = await temporarySocketPath();
  const { Broker } = await import("../broker/broker.ts");
  const broker = await Broker.listen({ socket: socket.path });
  const listener = listen("stopped", { socket: socket.path });
  await listener.ready;
  const iteration = (async () => {
    for await (const _ of listener) assert.fail("no clients");
  })();
  await broker.close();
  await assert.rejects(iteration, (error: unknown) => {
    assert.ok(error instanceof BrokerClosedError && !(error instanceof BrokerRefusedError));
    assert.match(error.message, /stopped while the request waited/);
    return true;
  });
  listener.close();
  await Reactor.instance().stopped;
  await socket.remove();
  assert.equal(countOpenDescriptors(), before);
});

Deno.test("a listener asks in v2 even where getPair last found a v1-only broker", () =>
  leakFree(async (_broker, socket) => {
    // As if the path had been served by a v1-only broker a moment ago, and ours replaced it.
    v1OnlyBrokers.add(socket);
    await using listener = listen("replaced", { socket });
    await listener.ready;
    assert.equal(listener.backlog, 16);
  }));
