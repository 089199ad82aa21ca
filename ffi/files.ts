/**
 * Files the broker keeps where other users may create names too (a pidfile,
 * a log file in a shared directory): opened without following a symlink and
 * without blocking on a FIFO, then refused unless they are regular files of
 * ours, or root's, that nobody else may write.
 *
 * @module
 */

import {
  errno,
  F_OFD_GETLK,
  F_OFD_SETLK,
  F_RDLCK,
  F_UNLCK,
  F_WRLCK,
  libc,
  O_APPEND,
  O_CLOEXEC,
  O_CREAT,
  O_EXCL,
  O_NOFOLLOW,
  O_NONBLOCK,
  O_PATH,
  O_RDWR,
  O_WRONLY,
  SEEK_SET,
  sizeArgument,
} from "./libc.ts";
import { Errno, OsError } from "./errors.ts";
import {
  cString,
  readFlockType,
  readStat,
  STAT_SIZE,
  type StatFields,
  wholeFileLock,
} from "./structs.ts";

/** What a held record lock fails with, besides EAGAIN (POSIX allows either). */
const EACCES = 13;

const S_IFMT = 0o170000;
const FILE_TYPES: Record<number, string> = {
  0o010000: "a FIFO",
  0o020000: "a character device",
  0o040000: "a directory",
  0o060000: "a block device",
  0o100000: "a regular file",
  0o120000: "a symlink",
  0o140000: "a socket",
};
const S_IFREG = 0o100000;

/** What the file type bits of `st_mode` say, as a phrase: "a FIFO", "a regular file"… */
function fileType(mode: number): string {
  return FILE_TYPES[mode & S_IFMT] ?? `a file of type ${(mode & S_IFMT).toString(8)}`;
}

/** Why an `open` failed, in the words an operator needs when the cause is a planted file. */
const OPEN_HINTS: Record<number, string> = {
  [Errno.ELOOP]: "a symlink; refusing to follow it",
  // O_WRONLY|O_NONBLOCK on a FIFO nobody reads; a device file says the same.
  [Errno.ENXIO]: "a FIFO or device, not a regular file; refusing it",
};

/** `open(2)` without following a final symlink; throws {@link OsError} naming `path`. */
function openNoFollow(path: string, flags: number, mode: number): number {
  // O_NONBLOCK: opening a FIFO would otherwise wait for its other end, forever.
  const fd = libc.open_with_mode(
    cString(path),
    flags | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK,
    mode,
  );
  if (fd < 0) {
    const code = errno();
    throw new OsError("open", code, path, OPEN_HINTS[code]);
  }
  return fd;
}

const statBuffer = new Uint8Array(STAT_SIZE);

function statDescriptor(fd: number, path: string): StatFields {
  if (libc.fstat(fd, statBuffer) < 0) throw new OsError("fstat", errno(), path);
  return readStat(statBuffer);
}

/** How {@link openOwnFile} opens a file. */
export interface OpenOptions {
  /** `"read-write"` (a pidfile) or `"append"` (a log). */
  access: "read-write" | "append";
  /**
   * Create a missing file with these permission bits (the umask narrows
   * them). Default: it must exist.
   */
  createMode?: number;
}

/**
 * An open file and its single owner: closed exactly once, by {@link close}
 * or `using`.
 */
export class OwnFile implements Disposable {
  /** The path it was opened by (it may have been renamed since). */
  readonly path: string;
  /** Whether opening it created it (with {@link OpenOptions.createMode}). */
  readonly created: boolean;
  #fd: number;

  /** Takes ownership of `fd`, opened by `path` (and `created` by that open). */
  constructor(fd: number, path: string, created = false) {
    this.#fd = fd;
    this.path = path;
    this.created = created;
  }

  /** The descriptor number; -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /** `fstat` of the open file. */
  status(): StatFields {
    return statDescriptor(this.#requireOpen(), this.path);
  }

  /** Sets the permission bits to `mode` narrowed by the umask, as creating it would. */
  setMode(mode: number): void {
    const umask = libc.umask(0o077);
    libc.umask(umask);
    if (libc.fchmod(this.#requireOpen(), mode & ~umask) < 0) {
      throw new OsError("fchmod", errno(), this.path);
    }
  }

  /**
   * Takes a write lock on the whole file without waiting, an open file
   * description lock (`F_OFD_SETLK`): true if it is ours now, false if
   * another open file description holds a lock on it, a read lock included.
   * It lasts until this closes, or the process ends however it ends.
   *
   * Not `flock`: anyone who may read the file may `flock` it. A write lock
   * needs a descriptor open for writing, and `flock` locks do not conflict
   * with it. A read lock (anyone who may read) still does: see
   * {@link writeLockedElsewhere}.
   */
  tryLock(): boolean {
    const request = wholeFileLock(F_WRLCK, SEEK_SET);
    if (libc.fcntl_lock(this.#requireOpen(), F_OFD_SETLK, request) === 0) return true;
    const code = errno();
    if (code === Errno.EAGAIN || code === EACCES) return false;
    throw new OsError("fcntl(F_OFD_SETLK)", code, this.path);
  }

  /**
   * Whether another open file description (or process) holds a write lock
   * on the file: one that only those who may write it can take. False
   * when what kept {@link tryLock} from succeeding were read locks.
   */
  writeLockedElsewhere(): boolean {
    // A read lock conflicts with write locks only: the kernel reports one if there is one.
    const probe = wholeFileLock(F_RDLCK, SEEK_SET);
    if (libc.fcntl_lock(this.#requireOpen(), F_OFD_GETLK, probe) < 0) {
      throw new OsError("fcntl(F_OFD_GETLK)", errno(), this.path);
    }
    return readFlockType(probe) !== F_UNLCK;
  }

  /** Whether `path` (not followed if a symlink) names this very file now. */
  isAt(path: string = this.path): boolean {
    const { dev, ino } = this.status();
    const handle = libc.open_with_mode(cString(path), O_PATH | O_NOFOLLOW | O_CLOEXEC, 0);
    if (handle < 0) {
      const code = errno();
      if (code === Errno.ENOENT) return false;
      throw new OsError("open", code, path);
    }
    try {
      const there = statDescriptor(handle, path);
      return there.dev === dev && there.ino === ino;
    } finally {
      libc.close(handle);
    }
  }

  /** Up to `limit` bytes from the start of the file. */
  readStart(limit: number): Uint8Array {
    const buffer = new Uint8Array(limit);
    const count = libc.pread(this.#requireOpen(), buffer, sizeArgument(limit), 0n);
    if (count < 0) throw new OsError("read", errno(), this.path);
    return buffer.subarray(0, count);
  }

  /** Empties the file and writes `bytes` at its start. */
  replaceContent(bytes: Uint8Array<ArrayBuffer>): void {
    const fd = this.#requireOpen();
    if (libc.ftruncate(fd, 0n) < 0) throw new OsError("ftruncate", errno(), this.path);
    for (let written = 0; written < bytes.length;) {
      const rest = bytes.subarray(written);
      const count = libc.pwrite(fd, rest, sizeArgument(rest.length), BigInt(written));
      if (count < 0) throw new OsError("write", errno(), this.path);
      written += count;
    }
  }

  /** Writes all of `bytes` at the file position (the end, when opened to append). */
  write(bytes: Uint8Array<ArrayBuffer>): void {
    const fd = this.#requireOpen();
    for (let written = 0; written < bytes.length;) {
      const rest = bytes.subarray(written);
      const count = libc.write(fd, rest, sizeArgument(rest.length));
      if (count < 0) throw new OsError("write", errno(), this.path);
      written += count;
    }
  }

  /** Closes the descriptor (releasing a lock it holds); further calls do nothing. */
  close(): void {
    if (this.#fd < 0) return;
    libc.close(this.#fd);
    this.#fd = -1;
  }

  /** Same as {@link close}. */
  [Symbol.dispose](): void {
    this.close();
  }

  #requireOpen(): number {
    if (this.#fd < 0) throw new Deno.errors.BadResource(`${this.path}: file is closed`);
    return this.#fd;
  }
}

/**
 * Why the open file at `path` must not be used, or undefined if it may: it is
 * a regular file, with one name, owned by us or by root, and neither its
 * group nor others may write it. Otherwise someone else could read what we
 * write, change it, or have us write into a file of their choosing.
 */
function distrust(status: StatFields, path: string): string | undefined {
  const { mode, nlink, uid: owner } = status;
  if ((mode & S_IFMT) !== S_IFREG) return `${path} is ${fileType(mode)}, not a regular file`;
  const uid = libc.geteuid();
  if (owner !== uid && owner !== 0) {
    return `${path} belongs to uid ${owner}, not to uid ${uid} (this process) or root`;
  }
  if ((mode & 0o022) !== 0) {
    return `${path} may be written by its group or others (mode ${
      (mode & 0o7777).toString(8).padStart(4, "0")
    })`;
  }
  if (nlink !== 1) {
    return `${path} has ${nlink} hard links, so it may be another file's second name`;
  }
  return undefined;
}

/**
 * Opens `path` the way {@link OpenOptions} say, never following a symlink
 * (`ELOOP`) or waiting on a FIFO, and returns it only if it is a regular
 * file of ours (or root's), with a single name, that neither group nor
 * others may write; otherwise closes it and throws saying which.
 */
export function openOwnFile(path: string, options: OpenOptions): OwnFile {
  const { access, createMode } = options;
  const flags = access === "append" ? O_WRONLY | O_APPEND : O_RDWR;
  const { fd, created } = openExistingOrNew(path, flags, createMode);
  const file = new OwnFile(fd, path, created);
  try {
    const reason = distrust(file.status(), path);
    if (reason !== undefined) throw new Error(`${reason}; refusing it`);
    return file;
  } catch (error) {
    file.close();
    throw error;
  }
}

/**
 * The file at `path`, or with `createMode` a new one made there. An existing
 * name is opened without O_CREAT: with it, Linux reports another user's
 * symlink in a sticky directory as EACCES instead of ELOOP. A new file is
 * made with O_EXCL, so it is ours from its first instant.
 */
function openExistingOrNew(
  path: string,
  flags: number,
  createMode?: number,
): { fd: number; created: boolean } {
  for (;;) {
    try {
      return { fd: openNoFollow(path, flags, 0), created: false };
    } catch (error) {
      if (!(createMode !== undefined && error instanceof OsError && error.code === "ENOENT")) {
        throw error;
      }
    }
    try {
      return { fd: openNoFollow(path, flags | O_CREAT | O_EXCL, createMode), created: true };
    } catch (error) {
      // Someone made the name in between: open that, and judge it.
      if (!(error instanceof OsError && error.code === "EEXIST")) throw error;
    }
  }
}
