/**
 * Running a program on a paired socket, the way socket-activated services and
 * inetd services expect to receive one: `one-socket pair --exec`.
 *
 * @module
 */

import { type ChildProcess, spawn } from "node:child_process";
import { constants } from "node:os";
import { resolve } from "node:path";
import { ExitError } from "./command_line.ts";
import type { PairedSocket } from "./paired_socket.ts";

/** Exit code when PROGRAM cannot be found, as shells and `env` use it. */
export const EXIT_NOT_FOUND = 127;
/** Exit code when PROGRAM exists but is not executable, as shells and `env` use it. */
export const EXIT_NOT_EXECUTABLE = 126;

/** What execvp searches when PATH is unset. */
const DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin";

/**
 * Finds `name` the way execvp would (as given when it holds a slash, else on
 * PATH) and returns it as an absolute path, so that a name starting with `-`
 * cannot be taken for an option by the shell's `exec`.
 *
 * Checking before pairing means a typo fails at once, not after a peer has
 * been taken from the broker.
 *
 * @example
 * ```ts
 * import { resolveProgram } from "./exec.ts";
 * console.log(resolveProgram("sh")); // "/usr/bin/sh", say
 * ```
 */
export function resolveProgram(name: string): string {
  // Checked before anything is asked of the broker: a peer must not be taken for a program that
  // cannot be started. The program runs through SHELL, so that is what needs run access.
  if (Deno.permissions.querySync({ name: "run", command: SHELL }).state !== "granted") {
    throw new ExitError(
      `exec ${name}: it is started through ${SHELL}: run Deno with --allow-run`,
      EXIT_NOT_EXECUTABLE,
    );
  }
  const candidates = name.includes("/")
    ? [resolve(name)]
    : (Deno.env.get("PATH") ?? DEFAULT_PATH).split(":").map((dir) => resolve(dir, name));
  let notExecutable: string | undefined;
  for (const path of candidates) {
    let info: Deno.FileInfo;
    try {
      info = Deno.statSync(path);
    } catch (error) {
      if (error instanceof Deno.errors.NotCapable) {
        throw new ExitError(
          `exec ${name}: cannot look for it without read access: run Deno with --allow-read`,
          EXIT_NOT_EXECUTABLE,
        );
      }
      continue; // missing here, or a PATH directory we may not search: execvp moves on too
    }
    if (!info.isFile) continue;
    if ((info.mode ?? 0) & 0o111) return path;
    notExecutable ??= path;
  }
  if (notExecutable !== undefined) {
    throw new ExitError(`exec ${notExecutable}: EACCES (not executable)`, EXIT_NOT_EXECUTABLE);
  }
  const where = name.includes("/") ? "no such file" : "not found in PATH";
  throw new ExitError(`exec ${name}: ENOENT (${where})`, EXIT_NOT_FOUND);
}

/** Options of {@link execOnSocket}. */
export interface ExecOptions {
  /** The key the socket was paired on, for `ONE_SOCKET_KEY` and `LISTEN_FDNAMES`. */
  key: string;
  /** Put the socket on standard input and output (inetd style) instead of descriptor 3. */
  stdio?: boolean;
  /**
   * Without `stdio`: the program's standard input, ours by default. `null`
   * (`/dev/null`) suits programs started for clients while we run on: in a
   * terminal they would compete for its input, and stop on `SIGTTIN` when we
   * run in the background.
   */
  stdin?: "inherit" | "null";
}

/** The variables that say who the peer is; set only from what the broker attested. */
const PEER_VARIABLES = ["ONE_SOCKET_PEER_PID", "ONE_SOCKET_PEER_UID", "ONE_SOCKET_PEER_GID"];

const SHELL = "/bin/sh";
// Between fork and exec a Deno child runs no code of ours, so a shell does what
// must happen there. PROGRAM and its arguments arrive as "$0" "$@", so the
// shell parses none of them, and `exec` keeps the shell's pid for PROGRAM.
//
// systemd-socket-activate sets LISTEN_PID in its child; `$$` is that pid.
const SET_LISTEN_PID = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"';
// The socket arrives as descriptor 3 here too, never as spawn's stdio 0 and 1:
// Deno 2.9.6 dup()s a descriptor given there without close-on-exec, and the
// child inherits those copies (as 20 and 24, say) besides 0 and 1, so the
// peer saw end of stream only when PROGRAM exited, not when it closed 0 and 1.
const MOVE_TO_STDIO = 'exec "$0" "$@" <&3 >&3 3<&-';

/** sd_listen_fds_with_names() accepts 1..255 printable ASCII characters without a colon. */
function descriptorName(key: string): string {
  return /^[\x20-\x39\x3b-\x7e]{1,255}$/.test(key) ? key : "one-socket";
}

const FORWARDED_SIGNALS = ["SIGINT", "SIGTERM"] as const;

/** Resolves to the child's exit code (128+N if signal N ended it); passes SIGINT and SIGTERM on. */
function exitCode(child: ChildProcess, program: string): Promise<number> {
  return new Promise((resolve, reject) => {
    // Not child.kill(): on Deno 2.9.6 it makes the exit event report that signal even
    // when the program caught it and exited with a status of its own.
    const forwarders = FORWARDED_SIGNALS.map((signal) => () => {
      try {
        Deno.kill(child.pid!, signal);
      } catch {
        // it has exited; its exit event is on the way
      }
    });
    FORWARDED_SIGNALS.forEach((signal, i) => Deno.addSignalListener(signal, forwarders[i]));
    const stopForwarding = () =>
      FORWARDED_SIGNALS.forEach((signal, i) => Deno.removeSignalListener(signal, forwarders[i]));
    child.once("error", (error: Error & { code?: string }) => {
      stopForwarding();
      reject(new Error(`spawn ${program}: ${error.code ?? error.message}`));
    });
    child.once("exit", (code, signal) => {
      stopForwarding();
      resolve(code ?? 128 + constants.signals[signal as keyof typeof constants.signals]);
    });
  });
}

/**
 * Runs `program` (an absolute path, see {@link resolveProgram}) with `socket`
 * and resolves to its exit code once it ends. Closes our copy of the socket
 * right after the spawn, so the peer sees end of stream as soon as the program
 * closes its own.
 *
 * By default the socket is descriptor 3 with `LISTEN_FDS=1`, `LISTEN_PID` (the
 * program's pid) and `LISTEN_FDNAMES` (the key, if it is a valid name, else
 * `one-socket`), which socket-activated programs accept; with `stdio` it is
 * descriptors 0 and 1 and no `LISTEN_*` variable is passed. Either way
 * `ONE_SOCKET_FD` names the descriptor and `ONE_SOCKET_KEY` holds the key,
 * and the program holds the socket at those descriptors only: `/bin/sh` puts
 * it in place and `exec`s the program. When the socket carries the peer's
 * credentials (protocol v2), `ONE_SOCKET_PEER_UID`, `ONE_SOCKET_PEER_GID`
 * and, unless the broker could not see it, `ONE_SOCKET_PEER_PID` hold them.
 *
 * The socket must not have been read or written: it reaches the program as
 * the blocking socket the broker created.
 *
 * @example
 * ```ts
 * import { getPair } from "../mod.ts";
 * import { execOnSocket, resolveProgram } from "./exec.ts";
 * const socket = await getPair("echo-service", { mode: "server" });
 * const code = await execOnSocket(socket, resolveProgram("cat"), [], {
 *   key: "echo-service",
 *   stdio: true,
 * });
 * Deno.exit(code);
 * ```
 */
export function execOnSocket(
  socket: PairedSocket,
  program: string,
  args: string[],
  options: ExecOptions,
): Promise<number> {
  const fd = socket.fd;
  const env = Deno.env.toObject();
  // Variables addressed to us, if we were socket-activated ourselves, are not the program's.
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  // Nor are the peer variables of a pair --exec we run under: they would name the wrong peer.
  for (const name of PEER_VARIABLES) delete env[name];
  env.ONE_SOCKET_KEY = options.key;
  const peer = socket.peer;
  if (peer !== undefined) {
    env.ONE_SOCKET_PEER_UID = String(peer.uid);
    env.ONE_SOCKET_PEER_GID = String(peer.gid);
    // The broker reports 0 for a peer in another pid namespace; a script's `kill 0` would
    // signal its own process group, so there is no variable rather than a 0.
    if (peer.pid !== 0) env.ONE_SOCKET_PEER_PID = String(peer.pid);
  }
  if (options.stdio) {
    env.ONE_SOCKET_FD = "0";
  } else {
    env.ONE_SOCKET_FD = "3";
    env.LISTEN_FDS = "1";
    env.LISTEN_FDNAMES = descriptorName(options.key);
  }
  let child: ChildProcess;
  try {
    const script = options.stdio ? MOVE_TO_STDIO : SET_LISTEN_PID;
    child = spawn(SHELL, ["-c", script, program, ...args], {
      stdio: [options.stdin === "null" ? "ignore" : "inherit", "inherit", "inherit", fd],
      env,
    });
  } finally {
    socket.close();
  }
  return exitCode(child, SHELL);
}
