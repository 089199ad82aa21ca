/**
 * Test helpers: a broker in a temporary directory, a raw protocol client that
 * sends arbitrary bytes and descriptors, and descriptor counting.
 *
 * @module
 */

import { Broker, type BrokerOptions } from "../broker/broker.ts";
import { Errno, OsError } from "../ffi/errors.ts";
import { Reactor } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  connectUnix,
  receiveMessage,
  sendMessage,
  UnixSocket,
} from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";

/** Open descriptors of this process, by listing `/proc/self/fd`. */
export function countOpenDescriptors(pid: number | "self" = "self"): number {
  // The listing itself holds one descriptor while it runs; that is the same every time.
  return [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
}

/** A fresh socket path in a fresh directory, removed by the returned cleanup. */
export async function temporarySocketPath(): Promise<{ path: string; remove(): Promise<void> }> {
  const directory = await Deno.makeTempDir({ prefix: "one-socket-test-" });
  return {
    path: `${directory}/broker.socket`,
    remove: () => Deno.remove(directory, { recursive: true }),
  };
}

/**
 * Runs `body` with a broker listening on a temporary socket, then closes the
 * broker and waits for the reactor to go idle, so that nothing outlives the test.
 */
export async function withBroker(
  body: (broker: Broker, path: string) => Promise<void>,
  options: Omit<BrokerOptions, "socket"> = {},
): Promise<void> {
  const socket = await temporarySocketPath();
  const broker = await Broker.listen({ ...options, socket: socket.path });
  try {
    await body(broker, socket.path);
  } finally {
    await broker.close();
    await Reactor.instance().stopped;
    await socket.remove();
  }
}

/** Polls `condition` every few milliseconds until it holds or `ms` pass. */
export async function eventually(
  condition: () => boolean,
  what: string,
  ms = 5000,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/** What the broker sent back on a raw connection. */
export interface RawReply {
  /** The bytes, up to end of stream. */
  bytes: Uint8Array;
  /** Descriptors that came with them (the caller owns and must close them). */
  descriptors: number[];
}

/**
 * A protocol client with no manners: sends exactly the bytes (and
 * descriptors) it is told to, and reads whatever comes back until the broker
 * closes the connection.
 */
export class RawClient implements Disposable {
  readonly socket: UnixSocket;

  private constructor(socket: UnixSocket) {
    this.socket = socket;
  }

  /** Connects to the broker at `path`. */
  static async connect(path: string): Promise<RawClient> {
    return new RawClient(await connectUnix(path));
  }

  /** Sends all of `bytes`, with `fds` attached to the first segment. */
  send(bytes: Uint8Array, fds: number[] = []): void {
    const header = new MessageHeader(new Uint8Array(bytes) as Uint8Array<ArrayBuffer>, 1);
    if (fds.length > 1) throw new Error("RawClient attaches at most one descriptor");
    header.prepareSend(bytes.length, fds.length === 1 ? fds[0] : -1);
    const sent = sendMessage(this.socket.fd, header);
    if (sent !== bytes.length) throw new OsError("sendmsg", sent < 0 ? -sent : Errno.EAGAIN);
  }

  /** Reads until end of stream (or `ms` elapse, which throws). */
  async readToEnd(ms = 5000): Promise<RawReply> {
    const header = new MessageHeader(new Uint8Array(4096), 8);
    const chunks: number[] = [];
    const descriptors: number[] = [];
    const deadline = Date.now() + ms;
    for (;;) {
      header.prepareReceive(header.data.length);
      const count = receiveMessage(this.socket.fd, header);
      if (count === 0 || count === -Errno.ECONNRESET) break;
      if (count === -Errno.EAGAIN) {
        const wait = this.socket.readiness.readable();
        const remaining = deadline - Date.now();
        let timer: ReturnType<typeof setTimeout> | undefined;
        const timedOut = await Promise.race([
          wait.then(() => false),
          new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(true), remaining)),
        ]);
        clearTimeout(timer);
        if (timedOut) {
          descriptors.forEach(closeDescriptor);
          throw new Error(`broker did not close the connection within ${ms} ms`);
        }
        continue;
      }
      if (count < 0) throw new OsError("recvmsg", -count);
      header.readDescriptors();
      descriptors.push(...header.descriptors);
      chunks.push(...header.data.subarray(0, count));
    }
    return { bytes: new Uint8Array(chunks), descriptors };
  }

  /** True if the broker has neither replied nor closed within `ms`. */
  async stillOpenAfter(ms: number): Promise<boolean> {
    try {
      const reply = await this.readToEnd(ms);
      reply.descriptors.forEach(closeDescriptor);
      return false;
    } catch {
      return true;
    }
  }

  /** Closes the connection. */
  [Symbol.dispose](): void {
    this.socket.close();
  }
}

/**
 * Compiles `tests/c/NAME.c` (or `source`) with the system compiler into a
 * temporary directory removed at exit; undefined when there is no `cc`.
 */
export async function buildCProgram(
  name: string,
  source: string = new URL(`./c/${name}.c`, import.meta.url).pathname,
): Promise<string | undefined> {
  const directory = await Deno.makeTempDir({ prefix: "one-socket-c-" });
  globalThis.addEventListener("unload", () => Deno.removeSync(directory, { recursive: true }));
  const output = `${directory}/${name}`;
  try {
    const { success, stderr } = await new Deno.Command("cc", {
      args: ["-O2", "-o", output, source],
    })
      .output();
    if (!success) throw new Error(`cc ${source} failed: ${new TextDecoder().decode(stderr)}`);
    return output;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
}

/**
 * Compiles `scripts/floor.c`, the benchmarks' minimal C broker: protocol v1
 * only, and it closes a request of another version as soon as its flags are
 * in, as the C broker does. Undefined when there is no `cc`.
 */
export function buildFloor(): Promise<string | undefined> {
  return buildCProgram("floor", new URL("../scripts/floor.c", import.meta.url).pathname);
}

/** The next connection on `listener`, once one comes: for stand-in brokers in tests. */
export async function acceptOne(listener: UnixSocket): Promise<UnixSocket> {
  let fd = acceptConnection(listener.fd);
  while (fd < 0) {
    await listener.readiness.readable();
    fd = acceptConnection(listener.fd);
  }
  return new UnixSocket(fd);
}
