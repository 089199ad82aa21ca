/**
 * Where the broker socket is when nobody says: the same answer for the broker
 * and its clients, so that both meet without configuration.
 *
 * @module
 */

import { currentUid } from "../ffi/socket.ts";

/** The environment variable the C broker and clients also read. */
export const SOCKET_PATH_VARIABLE = "ONE_SOCKET_PATH";

function environment(name: string): string | undefined {
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined; // no --allow-env: fall through to the default
  }
}

/**
 * The default broker socket path: `/run/one.socket` for root,
 * `$XDG_RUNTIME_DIR/one.socket` for a user with a runtime directory,
 * otherwise `/tmp/one-socket-<uid>.socket`.
 *
 * @example
 * ```ts
 * import { defaultSocketPath } from "./mod.ts";
 * console.log(defaultSocketPath()); // "/run/user/1000/one.socket" for most desktop users
 * ```
 */
export function defaultSocketPath(): string {
  const uid = currentUid();
  if (uid === 0) return "/run/one.socket";
  const runtime = environment("XDG_RUNTIME_DIR");
  return runtime ? `${runtime}/one.socket` : `/tmp/one-socket-${uid}.socket`;
}

/**
 * The socket path to use: `explicit` if given, else `$ONE_SOCKET_PATH`, else
 * {@link defaultSocketPath}.
 *
 * @example
 * ```ts
 * import { resolveSocketPath } from "./mod.ts";
 * console.log(resolveSocketPath("/tmp/test.socket")); // "/tmp/test.socket"
 * ```
 */
export function resolveSocketPath(explicit?: string): string {
  return explicit ?? environment(SOCKET_PATH_VARIABLE) ?? defaultSocketPath();
}
