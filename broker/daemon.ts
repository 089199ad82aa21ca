/**
 * `--daemon`: detach from the terminal, for hosts without a service manager.
 *
 * Deno cannot fork, so the command starts itself again, exactly as it was
 * started but without `--daemon`, in a new session with its standard streams
 * on `/dev/null` (or the log file). The parent waits until the child says it
 * serves, over the same datagram protocol as systemd's `NOTIFY_SOCKET`, and
 * exits 0 then, or 1 with the child's reason.
 *
 * @module
 */

import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { commandLine } from "../ffi/process.ts";
import { bindDatagram, pollDatagram, receiveDatagram, type UnixSocket } from "../ffi/socket.ts";
import { LOG_FILE_MODE } from "./log_file.ts";
import { DAEMON_NOTIFY_VARIABLE, parseNotification } from "./notify.ts";

const decoder = new TextDecoder();

/**
 * The arguments this process was started with, without `--daemon`: runtime
 * flags and script under `deno run`, the arguments alone in a compiled binary.
 */
function argumentsWithoutDaemon(): string[] {
  // Deno has no flag of that name, so every "--daemon" is one of ours.
  return commandLine().slice(1).filter((arg) => arg !== "--daemon");
}

/**
 * Waits for the child's `READY=1`; returns undefined then, or why it will
 * not come: the last `STATUS=` it sent before exiting, or how it exited.
 */
async function awaitReady(child: ChildProcess, socket: UnixSocket): Promise<string | undefined> {
  const exited = new Promise<string>((resolve) => {
    child.once("error", (error) => resolve(`cannot start the broker: ${error.message}`));
    child.once("exit", (code, signal) => {
      resolve(`the broker stopped before serving (${signal ?? `exit code ${code}`})`);
    });
  });
  const buffer = new Uint8Array(4096);
  let status: string | undefined;
  /** Takes in one notification; true once it says the broker serves. */
  const isReady = (datagram: Uint8Array) => {
    const fields = parseNotification(decoder.decode(datagram));
    status = fields.get("STATUS") ?? status;
    return fields.get("READY") === "1";
  };
  for (;;) {
    const datagram = receiveDatagram(socket, buffer);
    const next = await Promise.race([datagram, exited]);
    if (typeof next !== "string") {
      if (isReady(next)) return undefined;
      continue;
    }
    // Closing the socket wakes the pending receive, which then fails: expected.
    datagram.catch(() => {});
    // What it sent before exiting is queued already, whatever the order we learnt of the two.
    for (let queued; (queued = pollDatagram(socket, buffer)) !== undefined;) isReady(queued);
    return status ?? next;
  }
}

/**
 * Starts the broker detached and resolves once it serves; throws with its
 * reason if it does not. Its standard output and error go to `logFile` when
 * given (so that even a crash is on record), else to `/dev/null`.
 */
export async function daemonize(logFile?: string): Promise<void> {
  const directory = await Deno.makeTempDir({ prefix: "one-socket-daemon-" });
  try {
    using socket = bindDatagram(`${directory}/ready`);
    // The same mode as the broker's own opening of the log file, whichever creates it.
    const output = logFile === undefined ? "ignore" : openSync(logFile, "a", LOG_FILE_MODE);
    let child: ChildProcess;
    try {
      child = spawn(Deno.execPath(), argumentsWithoutDaemon(), {
        detached: true,
        stdio: ["ignore", output, output],
        env: { ...Deno.env.toObject(), [DAEMON_NOTIFY_VARIABLE]: `${directory}/ready` },
      });
    } finally {
      if (typeof output === "number") closeSync(output);
    }
    const failure = await awaitReady(child, socket);
    if (failure !== undefined) throw new Error(failure);
    child.unref();
  } finally {
    await Deno.remove(directory, { recursive: true });
  }
}
