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
  libc,
  LOCK_EX,
  LOCK_NB,
  O_APPEND,
  O_CLOEXEC,
  O_CREAT,
  O_EXCL,
  O_NOFOLLOW,
  O_NONBLOCK,
  O_PATH,
  O_RDWR,
  O_WRONLY,
  sizeArgument,
} from "./libc.ts";
import { Errno, OsError } from "./errors.ts";
import { cString, readStat, STAT_SIZE, type StatFields } from "./structs.ts";

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
  #fd: number;

  /** Takes ownership of `fd`, opened by `path`. */
  constructor(fd: number, path: string) {
    this.#fd = fd;
    this.path = path;
  }

  /** The descriptor number; -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /** `fstat` of the open file. */
  status(): StatFields {
    return statDescriptor(this.#requireOpen(), this.path);
  }

  /**
   * Takes an exclusive `flock` without waiting: true if it is ours now, false
   * if another open file description holds it. It lasts until this closes,
   * or the process ends however it ends.
   */
  tryLock(): boolean {
    if (libc.flock(this.#requireOpen(), LOCK_EX | LOCK_NB) === 0) return true;
    const code = errno();
    if (code === Errno.EWOULDBLOCK) return false;
    throw new OsError("flock", code, this.path);
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
  const file = new OwnFile(openExistingOrNew(path, flags, createMode), path);
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
function openExistingOrNew(path: string, flags: number, createMode?: number): number {
  for (;;) {
    try {
      return openNoFollow(path, flags, 0);
    } catch (error) {
      if (!(createMode !== undefined && error instanceof OsError && error.code === "ENOENT")) {
        throw error;
      }
    }
    try {
      return openNoFollow(path, flags | O_CREAT | O_EXCL, createMode);
    } catch (error) {
      // Someone made the name in between: open that, and judge it.
      if (!(error instanceof OsError && error.code === "EEXIST")) throw error;
    }
  }
}
