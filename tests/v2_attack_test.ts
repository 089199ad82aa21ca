/**
 * A hostile review of protocol v2 at the broker (listeners with credit,
 * attested credentials and pidfds, socket types, REFUSED reasons), spoken
 * byte for byte by raw clients, some of them a real second uid.
 *
 * A connection of another uid is made by a `perl` run as that uid through
 * `setpriv`; this (root) process then takes a copy of the connected socket
 * with `pidfd_getfd(2)`, so that the broker sees that uid (and that pid) in
 * `SO_PEERCRED` while the test speaks through it like any raw client.
 *
 * Each test holds an attack off; those for bugs the review found (since fixed)
 * say so in their comment. Tests that need root (a second uid, a broker
 * stripped of capabilities) are skipped without it.
 *
 * @module
 */

import assert from "node:assert/strict";
import { encodeGetPair, encodeSetPair as encodeSetPairV1, type Mode } from "../client/protocol.ts";
import {
  decodeRefused,
  decodeReply,
  encodeRequest,
  HEADER_SIZE,
  type SocketType,
} from "../client/protocol_v2.ts";
import {
  closeDescriptor,
  sendFrom,
  setNonblocking,
  shutdownWrite,
  socketKind,
  tryConnectUnix,
  UnixSocket,
} from "../ffi/socket.ts";
import { countOpenDescriptors, eventually, RawClient, withBroker } from "./helpers.ts";
import {
  assertJoined,
  closeAll,
  credit,
  expectHello,
  expectRefused,
  expectSetPair,
  listen,
  listenerIds,
  readMessage,
  reply,
  request,
  silentFor,
  v1,
} from "./raw_v2.ts";
import {
  type Cli,
  MOD,
  PERMISSIONS,
  type Scope,
  sleep,
  startBroker,
  withScope,
} from "./processes.ts";

const NOBODY = 65534;
const ROOT = Deno.uid() === 0;

const me = { pid: Deno.pid, uid: Deno.uid()!, gid: Deno.gid()! };

// ---------------------------------------------------------------------------------------------
// Connections of another uid

// pidfd_open(2) and pidfd_getfd(2) (glibc 2.36), opened on first use.
let pidfdCalls:
  | {
    pidfd_open(pid: number, flags: number): number;
    pidfd_getfd(pidfd: number, fd: number, flags: number): number;
    close(fd: number): number;
  }
  | undefined;
function pidfds() {
  return pidfdCalls ??= Deno.dlopen("libc.so.6", {
    pidfd_open: { parameters: ["i32", "u32"], result: "i32" },
    pidfd_getfd: { parameters: ["i32", "i32", "u32"], result: "i32" },
    close: { parameters: ["i32"], result: "i32" },
  }).symbols;
}

const CONNECTOR = `use Socket; my @s;
for my $i (1..$ARGV[1]) {
  socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
  connect($s, pack_sockaddr_un($ARGV[0])) or die "connect: $!";
  push @s, $s;
}
print join(" ", map { fileno($_) } @s), "\\n"; STDOUT->flush(); <STDIN>;`;

const perlMissing = !new Deno.Command("sh", {
  args: ["-c", "command -v setpriv && command -v perl"],
})
  .outputSync().success;
/** Why the second-uid tests cannot run, if they cannot. */
const otherUidMissing = !ROOT
  ? "needs root, to act as a second uid"
  : perlMissing
  ? "needs setpriv and perl"
  : undefined;
if (otherUidMissing) console.warn(`v2_attack_test: ${otherUidMissing}; second-uid tests ignored`);

/**
 * `count` connections to `path` made by a process of `uid` (which has exited
 * and been reaped when this returns), as raw clients of this process. The
 * broker sees `uid` and that process's pid as their peer.
 */
async function connectAs(uid: number, path: string, count = 1) {
  const child = new Deno.Command("setpriv", {
    args: [
      `--reuid=${uid}`,
      `--regid=${uid}`,
      "--clear-groups",
      "perl",
      "-e",
      CONNECTOR,
      path,
      String(count),
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let line = "";
  while (!line.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    line += value;
  }
  const clients: RawClient[] = [];
  const libc = pidfds();
  const pidfd = libc.pidfd_open(child.pid, 0);
  try {
    assert.ok(pidfd >= 0, `pidfd_open of the connector (it said: ${JSON.stringify(line)})`);
    for (const fd of line.trim().split(" ").map(Number)) {
      const mine = libc.pidfd_getfd(pidfd, fd, 0);
      assert.ok(mine >= 0, "pidfd_getfd");
      setNonblocking(mine);
      clients.push(rawClientOf(mine));
    }
  } finally {
    if (pidfd >= 0) libc.close(pidfd);
    await child.stdin.close();
    reader.releaseLock();
    await child.stdout.cancel().catch(() => {});
    const status = await child.status;
    const stderr = await new Response(child.stderr).text();
    assert.ok(status.success, `connector as uid ${uid}: ${stderr}`);
  }
  return { clients, pid: child.pid };
}

function rawClientOf(fd: number): RawClient {
  return new (RawClient as unknown as new (socket: UnixSocket) => RawClient)(new UnixSocket(fd));
}

async function openToOthers(path: string): Promise<void> {
  await Deno.chmod(path.slice(0, path.lastIndexOf("/")), 0o755);
  await Deno.chmod(path, 0o666);
}

// ---------------------------------------------------------------------------------------------
// CREDIT abuse

Deno.test("credit: a CREDIT sent a byte at a time counts; exactly at the bound is taken, one more is refused", () =>
  withBroker(async (broker, path) => {
    const { raw: listener, backlog } = await listen(path, "bytewise", {
      mode: "server",
      backlog: 2,
    });
    assert.equal(backlog, 2);
    const clients: RawClient[] = [];
    for (let i = 0; i < 3; i++) {
      clients.push(await request(path, "get_pair", "bytewise", { mode: "client" }));
    }
    const delivered = [await expectSetPair(listener), await expectSetPair(listener)];
    await eventually(() => broker.stats.waiting === 1, "the third client to wait");
    await expectHello(clients[2]);
    // CREDIT 2, one byte per write, each read on its own.
    const bytes = credit(2);
    for (const byte of bytes) {
      listener.send(new Uint8Array([byte]));
      await sleep(2);
    }
    const third = await expectSetPair(listener, "the third client, after the bytewise CREDIT");
    await eventually(() => broker.stats.waiting === 0, "nobody waiting");
    // Delivered 3, credited 2: exactly one outstanding. CREDIT 1 is at the bound.
    listener.send(credit(1));
    await sleep(50);
    assert.deepEqual(broker.listeners().map((l) => [l.inFlight, l.served]), [[0, 3]]);
    listener.send(credit(1));
    assert.match(
      await expectRefused(listener),
      /^invalid CREDIT: count 1 \(must be at most the 0 /,
    );
    await eventually(() => broker.stats.listeners === 0, "the listener gone");
    closeAll(...delivered, third);
    clients.forEach((client) => client[Symbol.dispose]());
    listener[Symbol.dispose]();
  }));

/** Bad CREDITs, each as sent after a fresh LISTEN with nothing delivered yet. */
function badCredits(): [string, Uint8Array][] {
  const put = (frame: Uint8Array, offset: number, value: number) => {
    new DataView(frame.buffer).setUint32(offset, value, true);
    return frame;
  };
  return [
    ["credit before any delivery", credit(1)],
    ["credit 65535 before any delivery", credit(65535)],
    ["request 6", put(credit(1), 0, 6)],
    ["request 3 (a second LISTEN)", encodeRequest("listen", "credits").subarray(0, 16)],
    ["flags 3", put(credit(1), 4, 3)],
    ["flags 0x102", put(credit(1), 4, 0x102)],
    ["size 5", put(credit(1), 8, 5)],
    ["size 0xffffffff", put(credit(1), 8, 0xffffffff)],
    ["count 0", put(credit(1), 12, 0)],
    ["count 65536", put(credit(1), 12, 65536)],
    ["count 2^32-1", put(credit(1), 12, 0xffffffff)],
    ["sixteen zero bytes", new Uint8Array(16)],
    ["a v1 GET_PAIR", encodeGetPair("credits", "none")],
  ];
}

Deno.test("credit: every malformed or excess CREDIT closes that listener with REFUSED; the key's other listener serves on", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    const { raw: steady } = await listen(path, "credits", { mode: "server", backlog: 64 });
    for (const [what, bytes] of badCredits()) {
      const { raw: hostile } = await listen(path, "credits", { mode: "server" });
      hostile.send(bytes);
      const reason = await expectRefused(hostile, what);
      assert.match(reason, /^invalid CREDIT: /, what);
      hostile[Symbol.dispose]();
      await eventually(() => broker.stats.listeners === 1, `${what}: only the steady listener`);
      // The steady listener is still registered and takes the next client at once.
      using client = await request(path, "get_pair", "credits", { mode: "client" });
      const end = await expectSetPair(client, `${what}: a client after it`);
      assert.equal(end.reply.peerListener, true);
      const other = await expectSetPair(steady);
      assertJoined(end.descriptors[0], other.descriptors[0]);
      closeAll(end, other);
      steady.send(credit(1));
    }
    steady[Symbol.dispose]();
    await eventually(() => broker.stats.open === 0, "everything closed");
    assert.equal(countOpenDescriptors(), baseline, "no descriptor left behind");
  }));

Deno.test("credit: a valid CREDIT then garbage in one write serves the waiting client first, then closes the listener", () =>
  withBroker(async (broker, path) => {
    const { raw: listener } = await listen(path, "garbage", { mode: "server", backlog: 1 });
    using first = await request(path, "get_pair", "garbage", { mode: "client" });
    const one = await expectSetPair(listener);
    closeAll(await expectSetPair(first), one);
    using second = await request(path, "get_pair", "garbage", { mode: "client" });
    await expectHello(second);
    using third = await request(path, "get_pair", "garbage", { mode: "client" });
    await expectHello(third);
    listener.send(new Uint8Array([...credit(1), ...new Uint8Array(4096).fill(0xa5)]));
    const two = await expectSetPair(listener, "the waiting client, served by the valid CREDIT");
    const end = await expectSetPair(second);
    assertJoined(two.descriptors[0], end.descriptors[0]);
    closeAll(two, end);
    assert.match(await expectRefused(listener), /^invalid CREDIT: /);
    // The third client is not taken down with it: it still waits, for the next listener.
    await eventually(() => broker.stats.listeners === 0, "the listener gone");
    assert.equal(broker.stats.waiting, 1);
    const { raw: next } = await listen(path, "garbage", { mode: "server" });
    closeAll(await expectSetPair(next), await expectSetPair(third));
    next[Symbol.dispose]();
    listener[Symbol.dispose]();
  }));

Deno.test("credit: a listener pouring 4 MiB of bytes is closed at its first bad CREDIT; others pair meanwhile", () =>
  withBroker(async (broker, path) => {
    const { raw: flooder } = await listen(path, "flood", { mode: "server" });
    const junk = new Uint8Array(64 * 1024).fill(0x5a);
    let sent = 0;
    for (let i = 0; i < 64; i++) {
      const count = sendFrom(flooder.socket.fd, junk);
      if (count < 0) break; // its buffer is full, or it was closed already
      sent += count;
    }
    assert.ok(sent >= 16, `sent ${sent} bytes`);
    for (let i = 0; i < 5; i++) {
      using a = await request(path, "get_pair", `meanwhile-${i}`);
      await expectHello(a);
      using b = await request(path, "get_pair", `meanwhile-${i}`);
      closeAll(await expectSetPair(a), await expectSetPair(b));
    }
    assert.match(await expectRefused(flooder), /^invalid CREDIT: request 1515870810 /);
    assert.equal(broker.stats.listeners, 0);
    flooder[Symbol.dispose]();
  }));

// ---------------------------------------------------------------------------------------------
// Who a listener may be given

const TYPES: SocketType[] = ["stream", "seqpacket", "dgram"];
const MODES: Mode[] = ["none", "client", "server"];
const KERNEL_TYPE = { stream: "SOCK_STREAM", seqpacket: "SOCK_SEQPACKET", dgram: "SOCK_DGRAM" };

Deno.test("types and modes: a listener of each (type, mode) gets exactly the compatible requests of its type, v1 or v2", () =>
  withBroker(async (broker, path) => {
    const listeners = new Map<string, RawClient>();
    for (const type of TYPES) {
      for (const mode of MODES) {
        listeners.set(`${type}/${mode}`, (await listen(path, "grid", { mode, type })).raw);
      }
    }
    const ids = new Map(broker.listeners().map((l) => [`${l.type}/${l.mode}`, l.id]));
    // One request at a time, each served before the next.
    const requests: { type: SocketType; mode: Mode; version: 1 | 2 }[] = [];
    for (const type of TYPES) for (const mode of MODES) requests.push({ type, mode, version: 2 });
    for (const mode of MODES) requests.push({ type: "stream", mode, version: 1 });
    for (const { type, mode, version } of requests) {
      const what = `v${version} ${type}/${mode}`;
      const server = `${type}/${peerMode(mode)}`;
      using client = version === 2
        ? await request(path, "get_pair", "grid", { mode, type })
        : await v1(path, "grid", mode);
      let clientEnd: number;
      if (version === 1) {
        const end = await client.readToEnd();
        assert.deepEqual(end.bytes, encodeSetPairV1(), `${what}: a v1 SET_PAIR`);
        assert.equal(end.descriptors.length, 1);
        clientEnd = end.descriptors[0];
      } else {
        const end = await expectSetPair(client, what);
        assert.equal(end.reply.type, type, what);
        assert.equal(end.reply.peerListener, true, what);
        assert.equal(
          end.reply.peerId,
          ids.get(server),
          `${what}: served by the ${server} listener`,
        );
        clientEnd = end.descriptors[0];
      }
      const served = await expectSetPair(listeners.get(server)!, `${server} for ${what}`);
      assert.equal(served.reply.type, type);
      assert.equal(served.reply.peerVersion, version);
      assert.equal(served.reply.peerListener, false);
      assert.equal(socketKind(clientEnd).type, KERNEL_TYPE[type], what);
      assert.equal(socketKind(served.descriptors[0]).type, KERNEL_TYPE[type], what);
      assertJoined(clientEnd, served.descriptors[0], what);
      closeDescriptor(clientEnd);
      closeAll(served);
      listeners.get(server)!.send(credit(1));
    }
    for (const [name, listener] of listeners) {
      assert.ok(await silentFor(listener, 10), `${name} got something it should not have`);
    }
    // Without its one compatible listener, a request waits: listeners of other types, or of
    // its own mode, never take it.
    for (const type of TYPES) {
      for (const mode of MODES) {
        const server = `${type}/${peerMode(mode)}`;
        listeners.get(server)![Symbol.dispose]();
        await eventually(() => broker.stats.listeners === 8, `${server} gone`);
        using client = await request(path, "get_pair", "grid", { mode, type });
        await expectHello(client, `${type}/${mode} without ${server}`);
        client[Symbol.dispose]();
        listeners.set(server, (await listen(path, "grid", { mode: peerMode(mode), type })).raw);
        await eventually(() => broker.stats.waiting === 0, "the client gone");
      }
    }
    // Listeners never pair with each other, of any mode.
    for (const [name, listener] of listeners) {
      assert.ok(await silentFor(listener, 10), `${name} was paired`);
      listener[Symbol.dispose]();
    }
    await eventually(() => broker.stats.open === 0, "everything closed");
  }));

function peerMode(mode: Mode): Mode {
  return mode === "none" ? "none" : mode === "client" ? "server" : "client";
}

Deno.test({
  name:
    "isolate-uids: nobody's listener never gets root's clients, nor root's listener nobody's; each serves its own uid",
  ignore: otherUidMissing !== undefined,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      // Nobody listens first, in every mode, on the key root's service uses.
      const { clients: hostile, pid: hostilePid } = await connectAs(NOBODY, path, 3);
      for (const [i, mode] of MODES.entries()) {
        hostile[i].send(encodeRequest("listen", "service", { mode, backlog: 64 }));
        await expectHello(hostile[i], `nobody's ${mode} listener`);
      }
      // Root's clients of every mode wait apart from nobody's listeners (the server apart from
      // the client, lest they pair with each other)…
      using rootServer = await request(path, "get_pair", "service", { mode: "server" });
      await expectHello(rootServer, "root's server client");
      rootServer[Symbol.dispose]();
      const rootClients: RawClient[] = [];
      for (const mode of ["none", "client"] as const) {
        const client = await request(path, "get_pair", "service", { mode });
        await expectHello(client, `root's ${mode} client`);
        rootClients.push(client);
      }
      for (const listener of hostile) assert.ok(await silentFor(listener, 20), "nobody got one");
      // …and root's own listeners serve them, attesting root.
      const rootListeners: RawClient[] = [];
      for (const [i, mode] of (["none", "client"] as const).entries()) {
        const { raw } = await listen(path, "service", { mode: peerMode(mode) });
        rootListeners.push(raw);
        const served = await expectSetPair(raw, `root's ${peerMode(mode)} listener`);
        assert.deepEqual(served.reply.peer, me);
        const end = await expectSetPair(rootClients[i]);
        assert.deepEqual(end.reply.peer, me);
        assertJoined(end.descriptors[0], served.descriptors[0]);
        closeAll(served, end);
      }
      // Nobody's clients reach nobody's listeners only, and each side learns the other's uid.
      for (const mode of MODES) {
        const { clients: [client], pid } = await connectAs(NOBODY, path);
        client.send(encodeRequest("get_pair", "service", { mode }));
        const end = await expectSetPair(client, `nobody's ${mode} client`);
        assert.deepEqual(end.reply.peer, { pid: hostilePid, uid: NOBODY, gid: NOBODY });
        const listener = hostile[MODES.indexOf(peerMode(mode))];
        const served = await expectSetPair(listener);
        assert.deepEqual(served.reply.peer, { pid, uid: NOBODY, gid: NOBODY });
        closeAll(end, served);
        client[Symbol.dispose]();
      }
      // Nobody's v1 clients too; root's listeners got nothing of nobody's.
      const { clients: [old] } = await connectAs(NOBODY, path);
      old.send(encodeGetPair("service", "client"));
      const end = await old.readToEnd();
      assert.equal(end.descriptors.length, 1);
      end.descriptors.forEach(closeDescriptor);
      closeAll(await expectSetPair(hostile[2]));
      for (const listener of rootListeners) assert.ok(await silentFor(listener, 20));
      [...hostile, ...rootListeners, ...rootClients, old].forEach((c) => c[Symbol.dispose]());
      await eventually(() => broker.stats.open === 0, "everything closed");
    }, { isolateUids: true, socketAccess: { mode: 0o666 } }),
});

Deno.test({
  name:
    "without isolation a policy decides who listens: nobody's LISTEN is refused with the rule's name only",
  ignore: otherUidMissing !== undefined,
  fn: async () => {
    const { AccessPolicy } = await import("../broker/policy.ts");
    const policy = AccessPolicy.parse(
      JSON.stringify({
        rules: [
          { action: "allow", key: "root-service", uids: [0], listen: true },
          { action: "allow", prefix: "" },
        ],
      }),
      "json",
      "v2 attack policy",
    );
    await withBroker(async (broker, path) => {
      await openToOthers(path);
      const { raw: service } = await listen(path, "root-service", { mode: "server" });
      const { clients: [squatter, other, client] } = await connectAs(NOBODY, path, 3);
      squatter.send(encodeRequest("listen", "root-service", { mode: "server" }));
      assert.equal(await expectRefused(squatter), "policy");
      other.send(encodeRequest("listen", "anything-else", { mode: "server" }));
      assert.equal(await expectRefused(other), "policy");
      // Nobody's client is served by root's listener, which learns who it is.
      client.send(encodeRequest("get_pair", "root-service", { mode: "client" }));
      const end = await expectSetPair(client);
      assert.deepEqual(end.reply.peer, me);
      const served = await expectSetPair(service);
      assert.equal(served.reply.peer.uid, NOBODY);
      closeAll(end, served);
      [service, squatter, other, client].forEach((c) => c[Symbol.dispose]());
      await eventually(() => broker.stats.open === 0, "everything closed");
    }, { authorize: (r) => policy.decide(r), socketAccess: { mode: 0o666 } });
  },
});

// ---------------------------------------------------------------------------------------------
// Several listeners, listeners that leave

Deno.test("rotation: listeners take turns, one out of credit is passed over, and credit brings the oldest waiter", () =>
  withBroker(async (broker, path) => {
    const names = ["one", "two", "three"];
    const listeners = [
      (await listen(path, "rota", { mode: "server", backlog: 1 })).raw,
      (await listen(path, "rota", { mode: "server", backlog: 3 })).raw,
      (await listen(path, "rota", { mode: "server", backlog: 2 })).raw,
    ];
    const ids = listenerIds(broker);
    const servedBy = async (client: RawClient) => {
      const end = await expectSetPair(client);
      closeAll(end);
      return names[ids.indexOf(end.reply.peerId)];
    };
    const order: string[] = [];
    for (let i = 0; i < 6; i++) {
      using client = await request(path, "get_pair", "rota", { mode: "client" });
      order.push(await servedBy(client));
    }
    assert.deepEqual(order, ["one", "two", "three", "two", "three", "two"]);
    for (const [i, count] of [1, 3, 2].entries()) {
      for (let j = 0; j < count; j++) closeAll(await expectSetPair(listeners[i]));
    }
    // All out of credit: clients wait, in order.
    const waiting: RawClient[] = [];
    for (let i = 0; i < 4; i++) {
      waiting.push(await request(path, "get_pair", "rota", { mode: "client" }));
      await expectHello(waiting[i]);
    }
    listeners[2].send(credit(1)); // three: the oldest waiter
    assert.equal(await servedBy(waiting[0]), "three");
    listeners[0].send(credit(1)); // one: the next
    assert.equal(await servedBy(waiting[1]), "one");
    listeners[1].send(credit(3)); // two: the last two, and keeps one credit
    assert.equal(await servedBy(waiting[2]), "two");
    assert.equal(await servedBy(waiting[3]), "two");
    using late = await request(path, "get_pair", "rota", { mode: "client" });
    assert.equal(await servedBy(late), "two");
    assert.deepEqual(broker.listeners().map((l) => l.inFlight), [1, 3, 2]);
    waiting.forEach((client) => client[Symbol.dispose]());
    listeners.forEach((listener) => listener[Symbol.dispose]());
  }));

Deno.test("leaving: a filed listener that closes right before clients come loses none of them to its dead end", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    for (let round = 0; round < 10; round++) {
      const { raw: doomed } = await listen(path, "leaving", { mode: "server" });
      const { raw: survivor } = await listen(path, "leaving", { mode: "server" });
      const survivorId = listenerIds(broker)[1];
      // The close and the clients reach the broker in the same turn, in either order.
      doomed[Symbol.dispose]();
      const clients: RawClient[] = [];
      for (let i = 0; i < 4; i++) {
        const socket = tryConnectUnix(path)!;
        const client = rawClientOf(socket.fd);
        client.send(encodeRequest("get_pair", "leaving", { mode: "client" }));
        clients.push(client);
      }
      for (const [i, client] of clients.entries()) {
        const end = await expectSetPair(client, `round ${round}, client ${i}`);
        assert.equal(
          end.reply.peerId,
          survivorId,
          `round ${round}: client ${i} went to the dead one`,
        );
        const served = await expectSetPair(survivor);
        assertJoined(end.descriptors[0], served.descriptors[0]);
        closeAll(end, served);
        client[Symbol.dispose]();
      }
      survivor[Symbol.dispose]();
      await eventually(() => broker.stats.open === 0, "everything closed");
    }
    assert.equal(countOpenDescriptors(), baseline, "no descriptor left behind");
  }));

Deno.test("leaving: clients queued behind a spent listener that leaves go to a one-shot partner or the next listener", () =>
  withBroker(async (broker, path) => {
    const { raw: spent } = await listen(path, "queue", { mode: "server", backlog: 1 });
    using first = await request(path, "get_pair", "queue", { mode: "client" });
    closeAll(await expectSetPair(first), await expectSetPair(spent));
    const queued: RawClient[] = [];
    for (let i = 0; i < 3; i++) {
      queued.push(await request(path, "get_pair", "queue", { mode: "client" }));
      await expectHello(queued[i]);
    }
    spent[Symbol.dispose]();
    await eventually(() => broker.stats.listeners === 0, "the spent listener gone");
    // A one-shot v1 server takes the oldest…
    using oneShot = await v1(path, "queue", "server");
    const v1End = await oneShot.readToEnd();
    const oldest = await expectSetPair(queued[0]);
    assert.equal(oldest.reply.peerVersion, 1);
    assertJoined(v1End.descriptors[0], oldest.descriptors[0]);
    v1End.descriptors.forEach(closeDescriptor);
    closeAll(oldest);
    // …and a new listener the rest, oldest first.
    const { raw: next } = await listen(path, "queue", { mode: "server" });
    for (const client of queued.slice(1)) {
      const end = await expectSetPair(client);
      const served = await expectSetPair(next);
      assertJoined(end.descriptors[0], served.descriptors[0]);
      closeAll(end, served);
    }
    assert.equal(broker.stats.waiting, 0);
    [...queued, next].forEach((c) => c[Symbol.dispose]());
  }));

// A listener whose CREDIT is read together with its hang-up: the broker sends the listener its
// end first, finds it gone, and the oldest queued client keeps its place for the next listener.
Deno.test({
  name:
    "leaving: a listener that hangs up right after its CREDIT takes no queued client down with it",
  fn: () =>
    withBroker(async (broker, path) => {
      const { raw: leaving } = await listen(path, "eaten", { mode: "server", backlog: 2 });
      const leavingId = listenerIds(broker)[0];
      for (let i = 0; i < 2; i++) {
        using client = await request(path, "get_pair", "eaten", { mode: "client" });
        closeAll(await expectSetPair(client), await expectSetPair(leaving));
      }
      const queued: RawClient[] = [];
      for (let i = 0; i < 2; i++) {
        queued.push(await request(path, "get_pair", "eaten", { mode: "client" }));
        await expectHello(queued[i]);
      }
      // Credit for both, and gone, before the broker reads either.
      leaving.send(credit(2));
      leaving[Symbol.dispose]();
      await eventually(() => broker.stats.listeners === 0, "the listener gone");
      const { raw: next } = await listen(path, "eaten", { mode: "server" });
      for (const client of queued) {
        const end = await expectSetPair(client);
        const peer = end.reply.peerId;
        closeAll(end);
        assert.notEqual(
          peer,
          leavingId,
          "the oldest queued client went to the listener that had left",
        );
        closeAll(await expectSetPair(next));
      }
      [...queued, next].forEach((c) => c[Symbol.dispose]());
    }),
});

// ---------------------------------------------------------------------------------------------
// pidfds

/** The pid a pidfd names, from its fdinfo: -1 once the process has been reaped. */
function pidOf(pidfd: number): number {
  const info = Deno.readTextFileSync(`/proc/self/fdinfo/${pidfd}`);
  return Number(/^Pid:\s+(-?\d+)$/m.exec(info)?.[1]);
}

Deno.test({
  name:
    "pidfd: a partner whose process exited and was reaped before delivery is still delivered, the reply consistent",
  ignore: !ROOT || perlMissing,
  fn: () =>
    withBroker(async (broker, path) => {
      const baseline = countOpenDescriptors();
      const { raw: listener } = await listen(path, "orphan", { mode: "server", pidfd: true });
      for (const version of [2, 1] as const) {
        // A connection whose connecting process is gone (its socket kept by this one).
        const { clients: [orphan], pid } = await connectAs(0, path);
        orphan.send(
          version === 2
            ? encodeRequest("get_pair", "orphan", { mode: "client", pidfd: true })
            : encodeGetPair("orphan", "client"),
        );
        const served = await expectSetPair(listener, `the orphan v${version} client`);
        assert.equal(served.reply.peer.pid, pid, "the pid recorded at connect");
        if (served.reply.descriptors === 2) assert.equal(pidOf(served.descriptors[1]), -1);
        if (version === 2) {
          const end = await expectSetPair(orphan);
          assert.equal(end.reply.descriptors, 2, "the listener lives: its pidfd comes");
          assert.equal(pidOf(end.descriptors[1]), Deno.pid);
          assertJoined(end.descriptors[0], served.descriptors[0]);
          closeAll(end);
        } else {
          const end = await orphan.readToEnd();
          assert.equal(end.descriptors.length, 1);
          end.descriptors.forEach(closeDescriptor);
        }
        closeAll(served);
        listener.send(credit(1));
        orphan[Symbol.dispose]();
      }
      // The other way: a listener whose process is gone, asked for its pidfd by a client.
      const { clients: [orphanListener], pid } = await connectAs(0, path);
      orphanListener.send(encodeRequest("listen", "orphan-listener", { mode: "server" }));
      await expectHello(orphanListener);
      using client = await request(path, "get_pair", "orphan-listener", {
        mode: "client",
        pidfd: true,
      });
      const end = await expectSetPair(client);
      assert.equal(end.reply.peer.pid, pid);
      if (end.reply.descriptors === 2) assert.equal(pidOf(end.descriptors[1]), -1);
      closeAll(end, await expectSetPair(orphanListener));
      [listener, orphanListener, client].forEach((c) => c[Symbol.dispose]());
      await eventually(() => broker.stats.open === 0, "everything closed");
      assert.equal(countOpenDescriptors(), baseline, "no pidfd or socket left behind");
    }),
});

// With pidfds asked for, every delivery to a listener carries two descriptors: the broker
// grants at most half the backlog, so a listener that stops reading still holds at most 64.
Deno.test({
  name: "pidfd: a stalled listener asking pidfds holds no more than 64 descriptors in flight",
  fn: () =>
    withBroker(async (broker, path) => {
      const { raw: stalled, backlog } = await listen(path, "stalled-pidfd", {
        mode: "server",
        backlog: 64,
        pidfd: true,
      });
      assert.equal(backlog, 32, "half the backlog: two descriptors per delivery");
      const clients: RawClient[] = [];
      for (let i = 0; i < 70; i++) clients.push(await v1(path, "stalled-pidfd", "client"));
      await eventually(() => broker.stats.waiting === 38, "all but the backlog to wait");
      let inFlight = 0;
      for (let i = 0; i < 32; i++) {
        const served = await expectSetPair(stalled);
        inFlight += served.descriptors.length;
        closeAll(served);
      }
      clients.forEach((client) => client[Symbol.dispose]());
      stalled[Symbol.dispose]();
      assert.ok(inFlight <= 64, `descriptors in flight to one stalled listener: ${inFlight}`);
    }),
});

// ---------------------------------------------------------------------------------------------
// Framing of requests

Deno.test("framing: a v2 GET_PAIR and a LISTEN sent a byte at a time pair and register", () =>
  withBroker(async (broker, path) => {
    const trickle = async (raw: RawClient, bytes: Uint8Array) => {
      for (const byte of bytes) {
        raw.send(new Uint8Array([byte]));
        await sleep(1);
      }
    };
    const key = "k".repeat(300);
    using listener = await RawClient.connect(path);
    await trickle(listener, encodeRequest("listen", key, { mode: "server", backlog: 3 }));
    assert.equal(await expectHello(listener), 3);
    using waiter = await RawClient.connect(path);
    await trickle(waiter, encodeRequest("get_pair", "bytes", { type: "seqpacket" }));
    await expectHello(waiter);
    using other = await RawClient.connect(path);
    await trickle(other, encodeRequest("get_pair", "bytes", { type: "seqpacket", pidfd: true }));
    const [a, b] = [await expectSetPair(waiter), await expectSetPair(other)];
    assert.equal(a.reply.type, "seqpacket");
    assertJoined(a.descriptors[0], b.descriptors[0]);
    closeAll(a, b);
    using client = await RawClient.connect(path);
    await trickle(client, encodeRequest("get_pair", key, { mode: "client" }));
    closeAll(await expectSetPair(client), await expectSetPair(listener));
    assert.equal(broker.stats.rejected, 0);
    assert.equal(broker.metrics.dropped.handshake_timeout, undefined);
  }));

function header(request: number, size: number, flags = 2): Uint8Array {
  const frame = new Uint8Array(HEADER_SIZE);
  const view = new DataView(frame.buffer);
  view.setUint32(0, request, true);
  view.setUint32(4, flags, true);
  view.setUint32(8, size, true);
  return frame;
}

Deno.test("framing: a header announcing the largest request, then silence, is closed by the handshake timeout and costs nothing after", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    const silent: RawClient[] = [];
    for (const request of [1, 3]) {
      for (let i = 0; i < 10; i++) {
        const raw = await RawClient.connect(path);
        raw.send(header(request, 1036));
        silent.push(raw);
      }
    }
    // And one that sends all but the last byte of a valid 1048-byte LISTEN.
    const almost = await RawClient.connect(path);
    almost.send(encodeRequest("listen", "x".repeat(1024)).subarray(0, 1047));
    silent.push(almost);
    await eventually(() => broker.stats.open === 21, "all held");
    assert.ok(await silentFor(almost, 100), "nothing said before the timeout");
    for (const raw of silent) {
      const end = await raw.readToEnd(3000);
      assert.equal(end.bytes.length, 0, "closed without a word: the request was never valid");
      raw[Symbol.dispose]();
    }
    assert.equal(broker.metrics.dropped.handshake_timeout, 21);
    await eventually(() => broker.stats.open === 0, "none held");
    // One past the largest, and one below the smallest, are closed at once.
    for (const size of [1037, 12, 0]) {
      using raw = await RawClient.connect(path);
      raw.send(header(1, size));
      const started = Date.now();
      assert.equal((await raw.readToEnd(400)).bytes.length, 0);
      assert.ok(Date.now() - started < 300, `size ${size} closed at once`);
    }
    // The largest request, whole, is served.
    const key = "y".repeat(1024);
    const { raw: big } = await listen(path, key, { mode: "server" });
    const client = await request(path, "get_pair", key, { mode: "client" });
    closeAll(await expectSetPair(client), await expectSetPair(big));
    big[Symbol.dispose]();
    client[Symbol.dispose]();
    await eventually(() => broker.stats.open === 0, "none held");
    assert.equal(countOpenDescriptors(), baseline, "no descriptor left behind");
  }, { handshakeTimeoutMs: 500 }));

Deno.test("framing: a LISTEN asking backlog 65535 is granted 64, one asking 0 the default 16", () =>
  withBroker(async (broker, path) => {
    const { raw: greedy, backlog } = await listen(path, "greedy", {
      mode: "server",
      backlog: 65535,
    });
    assert.equal(backlog, 64);
    const { raw: modest, backlog: chosen } = await listen(path, "modest", { backlog: 0 });
    assert.equal(chosen, 16);
    const clients: RawClient[] = [];
    for (let i = 0; i < 70; i++) clients.push(await v1(path, "greedy", "client"));
    await eventually(() => broker.stats.waiting === 6, "the greedy one to be held to 64");
    for (let i = 0; i < 64; i++) closeAll(await expectSetPair(greedy));
    // CREDIT for more than was delivered and not credited: 64 outstanding, 65 refused.
    greedy.send(credit(65));
    assert.match(await expectRefused(greedy), /count 65/);
    [greedy, modest, ...clients].forEach((c) => c[Symbol.dispose]());
    await eventually(() => broker.stats.open === 0, "everything closed");
  }));

// ---------------------------------------------------------------------------------------------
// Mixed versions, reuse, kicks, half-closes

Deno.test("mixed: v1 and v2 on one key with a listener: listeners first, then one-shot partners, each its own reply", () =>
  withBroker(async (broker, path) => {
    using oldServer = await v1(path, "mixed", "server");
    await eventually(() => broker.stats.waiting === 1, "the v1 server to wait");
    const { raw: listener } = await listen(path, "mixed", { mode: "server", backlog: 2 });
    assert.equal(broker.stats.waiting, 1, "a server listener does not take a server");
    using a = await v1(path, "mixed", "client");
    using b = await request(path, "get_pair", "mixed", { mode: "client" });
    const fromA = await a.readToEnd();
    assert.deepEqual(fromA.bytes, encodeSetPairV1());
    const endB = await expectSetPair(b);
    assert.equal(endB.reply.peerListener, true);
    const servedA = await expectSetPair(listener);
    const servedB = await expectSetPair(listener);
    assert.equal(servedA.reply.peerVersion, 1);
    assert.equal(servedB.reply.peerVersion, 2);
    assertJoined(fromA.descriptors[0], servedA.descriptors[0]);
    assertJoined(endB.descriptors[0], servedB.descriptors[0]);
    fromA.descriptors.forEach(closeDescriptor);
    closeAll(endB, servedA, servedB);
    // Out of credit: the next v2 client takes the v1 server.
    using c = await request(path, "get_pair", "mixed", { mode: "client" });
    const endC = await expectSetPair(c);
    assert.equal(endC.reply.peerVersion, 1);
    assert.equal(endC.reply.peerListener, false);
    const fromOld = await oldServer.readToEnd();
    assert.deepEqual(fromOld.bytes, encodeSetPairV1());
    assertJoined(endC.descriptors[0], fromOld.descriptors[0]);
    fromOld.descriptors.forEach(closeDescriptor);
    closeAll(endC);
    // The next v1 client waits, and a CREDIT hands it to the listener.
    using d = await v1(path, "mixed", "client");
    await eventually(() => broker.stats.waiting === 1, "the v1 client to wait");
    listener.send(credit(1));
    const servedD = await expectSetPair(listener);
    assert.equal(servedD.reply.peerVersion, 1);
    const fromD = await d.readToEnd();
    assertJoined(fromD.descriptors[0], servedD.descriptors[0]);
    fromD.descriptors.forEach(closeDescriptor);
    closeAll(servedD);
    listener[Symbol.dispose]();
  }));

Deno.test("reuse: a connection object after a seqpacket pidfd listener, or request, serves a v1 client as v1 and stream", () =>
  withBroker(async (broker, path) => {
    for (let round = 0; round < 20; round++) {
      // A v2 life on some descriptor number: a listener or a waiting request, seqpacket, pidfd.
      const v2life = round % 2 === 0
        ? (await listen(path, `life-${round}`, { type: "seqpacket", pidfd: true })).raw
        : await request(path, "get_pair", `life-${round}`, { type: "dgram", pidfd: true });
      if (round % 2 === 1) await expectHello(v2life);
      v2life[Symbol.dispose]();
      await eventually(() => broker.stats.open === 0, "the v2 life over");
      // The next lives, likely on the same numbers, are v1 stream requests.
      using server = await v1(path, `life-${round}`, "server");
      await eventually(() => broker.stats.waiting === 1, "v1 server waits");
      using client = await v1(path, `life-${round}`, "client");
      const [x, y] = [await server.readToEnd(), await client.readToEnd()];
      for (const end of [x, y]) {
        assert.deepEqual(end.bytes, encodeSetPairV1(), `round ${round}: a v1 reply`);
        assert.equal(end.descriptors.length, 1, `round ${round}: no pidfd`);
        assert.equal(socketKind(end.descriptors[0]).type, "SOCK_STREAM");
      }
      assertJoined(x.descriptors[0], y.descriptors[0]);
      [...x.descriptors, ...y.descriptors].forEach(closeDescriptor);
      // And a CREDIT-shaped first message on a reused object is no credit: closed silently.
      using fake = await RawClient.connect(path);
      fake.send(credit(1));
      assert.equal((await fake.readToEnd()).bytes.length, 0);
    }
    assert.equal(broker.stats.listeners, 0);
  }));

Deno.test("kick: a kicked listener hears REFUSED kicked and frees its key; its clients then wait", () =>
  withBroker(async (broker, path) => {
    const { raw: listener } = await listen(path, "kickme", { mode: "server" });
    using served = await request(path, "get_pair", "kickme", { mode: "client" });
    const end = await expectSetPair(served);
    const id = listenerIds(broker)[0];
    assert.equal(end.reply.peerId, id);
    assert.equal(broker.kick(id), true);
    // The delivered connection stays as it was: the listener got its end before the kick.
    const delivered = await expectSetPair(listener);
    assertJoined(end.descriptors[0], delivered.descriptors[0]);
    closeAll(end, delivered);
    assert.equal(await expectRefused(listener), "kicked");
    assert.equal(broker.stats.listeners, 0);
    assert.equal(broker.kick(id), false, "gone already");
    using next = await request(path, "get_pair", "kickme", { mode: "client" });
    await expectHello(next);
    listener[Symbol.dispose]();
  }));

Deno.test("half-close: a waiting v2 client that shuts down its write side is treated as the v1 one is", async () => {
  const outcome: Record<string, string> = {};
  for (const version of [1, 2] as const) {
    await withBroker(async (broker, path) => {
      using waiter = version === 1
        ? await v1(path, "half", "server")
        : await request(path, "get_pair", "half", { mode: "server" });
      if (version === 2) await expectHello(waiter);
      await eventually(() => broker.stats.waiting === 1, "waits");
      shutdownWrite(waiter.socket.fd);
      await sleep(100);
      using _partner = await v1(path, "half", "client");
      const answer = await waiter.readToEnd(1000);
      outcome[`v${version}`] = answer.descriptors.length === 1 ? "paired" : "dropped";
      answer.descriptors.forEach(closeDescriptor);
      if (outcome[`v${version}`] === "dropped") {
        await eventually(() => broker.stats.waiting === 1, "the partner waits alone");
      }
    });
  }
  // Both are closed as gone at the hang-up (the broker reads end of stream as a departure):
  // v2 does exactly what v1 does.
  assert.deepEqual(outcome, { v1: "dropped", v2: "dropped" });
});

// ---------------------------------------------------------------------------------------------
// Capacity

const DROP_REASONS = new Set([
  "policy",
  "pair_timeout",
  "uid_limit",
  "incomplete_limit",
  "listener_limit",
  "capacity",
  "shed",
  "kicked",
  "delivery_failed",
]);

Deno.test({
  name:
    "capacity: nobody filling a full broker cannot shed root's listener; nobody is shed, told only the rule's name",
  ignore: otherUidMissing !== undefined,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      const { raw: service } = await listen(path, "root-service", { mode: "server", backlog: 64 });
      // Nobody fills every other place with v2 waiters, and keeps trying.
      const flood: RawClient[] = [];
      for (let i = 0; i < 8; i++) {
        const { clients: [raw] } = await connectAs(NOBODY, path);
        flood.push(raw);
        if (i < 5) {
          raw.send(encodeRequest("get_pair", `nobody-${i}`, { mode: "server" }));
          await expectHello(raw, `nobody's waiter ${i}`);
        } else {
          // Full: a connection of the uid holding the most is closed as it comes, before its
          // request (so without a word, as in v1).
          assert.equal((await raw.readToEnd()).bytes.length, 0, `nobody's connection ${i}`);
        }
      }
      await eventually(() => broker.stats.open === 6, "the broker full");
      assert.equal(broker.metrics.dropped.capacity, 3, "nobody's extra connections");
      assert.equal(broker.stats.listeners, 1, "root's listener kept");
      // Root's clients are served by it at once, full or not.
      for (let i = 0; i < 5; i++) {
        using client = await request(path, "get_pair", "root-service", { mode: "client" });
        closeAll(await expectSetPair(client), await expectSetPair(service));
      }
      // A waiter of root's sheds nobody's oldest, which hears only "shed".
      using rootWaiter = await request(path, "get_pair", "root-waits", { mode: "server" });
      await expectHello(rootWaiter);
      assert.equal(await expectRefused(flood[0]), "shed");
      // Root's own listeners: a second LISTEN at capacity sheds nobody again, never root's.
      const { raw: second } = await listen(path, "root-other", { mode: "server" });
      assert.equal(broker.stats.listeners, 2);
      assert.equal(broker.stats.open, 6);
      const stillThere = broker.waitingClients().map((w) => w.peer.uid);
      assert.deepEqual(stillThere.sort((a, b) => a - b), [0, NOBODY, NOBODY, NOBODY]);
      assert.equal(await expectRefused(flood[1]), "shed");
      [service, second, ...flood].forEach((c) => c[Symbol.dispose]());
      await eventually(() => broker.stats.open === 1, "all but root's waiter closed");
    }, { maxConnections: 6, socketAccess: { mode: 0o666 } }),
});

Deno.test({
  name:
    "refused: no REFUSED names a key, a uid or a pid; only the rule, or the listener's own protocol error",
  ignore: otherUidMissing !== undefined,
  fn: async () => {
    const { AccessPolicy } = await import("../broker/policy.ts");
    const policy = AccessPolicy.parse(
      JSON.stringify({
        rules: [
          { action: "deny", prefix: "secret-", listen: true },
          { action: "allow", prefix: "", listen: true },
        ],
      }),
      "json",
      "refused policy",
    );
    const reasons: string[] = [];
    await withBroker(async (broker, path) => {
      await openToOthers(path);
      // Root's secret keys and waiters, which nobody must not learn of.
      using _rootWaiter = await request(path, "get_pair", "root-private-key", { mode: "server" });
      await expectHello(_rootWaiter);
      const { clients } = await connectAs(NOBODY, path, 5);
      const [denied, deniedListen, second, third, kicked] = clients;
      denied.send(encodeRequest("get_pair", "secret-root-key"));
      reasons.push(await expectRefused(denied));
      deniedListen.send(encodeRequest("listen", "secret-root-key"));
      reasons.push(await expectRefused(deniedListen));
      // uid_limit: one waiter (or listener) per uid.
      second.send(encodeRequest("get_pair", "root-private-key", { mode: "client" }));
      await expectHello(second, "nobody's one waiter (isolated from root's)");
      third.send(encodeRequest("get_pair", "other"));
      reasons.push(await expectRefused(third));
      kicked.send(encodeRequest("listen", "root-private-key", { mode: "server" }));
      reasons.push(await expectRefused(kicked));
      const { clients: [listener, extra] } = await connectAs(NOBODY, path, 2);
      second[Symbol.dispose]();
      await eventually(() => broker.stats.waiting === 1, "nobody's waiter gone");
      listener.send(encodeRequest("listen", "root-private-key", { mode: "server" }));
      await expectHello(listener);
      extra.send(encodeRequest("listen", "another", { mode: "server" }));
      reasons.push(await expectRefused(extra));
      listener.send(credit(7));
      reasons.push(await expectRefused(listener));
      // pair_timeout and kicked.
      const { clients: [late, victim] } = await connectAs(NOBODY, path, 2);
      late.send(encodeRequest("get_pair", "late-root-key-2"));
      await expectHello(late);
      reasons.push(await expectRefused(late));
      victim.send(encodeRequest("listen", "victim-key", { mode: "server" }));
      await expectHello(victim);
      broker.kick(broker.listeners()[0].id);
      reasons.push(await expectRefused(victim));
      [...clients, listener, extra, late, victim].forEach((c) => c[Symbol.dispose]());
    }, {
      isolateUids: true,
      authorize: (r) => policy.decide(r),
      maxWaitingPerUid: 1,
      maxListenersPerUid: 1,
      pairTimeoutMs: 300,
      socketAccess: { mode: 0o666 },
    });
    assert.deepEqual(reasons.slice(0, 5), [
      "policy",
      "policy",
      "uid_limit",
      "uid_limit",
      "uid_limit", // a listener holds one of its uid's waiting places, checked first
    ]);
    assert.match(reasons[5], /^invalid CREDIT: count 7 \(must be at most the 0 connections/);
    assert.deepEqual(reasons.slice(6), ["pair_timeout", "kicked"]);
    for (const reason of reasons) {
      assert.ok(DROP_REASONS.has(reason) || reason.startsWith("invalid CREDIT: "), reason);
      assert.doesNotMatch(reason, /key|secret|root|uid \d|\b0\b.*uid|65534|pid/, reason);
    }
  },
});

// A deny rule applies to LISTEN requests too; only an allow needs `listen = true`. (Found in
// review: a deny rule once skipped listeners, so a later allow let the denied uid listen.)
Deno.test({
  name: "policy: a deny rule naming a uid keeps that uid from listening on the keys too",
  ignore: false, // once fixed: otherUidMissing !== undefined
  fn: async () => {
    const { AccessPolicy } = await import("../broker/policy.ts");
    const policy = AccessPolicy.parse(
      `[[rules]]
action = "deny"
prefix = "vhost-"
uids = [${NOBODY}]

[[rules]]
action = "allow"
prefix = ""
listen = true
`,
      "toml",
      "deny then allow-listen",
    );
    await withBroker(async (broker, path) => {
      await openToOthers(path);
      const { clients: [pairing, squatter] } = await connectAs(NOBODY, path, 2);
      pairing.send(encodeRequest("get_pair", "vhost-user-1", { mode: "server" }));
      assert.equal(await expectRefused(pairing), "policy", "the deny rule applies to pairing");
      squatter.send(encodeRequest("listen", "vhost-user-1", { mode: "server" }));
      const { reply: answer } = await reply(squatter);
      try {
        assert.equal(answer.request, "refused", "nobody's LISTEN on a key denied to nobody");
      } finally {
        // What it means: root's vhost client goes to nobody, who learns root's credentials.
        if (answer.request === "hello") {
          using victim = await request(path, "get_pair", "vhost-user-1", { mode: "client" });
          const end = await expectSetPair(victim);
          console.log(`  root's client was served by uid ${end.reply.peer.uid}'s listener`);
          closeAll(end, await expectSetPair(squatter));
        }
        [pairing, squatter].forEach((c) => c[Symbol.dispose]());
        await eventually(() => broker.stats.open === 0, "everything closed");
      }
    }, { authorize: (r) => policy.decide(r), socketAccess: { mode: 0o666 } });
  },
});

// ---------------------------------------------------------------------------------------------
// A real broker process: descriptors, speed, vanishing clients, descriptors in flight

/** `count` v2 pairings on fresh keys, one after the other; their total milliseconds. */
async function timePairings(path: string, count: number, tag: string): Promise<number> {
  const started = performance.now();
  for (let i = 0; i < count; i++) {
    using a = await request(path, "get_pair", `${tag}-${i}`, { mode: "server" });
    await expectHello(a);
    using b = await request(path, "get_pair", `${tag}-${i}`, { mode: "client" });
    const [x, y] = [await expectSetPair(b), await expectSetPair(a)];
    assertJoined(x.descriptors[0], y.descriptors[0]);
    closeAll(x, y);
  }
  return performance.now() - started;
}

/** Connects, sends `bytes` and closes at once, before the broker can answer. */
function hitAndRun(path: string, bytes: Uint8Array): void {
  const socket = tryConnectUnix(path);
  if (socket === undefined) return; // the listen backlog is full: nothing was sent
  const raw = rawClientOf(socket.fd);
  try {
    raw.send(bytes);
  } finally {
    raw[Symbol.dispose]();
  }
}

Deno.test("real broker: a listener that never reads, 300 clients on its key and 400 vanishing v2 clients: bounded, fast, back to baseline", () =>
  withScope(async (scope) => {
    const broker = await startBroker(scope, ["--socket", scope.socket, "--handshake-timeout", "1"]);
    const path = scope.socket;
    await timePairings(path, 5, "warm");
    await sleep(300);
    const baseline = countOpenDescriptors(broker.pid);
    const quiet = await timePairings(path, 40, "quiet");
    const { raw: stalled } = await listen(path, "stalled", {
      mode: "server",
      backlog: 8,
      pidfd: true,
    });
    const clients: RawClient[] = [];
    for (let i = 0; i < 300; i++) {
      clients.push(
        i % 2 === 0
          ? await v1(path, "stalled", "client")
          : await request(path, "get_pair", "stalled", { mode: "client", pidfd: true }),
      );
    }
    // The listener holds its backlog in flight; everyone else waits, one descriptor each.
    await eventually(
      () => countOpenDescriptors(broker.pid) === baseline + 1 + 292,
      `the broker to hold the listener and 292 waiters (holds ${
        countOpenDescriptors(broker.pid) - baseline
      })`,
    );
    const loaded = await timePairings(path, 40, "loaded");
    assert.ok(
      loaded < 3 * quiet + 300,
      `40 pairings took ${Math.round(loaded)} ms beside the stalled key, ${
        Math.round(quiet)
      } before`,
    );
    // Clients and listeners that vanish before their HELLO: EPIPE, never SIGPIPE.
    for (let i = 0; i < 400; i++) {
      hitAndRun(
        path,
        i % 4 === 0
          ? encodeRequest("listen", `vanish-${i}`, { mode: "server", pidfd: true })
          : i % 4 === 1
          ? encodeRequest("get_pair", "stalled", { mode: "client", pidfd: true })
          : encodeRequest("get_pair", `vanish-${i}`, { type: "seqpacket" }),
      );
      if (i % 50 === 49) await sleep(5);
    }
    await eventually(
      () => countOpenDescriptors(broker.pid) === baseline + 1 + 292,
      "the vanished clients to be forgotten",
    );
    assert.ok(!broker.exited, broker.output);
    // The stalled listener wakes: it still gets its clients in order.
    let served = 0;
    for (let i = 0; i < 8; i++) {
      closeAll(await expectSetPair(stalled));
      served++;
    }
    stalled.send(credit(8));
    for (let i = 0; i < 8; i++) {
      const delivery = await expectSetPair(stalled);
      assert.equal(delivery.reply.descriptors, 2, "the client's pidfd: it is alive");
      closeAll(delivery);
      served++;
    }
    assert.equal(served, 16);
    [...clients, stalled].forEach((c) => c[Symbol.dispose]());
    await eventually(
      () => countOpenDescriptors(broker.pid) === baseline,
      "the broker's descriptors back at their baseline",
    );
    assert.equal(await timePairings(path, 1, "after") >= 0, true);
    assert.ok(!broker.exited, broker.output);
    assert.doesNotMatch(broker.output, /uncaught|panic|SIGPIPE/i);
  }));

/**
 * A broker under a descriptor limit of 64 without CAP_SYS_RESOURCE and
 * CAP_SYS_ADMIN: the kernel refuses its SCM_RIGHTS with ETOOMANYREFS while
 * more than 64 of its descriptors are in flight (see fairness_test.ts).
 */
function brokerWithoutCapabilities(scope: Scope): Promise<Cli> {
  return startBroker(scope, ["--socket", scope.socket], {
    descriptorLimit: 64,
    command: [
      "setpriv",
      "--bounding-set=-sys_resource,-sys_admin",
      "--inh-caps=-sys_resource,-sys_admin",
      Deno.execPath(),
      "run",
      ...PERMISSIONS,
      MOD,
    ],
  });
}

/** Pairs of our own clients whose replies are never read: descriptors in flight. */
async function hoard(path: string, broker: Cli): Promise<RawClient[]> {
  const hoarded: RawClient[] = [];
  for (let i = 0; i < 40; i++) {
    hoarded.push(await v1(path, `hoard-${i}`, "none"), await v1(path, `hoard-${i}`, "none"));
    await sleep(1);
  }
  await broker.waitForOutput("ETOOMANYREFS");
  return hoarded;
}

// A failed send to a waiting client costs the listener serving it a credit only if the listener
// was sent its end; the queued client hears delivery_failed, and the listener is served again.
Deno.test({
  name:
    "in flight: a send to a waiting client failing with ETOOMANYREFS costs the listener serving it no credit",
  ignore: !ROOT,
  fn: () =>
    withScope(async (scope) => {
      const broker = await brokerWithoutCapabilities(scope);
      const path = scope.socket;
      const { raw: listener } = await listen(path, "svc", { mode: "server", backlog: 1 });
      using first = await request(path, "get_pair", "svc", { mode: "client" });
      closeAll(await expectSetPair(first), await expectSetPair(listener));
      using queued = await request(path, "get_pair", "svc", { mode: "client" });
      await expectHello(queued);
      const hoarded = await hoard(path, broker);
      // The listener credits the one connection it got; the broker tries the queued client.
      listener.send(credit(1));
      const lost = await readMessage(queued);
      lost?.descriptors.forEach(closeDescriptor);
      assert.equal(
        lost && decodeReply(lost.bytes).request === "refused" ? decodeRefused(lost.bytes) : lost,
        "delivery_failed",
        "the queued client, told and closed: no pair could be sent",
      );
      assert.equal(await readMessage(queued), undefined);
      hoarded.forEach((c) => c[Symbol.dispose]());
      await sleep(200);
      // Nothing is in flight any more; the listener has received 1 and credited 1.
      using next = await request(path, "get_pair", "svc", { mode: "client" });
      const answer = await reply(next);
      answer.descriptors.forEach(closeDescriptor);
      assert.equal(answer.reply.request, "set_pair", "the listener is served again");
      closeAll(await expectSetPair(listener));
      listener[Symbol.dispose]();
    }),
});

// A send to a listener failing for the broker's reason (ETOOMANYREFS, descriptors others leave
// unread) refuses that client with delivery_failed and keeps the listener and its credit.
Deno.test({
  name:
    "in flight: a hoarder making sends fail with ETOOMANYREFS does not disconnect other users' listeners",
  ignore: !ROOT,
  fn: () =>
    withScope(async (scope) => {
      const broker = await brokerWithoutCapabilities(scope);
      const path = scope.socket;
      const { raw: listener } = await listen(path, "service", { mode: "server", backlog: 4 });
      const hoarded = await hoard(path, broker);
      using unlucky = await request(path, "get_pair", "service", { mode: "client" });
      const answer = await readMessage(unlucky);
      answer?.descriptors.forEach(closeDescriptor);
      hoarded.forEach((c) => c[Symbol.dispose]());
      await sleep(200);
      assert.ok(await silentFor(listener, 100), "the listener stays registered");
      using next = await request(path, "get_pair", "service", { mode: "client" });
      closeAll(await expectSetPair(next), await expectSetPair(listener));
      listener[Symbol.dispose]();
    }),
});

// v2 clients whose pair could not be sent hear REFUSED delivery_failed, not a bare end of stream
// (which means the broker stopped).
Deno.test({
  name: "in flight: v2 clients whose pair could not be sent hear REFUSED delivery_failed",
  ignore: !ROOT,
  fn: () =>
    withScope(async (scope) => {
      const broker = await brokerWithoutCapabilities(scope);
      const path = scope.socket;
      using waiting = await request(path, "get_pair", "victim", { mode: "server" });
      await expectHello(waiting);
      const hoarded = await hoard(path, broker);
      using newcomer = await request(path, "get_pair", "victim", { mode: "client" });
      const told = await readMessage(waiting);
      told?.descriptors.forEach(closeDescriptor);
      const toldNewcomer = await readMessage(newcomer);
      toldNewcomer?.descriptors.forEach(closeDescriptor);
      hoarded.forEach((c) => c[Symbol.dispose]());
      assert.ok(told !== undefined, "the waiting v2 client is told why");
      assert.deepEqual(decodeReply(told.bytes), { request: "refused", reason: "delivery_failed" });
    }),
});

// ---------------------------------------------------------------------------------------------
// Credit accounting

Deno.test("accounting: waiters that left before a LISTEN cost it no credit; live ones are served oldest first", () =>
  withBroker(async (broker, path) => {
    for (let round = 0; round < 5; round++) {
      const waiters: RawClient[] = [];
      for (let i = 0; i < 6; i++) {
        waiters.push(await request(path, "get_pair", `gone-${round}`, { mode: "client" }));
        await expectHello(waiters[i]);
      }
      const liveIds = broker.waitingClients().map((w) => w.id).filter((_, i) => i % 2 === 1);
      // Every other waiter leaves in the same turn as the LISTEN comes.
      for (let i = 0; i < 6; i += 2) waiters[i][Symbol.dispose]();
      const listener = await request(path, "listen", `gone-${round}`, {
        mode: "server",
        backlog: 2,
      });
      await expectHello(listener);
      const served = [await expectSetPair(listener), await expectSetPair(listener)];
      assert.deepEqual(served.map((s) => s.reply.peerId), liveIds.slice(0, 2), `round ${round}`);
      closeAll(...served);
      assert.deepEqual(
        broker.listeners().map((l) => [l.inFlight, l.served]),
        [[2, 2]],
        `round ${round}: two delivered, two in flight`,
      );
      await eventually(() => broker.stats.waiting === 1, "the last live waiter waits");
      listener.send(credit(1));
      const last = await expectSetPair(listener);
      assert.equal(last.reply.peerId, liveIds[2]);
      closeAll(last);
      for (let i = 1; i < 6; i += 2) closeAll(await expectSetPair(waiters[i]));
      [...waiters, listener].forEach((c) => c[Symbol.dispose]());
      await eventually(() => broker.stats.open === 0, "everything closed");
    }
  }));

Deno.test("accounting: listeners out of credit still count toward the per-uid listener limit", () =>
  withBroker(async (broker, path) => {
    const spent: RawClient[] = [];
    for (let i = 0; i < 2; i++) {
      const { raw } = await listen(path, `spent-${i}`, { mode: "server", backlog: 1 });
      using client = await request(path, "get_pair", `spent-${i}`, { mode: "client" });
      closeAll(await expectSetPair(client), await expectSetPair(raw));
      spent.push(raw);
    }
    assert.deepEqual(broker.listeners().map((l) => l.inFlight), [1, 1]);
    using third = await request(path, "listen", "spent-2", { mode: "server" });
    assert.equal(await expectRefused(third), "listener_limit");
    spent.forEach((c) => c[Symbol.dispose]());
  }, { maxListenersPerUid: 2 }));

Deno.test("framing: other versions, stray flag bits and broken v2 fields are closed without a word; the broker serves on", () =>
  withBroker(async (broker, path) => {
    const baseline = countOpenDescriptors();
    const patched = (frame: Uint8Array, offset: number, bytes: number[]) => {
      const copy = frame.slice();
      copy.set(bytes, offset);
      return copy;
    };
    const get = encodeRequest("get_pair", "broken", { mode: "client" });
    const lis = encodeRequest("listen", "broken", { mode: "server", backlog: 4 });
    const v1Frame = encodeGetPair("broken", "client");
    const cases: [string, Uint8Array][] = [
      ["v1 layout, version 3", patched(v1Frame, 4, [3])],
      ["v1 layout, version 15", patched(v1Frame, 4, [15])],
      ["v1 layout, version 0", patched(v1Frame, 4, [0])],
      ["v2, flags 0x12", patched(get, 4, [0x12])],
      ["v2, flags 0x80000002", patched(get, 4, [2, 0, 0, 0x80])],
      ["v2, request 2 (SET_PAIR)", patched(get, 0, [2])],
      ["v2, request 5 (CREDIT) first", credit(1)],
      ["v2, request 4 (HELLO)", patched(get, 0, [4])],
      ["v2, size 0xffffffff", patched(get, 8, [0xff, 0xff, 0xff, 0xff])],
      ["v2, mode 3", patched(get, 12, [3])],
      ["v2, type 3", patched(get, 14, [3])],
      ["v2, options bit 1", patched(get, 16, [2])],
      ["v2, options bit 31", patched(get, 16, [0, 0, 0, 0x80])],
      ["v2, key_len 0", patched(get, 20, [0, 0])],
      ["v2, key_len one less", patched(get, 20, [5, 0])],
      ["v2, key_len one more", patched(get, 20, [7, 0])],
      ["v2, GET_PAIR with a backlog", patched(get, 22, [1, 0])],
      ["v2 LISTEN, size one more, a byte after", new Uint8Array([...patched(lis, 8, [19]), 0])],
      ["v2 LISTEN, then a byte in the same write", new Uint8Array([...lis, 0])],
      ["v2 LISTEN, then a CREDIT in the same write", new Uint8Array([...lis, ...credit(1)])],
    ];
    for (const [what, bytes] of cases) {
      using raw = await RawClient.connect(path);
      raw.send(bytes);
      const answer = await raw.readToEnd(2000);
      assert.equal(answer.bytes.length, 0, `${what}: closed without a word`);
      assert.equal(answer.descriptors.length, 0, what);
    }
    assert.equal(broker.stats.listeners, 0);
    assert.equal(broker.stats.waiting, 0);
    const { raw: listener } = await listen(path, "broken", { mode: "server" });
    using client = await request(path, "get_pair", "broken", { mode: "client" });
    closeAll(await expectSetPair(client), await expectSetPair(listener));
    listener[Symbol.dispose]();
    client[Symbol.dispose]();
    await eventually(() => broker.stats.open === 0, "everything closed");
    assert.equal(countOpenDescriptors(), baseline, "no descriptor left behind");
  }));

Deno.test("racing: two LISTENs in one turn while ten clients wait share them, oldest first, none twice", () =>
  withBroker(async (broker, path) => {
    const waiters: RawClient[] = [];
    for (let i = 0; i < 10; i++) {
      waiters.push(await request(path, "get_pair", "race", { mode: "client" }));
      await expectHello(waiters[i]);
    }
    const ids = broker.waitingClients().map((w) => w.id);
    // Both connected and sent before the broker reads either.
    const racers = [tryConnectUnix(path)!, tryConnectUnix(path)!].map((s) => rawClientOf(s.fd));
    for (const racer of racers) {
      racer.send(encodeRequest("listen", "race", { mode: "server", backlog: 4 }));
    }
    const servedBy: number[][] = [];
    for (const racer of racers) {
      await expectHello(racer);
      const got: number[] = [];
      for (let i = 0; i < 4; i++) {
        const delivery = await expectSetPair(racer);
        got.push(delivery.reply.peerId);
        closeAll(delivery);
      }
      assert.deepEqual(got, [...got].sort((a, b) => a - b), "oldest first");
      servedBy.push(got);
    }
    const all = servedBy.flat().sort((a, b) => a - b);
    assert.deepEqual(all, ids.slice(0, 8), "the eight oldest, each once");
    assert.deepEqual(broker.waitingClients().map((w) => w.id), ids.slice(8));
    for (let i = 0; i < 8; i++) closeAll(await expectSetPair(waiters[i]));
    [...waiters, ...racers].forEach((c) => c[Symbol.dispose]());
  }));

// At capacity the broker sheds the heaviest uid's oldest connection, passing over its listeners
// while it holds anything else: a service's listener is not what a newcomer pushes out.
Deno.test({
  name:
    "capacity: shedding the heaviest uid takes one of its waiters, not the listener it registered first",
  ignore: false, // once fixed: otherUidMissing !== undefined
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      const { raw: service } = await listen(path, "root-service", { mode: "server" });
      const rootWaiters: RawClient[] = [];
      for (let i = 0; i < 3; i++) {
        rootWaiters.push(await request(path, "get_pair", `root-${i}`, { mode: "server" }));
        await expectHello(rootWaiters[i]);
      }
      const { clients: [a, b, newcomer] } = await connectAs(NOBODY, path, 3);
      for (const [i, raw] of [a, b].entries()) {
        raw.send(encodeRequest("get_pair", `nobody-${i}`, { mode: "server" }));
      }
      // The third connection of nobody's, already accepted, made the broker full: one of root's
      // (which holds four of six) has been shed to make room for it.
      await eventually(() => broker.metrics.dropped.shed === 1, "one connection shed");
      newcomer.send(encodeRequest("get_pair", "nobody-2", { mode: "server" }));
      for (const raw of [a, b, newcomer]) await expectHello(raw);
      const listenerAlive = broker.stats.listeners === 1;
      [service, ...rootWaiters, a, b, newcomer].forEach((c) => c[Symbol.dispose]());
      assert.ok(listenerAlive, "a waiter of root's is shed, not its listener");
    }, { maxConnections: 6, maxWaitingPerUid: 100, socketAccess: { mode: 0o666 } }),
});
