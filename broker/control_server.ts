/**
 * HTTP/1.1 on a Unix socket for callers we do not trust: the socket, its
 * accept loop and its connection limit are ours; `node:http` only parses and
 * writes on connections we hand it.
 *
 * Why not `Deno.serve({ path })`: its accept loop is out of our reach. It
 * accepts as many connections as are offered, so a crowd of idle ones can use
 * up the descriptors the broker keeps in reserve, and an accept that then
 * fails with EMFILE rejects a promise nobody holds, which ends the process.
 * It also has no deadline for a request that is never finished.
 *
 * Here, every connection lives under three bounds:
 * - at most `maxConnections` are open; a newcomer past that closes the one
 *   whose current exchange began longest ago (an idle keep-alive, most
 *   likely), so that holding connections open cannot lock operators out;
 * - each exchange, from the connect or the end of the previous answer to the
 *   end of this answer, must finish within `exchangeTimeoutMs`: this bounds
 *   idle keep-alives, trickled requests and answers nobody reads alike;
 * - at most {@link MAX_UNANSWERED} requests may wait for their answers, so
 *   pipelining cannot queue unbounded work or memory.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import http from "node:http";
import net from "node:net";
import { getLogger } from "@logtape/logtape";
import { Errno, errnoName, OsError } from "../ffi/errors.ts";
import { EPOLLIN } from "../ffi/libc.ts";
import { Reactor, type Watch } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  listenUnix,
  type UnixSocket,
  unlinkPath,
} from "../ffi/socket.ts";
import { assertStale } from "./broker.ts";

const logger = getLogger(["one-socket", "control"]);

/** Answers one parsed request; it must not throw (the server answers 500 if it does). */
export type RequestHandler = (request: http.IncomingMessage, response: http.ServerResponse) => void;

/** Limits of a {@link UnixHttpServer}. */
export interface UnixHttpServerOptions {
  /** The socket path; the file is created with mode 0600. */
  path: string;
  /** Most connections open at once. */
  maxConnections: number;
  /** Milliseconds each exchange (wait for a request, answer it) may take. */
  exchangeTimeoutMs: number;
}

/** Requests on one connection that may wait for their answers at once (HTTP pipelining). */
export const MAX_UNANSWERED = 2;
/** How long accepting pauses after an accept error (EMFILE, ENOMEM), so that we do not spin. */
const ACCEPT_PAUSE_MS = 100;
/** Only the owner (the broker's user, and root) may connect. */
const SOCKET_MODE = 0o600;
/** Longest request head `node:http` parses; ours are a line and a few headers. */
const MAX_HEADER_BYTES = 8192;

/** One open connection: the socket and the deadline of its current exchange. */
class HttpConnection {
  readonly socket: net.Socket;
  /** Requests received and not yet answered in full. */
  unanswered = 0;
  #deadline?: ReturnType<typeof setTimeout>;

  constructor(socket: net.Socket) {
    this.socket = socket;
  }

  /** Starts the deadline of a new exchange. */
  startExchange(timeoutMs: number, onTimeout: () => void): void {
    clearTimeout(this.#deadline);
    this.#deadline = setTimeout(onTimeout, timeoutMs);
  }

  /** Clears the deadline: the connection is closing. */
  stopDeadline(): void {
    clearTimeout(this.#deadline);
  }
}

/**
 * An HTTP server on a Unix socket with a connection limit and a deadline per
 * exchange; see the module documentation.
 *
 * @example Serve "ok" on a socket, ask it once, stop
 * ```ts
 * import { UnixHttpServer } from "./control_server.ts";
 * const path = `/tmp/http-example-${Deno.pid}.socket`;
 * await using server = await UnixHttpServer.listen(
 *   { path, maxConnections: 4, exchangeTimeoutMs: 5000 },
 *   (_request, response) => response.end("ok"),
 * );
 * using client = Deno.createHttpClient({ proxy: { transport: "unix", path } });
 * console.log(await (await fetch("http://localhost/", { client })).text()); // ok
 * ```
 */
export class UnixHttpServer implements AsyncDisposable {
  /** The socket path it serves on. */
  readonly path: string;
  readonly #options: UnixHttpServerOptions;
  readonly #listener: UnixSocket;
  readonly #listenWatch: Watch;
  readonly #http: http.Server;
  /** Open connections (descriptor not yet closed), oldest exchange first. */
  readonly #connections = new Map<net.Socket, HttpConnection>();
  readonly #fileIdentity: string;
  #acceptPaused = false;
  #closing?: Promise<void>;

  private constructor(
    options: UnixHttpServerOptions,
    listener: UnixSocket,
    handle: RequestHandler,
  ) {
    this.path = options.path;
    this.#options = options;
    this.#listener = listener;
    this.#fileIdentity = fileIdentity(options.path);
    this.#http = http.createServer({ maxHeaderSize: MAX_HEADER_BYTES });
    // One rule for idle connections: the exchange deadline (node's own timer would be a second one).
    this.#http.keepAliveTimeout = 0;
    this.#http.on("request", (request, response) => this.#onRequest(request, response, handle));
    this.#http.on("clientError", (error, socket) => answerClientError(error, socket));
    this.#listenWatch = Reactor.instance().watch(listener.fd, EPOLLIN, () => this.#acceptAll());
  }

  /**
   * Binds `options.path` (mode 0600) and serves `handle` on it. A stale socket
   * file (nobody listening) is replaced; a live one, or a file that is not a
   * socket, is not.
   */
  static async listen(
    options: UnixHttpServerOptions,
    handle: RequestHandler,
  ): Promise<UnixHttpServer> {
    const { path, maxConnections } = options;
    // The backlog holds those who wait for a place; the kernel refuses the rest (EAGAIN).
    const backlog = maxConnections;
    let listener: UnixSocket;
    try {
      listener = listenUnix(path, backlog, { mode: SOCKET_MODE });
    } catch (error) {
      if (!(error instanceof OsError && error.code === "EADDRINUSE")) throw error;
      await assertStale(path);
      logger.info("replacing stale socket file {path}", { path });
      unlinkPath(path);
      listener = listenUnix(path, backlog, { mode: SOCKET_MODE });
    }
    return new UnixHttpServer(options, listener, handle);
  }

  /** Connections open now. */
  get connections(): number {
    return this.#connections.size;
  }

  /** Stops accepting, closes every connection and removes the socket file. */
  close(): Promise<void> {
    return this.#closing ??= this.#shutdown();
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #shutdown(): Promise<void> {
    this.#listenWatch.cancel(true);
    this.#listener.close();
    // Someone may have replaced the file since (a newer broker on the same path): leave theirs alone.
    let current: string | undefined;
    try {
      current = fileIdentity(this.path);
    } catch {
      // already gone
    }
    if (current === this.#fileIdentity) unlinkPath(this.path);
    const closed = [...this.#connections.keys()].map((socket) =>
      new Promise((resolve) => socket.once("close", resolve))
    );
    for (const socket of this.#connections.keys()) socket.destroy();
    await Promise.all(closed);
  }

  #acceptAll(): void {
    for (;;) {
      if (this.#connections.size >= this.#options.maxConnections) {
        this.#makeRoom();
        return;
      }
      const fd = acceptConnection(this.#listener.fd);
      if (fd >= 0) {
        this.#adopt(fd);
        continue;
      }
      if (fd === -Errno.EAGAIN) return;
      if (fd === -Errno.ECONNABORTED || fd === -Errno.EINTR) continue;
      // Out of descriptors (the broker is full) or memory: what is open keeps being served.
      this.#pauseAccepting(`accept4: ${errnoName(-fd)}`);
      return;
    }
  }

  /**
   * Someone waits to connect and every place is taken: close the connection
   * whose exchange began longest ago, and accept again once its descriptor is
   * closed (see {@link #forget}), so that we never hold more than the limit.
   */
  #makeRoom(): void {
    this.#listenWatch.modify(0);
    this.#acceptPaused = true;
    for (const [socket] of this.#connections) {
      if (socket.destroyed) continue; // closing already: wait for it
      logger.debug("closing the longest-running control connection to make room");
      socket.destroy();
      return;
    }
  }

  #pauseAccepting(cause: string): void {
    logger.warn("control socket {path}: {cause}; retrying in {ms} ms", {
      path: this.path,
      cause,
      ms: ACCEPT_PAUSE_MS,
    });
    this.#listenWatch.modify(0);
    this.#acceptPaused = true;
    setTimeout(() => this.#resumeAccepting(), ACCEPT_PAUSE_MS).unref();
  }

  #resumeAccepting(): void {
    if (!this.#acceptPaused || this.#closing !== undefined) return;
    this.#acceptPaused = false;
    this.#listenWatch.modify(EPOLLIN);
  }

  /** Hands an accepted descriptor to node:http; from here the socket owns and closes it. */
  #adopt(fd: number): void {
    let socket: net.Socket;
    try {
      socket = new net.Socket({ fd, readable: true, writable: true });
    } catch (error) {
      closeDescriptor(fd);
      logger.error("control connection: cannot adopt fd {fd}: {error}", { fd, error });
      return;
    }
    const connection = new HttpConnection(socket);
    this.#connections.set(socket, connection);
    socket.on("error", (error) => logger.debug("control connection: {error}", { error }));
    socket.once("close", () => this.#forget(connection));
    this.#startExchange(connection);
    this.#http.emit("connection", socket);
  }

  #forget(connection: HttpConnection): void {
    connection.stopDeadline();
    this.#connections.delete(connection.socket);
    if (this.#connections.size < this.#options.maxConnections) this.#resumeAccepting();
  }

  /** A new exchange: a fresh deadline, and the connection moves to the back of the queue. */
  #startExchange(connection: HttpConnection): void {
    const { socket } = connection;
    this.#connections.delete(socket);
    this.#connections.set(socket, connection);
    connection.startExchange(this.#options.exchangeTimeoutMs, () => {
      logger.debug("closing a control connection: exchange not done within {ms} ms", {
        ms: this.#options.exchangeTimeoutMs,
      });
      socket.destroy();
    });
  }

  #onRequest(
    request: http.IncomingMessage,
    response: http.ServerResponse,
    handle: RequestHandler,
  ): void {
    const connection = this.#connections.get(request.socket as net.Socket);
    // Requests already parsed from the same read may still arrive once the connection is closed.
    if (connection === undefined || connection.socket.destroyed) {
      response.destroy();
      return;
    }
    if (++connection.unanswered > MAX_UNANSWERED) {
      logger.warn("closing a control connection: more than {n} requests pipelined", {
        n: MAX_UNANSWERED,
      });
      connection.socket.destroy();
      return;
    }
    response.once("finish", () => {
      if (--connection.unanswered === 0 && !connection.socket.destroyed) {
        this.#startExchange(connection);
      }
    });
    try {
      handle(request, response);
    } catch (error) {
      logger.error("control request {method} {url} failed: {error}", {
        method: request.method,
        url: request.url,
        error,
      });
      if (!response.headersSent) sendJson(response, 500, { error: "internal error" });
      else response.destroy();
    }
  }
}

/** Sends `body` as JSON with `status` and any extra `headers`. */
export function sendJson(
  response: http.ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  const text = JSON.stringify(body);
  response.writeHead(status, {
    ...headers,
    "content-type": "application/json",
    "content-length": String(Buffer.byteLength(text)),
  });
  response.end(text);
}

/**
 * A request node:http could not parse: answer in our JSON form and close. An
 * unknown method (`constructor`, say) is 501, an oversized head 431, the rest 400.
 */
function answerClientError(error: Error & { code?: string }, socket: net.Socket | unknown): void {
  if (!(socket instanceof net.Socket)) return;
  if (error.code === "ECONNRESET" || !socket.writable) {
    socket.destroy();
    return;
  }
  const [status, reason, message] = error.code === "HPE_HEADER_OVERFLOW"
    ? [431, "Request Header Fields Too Large", "request head too large"]
    : unknownMethod(error)
    ? [501, "Not Implemented", "method not implemented"]
    : [400, "Bad Request", `malformed request (${error.code ?? error.message})`];
  const body = JSON.stringify({ error: message });
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\ncontent-type: application/json\r\n` +
      `content-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`,
  );
}

/** Whether the request line's first word is not a method node:http knows. */
function unknownMethod(error: Error & { rawPacket?: Uint8Array }): boolean {
  const head = error.rawPacket?.subarray(0, 32);
  if (head === undefined) return false;
  const method = new TextDecoder().decode(head).split(" ", 1)[0];
  return !http.METHODS.includes(method);
}

/**
 * What tells one file at `path` from a later one: the inode number alone is
 * reused at once on ext4 and tmpfs, the birth time is not.
 */
function fileIdentity(path: string): string {
  const info = Deno.lstatSync(path);
  return `${info.dev}:${info.ino}:${info.birthtime?.getTime()}`;
}
