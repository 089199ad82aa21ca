/**
 * Protocol negotiation of the client: a v2 attempt first, the fallback to v1
 * against a v1-only C broker (scripts/floor.c, which closes a request of
 * another version as soon as its flags are in, as the C broker does) and the
 * memory per path, counted by a v1-only broker that logs what each
 * connection sent; and a scripted broker that answers v2 wrongly, to prove
 * that bad replies are refused without leaking a descriptor.
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
import { encodeSetPair as encodeSetPairV1, ProtocolError } from "../client/protocol.ts";
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
import { acceptOne, buildFloor, countOpenDescriptors, temporarySocketPath } from "./helpers.ts";
import { startFloor, withScope } from "./processes.ts";

const floor = await buildFloor();
const compilerMissing = floor === undefined;

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

// A 1048-byte v2 request: the floor's first read takes 1044 bytes, and it closes with 4 unread.
const longKey = "r".repeat(1024);

Deno.test({
  name:
    "a v1-only C broker closes the v2 GET_PAIR: getPair falls back to v1 on a new connection and pairs",
  ignore: compilerMissing,
  fn: () =>
    withScope(async (scope) => {
      await startFloor(scope, floor!);
      Reactor.instance();
      const before = countOpenDescriptors();
      const [server, client] = await Promise.all([
        getPair("fallback", { socket: scope.socket, mode: "server", pidfd: true }),
        getPair("fallback", { socket: scope.socket, mode: "client" }),
      ]);
      assert.equal(server.protocol, 1);
      assert.equal(client.protocol, 1);
      assert.equal(server.peer, undefined, "v1 carries no credentials; the pidfd wish is dropped");
      assert.equal(server.type, "stream");
      await assertConnected(server, client);
      server.close();
      client.close();
      assert.ok(v1OnlyBrokers.has(scope.socket));
      await Reactor.instance().stopped;
      assert.equal(countOpenDescriptors(), before);
    }),
});

/**
 * A v1-only broker that logs what each connection sent: `v2` for a request
 * of version 2, which it closes unanswered as the C broker does, `v1` for a
 * v1 `GET_PAIR`, which it answers with one end of a fresh socketpair.
 */
async function withCountingV1Broker(
  body: (path: string, log: string[]) => Promise<void>,
): Promise<void> {
  const socket = await temporarySocketPath();
  const listener = listenUnix(socket.path, 16);
  const log: string[] = [];
  const farEnds: number[] = [];
  let serving = true;
  const served = (async () => {
    while (serving) {
      const fd = acceptConnection(listener.fd);
      if (fd < 0) {
        await listener.readiness.readable();
        continue;
      }
      using connection = new UnixSocket(fd);
      const request = new Uint8Array(1044) as Uint8Array<ArrayBuffer>;
      let received = 0;
      while (received < 8 || (request[4] === 1 && received < request.length)) {
        const count = readInto(connection.fd, request.subarray(received));
        if (count === 0) break;
        if (count > 0) received += count;
        else await connection.readiness.readable();
      }
      if (request[4] !== 1) {
        log.push(`v${request[4]}`);
        continue;
      }
      log.push("v1");
      const [near, far] = socketPair();
      farEnds.push(far);
      const header = new MessageHeader(encodeSetPairV1() as Uint8Array<ArrayBuffer>, 1);
      header.prepareSend(1044, near);
      assert.equal(sendMessage(connection.fd, header), 1044);
      closeDescriptor(near);
    }
  })();
  try {
    await body(socket.path, log);
  } finally {
    serving = false;
    listener.close();
    await served;
    farEnds.forEach(closeDescriptor);
    await Reactor.instance().stopped;
    await socket.remove();
  }
}

Deno.test("the fallback is remembered per path: the second getPair goes straight to v1", async () => {
  await withCountingV1Broker(async (path, log) => {
    const first = await getPair("once", { socket: path });
    assert.equal(first.protocol, 1);
    first.close();
    assert.deepEqual(log, ["v2", "v1"], "a v2 attempt, closed, then v1 on a new connection");
    const second = await getPair("twice", { socket: path });
    assert.equal(second.protocol, 1);
    second.close();
    assert.deepEqual(log, ["v2", "v1", "v1"], "no second v2 attempt");
    // protocol: 1 never makes the attempt.
    const forced = await getPair("forced", { socket: path, protocol: 1 });
    forced.close();
    assert.deepEqual(log, ["v2", "v1", "v1", "v1"]);
  });
});

Deno.test({
  name: "a v1-only broker that resets the v2 attempt (bytes unread) is recognised all the same",
  ignore: compilerMissing,
  fn: () =>
    withScope(async (scope) => {
      await startFloor(scope, floor!);
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
      await startFloor(scope, floor!);
      Reactor.instance();
      const before = countOpenDescriptors();
      const path = scope.socket;
      await assert.rejects(
        getPair("s", { socket: path, type: "seqpacket" }),
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
      // Remembered: these fail before connecting.
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
      await startFloor(scope, floor!);
      await startFloor(scope, floor!, other);
      Reactor.instance();
      const before = countOpenDescriptors();
      const listener = listen("l", { socket: scope.socket });
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
      await assert.rejects(getPair("p", { socket: other, protocol: 2 }), {
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
    using connection = await acceptOne(listener);
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
