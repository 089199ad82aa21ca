/**
 * Where the broker socket is when nobody says: the same answer for the broker
 * and its clients, so that both meet without configuration. Likewise for the
 * control socket, between the broker's operator and `one-socket ctl`.
 *
 * @module
 */

import { currentUid } from "../ffi/socket.ts";

/** The environment variable the C broker and clients also read. */
export const SOCKET_PATH_VARIABLE = "ONE_SOCKET_PATH";

// Variables we could not read for want of --allow-env: a failed connect to the default path says so.
const unreadVariables = new Set<string>();

function environment(name: string): string | undefined {
  try {
    const value = Deno.env.get(name) || undefined;
    unreadVariables.delete(name);
    return value;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotCapable)) throw error;
    unreadVariables.add(name); // fall through to the default
    return undefined;
  }
}

/**
 * Why a default path may not be the one the user set: the variables that
 * could not be read without `--allow-env`, or undefined when none.
 *
 * @example
 * ```ts
 * import { resolveSocketPath, unreadEnvironmentHint } from "./socket_path.ts";
 * const path = resolveSocketPath();
 * console.log(path, unreadEnvironmentHint() ?? "");
 * ```
 */
export function unreadEnvironmentHint(): string | undefined {
  if (unreadVariables.size === 0) return undefined;
  const names = [...unreadVariables];
  return `$${names.join(" and $")} not read: run Deno with --allow-env=${names.join(",")}`;
}

/**
 * The default broker socket path: `/run/one.socket` for root,
 * `$XDG_RUNTIME_DIR/one.socket` for a user with a runtime directory,
 * otherwise `/tmp/one-socket-<uid>/one.socket` (see {@link guardFallbackDirectory}).
 *
 * @example
 * ```ts
 * import { defaultSocketPath } from "@one-socket/one-socket";
 * console.log(defaultSocketPath()); // "/run/user/1000/one.socket" for most desktop users
 * ```
 */
export function defaultSocketPath(): string {
  const uid = currentUid();
  if (uid === 0) return "/run/one.socket";
  const runtime = environment("XDG_RUNTIME_DIR");
  return runtime ? `${runtime}/one.socket` : `${fallbackDirectory(uid)}/one.socket`;
}

// Under /tmp anyone may create a name first: the socket lives in a directory only its uid may use.
const FALLBACK_PREFIX = "/tmp/one-socket-";
const fallbackDirectory = (uid: number) => `${FALLBACK_PREFIX}${uid}`;

/**
 * Guards the `/tmp` fallback of {@link defaultSocketPath}: another user could
 * otherwise bind the name first and receive every key. For a path in this
 * uid's fallback directory, the broker (`create`) makes the directory with
 * mode 0700; broker and clients then refuse it unless it is a real directory
 * owned by this uid that nobody else may use. Other paths are left alone.
 *
 * @example
 * ```ts
 * import { guardFallbackDirectory, resolveSocketPath } from "./socket_path.ts";
 * const path = resolveSocketPath();
 * guardFallbackDirectory(path, false); // throws if /tmp/one-socket-UID is not ours alone
 * ```
 */
export function guardFallbackDirectory(path: string, create: boolean): void {
  // Most paths are nowhere near /tmp: spare them the getuid.
  if (!path.startsWith(FALLBACK_PREFIX)) return;
  const uid = currentUid();
  const directory = fallbackDirectory(uid);
  if (!path.startsWith(`${directory}/`)) return;
  if (create) {
    try {
      Deno.mkdirSync(directory, { mode: 0o700 });
    } catch (error) {
      if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
    }
  }
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(directory);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return; // connecting will say ENOENT
    throw error;
  }
  const mode = (info.mode ?? 0) & 0o777;
  if (!info.isDirectory || info.uid !== uid || (mode & 0o077) !== 0) {
    throw new Error(
      `${directory} must be a directory of uid ${uid} that nobody else may use ` +
        `(it is ${
          info.isDirectory
            ? `a directory of uid ${info.uid}, mode ${mode.toString(8)}`
            : "not a directory"
        }); ` +
        `refusing to use ${path}`,
    );
  }
}

/**
 * The socket path to use: `explicit` if given, else `$ONE_SOCKET_PATH`, else
 * {@link defaultSocketPath}.
 *
 * @example
 * ```ts
 * import { resolveSocketPath } from "./socket_path.ts";
 * console.log(resolveSocketPath("/tmp/test.socket")); // "/tmp/test.socket"
 * ```
 */
export function resolveSocketPath(explicit?: string): string {
  return explicit ?? environment(SOCKET_PATH_VARIABLE) ?? defaultSocketPath();
}

/**
 * The environment variable `one-socket ctl` reads for the control socket path.
 *
 * @example
 * ```ts
 * import { CONTROL_PATH_VARIABLE } from "./socket_path.ts";
 * Deno.env.set(CONTROL_PATH_VARIABLE, "/run/one.control");
 * ```
 */
export const CONTROL_PATH_VARIABLE = "ONE_SOCKET_CONTROL";

/**
 * The control socket path to use: `explicit` if given, else
 * `$ONE_SOCKET_CONTROL`, else the broker socket path ({@link resolveSocketPath})
 * plus `.control`, the conventional `one-socket broker --control` path.
 *
 * @example
 * ```ts
 * import { resolveControlPath } from "./socket_path.ts";
 * Deno.env.set("ONE_SOCKET_PATH", "/tmp/demo.socket");
 * console.log(resolveControlPath()); // "/tmp/demo.socket.control" unless $ONE_SOCKET_CONTROL is set
 * ```
 */
export function resolveControlPath(explicit?: string): string {
  const path = explicit ?? environment(CONTROL_PATH_VARIABLE);
  if (path !== undefined) return path;
  const socket = resolveSocketPath();
  // An abstract name has no directory to put a control socket file beside.
  if (socket.startsWith("@")) {
    throw new Error(
      `the broker socket ${socket} is abstract, so there is no conventional control path: ` +
        `give --control or $${CONTROL_PATH_VARIABLE}`,
    );
  }
  return `${socket}.control`;
}
