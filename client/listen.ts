/**
 * {@link listen}: a server registers a key with the broker once (protocol
 * v2's `LISTEN`) and receives a fresh {@link PairedSocket} for every client
 * that asks for that key, without asking again per client.
 *
 * @module
 */

import { UnixSocket } from "../ffi/socket.ts";
import {
  abortable,
  type BrokerAddress,
  brokerAddress,
  BrokerClosedError,
  BrokerRefusedError,
  brokerStopped,
  BrokerVersionError,
  checkRequestOptions,
  connectTo,
  pairFromSetPair,
  ReplyReader,
  sendRequest,
  v1OnlyBrokers,
} from "./pair.ts";
import type { PairedSocket } from "./paired_socket.ts";
import { type Key, keyBytes, type Mode, ProtocolError } from "./protocol.ts";
import { encodeCredit, encodeRequest, MAX_CREDIT, type SocketType } from "./protocol_v2.ts";

/** Options of {@link listen}. */
export interface ListenOptions {
  /** Broker socket path; default `$ONE_SOCKET_PATH`, else {@link defaultSocketPath}. */
  socket?: string;
  /** The mode clients are served in: `server` (the default) serves `client`s; `none` serves `none`. */
  mode?: Mode;
  /** The pairs' socket type, `stream` by default; clients must ask for the same. */
  type?: SocketType;
  /** Ask for each client's pidfd, as its socket's `peer.pidfd`. */
  pidfd?: boolean;
  /**
   * Connections in flight wanted: delivered by the broker and not yet taken
   * from the listener. 1 to 65535; default (or 0) lets the broker choose.
   * The broker grants at most its own limit: see {@link Listener.backlog}.
   */
  backlog?: number;
  /** Closes the listener when it aborts, as {@link Listener.close} does. */
  signal?: AbortSignal;
}

/**
 * A registration of a key with the broker, and the clients it brings: an
 * async iterable of {@link PairedSocket}s, each with the client's
 * {@link PairedSocket.peer}. The broker delivers at most {@link backlog}
 * connections that the application has not taken yet; clients beyond wait
 * at the broker until the application takes some (the listener tells the
 * broker as it does).
 *
 * Iteration ends when the listener is closed ({@link close}, the signal,
 * `using`, or a `break` out of `for await`); it throws when the broker ends
 * the registration: {@link BrokerRefusedError} when it said why,
 * {@link BrokerClosedError} when it just hung up. Connections delivered
 * before that are yielded first. Closing frees the key at the broker and
 * closes the connections delivered but not taken.
 *
 * @example Serve every client of a key
 * ```ts
 * import { listen } from "@one-socket/one-socket";
 * await using listener = listen("echo", { mode: "server" });
 * for await (const socket of listener) {
 *   const buffer = new Uint8Array(1024);
 *   const count = await socket.read(buffer);
 *   if (count !== null) await socket.write(buffer.subarray(0, count));
 *   socket.close();
 * }
 * ```
 */
export class Listener implements AsyncIterable<PairedSocket>, AsyncDisposable, Disposable {
  /** The key, as bytes. */
  readonly key: Uint8Array;
  /** The broker socket path. */
  readonly path: string;
  /**
   * Resolves once the broker has registered the listener (its `HELLO`);
   * rejects when it refused ({@link BrokerRefusedError}), speaks only v1
   * ({@link BrokerVersionError}), could not be reached ({@link OsError}), or
   * the listener was closed first. Iteration reports the same error.
   */
  readonly ready: Promise<void>;
  readonly #broker: BrokerAddress;
  readonly #type: SocketType;
  readonly #pidfd: boolean;
  readonly #askedBacklog: number;
  readonly #stop = new AbortController();
  readonly #signal?: AbortSignal;
  readonly #onAbort = () => this.close();
  #resolveReady!: () => void;
  #rejectReady!: (error: unknown) => void;
  #socket?: UnixSocket;
  #backlog?: number;
  // Delivered, not yet taken by the application.
  readonly #queue: PairedSocket[] = [];
  readonly #waiters: (() => void)[] = [];
  // Delivered in all; credit sent back; taken and not yet credited.
  #delivered = 0;
  #credited = 0;
  #owed = 0;
  #creditInFlight = false;
  #closed = false;
  #error?: unknown;
  readonly #finished: Promise<void>;

  /** Use {@link listen}. */
  constructor(key: Key, options: ListenOptions = {}) {
    const { mode = "server", type = "stream", pidfd = false, backlog = 0, signal } = options;
    this.key = keyBytes(key).slice();
    checkRequestOptions("listen", mode, type);
    // Encoded now, so that a bad backlog is the caller's error at once.
    const request = encodeRequest("listen", this.key, { mode, type, pidfd, backlog });
    this.#type = type;
    this.#pidfd = pidfd;
    this.#askedBacklog = backlog;
    this.#broker = brokerAddress(options.socket, signal);
    this.path = this.#broker.path;
    this.ready = new Promise((resolve, reject) => {
      this.#resolveReady = resolve;
      this.#rejectReady = reject;
    });
    // Whoever does not await ready hears of the error from the iteration.
    this.ready.catch(() => {});
    this.#signal = signal;
    signal?.addEventListener("abort", this.#onAbort, { once: true });
    this.#finished = this.#run(request);
  }

  /**
   * The backlog the broker granted: at most this many connections are in
   * flight (delivered, not yet taken). Undefined until {@link ready}.
   */
  get backlog(): number | undefined {
    return this.#backlog;
  }

  async #run(request: Uint8Array): Promise<void> {
    const stop = this.#stop.signal;
    try {
      // Always asked in v2, whatever getPair found: a registration is rare, and a broker
      // thought v1-only may have been replaced, or have closed a request for another reason.
      const connecting = connectTo(this.#broker, stop);
      this.#socket = connecting instanceof UnixSocket ? connecting : await connecting;
      if (this.#closed) return;
      await this.#register(this.#socket, request, stop);
    } catch (error) {
      if (!this.#closed) this.#fail(error);
    } finally {
      this.#socket?.close();
      this.#signal?.removeEventListener("abort", this.#onAbort);
      this.#rejectReady(this.#error ?? new DOMException("listener closed", "AbortError"));
    }
  }

  /** Sends the `LISTEN` on `socket` and takes in the broker's messages until the end. */
  async #register(socket: UnixSocket, request: Uint8Array, stop: AbortSignal): Promise<void> {
    using reader = new ReplyReader(socket.fd);
    try {
      await sendRequest(socket, this.path, request, stop);
    } catch (error) {
      if (!(error instanceof BrokerClosedError)) throw error;
      // Closed before it could have answered: a v1 broker, as below.
    }
    for (;;) {
      const message = socket.fd < 0 ? "end" : reader.read(this.path);
      if (message === "again") {
        await abortable(socket.readiness.readable(), stop);
        if (this.#closed) return;
        continue;
      }
      if (message === "end") {
        if (reader.received > 0) throw brokerStopped(this.path);
        v1OnlyBrokers.add(this.path);
        throw new BrokerVersionError(this.path, "listeners need v2");
      }
      const { reply, descriptors } = message;
      if (reply.request === "refused") {
        throw new BrokerRefusedError(this.path, this.key, reply.reason);
      }
      if (reply.request === "hello") {
        if (this.#backlog !== undefined) {
          throw new ProtocolError("reply", "sequence", 4, "one HELLO per connection");
        }
        const asked = this.#askedBacklog;
        if (reply.backlog < 1 || (asked > 0 && reply.backlog > asked)) {
          throw new ProtocolError(
            "HELLO",
            "backlog",
            reply.backlog,
            `must be 1..${asked > 0 ? asked : "its limit"} for a LISTEN`,
          );
        }
        this.#backlog = reply.backlog;
        v1OnlyBrokers.delete(this.path); // it speaks v2 after all
        this.#resolveReady();
        continue;
      }
      this.#deliver(pairFromSetPair(reply, descriptors, this.#type, this.#pidfd));
    }
  }

  /** A connection the broker delivered: to a waiting taker, or into the queue. */
  #deliver(socket: PairedSocket): void {
    if (this.#backlog === undefined || this.#delivered - this.#credited >= this.#backlog) {
      socket.close();
      throw new ProtocolError(
        "SET_PAIR",
        "sequence",
        this.#delivered + 1,
        this.#backlog === undefined
          ? "a listener's first reply is a HELLO"
          : `at most ${this.#backlog} connections in flight`,
      );
    }
    this.#delivered++;
    this.#queue.push(socket);
    this.#wake();
  }

  #wake(): void {
    for (const resolve of this.#waiters.splice(0)) resolve();
  }

  #fail(error: unknown): void {
    this.#error ??= error;
    this.#socket?.close();
    this.#wake();
  }

  /**
   * Takes the next connection, waiting for one: `null` once the listener is
   * closed. Connections delivered before the broker ended the registration
   * come first; then this throws why it ended.
   *
   * @example Serve clients one at a time, stopping after ten
   * ```ts
   * import { listen } from "@one-socket/one-socket";
   * using listener = listen("vhost-user-1");
   * for (let served = 0; served < 10; served++) {
   *   const socket = await listener.accept();
   *   if (socket === null) break;
   *   console.log(`client pid ${socket.peer?.pid}`);
   *   socket.close();
   * }
   * ```
   */
  async accept(): Promise<PairedSocket | null> {
    for (;;) {
      const socket = this.#queue.shift();
      if (socket !== undefined) {
        this.#owed++;
        // Credit goes back in batches of half the backlog, or when the queue runs dry.
        if (this.#owed >= Math.max(1, this.#backlog! >> 1)) this.#returnCredit();
        return socket;
      }
      if (this.#closed) return null;
      if (this.#error !== undefined) throw this.#error;
      this.#returnCredit();
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  /** Tells the broker about the connections taken since the last `CREDIT`. */
  #returnCredit(): void {
    const socket = this.#socket;
    if (this.#owed === 0 || this.#creditInFlight || socket === undefined || socket.fd < 0) return;
    const count = Math.min(this.#owed, MAX_CREDIT);
    this.#owed -= count;
    this.#credited += count;
    this.#creditInFlight = true;
    // Sent at once unless the broker has stopped reading; then one CREDIT at a time. A send
    // that fails needs no report: the broker ended the registration, and the reads hear why.
    sendRequest(socket, this.path, encodeCredit(count), this.#stop.signal).then(() => {
      this.#creditInFlight = false;
      this.#returnCredit();
    }, () => {});
  }

  /**
   * Ends the registration: the broker frees the key at once (clients then
   * wait for, or go to, another listener), the connections delivered and
   * not taken are closed, and iteration ends. Later calls do nothing.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#stop.abort();
    this.#socket?.close();
    for (const socket of this.#queue.splice(0)) socket.close();
    this.#wake();
  }

  /** Same as {@link close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** {@link close}, then waits until the broker connection is closed and released. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
    await this.#finished;
  }

  /**
   * The connections, as {@link accept} takes them; leaving a `for await`
   * loop early (`break`, `return`, an exception) closes the listener.
   */
  [Symbol.asyncIterator](): AsyncIterator<PairedSocket> {
    return {
      next: async () => {
        const socket = await this.accept();
        return socket === null ? { done: true, value: undefined } : { done: false, value: socket };
      },
      return: () => {
        this.close();
        return Promise.resolve({ done: true, value: undefined });
      },
    };
  }
}

/**
 * Registers `key` with the broker as a listener (protocol v2) and returns
 * at once; {@link Listener.ready} tells when the broker has taken it. Every
 * client that then asks for `key` in a compatible mode and the same type (v1
 * and v2 clients alike) is paired with this listener, which stays
 * registered, until it is closed.
 *
 * @param key the key, 1 to 1024 bytes (strings UTF-8 encoded)
 * @param options broker socket, mode (`server` by default), type, pidfd, backlog, signal
 * @returns the listener, connecting in the background
 * @throws {RangeError} for a bad key or backlog
 * @throws {TypeError} for a bad mode or type
 *
 * @example A server that knows who its clients are
 * ```ts
 * import { listen } from "@one-socket/one-socket";
 * await using listener = listen("grpc-api", { pidfd: true, signal: AbortSignal.timeout(60_000) });
 * await listener.ready;
 * console.log(`listening, ${listener.backlog} connections in flight at most`);
 * for await (const socket of listener) {
 *   console.log(`client uid ${socket.peer?.uid}, pidfd ${socket.peer?.pidfd}`);
 *   socket.close(); // closes the pidfd too
 * }
 * ```
 */
export function listen(key: Key, options: ListenOptions = {}): Listener {
  return new Listener(key, options);
}
