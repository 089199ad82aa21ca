import assert from "node:assert/strict";
import { BrokerClosedError, connectBroker, getPair } from "../client/pair.ts";
import type { PairedSocket } from "../client/paired_socket.ts";
import { encodeSetPair, ProtocolError } from "../client/protocol.ts";
import { OsError } from "../ffi/errors.ts";
import { Reactor } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  connectUnix,
  createSocketPair,
  listenUnix,
  readInto,
  sendMessage,
  UnixSocket,
} from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import {
  acceptOne,
  countOpenDescriptors,
  eventually,
  RawClient,
  temporarySocketPath,
  withBroker,
} from "./helpers.ts";

const fixture = (name: string) => Deno.readFile(new URL(`./fixtures/${name}`, import.meta.url));

/**
 * A one-shot stand-in for the C broker: accepts one client, reads its
 * request, and answers with `reply` (bytes and descriptors) or just closes.
 */
async function withFakeBroker(
  reply: (request: Uint8Array) => { bytes: Uint8Array; fds: number[] } | "close",
  body: (path: string, request: Promise<Uint8Array>) => Promise<void>,
): Promise<void> {
  const socket = await temporarySocketPath();
  const listener = listenUnix(socket.path, 1);
  const served = (async () => {
    using connection = await acceptOne(listener);
    const request = new Uint8Array(1044);
    let received = 0;
    while (received < request.length) {
      const count = readInto(connection.fd, request.subarray(received) as Uint8Array<ArrayBuffer>);
      if (count === 0) break;
      if (count > 0) received += count;
      else await connection.readiness.readable();
    }
    const answer = reply(request.subarray(0, received));
    if (answer === "close") return request;
    const header = new MessageHeader(answer.bytes as Uint8Array<ArrayBuffer>, 1);
    header.prepareSend(answer.bytes.length, answer.fds.length > 0 ? answer.fds[0] : -1);
    assert.equal(sendMessage(connection.fd, header), answer.bytes.length);
    // A second descriptor needs a second message: the test helper attaches one at a time.
    for (const extra of answer.fds.slice(1)) {
      const more = new MessageHeader(new Uint8Array(0), 1);
      more.prepareSend(0, extra);
      sendMessage(connection.fd, more);
    }
    answer.fds.forEach(closeDescriptor);
    return request;
  })();
  try {
    await body(socket.path, served);
  } finally {
    listener.close();
    await served.catch(() => {});
    await Reactor.instance().stopped;
    await socket.remove();
  }
}

function freshPair(): [number, number] {
  const pair = new Int32Array(2);
  assert.equal(createSocketPair(pair), 0);
  return [pair[0], pair[1]];
}

/** A byte written to `paired` arrives at `peer`, the other end of its pair. */
async function assertCarries(paired: PairedSocket, peer: number): Promise<void> {
  await paired.write(new Uint8Array([42]));
  const byte = new Uint8Array(1) as Uint8Array<ArrayBuffer>;
  assert.equal(readInto(peer, byte), 1);
  assert.equal(byte[0], 42);
}

/** One end of a fresh socketpair whose other end is already closed. */
function loneEnd(): number {
  const [end, other] = freshPair();
  closeDescriptor(other);
  return end;
}

Deno.test("our GET_PAIR is byte for byte what the C client sends", async () => {
  const golden = await fixture("get_pair_server_vhost-user-1.bin");
  await withFakeBroker(() => "close", async (path, request) => {
    await assert.rejects(
      getPair("vhost-user-1", { socket: path, mode: "server", protocol: 1 }),
      BrokerClosedError,
    );
    assert.deepEqual(await request, golden);
  });
});

Deno.test("the C broker's SET_PAIR is accepted and its descriptor works", async () => {
  const golden = await fixture("set_pair.bin");
  const [ours, theirs] = freshPair();
  await withFakeBroker(() => ({ bytes: golden, fds: [ours] }), async (path) => {
    const socket = await getPair("vhost-user-1", { socket: path, mode: "client", protocol: 1 });
    try {
      await socket.write(new TextEncoder().encode("ping"));
      const buffer = new Uint8Array(4) as Uint8Array<ArrayBuffer>;
      assert.equal(readInto(theirs, buffer), 4);
      assert.equal(new TextDecoder().decode(buffer), "ping");
    } finally {
      socket.close();
      closeDescriptor(theirs);
    }
  });
});

const badReplies: [string, () => { bytes: Uint8Array; fds: number[] }, RegExp][] = [
  ["no descriptor", () => ({ bytes: encodeSetPair(), fds: [] }), /descriptors 0/],
  [
    "a reply one byte short",
    () => ({ bytes: encodeSetPair().subarray(0, 1043), fds: [loneEnd()] }),
    /length 1043/,
  ],
  ["size 0", () => {
    const bytes = encodeSetPair();
    bytes[8] = 0;
    return { bytes, fds: [loneEnd()] };
  }, /size 0/],
  ["request GET_PAIR", () => {
    const bytes = encodeSetPair();
    bytes[0] = 1;
    return { bytes, fds: [loneEnd()] };
  }, /request 1/],
  ["version 2", () => {
    const bytes = encodeSetPair();
    bytes[4] = 2;
    return { bytes, fds: [loneEnd()] };
  }, /flags 0x2/],
];

for (const [what, reply, message] of badReplies) {
  Deno.test(`a SET_PAIR with ${what} is refused and leaks nothing`, async () => {
    const before = countOpenDescriptors();
    await withFakeBroker(reply, async (path) => {
      await assert.rejects(getPair("k", { socket: path, protocol: 1 }), (error) => {
        assert.ok(error instanceof ProtocolError, String(error));
        assert.match(error.message, message);
        return true;
      });
    });
    assert.equal(countOpenDescriptors(), before);
  });
}

Deno.test("a missing broker socket is reported with its path and errno", async () => {
  const socket = await temporarySocketPath();
  try {
    await assert.rejects(getPair("k", { socket: socket.path }), (error) => {
      assert.ok(error instanceof OsError);
      assert.equal(error.code, "ENOENT");
      assert.equal(
        error.message,
        `connect ${socket.path}: ENOENT (no socket there; is the broker running?)`,
      );
      return true;
    });
  } finally {
    await socket.remove();
  }
});

Deno.test("a socket file without a broker is reported as ECONNREFUSED", async () => {
  const socket = await temporarySocketPath();
  try {
    listenUnix(socket.path, 1).close();
    await assert.rejects(
      connectBroker({ socket: socket.path }),
      { message: `connect ${socket.path}: ECONNREFUSED (is the broker running?)` },
    );
  } finally {
    await socket.remove();
  }
});

Deno.test("a regular file, a directory or a FIFO at the path is named, not taken for a broker", async () => {
  const socket = await temporarySocketPath();
  try {
    const directory = socket.path.slice(0, socket.path.lastIndexOf("/"));
    const file = `${directory}/file`;
    await Deno.writeTextFile(file, "not a socket\n");
    const fifo = `${directory}/fifo`;
    const made = await new Deno.Command("mkfifo", { args: [fifo] }).output();
    assert.ok(made.success, "mkfifo");
    // connect follows a symlink; so does the description.
    const link = `${directory}/link`;
    await Deno.symlink(file, link);
    const cases = [
      [file, "a regular file"],
      [directory, "a directory"],
      [fifo, "a FIFO"],
      [link, "a regular file"],
    ];
    for (const [path, kind] of cases) {
      await assert.rejects(getPair("k", { socket: path }), (error) => {
        assert.ok(error instanceof OsError);
        assert.equal(error.code, "ECONNREFUSED");
        assert.equal(
          error.message,
          `connect ${path}: ECONNREFUSED (${path} is ${kind}, not a socket)`,
        );
        return true;
      });
    }
  } finally {
    await socket.remove();
  }
});

Deno.test("an invalid key fails before anything is sent", async () => {
  await assert.rejects(getPair("", { socket: "/nonexistent/broker.socket" }), RangeError);
  await assert.rejects(getPair(new Uint8Array(1025), { socket: "/nonexistent" }), RangeError);
});

Deno.test("aborting a waiting getPair rejects with the reason and frees the broker slot", () =>
  withBroker(async (broker, path) => {
    const controller = new AbortController();
    const waiting = getPair("abandoned", { socket: path, signal: controller.signal });
    await eventually(() => broker.stats.waiting === 1, "the request to wait");
    controller.abort(new Error("no longer needed"));
    await assert.rejects(waiting, { message: "no longer needed" });
    await eventually(() => broker.stats.waiting === 0, "the broker to notice");
  }));

Deno.test("the lower-level steps pair like getPair does", () =>
  withBroker(async (_broker, path) => {
    using first = await connectBroker({ socket: path });
    using second = await connectBroker({ socket: path });
    await first.request("steps", "server");
    await second.request("steps", "client");
    const [a, b] = await Promise.all([first.receivePair(), second.receivePair()]);
    await a.write(new Uint8Array([42]));
    const buffer = new Uint8Array(1);
    assert.equal(await b.read(buffer), 1);
    assert.equal(buffer[0], 42);
    a.close();
    b.close();
  }));

Deno.test("streams carry 4 MiB each way, and closeWrite ends only one direction", () =>
  withBroker(async (_broker, path) => {
    const [a, b] = await Promise.all([
      getPair("bulk", { socket: path }),
      getPair("bulk", { socket: path }),
    ]);
    const payload = new Uint8Array(4 << 20).map((_, i) => (i * 2654435761) >>> 24);
    const collect = async (socket: PairedSocket) =>
      new Uint8Array(await new Response(socket.readable).arrayBuffer());
    const [atB, atA] = await Promise.all([
      collect(b),
      collect(a),
      new Blob([payload]).stream().pipeTo(a.writable),
      new Blob([payload]).stream().pipeTo(b.writable),
    ]);
    assert.deepEqual(atB, payload);
    assert.deepEqual(atA, payload);
    a.close();
    b.close();
  }));

Deno.test("reads after the peer closes end the stream; writes fail with EPIPE", () =>
  withBroker(async (_broker, path) => {
    const [a, b] = await Promise.all([
      getPair("gone", { socket: path }),
      getPair("gone", { socket: path }),
    ]);
    b.close();
    assert.equal(await a.read(new Uint8Array(8)), null);
    await assert.rejects(a.write(new Uint8Array(8)), { code: "EPIPE" });
    a.close();
  }));

Deno.test("close wakes a pending read; detach hands the descriptor on unclosed", () =>
  withBroker(async (_broker, path) => {
    const [a, b] = await Promise.all([
      getPair("detach", { socket: path }),
      getPair("detach", { socket: path }),
    ]);
    const pending = a.read(new Uint8Array(8));
    await new Promise((resolve) => setTimeout(resolve, 10));
    a.close();
    await assert.rejects(pending, Deno.errors.BadResource);
    const fd = b.detach();
    assert.equal(b.fd, -1);
    b.close();
    // Still ours to use: the peer end is closed, so a read sees end of stream.
    assert.equal(readInto(fd, new Uint8Array(1) as Uint8Array<ArrayBuffer>), 0);
    closeDescriptor(fd);
  }));

Deno.test("a raw client that sends nothing and leaves costs the broker nothing", () =>
  withBroker(async (broker, path) => {
    const raw = await RawClient.connect(path);
    await eventually(() => broker.stats.open === 1, "the connection to be accepted");
    raw[Symbol.dispose]();
    await eventually(() => broker.stats.open === 0, "the connection to be closed");
    assert.equal(broker.stats.rejected, 0);
  }));

Deno.test("a SET_PAIR that arrives in two pieces, the descriptor with the first, is assembled", async () => {
  const golden = await fixture("set_pair.bin");
  const [ours, theirs] = freshPair();
  const socket = await temporarySocketPath();
  const listener = listenUnix(socket.path, 1);
  Reactor.instance(); // its epoll and eventfd descriptors live as long as the process
  const before = countOpenDescriptors();
  try {
    const pairing = getPair("pieces", { socket: socket.path, protocol: 1 });
    using connection = await acceptOne(listener);
    const first = new MessageHeader(golden.slice(0, 100) as Uint8Array<ArrayBuffer>, 1);
    first.prepareSend(100, ours);
    assert.equal(sendMessage(connection.fd, first), 100);
    closeDescriptor(ours);
    // Long enough that the client has given up its wait on the JavaScript thread.
    await new Promise((resolve) => setTimeout(resolve, 20));
    const rest = new MessageHeader(golden.slice(100) as Uint8Array<ArrayBuffer>, 1);
    rest.prepareSend(golden.length - 100, -1);
    assert.equal(sendMessage(connection.fd, rest), golden.length - 100);
    const paired = await pairing;
    await assertCarries(paired, theirs);
    paired.close();
  } finally {
    closeDescriptor(theirs);
    listener.close();
    await Reactor.instance().stopped;
    await socket.remove();
  }
  // Our three (both ends of the pair, the listener) are closed; nothing of the client's is left.
  assert.equal(countOpenDescriptors(), before - 3);
});

Deno.test("getPair waits out a full backlog, then connects, sends and pairs", async () => {
  Reactor.instance(); // its epoll and eventfd descriptors live as long as the process
  const before = countOpenDescriptors();
  const socket = await temporarySocketPath();
  // Backlog 0 holds one queued connection: the next connect gets EAGAIN until it is accepted.
  using listener = listenUnix(socket.path, 0);
  using filler = await connectUnix(socket.path);
  const paired = getPair("backlog", { socket: socket.path, mode: "server", protocol: 1 });
  await new Promise((resolve) => setTimeout(resolve, 30));
  closeDescriptor(acceptConnection(listener.fd)); // the filler's slot is free: the retry gets in
  let fd = acceptConnection(listener.fd);
  while (fd < 0) {
    await listener.readiness.readable();
    fd = acceptConnection(listener.fd);
  }
  using client = new UnixSocket(fd);
  const request = new Uint8Array(1044) as Uint8Array<ArrayBuffer>;
  let received = 0;
  while (received < request.length) {
    const count = readInto(client.fd, request.subarray(received) as Uint8Array<ArrayBuffer>);
    if (count > 0) received += count;
    else await client.readiness.readable();
  }
  assert.equal(new TextDecoder().decode(request.subarray(16, 23)), "backlog");
  const [ours, theirs] = freshPair();
  const header = new MessageHeader(encodeSetPair() as Uint8Array<ArrayBuffer>, 1);
  header.prepareSend(1044, ours);
  assert.equal(sendMessage(client.fd, header), 1044);
  closeDescriptor(ours);
  const end = await paired;
  await assertCarries(end, theirs);
  end.close();
  closeDescriptor(theirs);
  client.close();
  filler.close();
  listener.close();
  await Reactor.instance().stopped;
  await socket.remove();
  assert.equal(countOpenDescriptors(), before);
});
