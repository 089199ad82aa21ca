/**
 * One Socket: a SocketPair broker and its client library, wire-compatible
 * with the C SocketPair Broker (protocol v1).
 *
 * Many processes on one host meet through one broker socket: each sends a
 * key, and when two keys match the broker hands each a end of a fresh
 * `socketpair()`. From then on the two talk directly.
 *
 * Run as a program, this module is the `one-socket` command
 * (`broker`, `pair`, `ctl`, `help`, `--version`).
 *
 * @example Pair two peers through a broker
 * ```ts
 * import { Broker, getPair } from "./mod.ts";
 * const path = `/tmp/one-socket-example-${Deno.pid}.socket`;
 * await using _broker = await Broker.listen({ path });
 * const [server, client] = await Promise.all([
 *   getPair("vhost-user-1", { socket: path, mode: "server" }),
 *   getPair("vhost-user-1", { socket: path, mode: "client" }),
 * ]);
 * await client.write(new TextEncoder().encode("hello"));
 * const buffer = new Uint8Array(5);
 * await server.read(buffer);
 * server.close();
 * client.close();
 * ```
 *
 * @module
 */

import denoConfig from "./deno.json" with { type: "json" };
import { runBroker } from "./broker/cli.ts";
import { runCtl } from "./broker/ctl.ts";
import { runPair } from "./client/cli.ts";
import { EXIT_USAGE } from "./client/command_line.ts";

export {
  type AccessDecision,
  type AccessRequest,
  type Authorizer,
  Broker,
  type BrokerOptions,
  type BrokerStats,
  type ListingPage,
  MAX_LISTING_PAGE,
  type UidLimits,
  type WaitingClient,
} from "./broker/broker.ts";
export {
  type ControlClient,
  type ControlClientsPage,
  type ControlOptions,
  type ControlServer,
  type ControlStatus,
  serveControl,
} from "./broker/control.ts";
export { BrokerMetrics, type DropReason, Histogram } from "./broker/metrics.ts";
export { AccessPolicy, PolicyError, type PolicyRule, ReloadingPolicy } from "./broker/policy.ts";
export {
  BrokerClosedError,
  BrokerConnection,
  connectBroker,
  getPair,
  type PairOptions,
} from "./client/pair.ts";
export { PairedSocket } from "./client/paired_socket.ts";
export {
  CONTROL_PATH_VARIABLE,
  defaultSocketPath,
  guardFallbackDirectory,
  resolveControlPath,
  resolveSocketPath,
  SOCKET_PATH_VARIABLE,
} from "./client/socket_path.ts";
export {
  decodeGetPair,
  decodeSetPair,
  describeKey,
  encodeGetPair,
  encodeSetPair,
  GET_PAIR_MIN_SIZE,
  GET_PAIR_PAYLOAD_SIZE,
  type GetPair,
  type Key,
  keyBytes,
  MAX_KEY_LENGTH,
  MESSAGE_SIZE,
  type Mode,
  MODES,
  parseMode,
  peerMode,
  PROTOCOL_VERSION,
  ProtocolError,
  type ProtocolErrorField,
  REQUEST_GET_PAIR,
  REQUEST_SET_PAIR,
  SET_PAIR_PAYLOAD_SIZE,
} from "./client/protocol.ts";
export { OsError } from "./ffi/errors.ts";
export type { PeerCredentials } from "./ffi/structs.ts";

/**
 * This release's version.
 *
 * @example
 * ```ts
 * import { VERSION } from "./mod.ts";
 * console.log(`one-socket ${VERSION}`);
 * ```
 */
export const VERSION: string = denoConfig.version;

const USAGE = `Usage: one-socket COMMAND [OPTIONS]

Commands:
  broker   run the SocketPair broker on a Unix socket
  pair     get the socket paired on a key: bridge it to stdin/stdout, or run a program on it
  ctl      ask a running broker (status, clients, kick, metrics) over its control socket
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
 * import { main } from "./mod.ts";
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
    case "ctl":
      return runCtl(rest);
    case "--version":
    case "-V":
      console.log(`one-socket ${VERSION}`);
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

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
