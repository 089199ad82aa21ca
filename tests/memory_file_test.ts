/**
 * `ffi/memory_file.ts` and what systemd's file descriptor store needs of
 * `ffi/`: a memory file that keeps what is written to it, seen the same
 * through any descriptor of it, and {@link sendDatagram} attaching
 * descriptors that arrive on the other side as the very same files.
 */

import assert from "node:assert/strict";
import { OsError } from "../ffi/errors.ts";
import { errno, F_GETFD, FD_CLOEXEC, libc, O_RDWR, SOCK_STREAM } from "../ffi/libc.ts";
import { MemoryFile } from "../ffi/memory_file.ts";
import { countOpenDescriptors } from "../ffi/process.ts";
import {
  bindDatagram,
  closeDescriptor,
  createSocketPair,
  readInto,
  receiveMessage,
  sendDatagram,
  sendFrom,
  type UnixSocket,
} from "../ffi/socket.ts";
import { cString, MessageHeader } from "../ffi/structs.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Runs `body`, then fails if it left a descriptor open. */
async function withoutLeaks(body: () => Promise<void> | void): Promise<void> {
  const before = countOpenDescriptors();
  await body();
  assert.equal(countOpenDescriptors(), before, "descriptors left open");
}

/** A second open file description of `fd`, reopened through /proc (not a dup: its own offset). */
function reopen(fd: number, flags = O_RDWR): number {
  const copy = libc.open(cString(`/proc/self/fd/${fd}`), flags);
  if (copy < 0) throw new OsError("open", errno(), `/proc/self/fd/${fd}`);
  return copy;
}

/** `count` connected stream socket pairs, as [sent end, kept end]. */
function socketPairs(count: number): [number, number][] {
  const pairs: [number, number][] = [];
  const ends = new Int32Array(2);
  for (let i = 0; i < count; i++) {
    const result = createSocketPair(ends, SOCK_STREAM);
    if (result < 0) throw new OsError("socketpair", -result);
    pairs.push([ends[0], ends[1]]);
  }
  return pairs;
}

function closeAll(fds: Iterable<number>): void {
  for (const fd of fds) closeDescriptor(fd);
}

/** A datagram socket bound at a fresh path, the test's stand-in for `NOTIFY_SOCKET`. */
interface Receiver extends Disposable {
  /** Where it is bound: a file, or `@…` abstract. */
  path: string;
  /** The bound socket. */
  socket: UnixSocket;
}

/** A {@link Receiver}; disposing of it closes the socket and removes its directory. */
function receiver(abstract: boolean): Receiver {
  if (abstract) {
    const path = `@one-socket-memfd-test-${Deno.pid}-${crypto.randomUUID()}`;
    const socket = bindDatagram(path);
    return { path, socket, [Symbol.dispose]: () => socket.close() };
  }
  const dir = Deno.makeTempDirSync({ prefix: "one-socket-memfd-" });
  const path = `${dir}/notify`;
  try {
    const socket = bindDatagram(path);
    return {
      path,
      socket,
      [Symbol.dispose]: () => {
        socket.close();
        Deno.removeSync(dir, { recursive: true });
      },
    };
  } catch (error) {
    Deno.removeSync(dir, { recursive: true });
    throw error;
  }
}

/**
 * Sends `text` with the first end of each pair and checks what arrives: the
 * text, and descriptors that are those very sockets (a write on each
 * received one comes out of the end we kept).
 */
function sendAndProve(pairCount: number, abstract: boolean): void {
  using notify = receiver(abstract);
  const { path, socket } = notify;
  const pairs = socketPairs(pairCount);
  const received: number[] = [];
  try {
    const text = `FDSTORE=1\nFDNAME=test-${pairCount}`;
    sendDatagram(path, encoder.encode(text), pairs.map(([sent]) => sent));
    const header = new MessageHeader(new Uint8Array(4096), 64);
    header.prepareReceive(header.data.length);
    const count = receiveMessage(socket.fd, header);
    assert.ok(count >= 0, `recvmsg: errno ${-count}`);
    const truncated = header.readDescriptors();
    received.push(...header.descriptors);
    assert.equal(truncated, false, "the kernel dropped descriptors");
    assert.equal(decoder.decode(header.data.subarray(0, count)), text);
    assert.equal(received.length, pairCount);
    // Our own ends are still ours: the receiver got copies, with numbers of its own.
    for (const fd of received) assert.ok(!pairs.some(([sent]) => sent === fd));
    const byte = new Uint8Array(1);
    const answer = new Uint8Array(2);
    for (let i = 0; i < pairCount; i++) {
      byte[0] = i;
      assert.equal(sendFrom(received[i], byte), 1);
      assert.equal(readInto(pairs[i][1], answer), 1, `pair ${i}`);
      assert.equal(answer[0], i, `pair ${i} got another socket's byte`);
    }
  } finally {
    closeAll(received);
    closeAll(pairs.flat());
  }
}

// --- MemoryFile ----------------------------------------------------------------------------------

Deno.test("memory file: write, read, size and truncate round trip", () =>
  withoutLeaks(() => {
    using file = MemoryFile.create("one-socket-test");
    assert.ok(file.fd >= 0);
    assert.equal(file.size, 0);
    assert.deepEqual(file.read(0, 10), new Uint8Array(0));

    file.write(encoder.encode("hello, world"), 0);
    assert.equal(file.size, 12);
    assert.equal(decoder.decode(file.read(0, 12)), "hello, world");
    assert.equal(decoder.decode(file.read(7, 5)), "world");
    // Past the end: what there is, then nothing.
    assert.equal(decoder.decode(file.read(7, 100)), "world");
    assert.deepEqual(file.read(12, 4), new Uint8Array(0));
    assert.deepEqual(file.read(1000, 4), new Uint8Array(0));
    assert.deepEqual(file.read(3, 0), new Uint8Array(0));

    file.write(encoder.encode("WORLD"), 7);
    assert.equal(decoder.decode(file.read(0, 100)), "hello, WORLD");

    file.truncate(5);
    assert.equal(file.size, 5);
    assert.equal(decoder.decode(file.read(0, 100)), "hello");
    // Growing fills with zeros.
    file.truncate(8);
    assert.deepEqual(file.read(0, 100), new Uint8Array([...encoder.encode("hello"), 0, 0, 0]));
    file.truncate(0);
    assert.equal(file.size, 0);

    // A large write, in one call or several, and read back the same.
    const big = crypto.getRandomValues(new Uint8Array(65536)).map((_, i) => i * 7);
    file.write(big, 0);
    assert.equal(file.size, big.length);
    assert.deepEqual(file.read(0, big.length), big);
    // A subarray writes only its own bytes.
    file.write(big.subarray(100, 110), 0);
    assert.deepEqual(file.read(0, 10), big.subarray(100, 110));
  }));

Deno.test("memory file: a write beyond the end grows the file, zeros in between", () =>
  withoutLeaks(() => {
    using file = MemoryFile.create("one-socket-test");
    file.write(encoder.encode("ab"), 0);
    file.write(encoder.encode("xyz"), 4096);
    assert.equal(file.size, 4099);
    const all = file.read(0, 10000);
    assert.equal(all.length, 4099);
    assert.equal(decoder.decode(all.subarray(0, 2)), "ab");
    assert.ok(all.subarray(2, 4096).every((byte) => byte === 0), "the hole reads as zeros");
    assert.equal(decoder.decode(all.subarray(4096)), "xyz");
    // Far out: a sparse file, not 1 GiB of memory.
    file.write(encoder.encode("!"), 2 ** 30);
    assert.equal(file.size, 2 ** 30 + 1);
    assert.equal(decoder.decode(file.read(2 ** 30 - 1, 10)), "\0!");
  }));

Deno.test("memory file: the contents are the same through a second descriptor", () =>
  withoutLeaks(() => {
    using file = MemoryFile.create("one-socket-shared");
    file.write(encoder.encode("state v1"), 0);
    // Deno's own file API, through /proc: the same inode.
    assert.equal(Deno.readTextFileSync(`/proc/self/fd/${file.fd}`), "state v1");
    // As the service manager hands it back: another descriptor, adopted.
    {
      using again = MemoryFile.adopt(reopen(file.fd));
      assert.notEqual(again.fd, file.fd);
      assert.equal(again.size, 8);
      assert.equal(decoder.decode(again.read(0, 8)), "state v1");
      again.write(encoder.encode("v2"), 6);
      again.write(encoder.encode(", more"), 8);
    }
    // Closing the adopted copy closed only that descriptor; ours sees its writes.
    assert.equal(file.size, 14);
    assert.equal(decoder.decode(file.read(0, 100)), "state v2, more");
  }));

Deno.test("memory file: adopt() makes the descriptor close-on-exec and refuses non-files", () =>
  withoutLeaks(() => {
    using file = MemoryFile.create("one-socket-test");
    // An inherited descriptor is not close-on-exec; adopting it makes it so.
    const inherited = reopen(file.fd);
    assert.equal(libc.fcntl(inherited, F_GETFD, 0) & FD_CLOEXEC, 0);
    using adopted = MemoryFile.adopt(inherited);
    assert.equal(libc.fcntl(adopted.fd, F_GETFD, 0) & FD_CLOEXEC, FD_CLOEXEC);

    const [one, other] = socketPairs(1)[0];
    try {
      assert.throws(
        () => MemoryFile.adopt(one),
        (error: Error) =>
          !(error instanceof OsError) &&
          error.message === `fd ${one} is a socket, not a regular file; refusing to adopt it`,
      );
      // Refused: still the caller's, and still open.
      assert.equal(sendFrom(one, new Uint8Array(1)), 1);
    } finally {
      closeAll([one, other]);
    }
    // A closed descriptor: fstat names it.
    assert.throws(
      () => MemoryFile.adopt(one),
      (error: unknown) =>
        error instanceof OsError && error.syscall === "fstat" && error.code === "EBADF" &&
        error.path === `fd ${one}`,
    );
    assert.throws(() => MemoryFile.adopt(-1), RangeError);
  }));

Deno.test("memory file: names are checked, and a closed file refuses to be used", () =>
  withoutLeaks(() => {
    assert.throws(() => MemoryFile.create("a\0b"), RangeError);
    assert.throws(() => MemoryFile.create("x".repeat(250)), RangeError);
    const file = MemoryFile.create("x".repeat(249));
    assert.equal(
      Deno.readLinkSync(`/proc/self/fd/${file.fd}`),
      `/memfd:${"x".repeat(249)} (deleted)`,
    );
    assert.throws(() => file.write(new Uint8Array(1), -1), RangeError);
    assert.throws(() => file.read(0.5, 1), RangeError);
    file.close();
    assert.equal(file.fd, -1);
    file.close(); // a second close does nothing
    assert.throws(() => file.write(new Uint8Array(1), 0), Deno.errors.BadResource);
    assert.throws(() => file.size, Deno.errors.BadResource);
  }));

// --- sendDatagram with descriptors ---------------------------------------------------------------

Deno.test("sendDatagram: one descriptor arrives as the same socket", () =>
  withoutLeaks(() => sendAndProve(1, false)));

Deno.test("sendDatagram: 64 descriptors in one datagram, to an abstract address", () =>
  withoutLeaks(() => sendAndProve(64, true)));

Deno.test("sendDatagram: a memory file sent and received is the same file", () =>
  withoutLeaks(() => {
    using notify = receiver(true);
    const { path, socket } = notify;
    using file = MemoryFile.create("one-socket-state");
    file.write(encoder.encode("kept"), 0);
    // From the middle of a buffer: the datagram is the view's bytes, not its buffer's.
    const framed = encoder.encode("[[FDSTORE=1\nFDNAME=state]]");
    sendDatagram(path, framed.subarray(2, framed.length - 2), [file.fd]);
    const header = new MessageHeader(new Uint8Array(256), 1);
    header.prepareReceive(256);
    const count = receiveMessage(socket.fd, header);
    assert.equal(decoder.decode(header.data.subarray(0, count)), "FDSTORE=1\nFDNAME=state");
    header.readDescriptors();
    assert.equal(header.descriptors.length, 1);
    using back = MemoryFile.adopt(header.descriptors[0]);
    assert.equal(decoder.decode(back.read(0, 10)), "kept");
    back.write(encoder.encode("!"), 4);
    assert.equal(decoder.decode(file.read(0, 10)), "kept!");
  }));

Deno.test("sendDatagram: without descriptors, a plain datagram as before", () =>
  withoutLeaks(() => {
    using notify = receiver(false);
    const { path, socket } = notify;
    sendDatagram(path, encoder.encode("READY=1"));
    sendDatagram(path, encoder.encode("WATCHDOG=1"), []);
    const header = new MessageHeader(new Uint8Array(256), 4);
    for (const expected of ["READY=1", "WATCHDOG=1"]) {
      header.prepareReceive(256);
      const count = receiveMessage(socket.fd, header);
      header.readDescriptors();
      assert.equal(decoder.decode(header.data.subarray(0, count)), expected);
      assert.deepEqual(header.descriptors, []);
    }
  }));

Deno.test("sendDatagram: errors name the call and the path", () =>
  withoutLeaks(() => {
    const missing = `/tmp/one-socket-no-such-${crypto.randomUUID()}`;
    const [one, other] = socketPairs(1)[0];
    try {
      assert.throws(
        () => sendDatagram(missing, encoder.encode("x"), [one]),
        (error: unknown) =>
          error instanceof OsError && error.syscall === "sendmsg" && error.code === "ENOENT" &&
          error.path === missing && error.message.startsWith(`sendmsg ${missing}: ENOENT`),
      );
      assert.throws(
        () => sendDatagram(missing, encoder.encode("x")),
        (error: unknown) =>
          error instanceof OsError && error.syscall === "sendto" && error.code === "ENOENT" &&
          error.path === missing,
      );
      // More than one SCM_RIGHTS message may carry (SCM_MAX_FD, 253): the kernel's EINVAL.
      using notify = receiver(true);
      const { path } = notify;
      assert.throws(
        () => sendDatagram(path, encoder.encode("x"), new Array(254).fill(one)),
        (error: unknown) =>
          error instanceof OsError && error.syscall === "sendmsg" && error.code === "EINVAL",
      );
      // Refused before any socket exists.
      assert.throws(() => sendDatagram(path, encoder.encode("x"), [one, -1]), RangeError);
    } finally {
      closeAll([one, other]);
    }
  }));

// --- MessageHeader.prepareSendDescriptors --------------------------------------------------------

Deno.test("MessageHeader.prepareSendDescriptors: checks its arguments, leaves the others alone", () => {
  const header = new MessageHeader(new Uint8Array(8), 2);
  assert.throws(() => header.prepareSendDescriptors(1, [3, 4, 5]), RangeError);
  assert.throws(() => header.prepareSendDescriptors(9, []), RangeError);
  assert.throws(() => header.prepareSendDescriptors(-1, []), RangeError);
  assert.throws(() => header.prepareSendDescriptors(1, [1.5]), RangeError);
  header.prepareSendDescriptors(8, [3, 4]);
  header.prepareSendDescriptors(0, []);
  // Still a header for the hot path: receive into it, send from it over a socket pair.
  const [one, other] = socketPairs(1)[0];
  try {
    header.data.set(encoder.encode("12345678"));
    header.prepareSendDescriptors(8, [one]);
    assert.equal(libc.sendmsg(one, header.header, 0), 8);
    const inbound = new MessageHeader(new Uint8Array(16), 2);
    inbound.prepareReceive(16);
    assert.equal(receiveMessage(other, inbound), 8);
    inbound.readDescriptors();
    assert.equal(inbound.descriptors.length, 1);
    closeAll(inbound.descriptors);
    // prepareSend after it: one descriptor again, and then none.
    header.prepareSend(4, -1);
    assert.equal(libc.sendmsg(one, header.header, 0), 4);
    inbound.prepareReceive(16);
    assert.equal(receiveMessage(other, inbound), 4);
    inbound.readDescriptors();
    assert.deepEqual(inbound.descriptors, []);
  } finally {
    closeAll([one, other]);
  }
});
