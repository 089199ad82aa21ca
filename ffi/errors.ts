/**
 * {@link OsError}: a failed system call, named the way an operator searches
 * for it (`connect /run/one.socket: ECONNREFUSED (is the broker running?)`).
 *
 * @module
 */

// Linux's asm-generic numbering, shared by x86_64 and aarch64.
const ERRNO_NAMES: Record<number, [name: string, text: string]> = {
  1: ["EPERM", "operation not permitted"],
  2: ["ENOENT", "no such file or directory"],
  3: ["ESRCH", "no such process"],
  4: ["EINTR", "interrupted system call"],
  5: ["EIO", "input/output error"],
  6: ["ENXIO", "no such device or address"],
  9: ["EBADF", "bad file descriptor"],
  11: ["EAGAIN", "resource temporarily unavailable"],
  12: ["ENOMEM", "cannot allocate memory"],
  13: ["EACCES", "permission denied"],
  14: ["EFAULT", "bad address"],
  17: ["EEXIST", "file exists"],
  20: ["ENOTDIR", "not a directory"],
  21: ["EISDIR", "is a directory"],
  22: ["EINVAL", "invalid argument"],
  23: ["ENFILE", "too many open files in system"],
  24: ["EMFILE", "too many open files"],
  28: ["ENOSPC", "no space left on device"],
  30: ["EROFS", "read-only file system"],
  32: ["EPIPE", "broken pipe"],
  36: ["ENAMETOOLONG", "file name too long"],
  40: ["ELOOP", "too many levels of symbolic links"],
  88: ["ENOTSOCK", "socket operation on non-socket"],
  91: ["EPROTOTYPE", "protocol wrong type for socket"],
  97: ["EAFNOSUPPORT", "address family not supported by protocol"],
  98: ["EADDRINUSE", "address already in use"],
  103: ["ECONNABORTED", "software caused connection abort"],
  104: ["ECONNRESET", "connection reset by peer"],
  105: ["ENOBUFS", "no buffer space available"],
  106: ["EISCONN", "transport endpoint is already connected"],
  107: ["ENOTCONN", "transport endpoint is not connected"],
  109: ["ETOOMANYREFS", "too many references: cannot splice"],
  110: ["ETIMEDOUT", "connection timed out"],
  111: ["ECONNREFUSED", "connection refused"],
  115: ["EINPROGRESS", "operation now in progress"],
};

/** errno values the rest of the code branches on. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EINTR: 4,
  EAGAIN: 11,
  /** Linux's EWOULDBLOCK is EAGAIN (what a held `flock(LOCK_NB)` reports). */
  EWOULDBLOCK: 11,
  ENXIO: 6,
  EEXIST: 17,
  ELOOP: 40,
  EMFILE: 24,
  ENFILE: 23,
  EPIPE: 32,
  EADDRINUSE: 98,
  ECONNABORTED: 103,
  ECONNRESET: 104,
  ENOBUFS: 105,
  ENOMEM: 12,
  ECONNREFUSED: 111,
  ENOTCONN: 107,
  ETOOMANYREFS: 109,
  EINPROGRESS: 115,
  ETIMEDOUT: 110,
} as const;

/** The symbolic name of an errno value (`EAGAIN`), or `E<number>` when unknown. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno]?.[0] ?? `E${errno}`;
}

/**
 * A system call that failed, with the errno name and the path or key involved.
 *
 * @example Branching on the errno name
 * ```ts
 * import { connectBroker, OsError } from "@one-socket/one-socket";
 * try {
 *   using _conn = await connectBroker({ socket: "/tmp/nothing-here.socket" });
 * } catch (error) {
 *   if (error instanceof OsError && error.code === "ENOENT") console.log("no broker socket");
 * }
 * ```
 */
export class OsError extends Error {
  /** The failed call, as in the C API (`connect`). */
  readonly syscall: string;
  /** The errno name (`ECONNREFUSED`). */
  readonly code: string;
  /** The errno value. */
  readonly errno: number;
  /** The socket path or key the call was about, when there is one. */
  readonly path?: string;

  /**
   * Describes a failed call; the message reads `syscall path: ECODE (hint or errno text)`.
   *
   * @param syscall the failed call
   * @param errno its errno value
   * @param path the path or key involved
   * @param hint a short advice appended in parentheses
   */
  constructor(syscall: string, errno: number, path?: string, hint?: string) {
    const text = ERRNO_NAMES[errno]?.[1] ?? "unknown error";
    super(
      `${syscall}${path === undefined ? "" : ` ${path}`}: ${errnoName(errno)} ` +
        `(${hint ?? text})`,
    );
    this.name = "OsError";
    this.syscall = syscall;
    this.code = errnoName(errno);
    this.errno = errno;
    if (path !== undefined) this.path = path;
  }
}

const ERRNO_BY_NAME = new Map(
  Object.entries(ERRNO_NAMES).map(([errno, [name]]) => [name, Number(errno)]),
);

/**
 * A failed Deno file system call as an {@link OsError} naming `syscall` and
 * `path` (Deno's own message has the path but not the errno name). Errors
 * without a known errno name come back unchanged.
 */
export function fileError(error: unknown, syscall: string, path: string): unknown {
  const code = (error as { code?: unknown } | null)?.code;
  const errno = typeof code === "string" ? ERRNO_BY_NAME.get(code) : undefined;
  return errno === undefined ? error : new OsError(syscall, errno, path);
}
