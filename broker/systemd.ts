/**
 * systemd socket activation (sd_listen_fds(3)): the listening socket a
 * service manager created and passed down, so that the broker binds nothing
 * and never removes a socket file it does not own.
 *
 * @module
 */

import { setCloseOnExec, socketKind, socketPath } from "../ffi/socket.ts";

/** The socket unit's `FileDescriptorName=` for the broker socket. */
const LISTEN_FD_NAME = "one-socket";
/** sd_listen_fds(3): passed descriptors are numbered from 3 up. */
const LISTEN_FDS_START = 3;
const LISTEN_VARIABLES = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/** Which of the passed descriptors is ours, as the environment says. */
export interface PassedDescriptors {
  /** The descriptor to serve. */
  fd: number;
  /** Its name in `LISTEN_FDNAMES` ("" when unnamed). */
  name: string;
  /** How many were passed (they are `3 … 3 + count - 1`). */
  count: number;
}

/**
 * Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`: undefined unless
 * they are meant for process `pid` and pass at least one descriptor. Among
 * several, the one named {@link LISTEN_FD_NAME} is ours, else the first.
 */
export function parseListenFds(
  env: Record<string, string | undefined>,
  pid: number,
): PassedDescriptors | undefined {
  const { LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES } = env;
  // Variables meant for another process (a parent that did not unset them) are not ours.
  if (LISTEN_PID === undefined || Number(LISTEN_PID) !== pid) return undefined;
  const count = Number(LISTEN_FDS);
  if (LISTEN_FDS === undefined || !Number.isSafeInteger(count) || count < 0) {
    throw new Error(`LISTEN_FDS=${LISTEN_FDS ?? ""} is not a descriptor count`);
  }
  if (count === 0) return undefined;
  const names = LISTEN_FDNAMES?.split(":") ?? [];
  const index = Math.max(names.slice(0, count).indexOf(LISTEN_FD_NAME), 0);
  return { fd: LISTEN_FDS_START + index, name: names[index] ?? "", count };
}

/** A listening socket passed by the service manager, checked and adopted. */
export interface InheritedListener {
  /** Its descriptor. */
  fd: number;
  /** The path it is bound to (`@name` when abstract). */
  path: string;
}

/**
 * Takes the listening socket passed to this process, if any: unsets the
 * `LISTEN_*` variables (as `sd_listen_fds(1)` does, so that no child takes
 * them for its own), marks every passed descriptor close-on-exec, and checks
 * that ours is a listening `AF_UNIX` stream socket.
 */
export function takeListener(): InheritedListener | undefined {
  const passed = parseListenFds(Deno.env.toObject(), Deno.pid);
  for (const name of LISTEN_VARIABLES) Deno.env.delete(name);
  if (passed === undefined) return undefined;
  for (let fd = LISTEN_FDS_START; fd < LISTEN_FDS_START + passed.count; fd++) {
    setCloseOnExec(fd, true);
  }
  const label = `inherited fd ${passed.fd}${passed.name ? ` (${passed.name})` : ""}`;
  const kind = socketKind(passed.fd);
  if (kind.domain !== "AF_UNIX" || kind.type !== "SOCK_STREAM" || !kind.listening) {
    throw new Error(
      `${label} is not a listening AF_UNIX stream socket: it is ${kind.domain} ` +
        `${kind.type}${kind.listening ? "" : ", not listening"}`,
    );
  }
  return { fd: passed.fd, path: socketPath(passed.fd) };
}
