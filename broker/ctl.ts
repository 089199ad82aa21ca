/**
 * `one-socket ctl`: the operator's side of the control API. Asks a broker
 * started with `--control` over that socket and prints the answer for people,
 * or as JSON for scripts.
 *
 * @module
 */

import { parseCommandLine, runCommand, UsageError } from "../client/command_line.ts";
import { resolveControlPath } from "../client/socket_path.ts";
import { OsError } from "../ffi/errors.ts";
import { connectUnix } from "../ffi/socket.ts";
import { MAX_LISTING_PAGE } from "./broker.ts";
import type { ControlClient, ControlClientsPage, ControlStatus } from "./control.ts";

/** Usage of `one-socket ctl`. */
export const CTL_USAGE =
  `Usage: one-socket ctl status|clients|kick ID|metrics [--control PATH] [--json]

Asks a running broker over its control socket (the broker serves one only
when started with --control PATH).

Commands:
  status      version, uptime, socket paths and counters
  clients     the clients waiting for a partner, oldest first (every page)
  kick ID     disconnect client ID (an id from "clients"); it may reconnect
  metrics     the metrics in Prometheus text format

Options:
  --control PATH  control socket; default $ONE_SOCKET_CONTROL, else the broker
                  socket path (see one-socket broker --help) plus ".control"
  --json          print the JSON answer (status; clients: every page's clients
                  in one {"clients": [...]}) for scripts
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
      return new OsError("connect", cause.errno, path, CONNECT_HINTS[cause.code]);
    }
  }
  return new Error(`${what} on ${path}: ${error instanceof Error ? error.message : error}`);
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
  async *clients(): AsyncGenerator<ControlClient[]> {
    let after = 0;
    for (;;) {
      const page: ControlClientsPage = JSON.parse(
        await this.request("GET", `/clients?limit=${MAX_LISTING_PAGE}&after=${after}`),
      );
      if (page.clients.length > 0) yield page.clients;
      if (page.next === undefined) return;
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
  const { counts } = status;
  const byMode = Object.entries(counts.waitingByMode).map(([mode, n]) => `${mode} ${n}`);
  return `one-socket ${status.version} (pid ${status.pid}), up ${
    formatDuration(status.uptimeSeconds)
  }\n` + table([
    ["socket", status.socket],
    ["control", status.control],
    ["waiting", `${counts.waiting} (${byMode.join(", ")})`],
    ["open", `${counts.connectionsOpen} connection${counts.connectionsOpen === 1 ? "" : "s"}`],
    ["paired", String(counts.pairedTotal)],
    ["accepted", String(counts.acceptedTotal)],
    ["rejected", String(counts.rejectedTotal)],
  ]);
}

/** Titles of the clients table's columns. */
const CLIENT_TITLES = ["ID", "MODE", "WAITING", "PID", "UID", "KEY"];
/**
 * Widths of the columns before KEY: fixed, because the rows arrive a page at
 * a time and are printed as they come (a wider cell just shifts its row).
 */
const CLIENT_WIDTHS = [7, 6, 7, 7, 6];

function clientRow(cells: string[]): string {
  return cells.map((cell, i) => cell.padEnd(CLIENT_WIDTHS[i] ?? 0)).join("  ").trimEnd();
}

/**
 * Prints every waiting client, a page at a time: as a table, or as one JSON
 * document (pages on lines of their own; JSON allows the line breaks).
 */
async function printClients(api: ControlApi, json: boolean): Promise<void> {
  let printed = 0;
  for await (const page of api.clients()) {
    const rows = json
      ? page.map((client) => JSON.stringify(client)).join(",")
      : page.map((client) =>
        clientRow([
          String(client.id),
          client.mode,
          formatDuration(client.waitingSeconds),
          String(client.pid),
          String(client.uid),
          `"${client.key}"`,
        ])
      ).join("\n");
    const opening = json ? '{"clients":[' : clientRow(CLIENT_TITLES) + "\n";
    console.log((printed === 0 ? opening : json ? "," : "") + rows);
    printed += page.length;
  }
  if (json) console.log(printed === 0 ? '{"clients":[]}' : "]}");
  else if (printed === 0) console.log("no clients waiting");
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
    if (!["status", "clients", "kick", "metrics"].includes(command)) {
      throw new UsageError(`unknown command ${command}`);
    }
    const wanted = command === "kick" ? 1 : 0;
    if (operands.length !== wanted) {
      throw new UsageError(
        wanted === 1 ? "kick takes one client ID" : `unexpected argument ${operands[0]}`,
      );
    }
    if (values.json && (command === "kick" || command === "metrics")) {
      throw new UsageError(`--json applies to status and clients, not ${command}`);
    }
    using api = new ControlApi(resolveControlPath(values.control));
    switch (command) {
      case "status": {
        const body = await api.request("GET", "/status");
        console.log(values.json ? body : formatStatus(JSON.parse(body)));
        break;
      }
      case "clients":
        await printClients(api, values.json);
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
