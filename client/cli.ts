/**
 * `one-socket pair`: get a paired socket and bridge it to standard input and
 * output, like `nc -U` for a broker key.
 *
 * @module
 */

import { parseCommandLine, runCommand, UsageError } from "./command_line.ts";
import { getPair } from "./pair.ts";
import { parseMode } from "./protocol.ts";

/** Usage of `one-socket pair`. */
export const PAIR_USAGE = `Usage: one-socket pair KEY [--mode none|client|server] [--socket PATH]

Waits for the peer that asks for KEY in a compatible mode (none pairs with
none, client with server), then copies standard input to the peer and the
peer's bytes to standard output. Exits 0 once both directions have ended.

Options:
  --mode MODE     none (default), client or server
  --socket PATH   broker socket (default: $ONE_SOCKET_PATH, else the default path)
  -h, --help      show this help`;

/** Runs `one-socket pair` with `args`; resolves to the exit code. */
export function runPair(args: string[]): Promise<number> {
  return runCommand("pair", PAIR_USAGE, async () => {
    const { values, positionals } = parseCommandLine(args, {
      mode: { type: "string", default: "none" },
      socket: { type: "string" },
      help: { type: "boolean", short: "h" },
    });
    if (values.help) {
      console.log(PAIR_USAGE);
      return 0;
    }
    if (positionals.length !== 1) {
      throw new UsageError(positionals.length === 0 ? "missing KEY" : "expected one KEY");
    }
    let mode;
    try {
      mode = parseMode(values.mode);
    } catch (error) {
      throw new UsageError((error as Error).message);
    }
    const socket = await getPair(positionals[0], { socket: values.socket, mode });
    try {
      await Promise.all([
        Deno.stdin.readable.pipeTo(socket.writable),
        socket.readable.pipeTo(Deno.stdout.writable),
      ]);
    } finally {
      socket.close();
    }
    return 0;
  });
}
