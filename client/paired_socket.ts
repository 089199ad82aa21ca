/**
 * {@link PairedSocket}: the descriptor a client receives from the broker, as
 * async reads and writes and as web streams.
 *
 * @module
 */

import { Errno, OsError } from "../ffi/errors.ts";
import { readInto, sendFrom, setNonblocking, shutdownWrite, UnixSocket } from "../ffi/socket.ts";

const STREAM_CHUNK_SIZE = 64 * 1024;

/**
 * One end of the socketpair the broker created: a connected Unix stream
 * socket shared with exactly one peer. It owns its descriptor until
 * {@link close} or {@link detach}.
 *
 * @example Echo one message back
 * ```ts
 * import { getPair } from "./mod.ts";
 * await using socket = await getPair("echo-demo", { mode: "server" });
 * const buffer = new Uint8Array(1024);
 * const count = await socket.read(buffer);
 * if (count !== null) await socket.write(buffer.subarray(0, count));
 * ```
 */
export class PairedSocket implements AsyncDisposable {
  readonly #socket: UnixSocket;
  #nonblocking = false;
  #readable?: ReadableStream<Uint8Array>;
  #writable?: WritableStream<Uint8Array>;

  /**
   * Takes ownership of a connected stream socket descriptor. It stays in
   * blocking mode until the first read or write, so a descriptor only handed
   * on (to a child process, say) reaches its user unchanged.
   */
  constructor(fd: number) {
    this.#socket = new UnixSocket(fd);
  }

  /** The descriptor number, for handing on; -1 once closed or detached. */
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
    for (;;) {
      const count = readInto(this.#open("read"), buffer as Uint8Array<ArrayBuffer>);
      if (count > 0) return count;
      if (count === 0) return buffer.length === 0 ? 0 : null;
      if (count === -Errno.ECONNRESET) return null;
      if (count !== -Errno.EAGAIN) throw new OsError("read", -count);
      await this.#socket.readiness.readable();
    }
  }

  /** Writes all of `data`, waiting for room as needed; resolves to `data.length`. */
  async write(data: Uint8Array): Promise<number> {
    let rest = data as Uint8Array<ArrayBuffer>;
    while (rest.length > 0) {
      const count = sendFrom(this.#open("write"), rest);
      if (count >= 0) {
        rest = rest.subarray(count);
      } else if (count === -Errno.EAGAIN) {
        await this.#socket.readiness.writable();
      } else {
        throw new OsError("write", -count);
      }
    }
    return data.length;
  }

  /** Ends the writing direction; the peer reads end of stream and may still reply. */
  closeWrite(): void {
    shutdownWrite(this.#open("shutdown"));
  }

  /** The incoming bytes as a byte stream; cancelling it closes the socket. */
  get readable(): ReadableStream<Uint8Array> {
    return this.#readable ??= new ReadableStream({
      type: "bytes",
      autoAllocateChunkSize: STREAM_CHUNK_SIZE,
      pull: async (controller) => {
        const request = controller.byobRequest!;
        const view = request.view!;
        const count = await this.read(
          new Uint8Array(view.buffer, view.byteOffset, view.byteLength),
        );
        if (count === null) {
          controller.close();
          request.respond(0);
        } else {
          request.respond(count);
        }
      },
      cancel: () => this.close(),
    });
  }

  /** A sink for outgoing bytes; closing it ends the writing direction only. */
  get writable(): WritableStream<Uint8Array> {
    return this.#writable ??= new WritableStream({
      write: async (chunk) => {
        await this.write(chunk);
      },
      close: () => this.closeWrite(),
      abort: () => this.close(),
    });
  }

  /** Gives up ownership of the descriptor (to pass it on); the caller closes it. */
  detach(): number {
    return this.#socket.detach();
  }

  /** Closes the descriptor; later calls do nothing. Pending reads and writes fail. */
  close(): void {
    this.#socket.close();
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}
