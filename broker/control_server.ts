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
 * - at most `maxConnections` are open; a newcomer past that closes the
 *   oldest one that has had its grace ({@link SILENT_GRACE_MS} if silent,
 *   {@link BUSY_GRACE_MS} otherwise), so that holding connections open
 *   cannot lock operators out;
 * - one request per connection, answered with `Connection: close`: a
 *   keep-alive connection could keep its place for ever, and pipelined
 *   requests would queue work and memory. node:http is given the bytes of
 *   the first request head ({@link MAX_HEADER_BYTES} at most) and nothing
 *   more: what follows is dropped unparsed, logged once per connection, and
 *   reading stops, so that no input holds up the broker's loop;
 * - the request and its whole answer must be done within `timeoutMs` of the
 *   connect: this bounds silent, trickled and half-sent requests and
 *   answers nobody reads alike.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import http from "node:http";
import net from "node:net";
import { getLogger } from "npm:@logtape/logtape@^2.4.2";
import { Errno, errnoName, OsError } from "../ffi/errors.ts";
import { EPOLLIN } from "../ffi/libc.ts";
import { Reactor, type Watch } from "../ffi/reactor.ts";
import {
  acceptConnection,
  closeDescriptor,
  listenUnix,
  type UnixSocket,
  unlinkPath,
  unreadBytes,
} from "../ffi/socket.ts";
import { assertStale, fileIdentity } from "./broker.ts";

const logger = getLogger(["one-socket", "control"]);

/** Answers one parsed request; it must not throw (the server answers 500 if it does). */
export type RequestHandler = (request: http.IncomingMessage, response: http.ServerResponse) => void;

/** Limits of a {@link UnixHttpServer}. */
export interface UnixHttpServerOptions {
  /** The socket path; the file is created with mode 0600. */
  path: string;
  /** Most connections open at once. */
  maxConnections: number;
  /** Milliseconds from connect to the end of the answer. */
  timeoutMs: number;
}

/** How long accepting pauses after an accept error (EMFILE, ENOMEM), so that we do not spin. */
const ACCEPT_PAUSE_MS = 100;
/**
 * How long a silent connection keeps its place against newcomers: one that
 * has not sent a whole request, and has nothing we have yet to read. An
 * honest client sends its request at once.
 */
export const SILENT_GRACE_MS = 250;
/**
 * How long any other connection keeps its place against newcomers: its
 * request waits for us, or its answer is on its way, which takes
 * milliseconds unless the loop is busy or nobody reads the answer.
 */
export const BUSY_GRACE_MS = 2000;
/**
 * Who waits for a place waits here; the kernel refuses connects beyond
 * (EAGAIN). Waiting connections cost the kernel memory, not our descriptors.
 */
const BACKLOG = 128;
/** Only the owner (the broker's user, and root) may connect. */
const SOCKET_MODE = 0o600;
/** Longest request head `node:http` parses; ours are a line and a few headers. */
const MAX_HEADER_BYTES = 8192;
/** node:http's code for a request head past its limit. */
const HEADER_OVERFLOW = "HPE_HEADER_OVERFLOW";
/** How a request head ends. */
const HEAD_END = new Uint8Array([13, 10, 13, 10]);

/** One open connection: the socket, its deadline, whether its one request came. */
class HttpConnection {
  readonly socket: net.Socket;
  /** Its descriptor, owned by `socket`: only looked at while the socket is open. */
  readonly fd: number;
  readonly deadline: ReturnType<typeof setTimeout>;
  /** `performance.now()` at accept. */
  readonly openedAt: number = performance.now();
  requested = false;
  /** Bytes of the request head handed to node:http so far. */
  forwarded = 0;
  /** The last bytes handed to node:http, in case the head's end is split across reads. */
  tail: Uint8Array = new Uint8Array(0);
  /** The request head has ended, or reached its limit: node:http gets nothing more. */
  headDone = false;
  /** It reached its limit: answered 431. */
  overflowed = false;
  /** "ignoring the requests after the first" was logged: once per connection at most. */
  ignoringLogged = false;

  constructor(socket: net.Socket, fd: number, deadline: ReturnType<typeof setTimeout>) {
    this.socket = socket;
    this.fd = fd;
    this.deadline = deadline;
  }
}

/**
 * An HTTP server on a Unix socket with a connection limit, one request per
 * connection and a deadline for each; see the module documentation.
 *
 * @example Serve "ok" on a socket, ask it once, stop
 * ```ts
 * import { UnixHttpServer } from "./control_server.ts";
 * const path = `/tmp/http-example-${Deno.pid}.socket`;
 * await using server = await UnixHttpServer.listen(
 *   { path, maxConnections: 4, timeoutMs: 5000 },
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
  /** Requests waiting for their turn (at most one per connection). */
  readonly #queue: (() => void)[] = [];
  /** Open connections (descriptor not yet closed), oldest first. */
  readonly #connections = new Map<net.Socket, HttpConnection>();
  readonly #fileIdentity: string;
  #acceptPaused = false;
  /** An accept failed (EMFILE, say) and none has succeeded since. */
  #acceptFailing = false;
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
    this.#http.on("request", (request, response) => this.#onRequest(request, response, handle));
    this.#http.on("clientError", (error, socket) => this.#onClientError(error, socket));
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
    const { path } = options;
    let listener: UnixSocket;
    try {
      listener = listenUnix(path, BACKLOG, { mode: SOCKET_MODE });
    } catch (error) {
      if (!(error instanceof OsError && error.code === "EADDRINUSE")) throw error;
      await assertStale(path);
      logger.info("replacing stale socket file {path}", { path });
      unlinkPath(path);
      listener = listenUnix(path, BACKLOG, { mode: SOCKET_MODE });
    }
    return new UnixHttpServer(options, listener, handle);
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
        if (this.#acceptFailing) {
          this.#acceptFailing = false;
          logger.info("control socket {path}: accepting again", { path: this.path });
        }
        this.#adopt(fd);
        continue;
      }
      if (fd === -Errno.EAGAIN) return;
      if (fd === -Errno.ECONNABORTED || fd === -Errno.EINTR) continue;
      // Out of descriptors (the broker is full) or memory: what is open keeps being served.
      this.#acceptFailed(`accept4: ${errnoName(-fd)}`);
      return;
    }
  }

  /**
   * Someone waits to connect and every place is taken. The oldest connection
   * that has had its grace goes ({@link graceMs}); accepting resumes once its
   * descriptor is closed (see {@link #forget}), so that never more are open
   * than the limit. If none has had its grace, the newcomer waits in the
   * backlog until one ends or its grace is over.
   */
  #makeRoom(): void {
    const now = performance.now();
    let soonest = Infinity;
    for (const [socket, connection] of this.#connections) {
      if (socket.destroyed) continue; // closing already: its close resumes accepting
      const left = connection.openedAt + graceMs(connection) - now;
      if (left <= 0) {
        logger.debug("closing a control connection open {ms} ms to make room", {
          ms: Math.round(now - connection.openedAt),
        });
        socket.destroy();
        this.#stopAccepting();
        return;
      }
      soonest = Math.min(soonest, left);
    }
    this.#stopAccepting(soonest === Infinity ? undefined : soonest);
  }

  /** Out of descriptors or memory: logged once until an accept succeeds again. */
  #acceptFailed(cause: string): void {
    if (!this.#acceptFailing) {
      this.#acceptFailing = true;
      logger.warn("control socket {path}: {cause}; retrying every {ms} ms", {
        path: this.path,
        cause,
        ms: ACCEPT_PAUSE_MS,
      });
    }
    this.#stopAccepting(ACCEPT_PAUSE_MS);
  }

  /** Stops watching the listener until a connection closes or, if given, `retryMs` pass. */
  #stopAccepting(retryMs?: number): void {
    if (!this.#acceptPaused) {
      this.#acceptPaused = true;
      this.#listenWatch.modify(0);
    }
    if (retryMs !== undefined) setTimeout(() => this.#resumeAccepting(), retryMs).unref();
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
    const { timeoutMs } = this.#options;
    const deadline = setTimeout(() => {
      logger.debug("closing a control connection: not done within {ms} ms", { ms: timeoutMs });
      socket.destroy();
    }, timeoutMs);
    const connection = new HttpConnection(socket, fd, deadline);
    this.#connections.set(socket, connection);
    socket.on("error", (error) => logger.debug("control connection: {error}", { error }));
    socket.once("close", () => this.#forget(connection));
    // node:http would have its parser read the descriptor itself (`parser.consume`), all of it:
    // 2 MB of pipelined requests were seconds of parsing on the broker's loop. Marked consumed,
    // the handle is read through "data" events instead, and node:http's listener gets the first
    // request head and nothing after (see #gate); the rest is dropped unparsed, and reading stops.
    const handle = (socket as unknown as { _handle?: { _consumed?: boolean } })._handle;
    if (handle !== undefined) handle._consumed = true;
    this.#http.emit("connection", socket);
    const parse = socket.listeners("data") as ((chunk: Buffer) => void)[];
    if (parse.length === 0) return; // node:http reads some other way: it is not ours to gate
    socket.removeAllListeners("data");
    socket.on("data", (chunk: Buffer) => this.#gate(connection, chunk, parse));
  }

  /**
   * Hands node:http the bytes of `chunk` up to the end of the first request
   * head, and drops the rest. A head that has not ended within
   * {@link MAX_HEADER_BYTES} is answered 431 here: node:http reports its
   * overflow only some bytes past the limit, which it is never given.
   */
  #gate(connection: HttpConnection, chunk: Buffer, parse: ((chunk: Buffer) => void)[]): void {
    let take = 0;
    let overflow = false;
    if (!connection.headDone) {
      take = Math.min(chunk.length, MAX_HEADER_BYTES - connection.forwarded);
      const end = headEnd(connection.tail, chunk.subarray(0, take));
      if (end >= 0) take = end;
      else overflow = connection.overflowed = connection.forwarded + take >= MAX_HEADER_BYTES;
      connection.headDone = end >= 0 || overflow;
    }
    if (take < chunk.length && !connection.overflowed) {
      // Whatever follows the head: the answer to the first request ends the connection.
      this.#ignoring(connection);
    }
    if (connection.headDone) connection.socket.pause();
    if (take > 0) {
      const forwarded = take === chunk.length ? chunk : chunk.subarray(0, take);
      connection.forwarded += take;
      const keep = HEAD_END.length - 1;
      const joined = concat(connection.tail, forwarded.subarray(Math.max(0, take - keep)));
      connection.tail = joined.slice(Math.max(0, joined.length - keep));
      for (const listener of parse) listener.call(connection.socket, forwarded);
    }
    const { socket } = connection;
    if (overflow && !connection.requested && !socket.destroyed && !socket.writableEnded) {
      answerClientError(
        Object.assign(new Error("head too large"), { code: HEADER_OVERFLOW }),
        socket,
      );
    }
  }

  /** Logs, once per connection, that what followed its first request is ignored. */
  #ignoring(connection: HttpConnection): void {
    if (connection.ignoringLogged) return;
    connection.ignoringLogged = true;
    logger.warn("control connection: ignoring the requests after the first");
  }

  #forget(connection: HttpConnection): void {
    clearTimeout(connection.deadline);
    this.#connections.delete(connection.socket);
    if (this.#connections.size < this.#options.maxConnections) this.#resumeAccepting();
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
    if (connection.requested) {
      // Pipelined within the bytes node:http was given (see #gate): only the first is answered,
      // and the connection ends with that answer.
      this.#ignoring(connection);
      return;
    }
    connection.requested = true;
    // node:http then ends the connection once the answer is out.
    response.shouldKeepAlive = false;
    this.#queue.push(() => this.#answer(request, response, handle));
    if (this.#queue.length === 1) setImmediate(this.#drainQueue);
  }

  #onClientError(error: Error & { code?: string }, socket: net.Socket | unknown): void {
    if (!(socket instanceof net.Socket)) return;
    // After a request, the answer owns the bytes on the wire: ours would be spliced into it.
    if (
      error.code === "ECONNRESET" || !socket.writable || this.#connections.get(socket)?.requested
    ) {
      socket.destroy();
      return;
    }
    answerClientError(error, socket);
  }

  /**
   * Answers the oldest queued request, and leaves the next for a later turn
   * of the event loop: requests that arrive together are answered one per
   * turn, so the broker's sockets are served between any two of them.
   */
  readonly #drainQueue = (): void => {
    this.#queue.shift()!();
    if (this.#queue.length > 0) setImmediate(this.#drainQueue);
  };

  #answer(
    request: http.IncomingMessage,
    response: http.ServerResponse,
    handle: RequestHandler,
  ): void {
    if (response.destroyed || request.socket.destroyed) return; // gone while it was queued
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
 * A request node:http could not parse: answered in our JSON form, then the
 * connection ends. An unknown method (`constructor`, say) is 501, an
 * oversized head 431, the rest 400.
 */
function answerClientError(error: Error & { code?: string }, socket: net.Socket): void {
  const [status, reason, message] = error.code === HEADER_OVERFLOW
    ? [431, "Request Header Fields Too Large", "request head too large"]
    : unknownMethod(error)
    ? [501, "Not Implemented", "method not implemented"]
    : [400, "Bad Request", `malformed request (${error.code ?? error.message})`];
  const body = JSON.stringify({ error: message });
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\ncontent-type: application/json\r\n` +
      `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
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
 * Where the request head ends in `chunk` (the index just past its blank
 * line), `tail` being the bytes before it; -1 if it does not end there.
 */
function headEnd(tail: Uint8Array, chunk: Uint8Array): number {
  const at = Buffer.from(concat(tail, chunk).buffer).indexOf(HEAD_END);
  return at < 0 ? -1 : at + HEAD_END.length - tail.length;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array<ArrayBuffer> {
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}

/** How long `connection` keeps its place against newcomers: see {@link SILENT_GRACE_MS}. */
function graceMs(connection: HttpConnection): number {
  if (connection.requested) return BUSY_GRACE_MS;
  // Its request may be in the kernel still, the loop being too busy to have read it.
  let unread = 0;
  try {
    unread = unreadBytes(connection.fd);
  } catch {
    // a socket in error: silent as far as we are concerned
  }
  return unread > 0 ? BUSY_GRACE_MS : SILENT_GRACE_MS;
}
