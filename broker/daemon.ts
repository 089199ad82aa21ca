/**
 * `--daemon`: detach from the terminal, for hosts without a service manager.
 *
 * Deno cannot fork, so the command starts itself again, exactly as it was
 * started but without `--daemon`, in a new session with its standard streams
 * on `/dev/null` (or the log file). The parent waits until the child says it
 * serves, over the same datagram protocol as systemd's `NOTIFY_SOCKET`, and
 * exits 0 then, or 1 with the child's reason, or 1 after a bounded wait
 * (having stopped a child that never said it serves).
 *
 * @module
 */

import { type ChildProcess, spawn } from "node:child_process";
import { commandLine } from "../ffi/process.ts";
import { bindDatagram, pollDatagram, receiveDatagram, type UnixSocket } from "../ffi/socket.ts";
import { openLogFile } from "./log_file.ts";
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

/** How long `--daemon` waits for the broker to serve unless told otherwise (`--ready-timeout`). */
export const DEFAULT_READY_TIMEOUT_MS = 30_000;

/**
 * Waits up to `timeoutMs` for the child's `READY=1`; returns undefined then,
 * or why it will not come: the last `STATUS=` it sent before exiting, how it
 * exited, or that the time ran out.
 */
async function awaitReady(
  child: ChildProcess,
  socket: UnixSocket,
  timeoutMs: number,
): Promise<string | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const exited = new Promise<string>((resolve) => {
    child.once("error", (error) => resolve(`cannot start the broker: ${error.message}`));
    child.once("exit", (code, signal) => {
      resolve(`the broker stopped before serving (${signal ?? `exit code ${code}`})`);
    });
  });
  const timedOut = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), timeoutMs);
  });
  const buffer = new Uint8Array(4096);
  let status: string | undefined;
  /** Takes in one notification; true once it says the broker serves. */
  const isReady = (datagram: Uint8Array) => {
    const fields = parseNotification(decoder.decode(datagram));
    status = fields.get("STATUS") ?? status;
    return fields.get("READY") === "1";
  };
  try {
    for (;;) {
      const datagram = receiveDatagram(socket, buffer);
      const next = await Promise.race([datagram, exited, timedOut]);
      if (next instanceof Uint8Array) {
        if (isReady(next)) return undefined;
        continue;
      }
      // Closing the socket wakes the pending receive, which then fails: expected.
      datagram.catch(() => {});
      // What it sent before exiting is queued already, whatever the order we learnt of the two.
      let readyMeanwhile = false;
      for (let queued; (queued = pollDatagram(socket, buffer)) !== undefined;) {
        readyMeanwhile ||= isReady(queued);
      }
      if (next !== "timeout") return status ?? next;
      if (readyMeanwhile) return undefined;
      // Stuck somewhere: SIGKILL, because a blocked event loop never runs a SIGTERM handler.
      child.kill("SIGKILL");
      return `the broker (pid ${child.pid}) did not report ready (READY=1) within ` +
        `${timeoutMs / 1000} s${status === undefined ? "" : ` (last status: ${status})`}; ` +
        "stopped it with SIGKILL";
    }
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Starts the broker detached and resolves once it serves; throws with its
 * reason if it does not, or if it has not said it serves within
 * `readyTimeoutMs` (it is then killed). Its standard output and error go to
 * `logFile` when given (so that even a crash is on record), opened with the
 * same checks as the broker's own log file, else to `/dev/null`.
 */
export async function daemonize(
  logFile?: string,
  readyTimeoutMs: number = DEFAULT_READY_TIMEOUT_MS,
): Promise<void> {
  const directory = await Deno.makeTempDir({ prefix: "one-socket-daemon-" });
  try {
    using socket = bindDatagram(`${directory}/ready`);
    let child: ChildProcess;
    {
      using output = logFile === undefined ? undefined : openLogFile(logFile);
      // The child gets its own copy of the descriptor; ours closes at the end of this block.
      const stdio = output === undefined ? "ignore" : output.fd;
      child = spawn(Deno.execPath(), argumentsWithoutDaemon(), {
        detached: true,
        stdio: ["ignore", stdio, stdio],
        env: { ...Deno.env.toObject(), [DAEMON_NOTIFY_VARIABLE]: `${directory}/ready` },
      });
    }
    const failure = await awaitReady(child, socket, readyTimeoutMs);
    if (failure !== undefined) throw new Error(failure);
    child.unref();
  } finally {
    await Deno.remove(directory, { recursive: true });
  }
}
