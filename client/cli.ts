/**
 * `one-socket pair`: get a paired socket and bridge it to standard input and
 * output, like `nc -U` for a broker key, or run a program on it.
 *
 * @module
 */

import { ExitError, parseCommandLine, runCommand, seconds, UsageError } from "./command_line.ts";
import { execOnSocket, resolveProgram } from "./exec.ts";
import { connectBroker } from "./pair.ts";
import { resolveSocketPath } from "./socket_path.ts";
import { describeKey, keyBytes, parseMode } from "./protocol.ts";
import { Errno, OsError } from "../ffi/errors.ts";

/** Write errors that mean the peer has closed its socket before reading all we sent. */
const PEER_GONE = new Set(["EPIPE", "ECONNRESET"]);

/** Exit code when no peer came within `--timeout`. */
export const EXIT_NO_PEER = 3;

/** Usage of `one-socket pair`. */
export const PAIR_USAGE =
  `Usage: one-socket pair KEY [--mode none|client|server] [--socket PATH] [--timeout SECONDS]
       one-socket pair KEY [OPTIONS] --exec [--stdio] -- PROGRAM [ARGS...]
       one-socket pair --key KEY [OPTIONS]   (for a KEY that starts with "-": --key=-k)

Waits for the peer that asks for KEY in a compatible mode (none pairs with
none, client with server), then copies standard input to the peer and the
peer's bytes to standard output. Exits 0 once both directions have ended,
1 if the peer closed before reading all of standard input.

With --exec, runs PROGRAM on the socket instead: as descriptor 3, with
LISTEN_FDS=1, LISTEN_PID and LISTEN_FDNAMES set as socket-activated programs
expect, or with --stdio as its standard input and output (like inetd).
ONE_SOCKET_FD and ONE_SOCKET_KEY tell it the descriptor and the key. SIGINT
and SIGTERM are passed on to it, and its exit status becomes ours.

Options:
  --key KEY          the key, instead of the KEY argument
  --mode MODE        none (default), client or server
  --socket PATH      broker socket (default: $ONE_SOCKET_PATH, else the default path)
  --timeout SECONDS  give up if no peer came within SECONDS
  --exec             run PROGRAM (given after --) on the socket
  --stdio            with --exec: the socket is PROGRAM's stdin and stdout, not fd 3
  -h, --help         show this help

Exit codes: 0 done, 1 error, 2 usage error, 3 no peer within --timeout;
with --exec, PROGRAM's status (128+N if signal N ended it), or 127 if
PROGRAM is not found and 126 if it is not executable.`;

/** Runs `one-socket pair` with `args`; resolves to the exit code. */
export function runPair(args: string[]): Promise<number> {
  return runCommand("pair", PAIR_USAGE, async () => {
    // Everything after "--" is PROGRAM's, however much it looks like our flags.
    const end = args.indexOf("--");
    const command = end < 0 ? undefined : args.slice(end + 1);
    const { values, positionals } = parseCommandLine(end < 0 ? args : args.slice(0, end), {
      key: { type: "string" },
      mode: { type: "string", default: "none" },
      socket: { type: "string" },
      timeout: { type: "string" },
      exec: { type: "boolean", default: false },
      stdio: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    }, (argument) => `a KEY that starts with "-" goes as --key=${argument}`);
    if (values.help) {
      console.log(PAIR_USAGE);
      return 0;
    }
    const keys = values.key === undefined ? positionals : [values.key, ...positionals];
    if (keys.length !== 1) {
      throw new UsageError(keys.length === 0 ? "missing KEY" : "expected one KEY");
    }
    const key = keys[0];
    if (values.exec && !command?.length) throw new UsageError("--exec needs a PROGRAM after --");
    if (!values.exec && command !== undefined) {
      throw new UsageError("a PROGRAM after -- needs --exec");
    }
    if (values.stdio && !values.exec) throw new UsageError("--stdio goes with --exec");
    let mode;
    try {
      mode = parseMode(values.mode);
    } catch (error) {
      throw new UsageError((error as Error).message);
    }
    const timeout = values.timeout === undefined ? undefined : seconds("--timeout", values.timeout);
    const program = command === undefined ? undefined : resolveProgram(command[0]);

    const signal = timeout === undefined ? undefined : AbortSignal.timeout(timeout * 1000);
    const bytes = keyBytes(key);
    let socket;
    try {
      using connection = await connectBroker({ socket: values.socket, signal }).catch((error) => {
        // Out of time before the broker even took the connection: that is not "no peer".
        if (signal?.aborted && error === signal.reason) {
          throw new OsError(
            "connect",
            Errno.EAGAIN,
            resolveSocketPath(values.socket),
            `the broker takes no connections; gave up after ${timeout} s`,
          );
        }
        throw error;
      });
      await connection.request(bytes, mode, signal);
      socket = await connection.receivePair(signal);
    } catch (error) {
      if (signal?.aborted && error === signal.reason) {
        throw new ExitError(
          `no peer for key "${describeKey(bytes)}" within ${timeout} s`,
          EXIT_NO_PEER,
        );
      }
      throw error;
    }
    if (program !== undefined) {
      return await execOnSocket(socket, program, command!.slice(1), { key, stdio: values.stdio });
    }
    let undelivered: OsError | undefined;
    try {
      [undelivered] = await Promise.all([
        Deno.stdin.readable.pipeTo(socket.writable).then(() => undefined, (error) => {
          // The peer stopped reading: our sending direction is over, but what it sent
          // before leaving must still reach standard output before we say so.
          if (!(error instanceof OsError && PEER_GONE.has(error.code))) throw error;
          return error;
        }),
        socket.readable.pipeTo(Deno.stdout.writable),
      ]);
    } finally {
      socket.close();
    }
    if (undelivered !== undefined) {
      // A script must tell a cut transfer from a finished one.
      throw new Error(
        `send to peer on key "${describeKey(bytes)}": ${undelivered.code} ` +
          "(the peer closed before reading all of standard input)",
      );
    }
    return 0;
  });
}
