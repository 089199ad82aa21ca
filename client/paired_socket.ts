/**
 * {@link PairedSocket}: the descriptor a client receives from the broker, as
 * async reads and writes, as whole messages (`seqpacket` and `dgram` pairs),
 * as web streams, or as a `node:net` socket, with the {@link Peer} the broker
 * attested; and {@link closeDescriptor} for one it gave up.
 *
 * @module
 */

import type { Socket } from "node:net";
import { Errno, OsError } from "../ffi/errors.ts";
import {
  closeDescriptor as releaseDescriptor,
  nextMessageLength,
  readInto,
  sendFrom,
  setNonblocking,
  shutdownWrite,
  UnixSocket,
} from "../ffi/socket.ts";
import type { SocketType } from "./protocol_v2.ts";

const STREAM_CHUNK_SIZE = 64 * 1024;

/**
 * Who is at the other end, as the broker attested it (protocol v2): the
 * partner's credentials as of its `connect` to the broker, which the partner
 * cannot change later. `SO_PEERCRED` on the paired socket itself names the
 * broker, which made the pair; this is the way to learn the partner.
 *
 * @example Serve only one user
 * ```ts
 * import { getPair } from "@one-socket/one-socket";
 * await using socket = await getPair("admin-api", { mode: "server" });
 * if (socket.peer === undefined || socket.peer.uid !== 0) throw new Error("not root");
 * ```
 */
export interface Peer {
  /** The partner's pid; 0 when the broker could not tell (another pid namespace). */
  readonly pid: number;
  /** The partner's uid. */
  readonly uid: number;
  /** The partner's primary gid. */
  readonly gid: number;
  /** Whether the partner is a listener (it stays registered and serves others too). */
  readonly listener: boolean;
  /** The protocol version the partner spoke to the broker. */
  readonly version: 1 | 2;
  /** The broker's connection id of the partner (low 32 bits), as in its log and `ctl clients`. */
  readonly id: number;
  /**
   * A pidfd of the partner's process (asked for with `pidfd: true`, where
   * the broker's kernel has `SO_PEERPIDFD`): it names the process without
   * the race of a reused pid. The {@link PairedSocket} owns it and closes it
   * in {@link PairedSocket.close}, whatever {@link PairedSocket.detach} or
   * {@link PairedSocket.toNodeSocket} did with the socket; it reads -1 from
   * then on. Absent when not asked for or not available.
   */
  readonly pidfd?: number;
}

/**
 * What the broker said about a pair, for {@link PairedSocket}'s constructor.
 *
 * @example A socketpair made by hand, as a seqpacket PairedSocket
 * ```ts
 * import { PairedSocket, type PairedSocketOptions } from "@one-socket/one-socket";
 * declare const fd: number; // one end of socketpair(AF_UNIX, SOCK_SEQPACKET)
 * const options: PairedSocketOptions = { type: "seqpacket" };
 * using socket = new PairedSocket(fd, options);
 * ```
 */
export interface PairedSocketOptions {
  /** The socket's type; default `stream`. */
  type?: SocketType;
  /** The protocol version the pair came by; default 1. */
  protocol?: 1 | 2;
  /** The partner; its `pidfd`, if any, passes to the new object. */
  peer?: Peer;
}

/** {@link Peer}, as this module updates it: its pidfd reads -1 once closed. */
type OwnedPeer = { -readonly [K in keyof Peer]: Peer[K] };

// Where an empty datagram is read: a read of 0 bytes would leave it queued.
const emptyMessage = new Uint8Array(1);

/**
 * One end of the socketpair the broker created: a connected Unix socket
 * shared with exactly one peer, of the {@link type} asked for (`stream`
 * unless said otherwise). It owns its descriptor until {@link close},
 * {@link detach} or {@link toNodeSocket}, and the partner's pidfd (in
 * {@link peer}) until {@link close}.
 *
 * Stream sockets carry bytes: {@link read}, {@link write} and the web
 * streams. `seqpacket` and `dgram` sockets carry whole messages:
 * {@link send} and {@link receive} (read and write work too, a message at
 * a time).
 *
 * Reads and writes are system calls on the JavaScript thread; only waiting
 * for the peer goes through the process's event loop. While bytes flow, a
 * read (or write) that finds nothing (no room) waits up to a millisecond on
 * the JavaScript thread before the loop hands the wait to a helper thread:
 * the hand-off costs more than the peer takes to send its next chunk, and the
 * price is that timers and other I/O may wait that long, once per such wait.
 *
 * @example Echo one message back
 * ```ts
 * import { getPair } from "@one-socket/one-socket";
 * await using socket = await getPair("echo-demo", { mode: "server" });
 * const buffer = new Uint8Array(1024);
 * const count = await socket.read(buffer);
 * if (count !== null) await socket.write(buffer.subarray(0, count));
 * ```
 */
export class PairedSocket implements Disposable, AsyncDisposable {
  /** The protocol version the pair came by: 2, or 1 from a v1-only broker (or when forced). */
  readonly protocol: 1 | 2;
  /** The socket's type. */
  readonly type: SocketType;
  /** The partner, as the broker attested it; absent under protocol v1. */
  readonly peer?: Peer;
  readonly #socket: UnixSocket;
  #nonblocking = false;
  // Reads and writes awaiting the peer: the descriptor must not change hands under them.
  #waiting = 0;
  // Whether bytes came in (went out) since the last wait: the peer is sending (reading)
  // right now, and its next bytes (room) are microseconds away.
  #streaming = false;
  #flowing = false;
  #stream?: ReadableStream<Uint8Array>;
  #writable?: WritableStream<Uint8Array>;

  /**
   * Takes ownership of a connected socket descriptor (and of
   * `options.peer.pidfd`). It stays in blocking mode until the first read or
   * write, so a descriptor only handed on (to a child process, say) reaches
   * its user unchanged.
   */
  constructor(fd: number, options: PairedSocketOptions = {}) {
    this.#socket = new UnixSocket(fd);
    this.type = options.type ?? "stream";
    this.protocol = options.protocol ?? 1;
    if (options.peer !== undefined) this.peer = { ...options.peer };
  }

  /** The descriptor number, for handing on; -1 once closed, detached or handed to Node. */
  get fd(): number {
    return this.#socket.fd;
  }

  #open(operation: string): number {
    const fd = this.#socket.fd;
    if (fd < 0) throw new Deno.errors.BadResource(`${operation}: paired socket is closed`);
    if (!this.#nonblocking) {
      setNonblocking(fd);
      this.#nonblocking = true;
    }
    return fd;
  }

  /**
   * Reads into `buffer`: the number of bytes read, or `null` at end of stream
   * (the peer closed or shut down its writing side).
   */
  async read(buffer: Uint8Array): Promise<number | null> {
    // An empty read asks for nothing: it must not look like end of stream.
    if (buffer.length === 0) {
      this.#open("read"); // a closed socket still throws
      return 0;
    }
    for (;;) {
      const count = this.#readNow(buffer as Uint8Array<ArrayBuffer>);
      if (count !== 0) return count;
      this.#waiting++;
      await this.#readable();
      this.#waiting--;
    }
  }

  /**
   * Waits for bytes. Right after bytes came in the peer is streaming and its
   * next bytes are microseconds away: the reactor waits for them on this
   * thread (up to a millisecond, once per wait) rather than pay a hand-off to
   * its helper thread.
   */
  #readable(): Promise<void> {
    const soon = this.#streaming;
    this.#streaming = false;
    return this.#socket.readiness.readable(soon);
  }

  /** Writes all of `data`, waiting for room as needed; resolves to `data.length`. */
  write(data: Uint8Array): Promise<number> {
    try {
      const count = sendFrom(this.#open("write"), data as Uint8Array<ArrayBuffer>);
      // The common case: the kernel took it all, and nothing needs awaiting.
      if (count === data.length) {
        this.#flowing = true;
        return Promise.resolve(count);
      }
      return this.#writeRest(data as Uint8Array<ArrayBuffer>, count);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  async #writeRest(data: Uint8Array<ArrayBuffer>, first: number): Promise<number> {
    let count = first;
    let rest = data;
    for (;;) {
      if (count >= 0) {
        this.#flowing = true;
        rest = rest.subarray(count);
        if (rest.length === 0) return data.length;
      } else if (count === -Errno.EAGAIN) {
        // A full buffer after bytes went out: the reader is draining it right now.
        const soon = this.#flowing;
        this.#flowing = false;
        this.#waiting++;
        await this.#socket.readiness.writable(soon);
        this.#waiting--;
      } else {
        throw new OsError("write", -count);
      }
      count = sendFrom(this.#open("write"), rest);
    }
  }

  /** Ends the writing direction; the peer reads end of stream and may still reply. */
  closeWrite(): void {
    shutdownWrite(this.#open("shutdown"));
  }

  /**
   * Sends `message` as one message, waiting for room as needed (`seqpacket`
   * and `dgram` only). A `seqpacket` message must not be empty: the peer
   * would read it as end of stream.
   *
   * @throws {TypeError} on a `stream` socket, which has no message boundaries: use {@link write}
   * @throws {RangeError} for an empty `seqpacket` message
   * @throws {OsError} `EMSGSIZE` for a message longer than the socket takes; `EPIPE`
   *   (`seqpacket`) or `ECONNREFUSED` (`dgram`) once the peer closed
   *
   * @example Messages keep their boundaries
   * ```ts
   * import { getPair } from "@one-socket/one-socket";
   * await using socket = await getPair("memif-ctl", { type: "seqpacket" });
   * await socket.send(new TextEncoder().encode("hello"));
   * await socket.send(new TextEncoder().encode("world")); // received apart, never "helloworld"
   * ```
   */
  async send(message: Uint8Array): Promise<void> {
    this.#requireMessages("send", "write");
    if (message.length === 0 && this.type === "seqpacket") {
      throw new RangeError("send: an empty seqpacket message reads as end of stream at the peer");
    }
    for (;;) {
      const count = sendFrom(this.#open("send"), message as Uint8Array<ArrayBuffer>);
      // A message goes whole or not at all.
      if (count >= 0) return;
      if (count !== -Errno.EAGAIN) throw new OsError("send", -count);
      this.#waiting++;
      await this.#socket.readiness.writable();
      this.#waiting--;
    }
  }

  /**
   * Receives one whole message (`seqpacket` and `dgram` only): a view of
   * `buffer` when it fits there, otherwise (or with no `buffer`) an array of
   * its own; a message is never cut. A `seqpacket` socket returns `null` at
   * end of stream (the peer closed or shut down its writing side). A `dgram`
   * socket has no end of stream: the kernel tells a datagram socket nothing
   * when its peer closes, and an empty datagram is a message like any other.
   * Agree on a last message, or {@link close} the socket, which makes a
   * waiting receive throw `BadResource`.
   *
   * @throws {TypeError} on a `stream` socket: use {@link read}
   *
   * @example Read messages until the peer is done
   * ```ts
   * import { getPair } from "@one-socket/one-socket";
   * await using socket = await getPair("memif-ctl", { type: "seqpacket", mode: "server" });
   * const buffer = new Uint8Array(2048);
   * for (let message; (message = await socket.receive(buffer)) !== null;) {
   *   console.log(`${message.length}-byte message`);
   * }
   * ```
   */
  async receive(buffer?: Uint8Array): Promise<Uint8Array | null> {
    this.#requireMessages("receive", "read");
    for (;;) {
      const message = this.#receiveNow(buffer as Uint8Array<ArrayBuffer> | undefined);
      if (message !== undefined) return message;
      this.#waiting++;
      await this.#socket.readiness.readable();
      this.#waiting--;
    }
  }

  #requireMessages(operation: string, instead: string): void {
    if (this.type === "stream") {
      throw new TypeError(
        `${operation}: a stream socket carries bytes, not messages; use ${instead}`,
      );
    }
  }

  /** One message if one is queued, null at end (seqpacket), undefined for nothing yet. */
  #receiveNow(buffer: Uint8Array<ArrayBuffer> | undefined): Uint8Array | null | undefined {
    const fd = this.#open("receive");
    // The next message's exact length, so that it is read whole into a buffer that holds it.
    const length = nextMessageLength(fd);
    if (length === -Errno.EAGAIN) return undefined;
    if (length < 0) {
      if (length === -Errno.ECONNRESET && this.type === "seqpacket") return null;
      throw new OsError("recv", -length);
    }
    if (length === 0 && this.type === "seqpacket") return null;
    const target = length === 0
      ? emptyMessage
      : buffer !== undefined && buffer.length >= length
      ? buffer
      : new Uint8Array(length);
    const count = readInto(fd, target);
    if (count < 0) throw new OsError("recv", -count);
    return target === emptyMessage ? new Uint8Array(0) : target.subarray(0, count);
  }

  /**
   * One read into `target`: the byte count, 0 for "nothing yet" (EAGAIN), or
   * null at end of stream. A short read is returned as it is: on a stream
   * socket it means the kernel has nothing more, and asking again costs a
   * system call that finds EAGAIN.
   */
  #readNow(target: Uint8Array<ArrayBuffer>): number | null {
    const count = readInto(this.#open("read"), target);
    if (count > 0) {
      this.#streaming = true;
      return count;
    }
    if (count === -Errno.EAGAIN) return 0;
    // A reset reads as end of stream, as in read().
    if (count === 0 || count === -Errno.ECONNRESET) return null;
    throw new OsError("read", -count);
  }

  /** The incoming bytes as a byte stream; cancelling it closes the socket. */
  get readable(): ReadableStream<Uint8Array> {
    return this.#stream ??= new ReadableStream({
      type: "bytes",
      autoAllocateChunkSize: STREAM_CHUNK_SIZE,
      // Synchronous when the kernel has bytes: a pull awaits only after EAGAIN.
      pull: (controller) => {
        const request = controller.byobRequest!;
        const view = request.view!;
        const target = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
        const filled = this.#readNow(target);
        if (filled === null) {
          controller.close();
          request.respond(0);
        } else if (filled > 0) {
          request.respond(filled);
        } else {
          return this.#pullLater(controller, target);
        }
      },
      cancel: () => this.close(),
    });
  }

  async #pullLater(
    controller: ReadableByteStreamController,
    target: Uint8Array<ArrayBuffer>,
  ): Promise<void> {
    let filled: number | null = 0;
    while (filled === 0) {
      await this.#readable();
      filled = this.#readNow(target);
    }
    const request = controller.byobRequest!;
    if (filled === null) {
      controller.close();
      request.respond(0);
    } else {
      request.respond(filled);
    }
  }

  /** A sink for outgoing bytes; closing it ends the writing direction only. */
  get writable(): WritableStream<Uint8Array> {
    return this.#writable ??= new WritableStream({
      write: (chunk) => this.write(chunk).then(() => {}),
      close: () => this.closeWrite(),
      abort: () => this.close(),
    });
  }

  /**
   * Lets the process exit while a read or write waits for the peer, as
   * `unref()` does for a `Deno.Conn` or a `node:net` socket. The wait is still
   * answered for as long as something else keeps the process running.
   *
   * @example A background listener that must not hold the program open
   * ```ts
   * import { getPair } from "@one-socket/one-socket";
   * const socket = await getPair("notifications");
   * socket.unref();
   * socket.read(new Uint8Array(64)).then((count) => console.log("notified", count));
   * ```
   */
  unref(): void {
    this.#socket.readiness.keepsAlive = false;
  }

  /** Undoes {@link unref}: a pending read or write keeps the process alive again. */
  ref(): void {
    this.#socket.readiness.keepsAlive = true;
  }

  /**
   * Hands the descriptor to a new `node:net` socket, for the libraries that
   * take one (`node:http`, `node:http2`, `node:tls`, gRPC): this object then
   * behaves as detached (`fd` is -1, its calls throw `BadResource`) and the
   * returned socket owns the descriptor and closes it when destroyed (the
   * partner's pidfd stays with this object, for {@link close}). An
   * {@link unref}'d socket stays unref'd. `node:net` is loaded on the first
   * call, not when this module is imported.
   *
   * @throws {Deno.errors.BadResource} once closed or detached
   * @throws {Deno.errors.Busy} while a read or write awaits the peer, or once
   *   {@link readable} or {@link writable} was taken (their bytes are theirs)
   *
   * @example Serve HTTP/1.1 to the peer
   * ```ts
   * import { createServer } from "node:http";
   * import { getPair } from "@one-socket/one-socket";
   * const server = createServer((_request, response) => response.end("hello\n"));
   * const socket = await getPair("http-demo", { mode: "server" });
   * server.emit("connection", socket.toNodeSocket());
   * ```
   *
   * @example Request it from the other end
   * ```ts
   * import { request } from "node:http";
   * import { getPair } from "@one-socket/one-socket";
   * const socket = (await getPair("http-demo", { mode: "client" })).toNodeSocket();
   * request({ createConnection: () => socket, path: "/" }, (response) => response.pipe(process.stdout))
   *   .end();
   * ```
   */
  toNodeSocket(): Socket {
    const fd = this.#socket.fd;
    if (fd < 0) throw new Deno.errors.BadResource("toNodeSocket: paired socket is closed");
    if (this.#waiting > 0) {
      throw new Deno.errors.Busy(`toNodeSocket: a read or write on fd ${fd} awaits the peer`);
    }
    if (this.#stream !== undefined || this.#writable !== undefined) {
      throw new Deno.errors.Busy(`toNodeSocket: the web streams of fd ${fd} own its bytes`);
    }
    const net = process.getBuiltinModule("node:net");
    // Node documents both as false by default for a socket made from a descriptor.
    const socket = new net.Socket({ fd, readable: true, writable: true });
    if (!this.#socket.readiness.keepsAlive) socket.unref();
    this.#socket.detach();
    return socket;
  }

  /**
   * Gives up ownership of the descriptor, to pass it on (to a C library
   * through FFI, say); this object then behaves as closed. The caller closes the
   * descriptor, with {@link closeDescriptor} if nothing else takes it. The
   * partner's pidfd stays with this object: {@link close} (or `using`) still
   * closes it.
   *
   * @example Hand the descriptor to code that takes a number, then close it
   * ```ts
   * import { closeDescriptor, getPair } from "@one-socket/one-socket";
   * const socket = await getPair("vhost-user-1");
   * const fd = socket.detach();
   * console.log(`the peer is at /proc/${Deno.pid}/fd/${fd}`);
   * closeDescriptor(fd);
   * ```
   */
  detach(): number {
    return this.#socket.detach();
  }

  /**
   * Closes the descriptor, if this object still owns it, and the partner's
   * pidfd; later calls do nothing. Pending reads and writes fail.
   */
  close(): void {
    this.#socket.close();
    const peer = this.peer as OwnedPeer | undefined;
    if (peer?.pidfd !== undefined && peer.pidfd >= 0) {
      releaseDescriptor(peer.pidfd);
      peer.pidfd = -1;
    }
  }

  /** Same as {@link close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** Same as {@link close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}

/**
 * Closes a descriptor that {@link PairedSocket.detach} handed out, once it
 * has been passed on (Deno 2 has no `Deno.close`).
 *
 * @param fd the descriptor number
 * @throws {OsError} `EBADF` when `fd` is not open (closed already, or never opened)
 * @throws {TypeError} when `fd` is not a C `int`: converted, it would name another descriptor
 *
 * @example Close it whatever the code it was lent to does
 * ```ts
 * import { closeDescriptor, getPair } from "@one-socket/one-socket";
 * // A library that duplicates the descriptors it is given (vhost-user, say).
 * declare function addBackend(fd: number): void;
 * const fd = (await getPair("vhost-user-1")).detach();
 * try {
 *   addBackend(fd);
 * } finally {
 *   closeDescriptor(fd);
 * }
 * ```
 */
export function closeDescriptor(fd: number): void {
  if ((fd | 0) !== fd) throw new TypeError(`closeDescriptor: ${fd} is not a descriptor number`);
  const result = releaseDescriptor(fd);
  // After EINTR, Linux has released the descriptor all the same: a retry could close another.
  if (result < 0 && result !== -Errno.EINTR) throw new OsError("close", -result, `fd ${fd}`);
}
