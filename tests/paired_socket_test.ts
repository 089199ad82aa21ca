import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { getPair } from "../client/pair.ts";
import { closeDescriptor, PairedSocket } from "../client/paired_socket.ts";
import { Reactor } from "../ffi/reactor.ts";
import { createSocketPair, sendFrom } from "../ffi/socket.ts";
import { countOpenDescriptors, withBroker } from "./helpers.ts";
import { Cli } from "./processes.ts";

/** Two PairedSockets on a fresh socketpair, as the broker would hand them out. */
function pair(): [PairedSocket, PairedSocket] {
  const fds = new Int32Array(2);
  assert.equal(createSocketPair(fds), 0);
  return [new PairedSocket(fds[0]), new PairedSocket(fds[1])];
}

const pattern = (length: number) =>
  new Uint8Array(length).map((_, i) => (i * 2654435761) >>> 24) as Uint8Array<ArrayBuffer>;

const later = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs `body`, then checks that it left no descriptor open and the reactor idle. */
async function leakFree(body: () => Promise<void>): Promise<void> {
  Reactor.instance(); // its epoll and eventfd descriptors live as long as the process
  const before = countOpenDescriptors();
  await body();
  await Reactor.instance().stopped;
  assert.equal(countOpenDescriptors(), before);
}

Deno.test("BYOB reads fill small buffers piece by piece, then end of stream", () =>
  leakFree(async () => {
    const [a, b] = pair();
    await a.write(new Uint8Array([1, 2, 3, 4, 5, 6, 7]));
    a.close();
    const reader = b.readable.getReader({ mode: "byob" });
    const seen: number[] = [];
    for (;;) {
      const { value, done } = await reader.read(new Uint8Array(3));
      if (done) break;
      assert.ok(value.length <= 3);
      seen.push(...value);
    }
    assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7]);
    b.close();
  }));

Deno.test("a pull that finds nothing waits for bytes sent later, then for end of stream", () =>
  leakFree(async () => {
    const [a, b] = pair();
    const collected = new Response(b.readable).arrayBuffer();
    await later(20);
    await a.write(new Uint8Array([9, 8, 7]));
    await later(20);
    await a.write(new Uint8Array([6]));
    a.closeWrite();
    assert.deepEqual([...new Uint8Array(await collected)], [9, 8, 7, 6]);
    a.close();
    b.close();
  }));

Deno.test("the readable of a peer that sends nothing and closes ends empty", () =>
  leakFree(async () => {
    const [a, b] = pair();
    setTimeout(() => a.close(), 10);
    assert.equal((await new Response(b.readable).arrayBuffer()).byteLength, 0);
    b.close();
  }));

Deno.test("bytes before end of stream are all delivered, in one pull or many", () =>
  leakFree(async () => {
    const [a, b] = pair();
    const payload = pattern(300_000);
    // More than one chunk is queued before the first pull, and the peer is gone by then.
    const written = a.write(payload).then(() => a.close());
    const received = new Uint8Array(await new Response(b.readable).arrayBuffer());
    await written;
    assert.deepEqual(received, payload);
    b.close();
  }));

Deno.test("a peer that resets the connection ends reads and the readable", () =>
  leakFree(async () => {
    const [a, b] = pair();
    // Closing with unread bytes resets the connection: the reader sees ECONNRESET.
    await b.write(new Uint8Array(16));
    await a.write(new Uint8Array(16));
    a.close();
    // What was sent before the reset is still read, then the reset reads as end of stream.
    const buffer = new Uint8Array(64);
    assert.equal(await b.read(buffer), 16);
    assert.equal(await b.read(buffer), null);
    const [c, d] = pair();
    await d.write(new Uint8Array(16));
    await c.write(new Uint8Array(16));
    c.close();
    assert.equal((await new Response(d.readable).arrayBuffer()).byteLength, 16);
    b.close();
    d.close();
  }));

Deno.test("a write larger than the socket buffer waits for the reader (backpressure)", () =>
  leakFree(async () => {
    const [a, b] = pair();
    const payload = pattern(8 << 20);
    let done = false;
    const writing = a.write(payload).then((count) => {
      done = true;
      return count;
    });
    await later(30);
    assert.equal(done, false, "the write completed with nobody reading");
    const received = new Uint8Array(payload.length);
    let at = 0;
    while (at < received.length) {
      const count = await b.read(received.subarray(at));
      assert.notEqual(count, null);
      at += count!;
    }
    assert.equal(await writing, payload.length);
    assert.deepEqual(received, payload);
    a.close();
    b.close();
  }));

Deno.test("the writable waits through backpressure and its close ends only writing", () =>
  leakFree(async () => {
    const [a, b] = pair();
    const payload = pattern(4 << 20);
    const piping = new Blob([payload]).stream().pipeTo(a.writable);
    await later(20);
    const received = new Uint8Array(await new Response(b.readable).arrayBuffer());
    await piping;
    assert.deepEqual(received, payload);
    // Reading still works after the writable closed.
    await b.write(new Uint8Array([5]));
    assert.equal(await a.read(new Uint8Array(1)), 1);
    a.close();
    b.close();
  }));

Deno.test("a write to a closed peer rejects with EPIPE, synchronously failing or not", () =>
  leakFree(async () => {
    const [a, b] = pair();
    b.close();
    await assert.rejects(a.write(new Uint8Array(8)), { code: "EPIPE" });
    a.close();
    await assert.rejects(a.write(new Uint8Array(8)), Deno.errors.BadResource);
  }));

Deno.test("cancelling the readable closes the socket: the peer reads end of stream", () =>
  leakFree(async () => {
    const [a, b] = pair();
    const reader = b.readable.getReader();
    const pending = reader.read();
    await later(10);
    await reader.cancel();
    assert.deepEqual(await pending, { value: undefined, done: true });
    assert.equal(b.fd, -1);
    assert.equal(await a.read(new Uint8Array(1)), null);
    a.close();
  }));

Deno.test("a read into a reused buffer returns what one read gives, never more than asked", () =>
  leakFree(async () => {
    const [a, b] = pair();
    const fd = a.detach();
    const sent = pattern(100);
    assert.equal(sendFrom(fd, sent), 100);
    const buffer = new Uint8Array(64);
    assert.equal(await b.read(buffer), 64);
    assert.deepEqual(buffer, sent.subarray(0, 64));
    assert.equal(await b.read(buffer), 36);
    closeDescriptor(fd);
    assert.equal(await b.read(buffer), null);
    b.close();
  }));

Deno.test("a reader that filled its buffer and then waits still wakes for a slow peer", () =>
  leakFree(async () => {
    // After a full read the reactor first waits on its own thread; a peer slower than that
    // must still be heard, through the helper thread.
    const [a, b] = pair();
    const fd = a.detach();
    assert.equal(sendFrom(fd, pattern(64)), 64);
    const buffer = new Uint8Array(64);
    assert.equal(await b.read(buffer), 64);
    const next = b.read(buffer);
    await later(30);
    assert.equal(sendFrom(fd, pattern(5)), 5);
    assert.equal(await next, 5);
    closeDescriptor(fd);
    b.close();
  }));

Deno.test("a reader waiting on its own thread for bytes that do not come leaves timers running", () =>
  leakFree(async () => {
    // After bytes came in, the next wait starts on the JavaScript thread: at most one slice,
    // then the helper thread takes it and timers run as usual.
    const [a, b] = pair();
    await a.write(new Uint8Array(64));
    const buffer = new Uint8Array(64);
    assert.equal(await b.read(buffer), 64);
    const next = b.read(buffer);
    let worstLateness = 0;
    for (let i = 0; i < 10; i++) {
      const start = performance.now();
      await later(5);
      worstLateness = Math.max(worstLateness, performance.now() - start - 5);
    }
    assert.ok(worstLateness < 50, `a 5 ms timer came ${worstLateness.toFixed(1)} ms late`);
    await a.write(new Uint8Array([1]));
    assert.equal(await next, 1);
    a.close();
    b.close();
  }));

Deno.test("a read into an empty buffer returns 0 at once, before and after end of stream, and throws once closed", () =>
  leakFree(async () => {
    const [a, b] = pair();
    assert.equal(await b.read(new Uint8Array(0)), 0, "nothing sent yet: no wait");
    await a.write(new Uint8Array([1]));
    assert.equal(await b.read(new Uint8Array(0)), 0, "bytes pending stay pending");
    a.close();
    assert.equal(await b.read(new Uint8Array(0)), 0, "not end of stream");
    const buffer = new Uint8Array(4);
    assert.equal(await b.read(buffer), 1);
    assert.equal(buffer[0], 1);
    assert.equal(await b.read(buffer), null);
    b.close();
    await assert.rejects(() => b.read(new Uint8Array(0)), Deno.errors.BadResource);
  }));

Deno.test("using closes the descriptor at the end of the block: the peer reads end of stream", () =>
  leakFree(async () => {
    const [a, b] = pair();
    let fd: number;
    {
      using scoped = b;
      fd = scoped.fd;
      assert.ok(Deno.statSync(`/proc/self/fd/${fd}`));
    }
    assert.equal(b.fd, -1);
    assert.equal(await a.read(new Uint8Array(1)), null);
    b[Symbol.dispose](); // a second close does nothing
    a.close();
  }));

Deno.test("a detached descriptor stays connected until closeDescriptor closes it", () =>
  leakFree(async () => {
    const [a, b] = pair();
    const fd = b.detach();
    assert.equal(b.fd, -1);
    await assert.rejects(b.read(new Uint8Array(1)), Deno.errors.BadResource);
    b.close(); // the descriptor is no longer its to close
    assert.equal(sendFrom(fd, pattern(3)), 3);
    assert.equal(await a.read(new Uint8Array(8)), 3);
    closeDescriptor(fd);
    assert.equal(await a.read(new Uint8Array(1)), null);
    // Straight after the first close, before anything can reuse the number.
    assert.throws(() => closeDescriptor(fd), {
      name: "OsError",
      code: "EBADF",
      message: `close fd ${fd}: EBADF (bad file descriptor)`,
    });
    a.close();
  }));

Deno.test("closeDescriptor refuses what is not a descriptor number rather than convert it", () => {
  assert.throws(() => closeDescriptor(-1), { name: "OsError", code: "EBADF" });
  for (const notInt of [Number.NaN, 1.5, 2 ** 32, Infinity]) {
    assert.throws(() => closeDescriptor(notInt), {
      name: "TypeError",
      message: `closeDescriptor: ${notInt} is not a descriptor number`,
    });
  }
});

Deno.test("an unref'd socket still reads while something else keeps the process alive", () =>
  leakFree(async () => {
    const [a, b] = pair();
    b.unref();
    const keepAlive = setTimeout(() => {}, 10_000);
    const next = b.read(new Uint8Array(8));
    await later(20);
    await a.write(pattern(3));
    assert.equal(await next, 3);
    clearTimeout(keepAlive);
    a.close();
    b.close();
  }));

const CONFIG = fileURLToPath(new URL("../deno.json", import.meta.url));

/**
 * Gets the pair for `key` at `path`, then runs its steps and says `waiting`:
 * `unref`, `read` (prints `read N`), `node-read` (the same through
 * toNodeSocket), `ref-later` and `unref-later` (100 ms on, while the read waits).
 */
const KEEP_ALIVE_CHILD = `
import { getPair } from ${JSON.stringify(import.meta.resolve("../client/pair.ts"))};
const [path, key, ...steps] = Deno.args;
const socket = await getPair(key, { socket: path });
const report = (count) => console.log(\`read \${count}\`);
for (const step of steps) {
  if (step === "unref") socket.unref();
  else if (step === "read") socket.read(new Uint8Array(64)).then(report);
  else if (step === "node-read") socket.toNodeSocket().on("data", (chunk) => report(chunk.length));
  else if (step === "ref-later") setTimeout(() => socket.ref(), 100);
  else if (step === "unref-later") setTimeout(() => socket.unref(), 100);
  else throw new Error(\`unknown step \${step}\`);
}
console.log("waiting");
`;

/** How long a child that must stay alive is watched before it is sent its bytes. */
const ALIVE_CHECK_MS = 400;

for (
  const [steps, exits] of [
    [["unref", "read"], true],
    [["read"], false],
    [["read", "unref-later"], true],
    [["unref", "read", "ref-later"], false],
    [["unref", "node-read"], true],
  ] as const
) {
  const outcome = exits ? "exits on its own" : "stays until its bytes come";
  Deno.test(`a process waiting on a paired socket (${steps.join(", ")}) ${outcome}`, () =>
    withBroker(async (_broker, path) => {
      const key = `keep-alive-${steps.join("-")}`;
      const child = new Cli([path, key, ...steps], {
        command: [Deno.execPath(), "eval", "--config", CONFIG, KEEP_ALIVE_CHILD],
      });
      try {
        using mine = await getPair(key, { socket: path });
        if (exits) {
          const { code, stdout, stderr } = await child.finish();
          assert.equal(code, 0, stderr);
          assert.equal(new TextDecoder().decode(stdout), "waiting\n");
        } else {
          await child.waitForOutput("waiting");
          await later(ALIVE_CHECK_MS);
          assert.equal(child.exited, false, `it exited with nothing to read: ${child.output}`);
          await mine.write(pattern(3));
          const { code, stdout, stderr } = await child.finish();
          assert.equal(code, 0, stderr);
          assert.equal(new TextDecoder().decode(stdout), "waiting\nread 3\n");
        }
        assert.equal(await mine.read(new Uint8Array(1)), null);
      } finally {
        await child.dispose();
      }
    }));
}
