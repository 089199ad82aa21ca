// Protocol v2 at the broker, spoken byte for byte by a raw client: negotiation
// replies, attested credentials, pidfds, socket types, listeners and their credit.
import assert from "node:assert/strict";
import {
  encodeGetPair,
  encodeSetPair as encodeSetPairV1,
  MESSAGE_SIZE,
} from "../client/protocol.ts";
import {
  Capability,
  decodeHello,
  decodeRefused,
  decodeSetPair,
  encodeCredit,
  encodeRequest,
} from "../client/protocol_v2.ts";
import { AccessPolicy } from "../broker/policy.ts";
import { closeDescriptor, readInto, sendFrom, socketKind } from "../ffi/socket.ts";
import { countOpenDescriptors, eventually, RawClient, withBroker } from "./helpers.ts";
import { assertJoined, expectSetPair, readMessage, reply, request } from "./raw_v2.ts";

const me = { pid: Deno.pid, uid: Deno.uid()!, gid: Deno.gid()! };

Deno.test("v2: a waiting request hears HELLO, then both get a SET_PAIR attesting the other", () =>
  withBroker(async (broker, path) => {
    using first = await request(path, "get_pair", "attest", { mode: "server" });
    const hello = await reply(first);
    assert.equal(hello.reply.request, "hello");
    const capabilities = (hello.reply as { capabilities: number }).capabilities;
    assert.ok(capabilities & Capability.Listen && capabilities & Capability.Seqpacket);
    using second = await request(path, "get_pair", "attest", { mode: "client" });
    const [a, b] = [await expectSetPair(second), await expectSetPair(first)];
    assert.deepEqual(a.reply.peer, me);
    assert.deepEqual(b.reply.peer, me);
    assert.equal(a.reply.peerVersion, 2);
    assert.equal(a.reply.descriptors, 1);
    assert.equal(a.reply.type, "stream");
    assert.notEqual(a.reply.peerId, b.reply.peerId, "each names the other's connection");
    assertJoined(a.descriptors[0], b.descriptors[0]);
    [...a.descriptors, ...b.descriptors].forEach(closeDescriptor);
    assert.equal(await readMessage(first), undefined, "closed after the SET_PAIR");
    assert.equal(broker.stats.paired, 1);
  }));

Deno.test("v2 pairs with v1: each side gets the SET_PAIR of its own version", () =>
  withBroker(async (_broker, path) => {
    using v1 = await RawClient.connect(path);
    v1.send(encodeGetPair("mixed", "server"));
    await eventually(() => true, "");
    using v2 = await request(path, "get_pair", "mixed", { mode: "client" });
    const fromV2 = await expectSetPair(v2);
    assert.equal(fromV2.reply.peerVersion, 1);
    const old = await v1.readToEnd();
    assert.deepEqual(old.bytes, encodeSetPairV1(), "byte for byte the C broker's reply");
    assert.equal(old.descriptors.length, 1);
    assertJoined(fromV2.descriptors[0], old.descriptors[0]);
    [...fromV2.descriptors, ...old.descriptors].forEach(closeDescriptor);
  }));

Deno.test("v2: only the same socket type pairs, and the pair is of that type", () =>
  withBroker(async (broker, path) => {
    using stream = await request(path, "get_pair", "typed", { mode: "server" });
    await reply(stream); // HELLO
    using seq = await request(path, "get_pair", "typed", { mode: "client", type: "seqpacket" });
    await reply(seq); // HELLO: a stream server does not serve it
    assert.equal(broker.stats.waiting, 2);
    using seqServer = await request(path, "get_pair", "typed", {
      mode: "server",
      type: "seqpacket",
    });
    const [a, b] = [await expectSetPair(seqServer), await expectSetPair(seq)];
    assert.equal(a.reply.type, "seqpacket");
    assert.equal(socketKind(a.descriptors[0]).type, "SOCK_SEQPACKET");
    // Boundaries hold: two writes are two reads.
    assert.equal(sendFrom(a.descriptors[0], new Uint8Array(3)), 3);
    assert.equal(sendFrom(a.descriptors[0], new Uint8Array(5)), 5);
    const buffer = new Uint8Array(64);
    assert.equal(readInto(b.descriptors[0], buffer), 3);
    assert.equal(readInto(b.descriptors[0], buffer), 5);
    [...a.descriptors, ...b.descriptors].forEach(closeDescriptor);
    assert.equal(broker.stats.waiting, 1, "the stream server still waits");
  }));

Deno.test("v2: a pidfd of the partner comes as a second descriptor when asked for", () =>
  withBroker(async (_broker, path) => {
    using a = await request(path, "get_pair", "pidfd", { pidfd: true });
    await reply(a);
    using b = await request(path, "get_pair", "pidfd");
    const withPidfd = await expectSetPair(a);
    const without = await expectSetPair(b);
    assert.equal(without.reply.descriptors, 1);
    assert.equal(without.descriptors.length, 1);
    if (withPidfd.reply.descriptors === 1) {
      console.log("  (no SO_PEERPIDFD on this kernel: checked that none was sent)");
      assert.equal(withPidfd.descriptors.length, 1);
    } else {
      assert.equal(withPidfd.descriptors.length, 2);
      const info = Deno.readTextFileSync(`/proc/self/fdinfo/${withPidfd.descriptors[1]}`);
      assert.match(info, new RegExp(`^Pid:\\s+${Deno.pid}$`, "m"));
    }
    [...withPidfd.descriptors, ...without.descriptors].forEach(closeDescriptor);
  }));

Deno.test("v2 listener: serves clients at once up to its backlog, then they wait for CREDIT", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    using listener = await request(path, "listen", "svc", { mode: "server", backlog: 2 });
    const hello = await readMessage(listener);
    assert.equal(decodeHello(hello!.bytes).backlog, 2);
    const clients: RawClient[] = [];
    for (let i = 0; i < 3; i++) {
      const client = await RawClient.connect(path);
      client.send(encodeGetPair("svc", "client"));
      clients.push(client);
    }
    const served = [await expectSetPair(listener), await expectSetPair(listener)];
    for (const [i, delivery] of served.entries()) {
      assert.equal(delivery.reply.peerVersion, 1);
      assert.deepEqual(delivery.reply.peer, me);
      const end = await clients[i].readToEnd();
      assert.equal(end.bytes.length, MESSAGE_SIZE);
      assertJoined(delivery.descriptors[0], end.descriptors[0]);
      [...delivery.descriptors, ...end.descriptors].forEach(closeDescriptor);
    }
    await eventually(() => broker.stats.waiting === 1, "the third client to wait");
    assert.deepEqual(broker.listeners().map((l) => [l.inFlight, l.served]), [[2, 2]]);
    listener.send(encodeCredit(1));
    const third = await expectSetPair(listener);
    const end = await clients[2].readToEnd();
    assertJoined(third.descriptors[0], end.descriptors[0]);
    [...third.descriptors, ...end.descriptors].forEach(closeDescriptor);
    assert.equal(broker.stats.waiting, 0);
    // More credit than connections outstanding is a protocol error, told before the close.
    listener.send(encodeCredit(3)); // two are outstanding
    const refused = await readMessage(listener);
    assert.match(decodeRefused(refused!.bytes), /CREDIT: count 3/);
    assert.equal(await readMessage(listener), undefined);
    await eventually(() => broker.stats.listeners === 0, "the listener to be gone");
    clients.forEach((client) => client[Symbol.dispose]());
    await eventually(() => broker.stats.open === 0, "every connection closed");
    // Only the listener's own end of its registration is left open here.
    assert.equal(countOpenDescriptors(), baseline + 1, "no descriptor left behind");
  }));

Deno.test("v2 listeners on one key take turns; one that leaves frees the key", () =>
  withBroker(async (broker, path) => {
    using one = await request(path, "listen", "turns", { mode: "server" });
    using two = await request(path, "listen", "turns", { mode: "server" });
    await readMessage(one);
    await readMessage(two);
    const served: number[] = [];
    for (let i = 0; i < 4; i++) {
      using client = await request(path, "get_pair", "turns", { mode: "client" });
      const end = await expectSetPair(client);
      end.descriptors.forEach(closeDescriptor);
      served.push(end.reply.peerId);
    }
    assert.equal(new Set(served).size, 2, "both listeners served");
    assert.notEqual(served[0], served[1]);
    assert.equal(served[0], served[2]);
    for (const listener of [one, two]) {
      for (let i = 0; i < 2; i++) {
        (await expectSetPair(listener)).descriptors.forEach(closeDescriptor);
      }
    }
    one[Symbol.dispose]();
    two[Symbol.dispose]();
    await eventually(() => broker.stats.listeners === 0, "both listeners to be gone");
    using waiter = await request(path, "get_pair", "turns", { mode: "client" });
    assert.equal((await reply(waiter)).reply.request, "hello", "a client now waits as usual");
  }));

Deno.test("v2 listener registered while clients wait serves them at once, oldest first", () =>
  withBroker(async (broker, path) => {
    const waiting: RawClient[] = [];
    for (let i = 0; i < 3; i++) {
      waiting.push(await request(path, "get_pair", "late", { mode: "client" }));
      await reply(waiting[i]); // HELLO
    }
    using listener = await request(path, "listen", "late", { mode: "server" });
    await readMessage(listener);
    const ids: number[] = [];
    for (let i = 0; i < 3; i++) {
      const delivery = await expectSetPair(listener);
      ids.push(delivery.reply.peerId);
      delivery.descriptors.forEach(closeDescriptor);
      (await expectSetPair(waiting[i])).descriptors.forEach(closeDescriptor);
    }
    assert.deepEqual(ids, [...ids].sort((a, b) => a - b), "oldest first");
    assert.equal(broker.stats.waiting, 0);
    waiting.forEach((client) => client[Symbol.dispose]());
  }));

Deno.test("v2 listener that never reads holds its backlog only; other keys pair on", () =>
  withBroker(async (broker, path) => {
    using stalled = await request(path, "listen", "stalled", { mode: "server", backlog: 4 });
    const clients: RawClient[] = [];
    for (let i = 0; i < 50; i++) {
      const client = await RawClient.connect(path);
      client.send(encodeGetPair("stalled", "client"));
      clients.push(client);
    }
    await eventually(() => broker.stats.waiting === 46, "all but the backlog to wait");
    using a = await request(path, "get_pair", "other");
    await reply(a);
    using b = await request(path, "get_pair", "other");
    const [x, y] = [await expectSetPair(a), await expectSetPair(b)];
    [...x.descriptors, ...y.descriptors].forEach(closeDescriptor);
    clients.forEach((client) => client[Symbol.dispose]());
    stalled[Symbol.dispose]();
    await eventually(() => broker.stats.open === 0, "everything closed");
  }));

const listenPolicy = AccessPolicy.parse(
  `[[rules]]
action = "allow"
key = "open-key"

[[rules]]
action = "allow"
key = "listen-key"
listen = true
`,
  "toml",
  "test.toml",
);

Deno.test("v2: a denied request hears REFUSED with the reason; a rule covers listeners only when it says so", () =>
  withBroker(async (_broker, path) => {
    using listener = await request(path, "listen", "open-key");
    assert.equal(decodeRefused((await readMessage(listener))!.bytes), "policy");
    using pair = await request(path, "get_pair", "open-key");
    assert.equal((await reply(pair)).reply.request, "hello");
    using allowed = await request(path, "listen", "listen-key");
    assert.equal((await reply(allowed)).reply.request, "hello");
  }, { authorize: (request) => listenPolicy.decide(request) }));

Deno.test("v2: bytes after the request close it; malformed v2 requests close without a word", () =>
  withBroker(async (broker, path) => {
    using chatty = await RawClient.connect(path);
    const frame = encodeRequest("get_pair", "k");
    chatty.send(new Uint8Array([...frame, 0]));
    assert.equal((await chatty.readToEnd()).bytes.length, 0);
    using late = await request(path, "get_pair", "k2");
    await reply(late); // HELLO
    late.send(new Uint8Array([1]));
    assert.match(decodeRefused((await readMessage(late))!.bytes), /sequence/);
    using bad = await RawClient.connect(path);
    const wrongType = encodeRequest("get_pair", "k");
    wrongType[14] = 9;
    bad.send(wrongType);
    assert.equal((await bad.readToEnd()).bytes.length, 0);
    assert.equal(broker.metrics.protocolErrors.type, 1);
    assert.equal(broker.stats.waiting, 0);
  }));

Deno.test("v2 SET_PAIR decodes with the codec the client uses", () =>
  withBroker(async (_broker, path) => {
    using a = await request(path, "get_pair", "codec");
    await reply(a);
    using b = await request(path, "get_pair", "codec");
    const message = await readMessage(b);
    const decoded = decodeSetPair(message!.bytes);
    assert.equal(decoded.delivery, "socketpair");
    message!.descriptors.forEach(closeDescriptor);
    (await expectSetPair(a)).descriptors.forEach(closeDescriptor);
  }));

Deno.test("v2: one uid holds at most maxListenersPerUid listeners; the next hears listener_limit", () =>
  withBroker(async (broker, path) => {
    const listeners: RawClient[] = [];
    for (let i = 0; i < 3; i++) {
      listeners.push(await request(path, "listen", `limit-${i}`));
      assert.equal((await reply(listeners[i])).reply.request, "hello");
    }
    using fourth = await request(path, "listen", "limit-3");
    assert.equal(decodeRefused((await readMessage(fourth))!.bytes), "listener_limit");
    assert.equal(broker.metrics.dropped.listener_limit, 1);
    listeners.pop()![Symbol.dispose]();
    await eventually(() => broker.stats.listeners === 2, "a place to free");
    using again = await request(path, "listen", "limit-3");
    assert.equal((await reply(again)).reply.request, "hello");
    listeners.forEach((listener) => listener[Symbol.dispose]());
  }, { maxListenersPerUid: 3 }));

Deno.test("v2: a listener spent by waiting clients at its registration is no handshake to time out", () =>
  withBroker(async (broker, path) => {
    using waiting = await request(path, "get_pair", "spent", { mode: "client" });
    await reply(waiting);
    using listener = await request(path, "listen", "spent", { mode: "server", backlog: 1 });
    await readMessage(listener); // HELLO
    (await expectSetPair(listener)).descriptors.forEach(closeDescriptor);
    (await expectSetPair(waiting)).descriptors.forEach(closeDescriptor);
    await new Promise((resolve) => setTimeout(resolve, 1500)); // past the 1 s handshake timeout
    assert.equal(broker.stats.listeners, 1, "still registered");
    assert.equal(broker.metrics.dropped.handshake_timeout, undefined);
    listener.send(encodeCredit(1));
    using client = await request(path, "get_pair", "spent", { mode: "client" });
    (await expectSetPair(client)).descriptors.forEach(closeDescriptor);
    (await expectSetPair(listener)).descriptors.forEach(closeDescriptor);
  }, { handshakeTimeoutMs: 1000 }));
