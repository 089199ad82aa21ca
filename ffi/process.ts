/**
 * Process-wide resources: the descriptor limit.
 *
 * @module
 */

import { errno, libc, RLIMIT_NOFILE } from "./libc.ts";
import { OsError } from "./errors.ts";
import { RLIMIT_SIZE } from "./structs.ts";

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
