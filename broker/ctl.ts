/**
 * `one-socket ctl`: the operator's side of the control API. Asks a broker
 * started with `--control` over that socket and prints the answer for people,
 * or as JSON for scripts.
 *
 * @module
 */

import { parseCommandLine, runCommand, UsageError } from "../client/command_line.ts";
import { resolveControlPath, unreadEnvironmentHint } from "../client/socket_path.ts";
import { OsError } from "../ffi/errors.ts";
import { connectUnix } from "../ffi/socket.ts";
import { MAX_LISTING_PAGE } from "./broker.ts";
import type {
  ControlClient,
  ControlClientsPage,
  ControlListener,
  ControlListenersPage,
  ControlStatus,
} from "./control.ts";

/** Usage of `one-socket ctl`. */
export const CTL_USAGE =
  `Usage: one-socket ctl status|clients|listeners|kick ID|metrics [--control PATH] [--json]

Asks a running broker over its control socket (the broker serves one only
when started with --control PATH).

Commands:
  status      version, uptime, socket paths and counters
  clients     the clients waiting for a partner, oldest first (every page)
  listeners   the listeners registered (protocol v2), oldest first (every page)
  kick ID     disconnect client or listener ID (an id from "clients" or
              "listeners"); it may reconnect
  metrics     the metrics in Prometheus text format

Options:
  --control PATH  control socket; default $ONE_SOCKET_CONTROL, else the broker
                  socket path (see one-socket broker --help) plus ".control"
  --json          print the JSON answer (status; clients, listeners: every
                  page's entries in one {"clients": [...]} or
                  {"listeners": [...]}) for scripts
  -h, --help      show this help`;

/** Bound on one request: a script polling a wedged broker must not hang. */
const TIMEOUT_MS = 10_000;

const CONNECT_HINTS: Record<string, string> = {
  ENOENT: "is the broker running with --control?",
  ECONNREFUSED: "is the broker running with --control?",
  EACCES: "no permission to use the control socket",
};

/**
 * Why a request did not get through, said the way `pair` says it: fetch
 * reports only a message, so the cause is found by connecting ourselves.
 */
async function unreachable(path: string, what: string, error: unknown): Promise<Error> {
  if (error instanceof DOMException && error.name === "TimeoutError") {
    return new Error(`${what} on ${path}: no answer within ${TIMEOUT_MS / 1000} s`);
  }
  try {
    (await connectUnix(path, AbortSignal.timeout(1000))).close();
  } catch (cause) {
    if (cause instanceof OsError) {
      const hint = [CONNECT_HINTS[cause.code], unreadEnvironmentHint()].filter(Boolean).join("; ");
      return new OsError("connect", cause.errno, path, hint || undefined);
    }
  }
  // Something listens there, but it does not speak HTTP: the broker socket itself, say.
  return new Error(
    `${what} on ${path}: no HTTP answer (${error instanceof Error ? error.message : error}); ` +
      "is it the control socket? The broker socket is not: --control names the one the broker " +
      'serves, by convention the broker socket path plus ".control"',
  );
}

/** The control socket at `path`, one connection kept for a run's requests. */
class ControlApi implements Disposable {
  readonly #path: string;
  readonly #client: Deno.HttpClient;

  constructor(path: string) {
    this.#path = path;
    this.#client = Deno.createHttpClient({ proxy: { transport: "unix", path } });
  }

  /** Sends one request; resolves to the body of a 2xx answer. */
  async request(method: string, resource: string): Promise<string> {
    const what = `${method} ${resource}`;
    let response: Response;
    let body: string;
    try {
      response = await fetch(`http://localhost${resource}`, {
        method,
        client: this.#client,
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
      body = await response.text();
    } catch (error) {
      throw await unreachable(this.#path, what, error);
    }
    if (response.ok) return body;
    let message: unknown;
    try {
      message = JSON.parse(body).error;
    } catch {
      // not one of our answers: report the status alone
    }
    throw new Error(typeof message === "string" ? message : `${what}: HTTP ${response.status}`);
  }

  /** Every waiting client, a page at a time: the cursor is followed until no `next`. */
  clients(): AsyncGenerator<ControlClient[]> {
    return this.#pages("/clients", (page: ControlClientsPage) => page.clients);
  }

  /** Every listener, a page at a time, as {@link clients}. */
  listeners(): AsyncGenerator<ControlListener[]> {
    return this.#pages("/listeners", (page: ControlListenersPage) => page.listeners);
  }

  /**
   * The pages of the listing at `resource`. The cursor must move on: a
   * broker whose `next` does not would otherwise be asked for ever.
   */
  async *#pages<P extends { next?: number }, T>(
    resource: string,
    entries: (page: P) => T[],
  ): AsyncGenerator<T[]> {
    let after = 0;
    for (;;) {
      const page: P = JSON.parse(
        await this.request("GET", `${resource}?limit=${MAX_LISTING_PAGE}&after=${after}`),
      );
      const listed = entries(page);
      if (listed.length > 0) yield listed;
      if (page.next === undefined) return;
      if (!(page.next > after)) {
        throw new Error(`GET ${resource}: the cursor went from ${after} to ${page.next}`);
      }
      after = page.next;
    }
  }

  [Symbol.dispose](): void {
    this.#client.close();
  }
}

/** `12.3s`, `5m02s`, `3h07m`, `2d04h`: short enough for a table column. */
function formatDuration(seconds: number): string {
  // Truncated, not rounded, so that 59.97 s does not print as 60.0s.
  if (seconds < 60) return `${(Math.floor(seconds * 10) / 10).toFixed(1)}s`;
  const whole = Math.floor(seconds);
  const two = (n: number) => String(n).padStart(2, "0");
  if (whole < 3600) return `${Math.floor(whole / 60)}m${two(whole % 60)}s`;
  if (whole < 86400) return `${Math.floor(whole / 3600)}h${two(Math.floor(whole / 60) % 60)}m`;
  return `${Math.floor(whole / 86400)}d${two(Math.floor(whole / 3600) % 24)}h`;
}

/** Rows as columns separated by two spaces, each as wide as its widest cell. */
function table(rows: string[][]): string {
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => row[column].length)));
  return rows
    .map((row) => row.map((cell, column) => cell.padEnd(widths[column])).join("  ").trimEnd())
    .join("\n");
}

function formatStatus(status: ControlStatus): string {
  const { counts, takeover } = status;
  const tookOver = takeover === undefined ? [] : [[
    "took over",
    `from pid ${takeover.fromPid} at ${takeover.at} (${takeover.adopted} connections, pairing ` +
    `paused ${takeover.pauseMs.toFixed(1)} ms${
      takeover.oldDied ? ", the old broker died half-way" : ""
    }); ` +
    `serving since ${takeover.servingSince}`,
  ]];
  const byMode = Object.entries(counts.waitingByMode).map(([mode, n]) => `${mode} ${n}`);
  return `one-socket ${status.version} (pid ${status.pid}), up ${
    formatDuration(status.uptimeSeconds)
  }\n` + table([
    ["socket", status.socket],
    ["control", status.control],
    ...tookOver,
    ["waiting", `${counts.waiting} (${byMode.join(", ")})`],
    ["listeners", String(counts.listeners)],
    ["open", `${counts.connectionsOpen} connection${counts.connectionsOpen === 1 ? "" : "s"}`],
    ["paired", `${counts.pairedTotal} (${counts.listenerDeliveriesTotal} to listeners)`],
    ["accepted", String(counts.acceptedTotal)],
    ["rejected", String(counts.rejectedTotal)],
  ]);
}

/**
 * A listing's table: titles, then a row's cells. The columns before the last
 * (KEY) have fixed widths, because the rows arrive a page at a time and are
 * printed as they come (a wider cell just shifts its row).
 */
interface Listing<T> {
  /** The JSON member holding the entries: `clients` or `listeners`. */
  name: string;
  titles: string[];
  widths: number[];
  cells(entry: T): string[];
  /** What is printed for an empty listing. */
  none: string;
}

const CLIENTS: Listing<ControlClient> = {
  name: "clients",
  titles: ["ID", "MODE", "TYPE", "PROTO", "WAITING", "PID", "UID", "KEY"],
  widths: [7, 6, 9, 5, 7, 7, 6],
  cells: (client) => [
    String(client.id),
    client.mode,
    client.type,
    `v${client.version}`,
    formatDuration(client.waitingSeconds),
    String(client.pid),
    String(client.uid),
    `"${client.key}"`,
  ],
  none: "no clients waiting",
};

const LISTENERS: Listing<ControlListener> = {
  name: "listeners",
  titles: ["ID", "MODE", "TYPE", "BACKLOG", "INFLIGHT", "SERVED", "LISTENING", "PID", "UID", "KEY"],
  widths: [7, 6, 9, 7, 8, 8, 9, 7, 6],
  cells: (listener) => [
    String(listener.id),
    listener.mode,
    listener.type,
    String(listener.backlog),
    String(listener.inFlight),
    String(listener.served),
    formatDuration(listener.listeningSeconds),
    String(listener.pid),
    String(listener.uid),
    `"${listener.key}"`,
  ],
  none: "no listeners",
};

function row(cells: string[], widths: number[]): string {
  return cells.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join("  ").trimEnd();
}

/**
 * Prints every entry of a listing, a page at a time: as a table, or as one
 * JSON document (pages on lines of their own; JSON allows the line breaks).
 */
async function printListing<T>(
  pages: AsyncIterable<T[]>,
  listing: Listing<T>,
  json: boolean,
): Promise<void> {
  let printed = 0;
  for await (const page of pages) {
    const rows = json
      ? page.map((entry) => JSON.stringify(entry)).join(",")
      : page.map((entry) => row(listing.cells(entry), listing.widths)).join("\n");
    const opening = json ? `{"${listing.name}":[` : row(listing.titles, listing.widths) + "\n";
    console.log((printed === 0 ? opening : json ? "," : "") + rows);
    printed += page.length;
  }
  if (json) console.log(printed === 0 ? `{"${listing.name}":[]}` : "]}");
  else if (printed === 0) console.log(listing.none);
}

/** Runs `one-socket ctl` with `args`; resolves to the exit code. */
export function runCtl(args: string[]): Promise<number> {
  return runCommand("ctl", CTL_USAGE, async () => {
    const { values, positionals } = parseCommandLine(args, {
      control: { type: "string" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    });
    if (values.help) {
      console.log(CTL_USAGE);
      return 0;
    }
    const [command, ...operands] = positionals;
    if (command === undefined) throw new UsageError("missing command");
    if (!["status", "clients", "listeners", "kick", "metrics"].includes(command)) {
      throw new UsageError(`unknown command ${command}`);
    }
    const wanted = command === "kick" ? 1 : 0;
    if (operands.length !== wanted) {
      throw new UsageError(
        wanted === 1 ? "kick takes one client ID" : `unexpected argument ${operands[0]}`,
      );
    }
    if (values.json && (command === "kick" || command === "metrics")) {
      throw new UsageError(`--json applies to status, clients and listeners, not ${command}`);
    }
    using api = new ControlApi(resolveControlPath(values.control));
    switch (command) {
      case "status": {
        const body = await api.request("GET", "/status");
        console.log(values.json ? body : formatStatus(JSON.parse(body)));
        break;
      }
      case "clients":
        await printListing(api.clients(), CLIENTS, values.json);
        break;
      case "listeners":
        await printListing(api.listeners(), LISTENERS, values.json);
        break;
      case "kick":
        await api.request("DELETE", `/clients/${encodeURIComponent(operands[0])}`);
        console.log(`disconnected client ${operands[0]}`);
        break;
      case "metrics":
        console.log((await api.request("GET", "/metrics")).trimEnd());
        break;
    }
    return 0;
  });
}
