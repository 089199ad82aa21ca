/**
 * Who may connect to the broker socket: `--socket-mode` and `--socket-group`.
 * Connecting to a Unix socket needs write permission on its file, so `0660`
 * plus a group lets exactly that group's members in. The broker puts both in
 * place between `bind` and `listen` (see `listenUnix`), so nobody else can
 * connect at any instant.
 *
 * @module
 */

import { UsageError } from "../client/command_line.ts";
import { fileError } from "../ffi/errors.ts";
import type { SocketFileAccess } from "../ffi/socket.ts";

const GROUP_FILE = "/etc/group";

/** Permission bits and group owner for the socket file; each unset one is left as bound. */
export type SocketAccess = SocketFileAccess;

/** `--socket-mode`: three or four octal digits (`0660`, `660`). */
export function parseSocketMode(text: string): number {
  if (!/^[0-7]{3,4}$/.test(text)) {
    throw new UsageError(`--socket-mode takes octal permission bits such as 0660, not ${text}`);
  }
  return parseInt(text, 8);
}

/** The gid of group `name` in the text of an `/etc/group` file, or undefined. */
export function findGroupId(groupFile: string, name: string): number | undefined {
  for (const line of groupFile.split("\n")) {
    const [group, , gid] = line.split(":");
    if (group === name && /^\d+$/.test(gid ?? "")) return Number(gid);
  }
  return undefined;
}

/** `--socket-group`: a number is a gid as it is; a name is looked up in `/etc/group`. */
export function resolveGroup(group: string): number {
  if (/^\d+$/.test(group)) return Number(group);
  let text: string;
  try {
    text = Deno.readTextFileSync(GROUP_FILE);
  } catch (error) {
    throw fileError(error, "open", GROUP_FILE);
  }
  const gid = findGroupId(text, group);
  if (gid === undefined) {
    throw new Error(`--socket-group ${group}: no such group in ${GROUP_FILE} (a number works too)`);
  }
  return gid;
}

/** Throws if `access` asks for anything but `path` has no file to apply it to (abstract). */
export function checkSocketAccess(path: string, { mode, gid }: SocketAccess): void {
  if ((mode !== undefined || gid !== undefined) && path.startsWith("@")) {
    throw new Error(`--socket-mode and --socket-group need a socket file; ${path} is abstract`);
  }
}
