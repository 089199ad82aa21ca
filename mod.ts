/**
 * One Socket: a SocketPair broker and its client library, wire-compatible
 * with the C SocketPair Broker (protocol v1), and speaking protocol v2
 * (listeners, attested peers, `seqpacket` and `dgram` pairs) where the
 * broker does.
 *
 * Many processes on one host meet through one broker socket: each sends a
 * key, and when two keys match the broker hands each an end of a fresh
 * `socketpair()`. From then on the two talk directly.
 *
 * Importing it needs no permission; calls that reach libc need
 * `--allow-ffi`. Run as a program, this module is the `one-socket` command
 * (`broker`, `pair`, `serve`, `ctl`, `help`, `--version`), loaded only then.
 *
 * Sub-modules: `./protocol` and `./protocol/v2` (the wire formats, pure),
 * `./policy` (TOML access rules for an embedded broker), `./control` (its
 * HTTP control API).
 *
 * @example Pair two peers through a broker
 * ```ts
 * import { Broker, getPair } from "./mod.ts";
 * const path = `/tmp/one-socket-example-${Deno.pid}.socket`;
 * await using _broker = await Broker.listen({ socket: path });
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

export {
  type AccessDecision,
  type AccessRequest,
  type Authorizer,
  Broker,
  type BrokerOptions,
  type BrokerStats,
  type ListenerInfo,
  type ListingPage,
  MAX_LISTING_PAGE,
  type TakeoverInfo,
  type UidLimits,
  type WaitingClient,
} from "./broker/broker.ts";
export {
  BrokerClosedError,
  BrokerConnection,
  BrokerRefusedError,
  BrokerVersionError,
  connectBroker,
  type ConnectOptions,
  getPair,
  type PairOptions,
} from "./client/pair.ts";
export { listen, Listener, type ListenOptions } from "./client/listen.ts";
export {
  closeDescriptor,
  PairedSocket,
  type PairedSocketOptions,
  type Peer,
} from "./client/paired_socket.ts";
export type { SocketType } from "./client/protocol_v2.ts";
export type { BrokerMetrics, DropReason, Histogram } from "./broker/metrics.ts";
export { defaultSocketPath, SOCKET_PATH_VARIABLE } from "./client/socket_path.ts";
export { type Key, type Mode, ProtocolError, type ProtocolErrorField } from "./client/protocol.ts";
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

if (import.meta.main) {
  const { main } = await import("./broker/command.ts");
  Deno.exit(await main(Deno.args));
}
