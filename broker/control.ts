/**
 * The control API: HTTP on a second Unix socket, so that operators and their
 * tools (`one-socket ctl`, `curl --unix-socket`, a metrics scraper) can look
 * into a running broker without touching the broker socket.
 *
 * - `GET /status`: version, uptime, socket paths, counters
 * - `GET /clients`: the clients waiting for a partner
 * - `DELETE /clients/ID`: disconnect one client
 * - `GET /metrics`: Prometheus text format
 *
 * Errors are JSON `{"error": "..."}` with a 4xx or 5xx status.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import denoConfig from "../deno.json" with { type: "json" };
import { describeKey, type Mode } from "../client/protocol.ts";
import { countOpenDescriptors, descriptorLimit } from "../ffi/process.ts";
import { assertStale, type Broker } from "./broker.ts";
import { PROMETHEUS_CONTENT_TYPE, renderPrometheus } from "./prometheus.ts";

const logger = getLogger(["one-socket", "control"]);

/** A running control server, from {@link serveControl}. */
export interface ControlServer extends AsyncDisposable {
  /** The socket path it serves on. */
  readonly path: string;
  /** Stops serving and removes the socket file. */
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
  /** The control socket path. */
  control: string;
  /** Counters, since start (`...Total`) or now. */
  counts: {
    waiting: number;
    waitingByMode: Record<Mode, number>;
    pairedTotal: number;
    rejectedTotal: number;
    acceptedTotal: number;
    connectionsOpen: number;
  };
}

/** One waiting client in the body of `GET /clients` (`{ clients: [...] }`). */
export interface ControlClient {
  /** The id `DELETE /clients/ID` takes. */
  id: number;
  /** The key, printable: as in the broker's log, non-printable bytes as `\xNN`. */
  key: string;
  /** The key's bytes in hexadecimal, exactly. */
  keyHex: string;
  /** The requested mode. */
  mode: Mode;
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

/** An error answer: the status and the JSON `{ error }` body. */
class HttpError extends Error {
  readonly status: number;
  readonly headers?: HeadersInit;

  constructor(status: number, message: string, headers?: HeadersInit) {
    super(message);
    this.status = status;
    this.headers = headers;
  }
}

function json(body: unknown, status = 200, headers?: HeadersInit): Response {
  return Response.json(body, { status, headers });
}

function status(broker: Broker, control: string): Response {
  const stats = broker.stats;
  const body: ControlStatus = {
    version: denoConfig.version,
    pid: Deno.pid,
    uptimeSeconds: (Date.now() - broker.startedAt.getTime()) / 1000,
    socket: broker.path,
    control,
    counts: {
      waiting: stats.waiting,
      waitingByMode: broker.waitingByMode(),
      pairedTotal: stats.paired,
      rejectedTotal: stats.rejected,
      acceptedTotal: stats.accepted,
      connectionsOpen: stats.open,
    },
  };
  return json(body);
}

function clients(broker: Broker): Response {
  const now = Date.now();
  return json({
    clients: broker.waitingClients().map((client): ControlClient => ({
      id: client.id,
      key: describeKey(client.key),
      keyHex: client.key.toHex(),
      mode: client.mode,
      since: client.since.toISOString(),
      waitingSeconds: (now - client.since.getTime()) / 1000,
      pid: client.peer.pid,
      uid: client.peer.uid,
      gid: client.peer.gid,
    })),
  });
}

function kick(broker: Broker, id: string): Response {
  if (!/^[0-9]+$/.test(id)) throw new HttpError(400, `client id must be a number, not "${id}"`);
  if (!broker.kick(Number(id))) throw new HttpError(404, `no client ${id}`);
  return new Response(null, { status: 204 });
}

function metrics(broker: Broker): Response {
  const counters = broker.metrics;
  const body = renderPrometheus({
    accepted: counters.accepted,
    paired: counters.paired,
    acceptPauses: counters.acceptPauses,
    descriptorExhaustions: counters.descriptorExhaustions,
    protocolErrors: counters.protocolErrors,
    dropped: counters.dropped,
    pairWait: counters.pairWait,
    waitingByMode: broker.waitingByMode(),
    connectionsOpen: broker.stats.open,
    openDescriptors: countOpenDescriptors(),
    maxDescriptors: descriptorLimit().soft,
    memory: Deno.memoryUsage(),
    startTimeSeconds: broker.startedAt.getTime() / 1000,
  });
  return new Response(body, { headers: { "content-type": PROMETHEUS_CONTENT_TYPE } });
}

type Handlers = Partial<Record<string, () => Response>>;

/** The handlers for `pathname` by method, or undefined when there is no such resource. */
function resource(broker: Broker, control: string, pathname: string): Handlers | undefined {
  switch (pathname) {
    case "/status":
      return { GET: () => status(broker, control) };
    case "/clients":
      return { GET: () => clients(broker) };
    case "/metrics":
      return { GET: () => metrics(broker) };
  }
  const client = /^\/clients\/([^/]+)$/.exec(pathname);
  if (client) return { DELETE: () => kick(broker, client[1]) };
  return undefined;
}

function handle(broker: Broker, control: string, request: Request): Response {
  const { pathname } = new URL(request.url);
  try {
    const handlers = resource(broker, control, pathname);
    if (handlers === undefined) throw new HttpError(404, `no resource ${pathname}`);
    const handler = handlers[request.method];
    if (handler === undefined) {
      const allowed = Object.keys(handlers).join(", ");
      throw new HttpError(405, `${request.method} ${pathname}: use ${allowed}`, {
        allow: allowed,
      });
    }
    return handler();
  } catch (error) {
    if (error instanceof HttpError) {
      return json({ error: error.message }, error.status, error.headers);
    }
    throw error;
  }
}

/** Binds the control socket, replacing a stale socket file as the broker does with its own. */
async function listen(
  path: string,
  handler: (request: Request) => Response,
): Promise<Deno.HttpServer> {
  const serve = () =>
    Deno.serve({
      path,
      // Deno would print its own "Listening on" line to stdout.
      onListen: () => logger.info("control API on {path}", { path }),
      onError: (error) => {
        logger.error("control request failed: {error}", { error });
        return json({ error: "internal error" }, 500);
      },
    }, handler);
  try {
    return serve();
  } catch (error) {
    if (!(error instanceof Deno.errors.AddrInUse)) {
      const code = (error as { code?: unknown }).code;
      if (typeof code !== "string") throw error;
      throw new Error(`bind ${path}: ${code} (control socket)`, { cause: error });
    }
  }
  await assertStale(path);
  logger.info("replacing stale socket file {path}", { path });
  await Deno.remove(path);
  return serve();
}

/**
 * Serves the control API for `broker` on the Unix socket `path` (a file:
 * Deno cannot serve HTTP on an abstract socket). A stale socket file is
 * replaced; a live one, or a path that is not a socket, is not.
 *
 * @example Ask a broker for its status over HTTP
 * ```ts
 * import { Broker, serveControl } from "./mod.ts";
 * const path = `/tmp/control-example-${Deno.pid}.socket`;
 * await using broker = await Broker.listen({ path });
 * await using control = await serveControl(broker, `${path}.control`);
 * using client = Deno.createHttpClient({ proxy: { transport: "unix", path: control.path } });
 * const response = await fetch("http://localhost/status", { client });
 * console.log((await response.json()).counts.waiting); // 0
 * ```
 */
export async function serveControl(broker: Broker, path: string): Promise<ControlServer> {
  if (path.startsWith("@")) {
    throw new TypeError(
      `control socket ${path}: abstract sockets are not supported, give a file path`,
    );
  }
  const server = await listen(path, (request) => handle(broker, path, request));
  let closing: Promise<void> | undefined;
  // Deno removes the socket file itself once the listener is closed.
  const close = () => closing ??= server.shutdown();
  return { path, close, [Symbol.asyncDispose]: close };
}
