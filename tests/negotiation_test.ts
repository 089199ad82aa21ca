/**
 * Protocol negotiation of the client: a v2 attempt first, the fallback to v1
 * against a v1-only C broker (scripts/floor.c) and its memory per path, and
 * a scripted broker that answers v2 wrongly, to prove that bad replies are
 * refused without leaking a descriptor.
 *
 * The floor reads a request until 1040 bytes are in, then checks `flags`
 * and closes a version 2 request. A v2 `GET_PAIR` or `LISTEN` with a key of
 * 1016 bytes is exactly 1040 bytes: the floor closes it at once, as the C
 * broker closes any v2 request (it takes each read for a whole message). With
 * a 1024-byte key the floor closes with 4 bytes unread, which the client sees
 * as `ECONNRESET`. A short v2 request, on the other hand, never gets an answer
 * from the floor, which waits for the rest: a short key that pairs through it
 * proves that no v2 attempt was made.
 *
 * @module
 */

import assert from "node:assert/strict";
import { listen } from "../client/listen.ts";
import {
  BrokerClosedError,
  BrokerRefusedError,
  BrokerVersionError,
  getPair,
  v1OnlyBrokers,
} from "../client/pair.ts";
import type { PairedSocket } from "../client/paired_socket.ts";
import { ProtocolError } from "../client/protocol.ts";
import {
  encodeHello,
  encodeRefused,
  encodeSetPair,
  type SetPair,
  validateRequest,
} from "../client/protocol_v2.ts";
import { Reactor } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  createSocketPair,
  listenUnix,
  readInto,
  sendMessage,
  UnixSocket,
} from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import { countOpenDescriptors, temporarySocketPath } from "./helpers.ts";
import { type Scope, withScope } from "./processes.ts";

const compilerMissing = !new Deno.Command("sh", { args: ["-c", "command -v cc"] }).outputSync()
  .success;

/** Builds scripts/floor.c into the scope's directory and starts it on `path`. */
async function startFloor(scope: Scope, path = scope.socket) {
  const binary = `${scope.dir}/floor`;
  try {
    Deno.statSync(binary);
  } catch {
    const source = new URL("../scripts/floor.c", import.meta.url).pathname;
    const { success, stderr } = await new Deno.Command("cc", {
      args: ["-O2", "-o", binary, source],
    }).output();
    assert.ok(success, `cc scripts/floor.c: ${new TextDecoder().decode(stderr)}`);
  }
  const floor = scope.spawn([path], { command: [binary] });
  await floor.waitUntil(`socket ${path}`, () => {
    try {
      return Deno.statSync(path).isSocket === true;
    } catch {
      return false;
    }
  });
  return floor;
}

/** Connections the floor holds now: its descriptors beyond the idle ones. */
function floorConnections(pid: number, idle: number): number {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)].length - idle;
}

/** `a` sends a byte to `b` and the other way round. */
async function assertConnected(a: PairedSocket, b: PairedSocket): Promise<void> {
  const buffer = new Uint8Array(1);
  await a.write(new Uint8Array([7]));
  assert.equal(await b.read(buffer), 1);
  assert.equal(buffer[0], 7);
  await b.write(new Uint8Array([8]));
  assert.equal(await a.read(buffer), 1);
  assert.equal(buffer[0], 8);
}

const exactKey = "k".repeat(1016); // a 1040-byte v2 request: the floor reads it all, then closes
const longKey = "r".repeat(1024); // a 1048-byte v2 request: the floor closes with 4 bytes unread

Deno.test({
  name:
    "a v1-only C broker closes the v2 GET_PAIR: getPair falls back to v1 on a new connection, and remembers the path",
  ignore: compilerMissing,
  fn: () =>
    withScope(async (scope) => {
      const floor = await startFloor(scope);
      Reactor.instance();
      const before = countOpenDescriptors();
      const idle = [...Deno.readDirSync(`/proc/${floor.pid}/fd`)].length;
      const [server, client] = await Promise.all([
        getPair(exactKey, { socket: scope.socket, mode: "server", pidfd: true }),
        getPair(exactKey, { socket: scope.socket, mode: "client" }),
      ]);
      assert.equal(server.protocol, 1);
      assert.equal(client.protocol, 1);
      assert.equal(server.peer, undefined, "v1 carries no credentials; the pidfd wish is dropped");
      assert.equal(server.type, "stream");
      await assertConnected(server, client);
      server.close();
      client.close();
      assert.ok(v1OnlyBrokers.has(scope.socket));

      // Remembered: a short v2 request would wait at the floor for ever, and a v2 attempt
      // would hold a second connection there while the first waits.
      const waiting = getPair("short", {
        socket: scope.socket,
        mode: "server",
        signal: AbortSignal.timeout(5000),
      });
      await floor.waitUntil("the waiter's connection", () => floorConnections(floor.pid, idle) > 0);
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(floorConnections(floor.pid, idle), 1, "one connection: straight to v1");
      const partner = await getPair("short", { socket: scope.socket, mode: "client" });
      const first = await waiting;
      assert.equal(first.protocol, 1);
      await assertConnected(first, partner);
      first.close();
      partner.close();
      await Reactor.instance().stopped;
      assert.equal(countOpenDescriptors(), before);
    }),
});

Deno.test({
  name: "a v1-only broker that resets the v2 attempt (bytes unread) is recognised all the same",
  ignore: compilerMissing,
  fn: () =>
    withScope(async (scope) => {
      await startFloor(scope);
      const [server, client] = await Promise.all([
        getPair(longKey, { socket: scope.socket, mode: "server" }),
        getPair(longKey, { socket: scope.socket, mode: "client" }),
      ]);
      assert.equal(server.protocol, 1);
      await assertConnected(server, client);
      server.close();
      client.close();
      await Reactor.instance().stopped;
    }),
});

Deno.test({
  name:
    "after the fallback, what v1 cannot carry fails clearly: seqpacket and dgram pairs, listeners, protocol 2",
  ignore: compilerMissing,
  fn: () =>
    withScope(async (scope) => {
      await startFloor(scope);
      Reactor.instance();
      const before = countOpenDescriptors();
      const path = scope.socket;
      await assert.rejects(
        getPair(exactKey, { socket: path, type: "seqpacket" }),
        (error: unknown) => {
          assert.ok(error instanceof BrokerVersionError);
          assert.equal(
            error.message,
            `broker at ${path} speaks only protocol v1: seqpacket pairs need v2`,
          );
          assert.equal(error.path, path);
          return true;
        },
      );
      assert.ok(v1OnlyBrokers.has(path));
      // Remembered: no connection is made for these (a short v2 request would hang).
      await assert.rejects(getPair("d", { socket: path, type: "dgram" }), {
        message: `broker at ${path} speaks only protocol v1: dgram pairs need v2`,
      });
      await assert.rejects(getPair("p", { socket: path, protocol: 2 }), BrokerVersionError);
      const remembered = listen("l", { socket: path });
      await assert.rejects(remembered.ready, {
        name: "BrokerVersionError",
        message: `broker at ${path} speaks only protocol v1: listeners need v2`,
      });
      await assert.rejects(remembered.accept(), BrokerVersionError);
      await remembered[Symbol.asyncDispose]();
      await Reactor.instance().stopped;
      assert.equal(countOpenDescriptors(), before);
    }),
});

Deno.test({
  name:
    "a listener's LISTEN closed unanswered by a v1-only broker: ready and iteration reject, the path is remembered",
  ignore: compilerMissing,
  fn: () =>
    withScope(async (scope) => {
      const other = `${scope.dir}/other.socket`;
      await startFloor(scope);
      await startFloor(scope, other);
      Reactor.instance();
      const before = countOpenDescriptors();
      const listener = listen(exactKey, { socket: scope.socket });
      await assert.rejects(listener.ready, {
        message: `broker at ${scope.socket} speaks only protocol v1: listeners need v2`,
      });
      let error: unknown;
      try {
        for await (const _ of listener) assert.fail("nothing to iterate");
      } catch (caught) {
        error = caught;
      }
      assert.ok(error instanceof BrokerVersionError);
      assert.ok(v1OnlyBrokers.has(scope.socket));
      assert.equal(listener.backlog, undefined);
      await listener[Symbol.asyncDispose]();
      // protocol 2 forced, on a fresh path: no fallback, and the reason.
      await assert.rejects(getPair(exactKey, { socket: other, protocol: 2 }), {
        name: "BrokerVersionError",
        message:
          `broker at ${other} speaks only protocol v1: it closed a protocol 2 request unanswered`,
      });
      await Reactor.instance().stopped;
      assert.equal(countOpenDescriptors(), before);
    }),
});

/** One broker message to send, with descriptors (at most 2) and a pause before it. */
interface Scripted {
  bytes: Uint8Array;
  fds?: number[];
  pauseMs?: number;
}

/**
 * A scripted v2 broker for one client: accepts it, checks that its request
 * is a valid v2 one, then sends `replies` in order (each in one sendmsg) and
 * closes.
 */
async function withScriptedBroker(
  replies: Scripted[],
  body: (path: string) => Promise<void>,
): Promise<void> {
  const socket = await temporarySocketPath();
  const listener = listenUnix(socket.path, 1);
  const served = (async () => {
    let fd = acceptConnection(listener.fd);
    while (fd < 0) {
      await listener.readiness.readable();
      fd = acceptConnection(listener.fd);
    }
    using connection = new UnixSocket(fd);
    const request = new Uint8Array(2048) as Uint8Array<ArrayBuffer>;
    let count = readInto(connection.fd, request);
    while (count < 0) {
      await connection.readiness.readable();
      count = readInto(connection.fd, request);
    }
    assert.equal(validateRequest(request, count), undefined);
    for (const reply of replies) {
      if (reply.pauseMs) await new Promise((resolve) => setTimeout(resolve, reply.pauseMs));
      const header = new MessageHeader(reply.bytes.slice() as Uint8Array<ArrayBuffer>, 2);
      const [first = -1, second = -1] = reply.fds ?? [];
      header.prepareSend(reply.bytes.length, first, second);
      sendMessage(connection.fd, header);
      reply.fds?.forEach(closeDescriptor);
    }
  })();
  try {
    await body(socket.path);
  } finally {
    listener.close();
    await served;
    await Reactor.instance().stopped;
    await socket.remove();
  }
}

/** One end of a fresh socketpair of `type` (1 stream, 5 seqpacket), and the other end. */
function socketPair(type = 1): [number, number] {
  const fds = new Int32Array(2);
  assert.equal(createSocketPair(fds, type), 0);
  return [fds[0], fds[1]];
}

const setPair = (fields: Partial<SetPair> = {}): Uint8Array =>
  encodeSetPair({
    delivery: "socketpair",
    type: "stream",
    descriptors: 1,
    peer: { pid: 4242, uid: 1000, gid: 100 },
    peerListener: false,
    peerVersion: 2,
    capabilities: 0xf,
    peerId: 9,
    ...fields,
  });

Deno.test("a HELLO, then a SET_PAIR in pieces (the descriptor with the first), gives the peer", async () => {
  Reactor.instance();
  const before = countOpenDescriptors();
  const [ours, theirs] = socketPair();
  const reply = setPair({ peerListener: true, peerVersion: 1 });
  await withScriptedBroker([
    { bytes: encodeHello(0xf, 0) },
    { bytes: reply.subarray(0, 5), fds: [ours], pauseMs: 20 },
    { bytes: reply.subarray(5), pauseMs: 20 },
  ], async (path) => {
    using socket = await getPair("pieces", { socket: path });
    assert.equal(socket.protocol, 2);
    assert.deepEqual(socket.peer, {
      pid: 4242,
      uid: 1000,
      gid: 100,
      listener: true,
      version: 1,
      id: 9,
    });
    await socket.write(new Uint8Array([1]));
    const byte = new Uint8Array(1) as Uint8Array<ArrayBuffer>;
    assert.equal(readInto(theirs, byte), 1);
  });
  closeDescriptor(theirs);
  assert.equal(countOpenDescriptors(), before);
});

Deno.test("a HELLO and the SET_PAIR read at once are both taken", async () => {
  const [ours, theirs] = socketPair();
  const joined = new Uint8Array([...encodeHello(0xf, 0), ...setPair()]);
  // The descriptors go with the HELLO's first byte here: still the SET_PAIR's, in the same read.
  await withScriptedBroker([{ bytes: joined, fds: [ours] }], async (path) => {
    using socket = await getPair("joined", { socket: path });
    assert.equal(socket.peer?.pid, 4242);
  });
  closeDescriptor(theirs);
});

Deno.test("a REFUSED rejects with the path, key and reason, and is no reason to fall back", async () => {
  await withScriptedBroker([{ bytes: encodeRefused("policy") }], async (path) => {
    await assert.rejects(getPair('x"y', { socket: path }), (error: unknown) => {
      assert.ok(error instanceof BrokerRefusedError);
      assert.ok(error instanceof BrokerClosedError, "code that handles closes handles refusals");
      assert.equal(error.message, `broker at ${path} refused key "x\\"y": policy`);
      assert.equal(error.reason, "policy");
      assert.equal(error.path, path);
      assert.deepEqual(error.key, new TextEncoder().encode('x"y'));
      return true;
    });
    assert.ok(!v1OnlyBrokers.has(path));
  });
});

Deno.test("end of stream after the HELLO is a BrokerClosedError, not a fallback", async () => {
  await withScriptedBroker([{ bytes: encodeHello(0xf, 0) }], async (path) => {
    await assert.rejects(getPair("k", { socket: path }), (error: unknown) => {
      assert.ok(error instanceof BrokerClosedError && !(error instanceof BrokerRefusedError));
      return true;
    });
    assert.ok(!v1OnlyBrokers.has(path));
  });
});

// The far ends of the pairs whose near ends the scripted broker sends (and closes).
const farEnds: number[] = [];

/** One end of a fresh socketpair of `type`; the other end waits in {@link farEnds}. */
function end(type = 1): number {
  const [near, far] = socketPair(type);
  farEnds.push(far);
  return near;
}

const wrongReplies: [string, () => Scripted[], RegExp][] = [
  ["no descriptor", () => [{ bytes: setPair() }], /descriptors 0 \(must be 1/],
  ["one descriptor where it says 2", () => [{
    bytes: setPair({ descriptors: 2 }),
    fds: [end()],
  }], /descriptors 1 \(must be 2/],
  [
    "two descriptors where it says 1",
    () => [{ bytes: setPair(), fds: [end(), end()] }],
    /descriptors 2 \(must be 1/,
  ],
  ["a pidfd nobody asked for", () => [{
    bytes: setPair({ descriptors: 2 }),
    fds: [end(), end()],
  }], /descriptors 2 \(must be 1: no pidfd was asked for/],
  ["another type than asked", () => [{
    bytes: setPair({ type: "seqpacket" }),
    fds: [end(5)],
  }], /type 1 \(must be 0, stream/],
  [
    "a descriptor on a HELLO",
    () => [{ bytes: encodeHello(0xf, 0), fds: [end()] }],
    /descriptors 1 \(only a SET_PAIR/,
  ],
  [
    "two HELLOs",
    () => [{ bytes: encodeHello(0xf, 0) }, { bytes: encodeHello(0xf, 0) }],
    /sequence/,
  ],
  ["a v1 SET_PAIR", () => {
    const v1 = new Uint8Array(1044);
    v1.set([2, 0, 0, 0, 1, 0, 0, 0, 8]);
    return [{ bytes: v1, fds: [end()] }];
  }, /flags 0x1/],
  ["a message cut short", () => [{ bytes: setPair().subarray(0, 30), fds: [end()] }], /length 30/],
];

for (const [what, replies, message] of wrongReplies) {
  Deno.test(`a v2 reply with ${what} is refused and leaks nothing`, async () => {
    Reactor.instance();
    const before = countOpenDescriptors();
    await withScriptedBroker(replies(), async (path) => {
      await assert.rejects(getPair("k", { socket: path }), (error: unknown) => {
        assert.ok(error instanceof ProtocolError, String(error));
        assert.match(error.message, message);
        return true;
      });
    });
    farEnds.splice(0).forEach(closeDescriptor);
    assert.equal(countOpenDescriptors(), before);
  });
}
