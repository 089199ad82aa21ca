/**
 * Process-wide resources (the descriptor limit and the descriptors in use),
 * and whether another process is alive.
 *
 * @module
 */

import { errno, libc, O_RDONLY_CLOEXEC, RLIMIT_NOFILE, sizeArgument } from "./libc.ts";
import { OsError } from "./errors.ts";
import { cString, RLIMIT_SIZE } from "./structs.ts";

/** The descriptor limit, soft (in force) and hard (the ceiling an unprivileged process may raise to). */
export interface DescriptorLimit {
  /** The limit in force. */
  soft: number;
  /** The most the soft limit may be raised to. */
  hard: number;
}

const rlimit = new BigUint64Array(RLIMIT_SIZE / 8);

/** Reads `RLIMIT_NOFILE`. */
export function descriptorLimit(): DescriptorLimit {
  if (libc.getrlimit(RLIMIT_NOFILE, rlimit) < 0) throw new OsError("getrlimit", errno());
  return { soft: Number(rlimit[0]), hard: Number(rlimit[1]) };
}

/** Raises the soft descriptor limit to the hard one; returns the limit now in force. */
export function raiseDescriptorLimit(): DescriptorLimit {
  const limit = descriptorLimit();
  if (limit.soft < limit.hard) {
    rlimit[0] = BigInt(limit.hard);
    rlimit[1] = BigInt(limit.hard);
    if (libc.setrlimit(RLIMIT_NOFILE, rlimit) < 0) throw new OsError("setrlimit", errno());
  }
  return descriptorLimit();
}

const DESCRIPTOR_DIRECTORY = "/proc/self/fd";
const descriptorDirectory = cString(DESCRIPTOR_DIRECTORY);

/**
 * How many descriptors this process has open. Counted through libc because
 * Deno lets only `--allow-all` read `/proc/self/fd`.
 */
export function countOpenDescriptors(): number {
  const directory = libc.opendir(descriptorDirectory);
  if (directory === null) throw new OsError("opendir", errno(), DESCRIPTOR_DIRECTORY);
  // readdir signals an error only by NULL, as at the end; on procfs it has none to report.
  let entries = 0;
  while (libc.readdir(directory) !== null) entries++;
  libc.closedir(directory);
  // Neither "." nor ".." is a descriptor, and neither is the one opendir holds.
  return entries - 3;
}

const COMMAND_LINE_FILE = "/proc/self/cmdline";
const commandLineFile = cString(COMMAND_LINE_FILE);

/**
 * This process's `argv`, program first: the runtime's own flags included,
 * which `Deno.args` leaves out. Read through libc because Deno lets only
 * `--allow-all` read `/proc/self`.
 */
export function commandLine(): string[] {
  const fd = libc.open(commandLineFile, O_RDONLY_CLOEXEC);
  if (fd < 0) throw new OsError("open", errno(), COMMAND_LINE_FILE);
  const decoder = new TextDecoder();
  const chunk = new Uint8Array(4096);
  let text = "";
  try {
    for (;;) {
      const count = libc.read(fd, chunk, sizeArgument(chunk.length));
      if (count < 0) throw new OsError("read", errno(), COMMAND_LINE_FILE);
      if (count === 0) break;
      text += decoder.decode(chunk.subarray(0, count), { stream: true });
    }
  } finally {
    libc.close(fd);
  }
  // Every argument ends with a NUL, the last one too.
  return (text + decoder.decode()).split("\0").slice(0, -1);
}
