/**
 * `one-socket pair`: get a paired socket and bridge it to standard input and
 * output, like `nc -U` for a broker key, or run a program on it.
 *
 * @module
 */

import { ExitError, parseCommandLine, runCommand, seconds, UsageError } from "./command_line.ts";
import { execOnSocket, resolveProgram } from "./exec.ts";
import { getPair } from "./pair.ts";
import type { PairedSocket } from "./paired_socket.ts";
import { resolveSocketPath } from "./socket_path.ts";
import { describeKey, keyBytes, type Mode, parseMode } from "./protocol.ts";
import { parseSocketType, type SocketType } from "./protocol_v2.ts";
import { Errno, OsError } from "../ffi/errors.ts";
import { tryConnectUnix } from "../ffi/socket.ts";

/**
 * Send errors that mean the peer has closed its socket before reading all we
 * sent (`ECONNREFUSED`: a datagram peer that is gone).
 */
const PEER_GONE = new Set(["EPIPE", "ECONNRESET", "ECONNREFUSED"]);

/** The most one read of standard input takes, and so the largest message pair sends. */
const MESSAGE_CHUNK = 64 * 1024;

/** Exit code when no peer came within `--timeout`. */
export const EXIT_NO_PEER = 3;

/** Usage of `one-socket pair`. */
export const PAIR_USAGE =
  `Usage: one-socket pair KEY [--mode none|client|server] [--type TYPE] [--socket PATH]
                       [--timeout SECONDS]
       one-socket pair KEY [OPTIONS] --exec [--stdio] -- PROGRAM [ARGS...]
       one-socket pair --key KEY [OPTIONS]   (for a KEY that starts with "-": --key=-k)

Waits for the peer that asks for KEY in a compatible mode (none pairs with
none, client with server) and the same socket type, then copies standard
input to the peer and the peer's bytes to standard output. Exits 0 once
both directions have ended, 1 if the peer closed before reading all of
standard input.

With --type seqpacket or dgram, message boundaries are kept: each read from
standard input (at most 64 KiB) is sent as one message, and each message
received is one write to standard output. A seqpacket peer that closes ends
the stream, as with stream. A datagram socket has no end of stream: when
standard input ends, pair sends an empty message, and an empty message from
the peer ends what comes from it.

With --exec, runs PROGRAM on the socket instead: as descriptor 3, with
LISTEN_FDS=1, LISTEN_PID and LISTEN_FDNAMES set as socket-activated programs
expect, or with --stdio as its standard input and output (like inetd).
ONE_SOCKET_FD and ONE_SOCKET_KEY tell it the descriptor and the key. From a
protocol v2 broker, ONE_SOCKET_PEER_UID, ONE_SOCKET_PEER_GID and
ONE_SOCKET_PEER_PID tell who the peer is, as the kernel told the broker (no
PID for a peer in another pid namespace). SIGINT and SIGTERM are passed on to
PROGRAM, and its exit status becomes ours.

Options:
  --key KEY          the key, instead of the KEY argument
  --mode MODE        none (default), client or server
  --type TYPE        stream (default), seqpacket or dgram (protocol v2 brokers only)
  --socket PATH      broker socket (default: $ONE_SOCKET_PATH, else the default path)
  --timeout SECONDS  give up if no peer came within SECONDS
  --exec             run PROGRAM (given after --) on the socket
  --stdio            with --exec: the socket is PROGRAM's stdin and stdout, not fd 3
  -h, --help         show this help

Exit codes: 0 done, 1 error, 2 usage error, 3 no peer within --timeout;
with --exec, PROGRAM's status (128+N if signal N ended it), or 127 if
PROGRAM is not found and 126 if it is not executable.`;

/** How a KEY that looks like an option is given instead. */
export const KEY_DASH_HINT = (argument: string): string =>
  `a KEY that starts with "-" goes as --key=${argument}`;

/** The options that `pair` and `serve` share, as {@link parseCommandLine} takes them. */
export const KEYED_OPTIONS = {
  key: { type: "string" },
  mode: { type: "string" },
  socket: { type: "string" },
  type: { type: "string" },
  exec: { type: "boolean", default: false },
  stdio: { type: "boolean", default: false },
  help: { type: "boolean", short: "h" },
} as const;

/** The flags of {@link KEYED_OPTIONS} as `parseArgs` returns them. */
export interface KeyedValues {
  /** `--key` */
  key?: string;
  /** `--mode` */
  mode?: string;
  /** `--type` */
  type?: string;
  /** `--exec` */
  exec?: boolean;
  /** `--stdio` */
  stdio?: boolean;
}

/** A `pair` or `serve` command line, checked. */
export interface KeyedCommandLine {
  /** The one KEY, from `--key` or the argument. */
  key: string;
  /** `--mode`, or the command's default. */
  mode: Mode;
  /** `--type`, `stream` by default. */
  type: SocketType;
  /** With `--exec`: PROGRAM and its arguments, not yet looked up. */
  command?: string[];
}

/**
 * Splits `args` at the first `--`: everything after it is PROGRAM's, however
 * much it looks like our flags. The second part is undefined without `--`.
 *
 * @example
 * ```ts
 * import { splitAtProgram } from "./cli.ts";
 * console.log(splitAtProgram(["k", "--exec", "--", "cat", "-n"])); // [["k", "--exec"], ["cat", "-n"]]
 * ```
 */
export function splitAtProgram(args: string[]): [ours: string[], command: string[] | undefined] {
  const end = args.indexOf("--");
  return end < 0 ? [args, undefined] : [args.slice(0, end), args.slice(end + 1)];
}

/**
 * Checks what `pair` and `serve` share: one KEY, a mode, a socket type, and
 * `--exec` and `--stdio` going with a PROGRAM after `--`. Throws a
 * {@link UsageError} naming what is wrong.
 *
 * @example
 * ```ts
 * import { keyedCommandLine } from "./cli.ts";
 * const line = keyedCommandLine({ type: "seqpacket" }, ["k"], undefined, "none");
 * console.log(line.key, line.mode, line.type); // k none seqpacket
 * ```
 */
export function keyedCommandLine(
  values: KeyedValues,
  positionals: string[],
  command: string[] | undefined,
  defaultMode: Mode,
): KeyedCommandLine {
  const keys = values.key === undefined ? positionals : [values.key, ...positionals];
  if (keys.length !== 1) {
    throw new UsageError(keys.length === 0 ? "missing KEY" : "expected one KEY");
  }
  if (values.exec && !command?.length) throw new UsageError("--exec needs a PROGRAM after --");
  if (!values.exec && command !== undefined) {
    throw new UsageError("a PROGRAM after -- needs --exec");
  }
  if (values.stdio && !values.exec) throw new UsageError("--stdio goes with --exec");
  try {
    return {
      key: keys[0],
      mode: parseMode(values.mode ?? defaultMode),
      type: parseSocketType(values.type ?? "stream"),
      command,
    };
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/** Runs `one-socket pair` with `args`; resolves to the exit code. */
export function runPair(args: string[]): Promise<number> {
  return runCommand("pair", PAIR_USAGE, async () => {
    const [ours, command] = splitAtProgram(args);
    const { values, positionals } = parseCommandLine(ours, {
      ...KEYED_OPTIONS,
      timeout: { type: "string" },
    }, KEY_DASH_HINT);
    if (values.help) {
      console.log(PAIR_USAGE);
      return 0;
    }
    const { key, mode, type } = keyedCommandLine(values, positionals, command, "none");
    const timeout = values.timeout === undefined ? undefined : seconds("--timeout", values.timeout);
    const program = command === undefined ? undefined : resolveProgram(command[0]);

    const signal = timeout === undefined ? undefined : AbortSignal.timeout(timeout * 1000);
    const bytes = keyBytes(key);
    let socket;
    try {
      socket = await getPair(bytes, { socket: values.socket, mode, type, signal });
    } catch (error) {
      if (signal?.aborted && error === signal.reason) {
        const path = resolveSocketPath(values.socket);
        // Out of time before the broker even took the connection is not "no peer".
        if (takesNoConnections(path)) {
          throw new OsError(
            "connect",
            Errno.EAGAIN,
            path,
            `the broker takes no connections; gave up after ${timeout} s`,
          );
        }
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
        sendStandardInput(socket, type).then(() => undefined, (error) => {
          // The peer stopped reading: our sending direction is over, but what it sent
          // before leaving must still reach standard output before we say so.
          if (!(error instanceof OsError && PEER_GONE.has(error.code))) throw error;
          return error;
        }),
        type === "stream"
          ? socket.readable.pipeTo(Deno.stdout.writable)
          : receiveToStandardOutput(socket, type),
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

/**
 * Whether the broker at `path` leaves a connect waiting (`EAGAIN`: its
 * backlog is full), by trying one. getPair does not say where its time ran
 * out; a broker that takes no connection now took none then either. (One it
 * takes is closed at once, which the broker notes at most in its debug log.)
 */
function takesNoConnections(path: string): boolean {
  try {
    using probe = tryConnectUnix(path);
    return probe === undefined;
  } catch {
    return false; // refused or gone now: nothing says it took no connections then
  }
}

/**
 * Copies standard input to the peer: as a byte stream, or with message types
 * each read as one message. Then ends our sending side: a shutdown, or for a
 * datagram socket, which has none, an empty message.
 */
async function sendStandardInput(socket: PairedSocket, type: SocketType): Promise<void> {
  if (type === "stream") return await Deno.stdin.readable.pipeTo(socket.writable);
  const buffer = new Uint8Array(MESSAGE_CHUNK);
  for (;;) {
    const count = await Deno.stdin.read(buffer);
    if (count === null) break;
    await socket.send(buffer.subarray(0, count));
  }
  if (type === "dgram") await socket.send(new Uint8Array(0));
  else socket.closeWrite();
}

/**
 * Writes every message from the peer to standard output in one write, until
 * the peer's end of stream (seqpacket) or empty message (dgram).
 */
async function receiveToStandardOutput(socket: PairedSocket, type: SocketType): Promise<void> {
  for (;;) {
    const message = await socket.receive();
    if (message === null || (type === "dgram" && message.length === 0)) return;
    // A pipe takes a blocking write whole; a loop covers terminals and files that take less.
    for (let written = 0; written < message.length;) {
      written += await Deno.stdout.write(message.subarray(written));
    }
  }
}
