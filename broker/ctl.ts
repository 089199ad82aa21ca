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
import type { ControlClient, ControlStatus } from "./control.ts";

/** Usage of `one-socket ctl`. */
export const CTL_USAGE =
  `Usage: one-socket ctl status|clients|kick ID|metrics [--control PATH] [--json]

Asks a running broker over its control socket (the broker serves one only
when started with --control PATH).

Commands:
  status      version, uptime, socket paths and counters
  clients     the clients waiting for a partner, oldest first
  kick ID     disconnect client ID (an id from "clients"); it may reconnect
  metrics     the metrics in Prometheus text format

Options:
  --control PATH  control socket; default $ONE_SOCKET_CONTROL, else the broker
                  socket path (see one-socket broker --help) plus ".control"
  --json          print the JSON answer (status, clients) for scripts
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

/** Sends one request to the control socket; resolves to the body of a 2xx answer. */
async function request(path: string, method: string, resource: string): Promise<string> {
  const what = `${method} ${resource}`;
  using client = Deno.createHttpClient({ proxy: { transport: "unix", path } });
  let response: Response;
  let body: string;
  try {
    response = await fetch(`http://localhost${resource}`, {
      method,
      client,
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
    body = await response.text();
  } catch (error) {
    throw await unreachable(path, what, error);
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

function formatClients(clients: ControlClient[]): string {
  if (clients.length === 0) return "no clients waiting";
  return table([
    ["ID", "MODE", "WAITING", "PID", "UID", "KEY"],
    ...clients.map((client) => [
      String(client.id),
      client.mode,
      formatDuration(client.waitingSeconds),
      String(client.pid),
      String(client.uid),
      `"${client.key}"`,
    ]),
  ]);
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
    const path = resolveControlPath(values.control);
    switch (command) {
      case "status": {
        const body = await request(path, "GET", "/status");
        console.log(values.json ? body : formatStatus(JSON.parse(body)));
        break;
      }
      case "clients": {
        const body = await request(path, "GET", "/clients");
        console.log(values.json ? body : formatClients(JSON.parse(body).clients));
        break;
      }
      case "kick":
        await request(path, "DELETE", `/clients/${encodeURIComponent(operands[0])}`);
        console.log(`disconnected client ${operands[0]}`);
        break;
      case "metrics":
        console.log((await request(path, "GET", "/metrics")).trimEnd());
        break;
    }
    return 0;
  });
}
