/**
 * The `one-socket` command: `broker`, `pair`, `serve`, `ctl`, `help` and
 * `--version`.
 * `mod.ts` loads this module only when it runs as the program, so library
 * users load no command-line code.
 *
 * @module
 */

import denoConfig from "../deno.json" with { type: "json" };
import { runBroker } from "./cli.ts";
import { runCtl } from "./ctl.ts";
import { runPair } from "../client/cli.ts";
import { runServe } from "../client/serve.ts";
import { EXIT_USAGE } from "../client/command_line.ts";

const USAGE = `Usage: one-socket COMMAND [OPTIONS]

Commands:
  broker   run the SocketPair broker on a Unix socket
  pair     get the socket paired on a key: bridge it to stdin/stdout, or run a program on it
  serve    listen on a key and run a program for every peer, on its own socket
  ctl      ask a running broker (status, clients, listeners, kick, metrics) over its control socket
  help     show this help (or: one-socket COMMAND --help)

Options:
  --version  print the version

Environment:
  ONE_SOCKET_PATH  broker socket path, for both the broker and its clients
  ONE_SOCKET_CONTROL  control socket path for ctl (default: the socket path + ".control")`;

/**
 * The `one-socket` command: dispatches to a subcommand and resolves to the
 * process exit code.
 *
 * @example
 * ```ts
 * import { main } from "./command.ts";
 * const code = await main(["--version"]);
 * console.log(code); // 0
 * ```
 */
export function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  switch (command) {
    case "broker":
      return runBroker(rest);
    case "pair":
      return runPair(rest);
    case "serve":
      return runServe(rest);
    case "ctl":
      return runCtl(rest);
    case "--version":
    case "-V":
      console.log(`one-socket ${denoConfig.version}`);
      return Promise.resolve(0);
    case "help":
    case "--help":
    case "-h":
      console.log(USAGE);
      return Promise.resolve(0);
    default:
      console.error(
        command === undefined ? USAGE : `one-socket: unknown command ${command}\n\n${USAGE}`,
      );
      return Promise.resolve(EXIT_USAGE);
  }
}
