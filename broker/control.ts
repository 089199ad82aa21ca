/**
 * The control API: HTTP on a second Unix socket, so that operators and their
 * tools (`one-socket ctl`, `curl --unix-socket`, a metrics scraper) can look
 * into a running broker without touching the broker socket.
 *
 * - `GET /status`: version, uptime, socket paths, counters
 * - `GET /clients?limit=N&after=ID`: one page of the clients waiting for a partner
 * - `GET /listeners?limit=N&after=ID`: one page of the registered listeners (protocol v2)
 * - `DELETE /clients/ID`: disconnect one connection, waiting client or listener
 * - `GET /metrics`: Prometheus text format
 *
 * Errors are JSON `{"error": "..."}` with a 4xx or 5xx status. Every answer
 * costs bounded work and size, and connections are bounded in number and
 * time (see `control_server.ts`): whoever may connect cannot stall pairing.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import type http from "node:http";
import { getLogger } from "npm:@logtape/logtape@^2.4.2";
import denoConfig from "../deno.json" with { type: "json" };
import { describeKey, type Mode } from "../client/protocol.ts";
import type { SocketType } from "../client/protocol_v2.ts";
import { countOpenDescriptors, descriptorLimit } from "../ffi/process.ts";
import { type Broker, type ListingPage, MAX_LISTING_PAGE } from "./broker.ts";
import { sendJson, UnixHttpServer } from "./control_server.ts";
import { PROMETHEUS_CONTENT_TYPE, renderPrometheus } from "./prometheus.ts";

const logger = getLogger(["one-socket", "control"]);

/** Most control connections open at once, unless {@link ControlOptions} says otherwise. */
export const DEFAULT_CONTROL_CONNECTIONS = 16;
/** Milliseconds a control connection may stay open, unless {@link ControlOptions} says otherwise. */
export const DEFAULT_CONTROL_TIMEOUT_MS = 10_000;
/** Entries in a `GET /clients` or `GET /listeners` page when the request gives no `limit`. */
export const DEFAULT_CLIENTS_PAGE = 100;
/**
 * Bytes a `GET /clients` or `GET /listeners` page stops at, whatever its
 * `limit`: a thousand clients with 1024-byte keys would be 2.8 MB and 30 ms of
 * the broker's loop; 64 KiB (about 200 entries with short keys, 6 with the
 * longest, every byte escaped) is 1 to 2 ms, little enough that sixteen
 * connections asking at once cannot hold up pairing.
 */
const MAX_CLIENTS_PAGE_BYTES = 64 * 1024;
/**
 * One entry's answer without its key, and more: ids, mode, type, counts,
 * times, credentials, names.
 */
const CLIENT_ENTRY_BYTES = 320;

/** Where and within which limits {@link serveControl} serves. */
export interface ControlOptions {
  /** The control socket's path (a file: abstract names are refused). */
  socket: string;
  /**
   * Most control connections open at once (default
   * {@link DEFAULT_CONTROL_CONNECTIONS}); a newcomer past it closes the
   * oldest that has had its grace (0.25 s without a whole request, 2 s with
   * one), or waits for one to end. Each holds a descriptor: keep them within
   * what the broker keeps in reserve.
   */
  maxConnections?: number;
  /**
   * Milliseconds from a connect to the end of its answer (default
   * {@link DEFAULT_CONTROL_TIMEOUT_MS}): silent, trickled or half-sent
   * requests and unread answers are closed after it. Each connection carries
   * one request (answered with `Connection: close`).
   */
  timeoutMs?: number;
}

/** A running control server, from {@link serveControl}. */
export interface ControlServer extends AsyncDisposable {
  /** The socket path it serves on. */
  readonly path: string;
  /** Stops serving, closes its connections and removes the socket file. */
  close(): Promise<void>;
}

/** The body of `GET /status`. */
export interface ControlStatus {
  /** The broker's release. */
  version: string;
  /** The broker's process id. */
  pid: number;
  /** Seconds since the broker started serving. */
  uptimeSeconds: number;
  /** The broker socket path. */
  socket: string;
  /** Set when this broker took over from another (`--takeover`). */
  takeover?: {
    /** The pid of the broker that handed over. */
    fromPid: number;
    /** When, as an ISO 8601 time. */
    at: string;
    /** When the first broker of the chain of hand-overs started, as an ISO 8601 time. */
    servingSince: string;
    /** Milliseconds pairing paused. */
    pauseMs: number;
    /** Connections received. */
    adopted: number;
    /** Whether the old broker died before it had sent everything. */
    oldDied: boolean;
  };
  /** The control socket path. */
  control: string;
  /** Counters, since start (`...Total`) or now. */
  counts: {
    /** Clients waiting for a partner. */
    waiting: number;
    /** The same, by mode. */
    waitingByMode: Record<Mode, number>;
    /** Listeners registered (protocol v2). */
    listeners: number;
    /** Pairs delivered. */
    pairedTotal: number;
    /** Pairs delivered to listeners (counted in `pairedTotal` too). */
    listenerDeliveriesTotal: number;
    /** Connections closed for breaking the protocol. */
    rejectedTotal: number;
    /** Connections accepted. */
    acceptedTotal: number;
    /** Client connections open (waiting, listening or still sending their request). */
    connectionsOpen: number;
    /** Connections taken over from another broker. */
    adoptedTotal: number;
  };
}

/** One waiting client in a {@link ControlClientsPage}. */
export interface ControlClient {
  /** The id `DELETE /clients/ID` takes. */
  id: number;
  /** The key, printable: as in the broker's log, non-printable bytes as `\xNN`. */
  key: string;
  /** The key's bytes in hexadecimal, exactly. */
  keyHex: string;
  /** The requested mode. */
  mode: Mode;
  /** The socket type it asked for (`stream` for protocol v1). */
  type: SocketType;
  /** The protocol version it spoke. */
  version: 1 | 2;
  /** When it started waiting (ISO 8601). */
  since: string;
  /** Seconds it has waited. */
  waitingSeconds: number;
  /** Its process id as of its `connect`. */
  pid: number;
  /** Its user id. */
  uid: number;
  /** Its group id. */
  gid: number;
}

/** The body of `GET /clients`: one page, by ascending id. */
export interface ControlClientsPage {
  /**
   * Waiting clients with ids above the request's `after`: at most its
   * `limit`, and fewer when a page reaches about 64 KiB.
   */
  clients: ControlClient[];
  /** When more may follow: pass it as `after` for the next page. */
  next?: number;
}

/** One registered listener (protocol v2) in a {@link ControlListenersPage}. */
export interface ControlListener {
  /** The id `DELETE /clients/ID` takes. */
  id: number;
  /** The key, printable: as in the broker's log, non-printable bytes as `\xNN`. */
  key: string;
  /** The key's bytes in hexadecimal, exactly. */
  keyHex: string;
  /** Its mode: requests in the peer mode are served. */
  mode: Mode;
  /** The socket type it serves. */
  type: SocketType;
  /** Connections it may have in flight (as granted in its `HELLO`). */
  backlog: number;
  /** Connections delivered to it and not yet credited back. */
  inFlight: number;
  /** Connections delivered to it since it registered. */
  served: number;
  /** When it registered (ISO 8601). */
  since: string;
  /** Seconds since it registered. */
  listeningSeconds: number;
  /** Its process id as of its `connect`. */
  pid: number;
  /** Its user id. */
  uid: number;
  /** Its group id. */
  gid: number;
}

/** The body of `GET /listeners`: one page, by ascending id. */
export interface ControlListenersPage {
  /**
   * Listeners with ids above the request's `after`: at most its `limit`,
   * and fewer when a page reaches about 64 KiB.
   */
  listeners: ControlListener[];
  /** When more may follow: pass it as `after` for the next page. */
  next?: number;
}

/** The answer to one request, before it is written. */
interface Answer {
  status: number;
  headers?: Record<string, string>;
  /** JSON-encoded unless `text` is set. */
  body?: unknown;
  /** A body sent as is (Prometheus text). */
  text?: string;
}

/** An error answer: the status and the JSON `{ error }` body. */
class HttpError extends Error {
  readonly status: number;
  readonly headers?: Record<string, string>;

  constructor(status: number, message: string, headers?: Record<string, string>) {
    super(message);
    this.status = status;
    this.headers = headers;
  }
}

function status(broker: Broker, control: string): Answer {
  const stats = broker.stats;
  const body: ControlStatus = {
    version: denoConfig.version,
    pid: Deno.pid,
    uptimeSeconds: (Date.now() - broker.startedAt.getTime()) / 1000,
    socket: broker.path,
    takeover: broker.tookOver && {
      fromPid: broker.tookOver.pid,
      at: broker.tookOver.at.toISOString(),
      servingSince: broker.tookOver.servingSince.toISOString(),
      pauseMs: broker.tookOver.pauseMs,
      adopted: broker.tookOver.adopted,
      oldDied: broker.tookOver.oldDied,
    },
    control,
    counts: {
      waiting: stats.waiting,
      waitingByMode: broker.waitingByMode(),
      listeners: stats.listeners,
      pairedTotal: stats.paired,
      listenerDeliveriesTotal: broker.metrics.listenerDeliveries,
      rejectedTotal: stats.rejected,
      acceptedTotal: stats.accepted,
      connectionsOpen: stats.open,
      adoptedTotal: broker.metrics.adopted,
    },
  };
  return { status: 200, body };
}

/** A whole number from a query parameter, within `min`…`max`; 400 otherwise. */
function wholeNumber(name: string, text: string, min: number, max: number): number {
  const value = /^[0-9]{1,16}$/.test(text) ? Number(text) : NaN;
  if (!(value >= min && value <= max)) {
    throw new HttpError(
      400,
      `${name} must be a whole number from ${min} to ${max}, not "${text.slice(0, 40)}"`,
    );
  }
  return value;
}

/** `limit` and `after` from the query; anything else in it is a mistake worth saying. */
function listingPage(query: URLSearchParams): { limit: number; after: number } {
  const page = { limit: DEFAULT_CLIENTS_PAGE, after: 0 };
  for (const name of new Set(query.keys())) {
    const values = query.getAll(name);
    if (values.length > 1) throw new HttpError(400, `${name} given ${values.length} times`);
    if (name === "limit") page.limit = wholeNumber(name, values[0], 1, MAX_LISTING_PAGE);
    else if (name === "after") {
      page.after = wholeNumber(name, values[0], 0, Number.MAX_SAFE_INTEGER);
    } else throw new HttpError(400, `unknown parameter ${name.slice(0, 40)} (use limit and after)`);
  }
  return page;
}

/**
 * One page of `list`'s entries as `toEntry` answers them, up to the query's
 * `limit` and about {@link MAX_CLIENTS_PAGE_BYTES}; `next` when more may follow.
 */
function pageOf<T extends { id: number }, E extends { id: number; key: string; keyHex: string }>(
  query: URLSearchParams,
  list: (page: ListingPage) => T[],
  toEntry: (item: T, now: number) => E,
): { entries: E[]; next?: number } {
  const page = listingPage(query);
  const now = Date.now();
  const entries: E[] = [];
  let bytes = 0;
  for (const item of list(page)) {
    const entry = toEntry(item, now);
    entries.push(entry);
    // An upper bound: JSON may escape every character of the printable key.
    bytes += CLIENT_ENTRY_BYTES + 2 * entry.key.length + entry.keyHex.length;
    if (bytes >= MAX_CLIENTS_PAGE_BYTES) break;
  }
  const full = entries.length === page.limit || bytes >= MAX_CLIENTS_PAGE_BYTES;
  return full ? { entries, next: entries[entries.length - 1].id } : { entries };
}

function clients(broker: Broker, query: URLSearchParams): Answer {
  const { entries, next } = pageOf(query, (page) => broker.waitingClients(page), (client, now) => ({
    id: client.id,
    key: describeKey(client.key),
    keyHex: client.key.toHex(),
    mode: client.mode,
    type: client.type,
    version: client.version,
    since: client.since.toISOString(),
    waitingSeconds: (now - client.since.getTime()) / 1000,
    pid: client.peer.pid,
    uid: client.peer.uid,
    gid: client.peer.gid,
  } satisfies ControlClient));
  const body: ControlClientsPage = { clients: entries };
  if (next !== undefined) body.next = next;
  return { status: 200, body };
}

function listeners(broker: Broker, query: URLSearchParams): Answer {
  const { entries, next } = pageOf(query, (page) => broker.listeners(page), (listener, now) => ({
    id: listener.id,
    key: describeKey(listener.key),
    keyHex: listener.key.toHex(),
    mode: listener.mode,
    type: listener.type,
    backlog: listener.backlog,
    inFlight: listener.inFlight,
    served: listener.served,
    since: listener.since.toISOString(),
    listeningSeconds: (now - listener.since.getTime()) / 1000,
    pid: listener.peer.pid,
    uid: listener.peer.uid,
    gid: listener.peer.gid,
  } satisfies ControlListener));
  const body: ControlListenersPage = { listeners: entries };
  if (next !== undefined) body.next = next;
  return { status: 200, body };
}

function kick(broker: Broker, id: string): Answer {
  if (!/^[0-9]{1,16}$/.test(id)) {
    throw new HttpError(400, `client id must be a number, not "${id.slice(0, 40)}"`);
  }
  if (!broker.kick(Number(id))) throw new HttpError(404, `no client ${id}`);
  return { status: 204 };
}

function metrics(broker: Broker): Answer {
  const counters = broker.metrics;
  const text = renderPrometheus({
    accepted: counters.accepted,
    paired: counters.paired,
    listenerDeliveries: counters.listenerDeliveries,
    acceptPauses: counters.acceptPauses,
    descriptorExhaustions: counters.descriptorExhaustions,
    protocolErrors: counters.protocolErrors,
    dropped: counters.dropped,
    pairWait: counters.pairWait,
    waitingByMode: broker.waitingByMode(),
    listeners: broker.stats.listeners,
    connectionsOpen: broker.stats.open,
    openDescriptors: countOpenDescriptors(),
    maxDescriptors: descriptorLimit().soft,
    memory: Deno.memoryUsage(),
    startTimeSeconds: broker.startedAt.getTime() / 1000,
  });
  return { status: 200, headers: { "content-type": PROMETHEUS_CONTENT_TYPE }, text };
}

/**
 * The handlers of `url`'s resource by method, or undefined when there is no
 * such resource. A Map: a method name is the client's to choose, and must
 * never reach an object's prototype (`constructor`, `__proto__`).
 */
function resource(
  broker: Broker,
  control: string,
  url: URL,
): ReadonlyMap<string, () => Answer> | undefined {
  switch (url.pathname) {
    case "/status":
      return new Map([["GET", () => status(broker, control)]]);
    case "/clients":
      return new Map([["GET", () => clients(broker, url.searchParams)]]);
    case "/listeners":
      return new Map([["GET", () => listeners(broker, url.searchParams)]]);
    case "/metrics":
      return new Map([["GET", () => metrics(broker)]]);
  }
  const client = /^\/clients\/([^/]+)$/.exec(url.pathname);
  if (client) return new Map([["DELETE", () => kick(broker, client[1])]]);
  return undefined;
}

function answer(broker: Broker, control: string, method: string, target: string): Answer {
  // Origin form ("/status") from curl, absolute form ("http://localhost/status") from Deno's
  // fetch, which talks to a Unix socket as to a proxy: only the path and query matter.
  const url = URL.parse(target, "http://localhost");
  if (url === null) throw new HttpError(400, "request target is not a URL");
  const handlers = resource(broker, control, url);
  if (handlers === undefined) throw new HttpError(404, `no resource ${url.pathname}`);
  const handler = handlers.get(method);
  if (handler === undefined) {
    const allowed = [...handlers.keys()].join(", ");
    throw new HttpError(405, `${method} ${url.pathname}: use ${allowed}`, { allow: allowed });
  }
  return handler();
}

function handle(
  broker: Broker,
  control: string,
  request: http.IncomingMessage,
  response: http.ServerResponse,
): void {
  let result: Answer;
  try {
    result = answer(broker, control, request.method ?? "", request.url ?? "");
  } catch (error) {
    if (!(error instanceof HttpError)) throw error;
    result = { status: error.status, headers: error.headers, body: { error: error.message } };
  }
  if (result.text !== undefined) {
    response.writeHead(result.status, {
      ...result.headers,
      "content-length": String(Buffer.byteLength(result.text)),
    });
    response.end(result.text);
  } else if (result.body !== undefined) {
    sendJson(response, result.status, result.body, result.headers);
  } else {
    response.writeHead(result.status, result.headers);
    response.end();
  }
}

/**
 * Serves the control API for `broker` on the Unix socket `options.socket` (a file, made
 * with mode 0600: only the broker's user and root may connect). A stale
 * socket file is replaced; a live one, or a path that is not a socket, is not.
 *
 * @example Ask a broker for its status over HTTP
 * ```ts
 * import { Broker } from "@one-socket/one-socket";
 * import { serveControl } from "@one-socket/one-socket/control";
 * const path = `/tmp/control-example-${Deno.pid}.socket`;
 * await using broker = await Broker.listen({ socket: path });
 * await using control = await serveControl(broker, { socket: `${path}.control`, timeoutMs: 5000 });
 * using client = Deno.createHttpClient({ proxy: { transport: "unix", path: control.path } });
 * const response = await fetch("http://localhost/status", { client });
 * console.log((await response.json()).counts.waiting); // 0
 * ```
 */
export async function serveControl(
  broker: Broker,
  options: ControlOptions,
): Promise<ControlServer> {
  const path = options.socket;
  if (path.startsWith("@")) {
    throw new TypeError(
      `control socket ${path}: abstract sockets are not supported, give a file path`,
    );
  }
  const server = await UnixHttpServer.listen({
    path,
    maxConnections: options.maxConnections ?? DEFAULT_CONTROL_CONNECTIONS,
    timeoutMs: options.timeoutMs ?? DEFAULT_CONTROL_TIMEOUT_MS,
  }, (request, response) => handle(broker, path, request, response));
  logger.info("control API on {path}", { path });
  const close = () => server.close();
  return { path, close, [Symbol.asyncDispose]: close };
}
