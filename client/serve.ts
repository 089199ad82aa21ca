/**
 * `one-socket serve`: a listener on a broker key that runs a program for
 * every client, in the way of UCSPI's `tcpserver` or systemd's `Accept=yes`.
 *
 * @module
 */

import { constants } from "node:os";
import { LogLimit } from "../broker/log_limit.ts";
import { KEY_DASH_HINT, KEYED_OPTIONS, keyedCommandLine, splitAtProgram } from "./cli.ts";
import {
  failureMessage,
  parseCommandLine,
  runCommand,
  UsageError,
  wholeNumber,
} from "./command_line.ts";
import { execOnSocket, resolveProgram } from "./exec.ts";
import { listen } from "./listen.ts";
import type { PairedSocket } from "./paired_socket.ts";
import { describeKey, keyBytes } from "./protocol.ts";
import { MAX_BACKLOG } from "./protocol_v2.ts";

/**
 * Programs run at once without `--max`: `tcpserver`'s default. There is a
 * bound by default because any local user who may ask for the key could
 * otherwise make us fork without end.
 */
export const DEFAULT_MAX = 40;

/** Usage of `one-socket serve`. */
export const SERVE_USAGE =
  `Usage: one-socket serve KEY [--mode MODE] [--type TYPE] [--socket PATH] [--max N]
                        [--backlog N] --exec [--stdio] -- PROGRAM [ARGS...]
       one-socket serve --key KEY [OPTIONS] --exec -- PROGRAM [ARGS...]
                        (for a KEY that starts with "-": --key=-k)

Registers a listener for KEY with the broker (protocol v2) and runs PROGRAM
once for every peer that asks for KEY in a compatible mode (by default this
side is the server, so clients) and the same socket type. PROGRAM gets the
socket as pair --exec gives it: as descriptor 3, with LISTEN_FDS=1,
LISTEN_PID and LISTEN_FDNAMES set as socket-activated programs expect, or
with --stdio as its standard input and output (like inetd); otherwise its
standard input is /dev/null. ONE_SOCKET_FD and ONE_SOCKET_KEY tell it the
descriptor and the key; ONE_SOCKET_PEER_UID, ONE_SOCKET_PEER_GID and
ONE_SOCKET_PEER_PID tell who the peer is, as the kernel told the broker (no
PID for a peer in another pid namespace).

At most --max programs run at once. While that many run, serve takes no
connection from the broker, which hands over up to --backlog more ahead of
time and keeps any further peers waiting. A program that exits with a
status other than 0 is logged on stderr (the key, the peer's pid and uid,
the status) and serving goes on. SIGINT or SIGTERM stops listening, is
passed on to the programs still running, and serve exits 0 once they have
ended.

Options:
  --key KEY          the key, instead of the KEY argument
  --mode MODE        server (default), client or none
  --type TYPE        stream (default), seqpacket or dgram
  --socket PATH      broker socket (default: $ONE_SOCKET_PATH, else the default path)
  --max N            run at most N programs at once (default ${DEFAULT_MAX})
  --backlog N        connections the broker may hand over ahead of time
                     (default: the broker's choice; it grants at most its own limit)
  --exec             run PROGRAM (given after --) for every peer (required)
  --stdio            the socket is PROGRAM's stdin and stdout, not fd 3
  -h, --help         show this help

Exit codes: 0 stopped by SIGINT or SIGTERM, 1 error (a broker that speaks only
protocol v1, a refused listener, a broker that went away), 2 usage error, 127
if PROGRAM is not found and 126 if it is not executable.`;

const STOP_SIGNALS = ["SIGINT", "SIGTERM"] as const;

/** Runs `one-socket serve` with `args`; resolves to the exit code. */
export function runServe(args: string[]): Promise<number> {
  return runCommand("serve", SERVE_USAGE, async () => {
    const [ours, command] = splitAtProgram(args);
    const { values, positionals } = parseCommandLine(ours, {
      ...KEYED_OPTIONS,
      max: { type: "string" },
      backlog: { type: "string" },
    }, KEY_DASH_HINT);
    if (values.help) {
      console.log(SERVE_USAGE);
      return 0;
    }
    const { key, mode, type } = keyedCommandLine(values, positionals, command, "server");
    if (!values.exec) throw new UsageError("serve needs --exec -- PROGRAM, to run for every peer");
    const max = values.max === undefined ? DEFAULT_MAX : wholeNumber("--max", values.max);
    const backlog = values.backlog === undefined
      ? undefined
      : wholeNumber("--backlog", values.backlog, MAX_BACKLOG);
    // Before listening: a typo must not take a single client from the broker.
    const program = resolveProgram(command![0]);
    const programArgs = command!.slice(1);
    const name = describeKey(keyBytes(key));
    const log = new ChildLog(name, program);

    const stop = new AbortController();
    let stoppedBy: (typeof STOP_SIGNALS)[number] | undefined;
    const onSignal = STOP_SIGNALS.map((signal) => () => {
      stoppedBy ??= signal;
      stop.abort();
    });
    STOP_SIGNALS.forEach((signal, i) => Deno.addSignalListener(signal, onSignal[i]));
    const running = new Set<Promise<void>>();
    // Called when a program ends or a stop signal comes: the loop below may go on.
    let wake: (() => void) | undefined;
    const wakeUp = () => wake?.();
    stop.signal.addEventListener("abort", wakeUp, { once: true });

    const run = async (socket: PairedSocket): Promise<void> => {
      const peer = socket.peer;
      let code;
      try {
        code = await execOnSocket(socket, program, programArgs, {
          key,
          stdio: values.stdio,
          stdin: "null",
        });
      } catch (error) {
        log.failed(peer, `could not be run: ${failureMessage(error)}`);
        return;
      }
      // The signal we passed on to stop it is no failure.
      const stopCode = stoppedBy && 128 + constants.signals[stoppedBy];
      if (code !== 0 && code !== stopCode) log.failed(peer, `exited with status ${code}`);
    };

    try {
      const listener = listen(key, {
        socket: values.socket,
        mode,
        type,
        backlog,
        signal: stop.signal,
      });
      try {
        await listener.ready;
        for (;;) {
          // With max programs running we take no connection: the broker keeps further peers,
          // so a flood of them costs us at most max children and the backlog's descriptors.
          while (running.size >= max && !stop.signal.aborted) {
            await new Promise<void>((resolve) => wake = resolve);
          }
          if (stop.signal.aborted) break;
          const socket = await listener.accept(); // null once a stop signal closed it
          if (socket === null) break;
          const child = run(socket).finally(() => {
            running.delete(child);
            wakeUp();
          });
          running.add(child);
        }
      } finally {
        listener.close();
        await Promise.all(running);
      }
    } catch (error) {
      // Stopping while the broker is asked or a connection awaited ends that wait: no failure.
      if (!stop.signal.aborted) throw error;
    } finally {
      log.close();
      STOP_SIGNALS.forEach((signal, i) => Deno.removeSignalListener(signal, onSignal[i]));
    }
    return 0;
  });
}

/**
 * The stderr lines about programs that failed, at most 20 per 10 s: any
 * peer may end its connection at once and make every program fail, and must
 * not be able to fill a disk with our log.
 */
class ChildLog {
  readonly #key: string;
  readonly #program: string;
  readonly #limit = new LogLimit();
  readonly #heldBack = (_cause: string, dropped: number, seconds: number) =>
    console.error(
      `one-socket serve: key "${this.#key}": held back ${dropped} more lines about failed ` +
        `programs in the last ${seconds} s`,
    );

  constructor(key: string, program: string) {
    this.#key = key;
    this.#program = program;
  }

  /** Says that the program run for `peer` failed: `what` happened. */
  failed(peer: PairedSocket["peer"], what: string): void {
    const now = performance.now();
    this.#limit.report(now, this.#heldBack);
    if (!this.#limit.allow("failed", now)) return;
    const who = peer === undefined ? "peer" : `peer pid ${peer.pid} uid ${peer.uid}`;
    console.error(`one-socket serve: key "${this.#key}": ${who}: ${this.#program} ${what}`);
  }

  /** Says what was held back and not yet said. */
  close(): void {
    this.#limit.report(performance.now(), this.#heldBack, true);
  }
}
