/**
 * {@link MemoryFile}: a file that lives only in memory (`memfd_create`), the
 * broker's state kept where systemd's file descriptor store can hold it
 * across a restart of the broker.
 *
 * @module
 */

import { errno, F_GETFD, F_SETFD, FD_CLOEXEC, libc, MFD_CLOEXEC, sizeArgument } from "./libc.ts";
import { Errno, OsError } from "./errors.ts";
import { cString, readStat, STAT_SIZE } from "./structs.ts";

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const FILE_TYPES: Record<number, string> = {
  0o010000: "a FIFO",
  0o020000: "a character device",
  0o040000: "a directory",
  0o060000: "a block device",
  0o120000: "a symlink",
  0o140000: "a socket",
};

/** `MFD_NAME_MAX_LEN`: `NAME_MAX` less the `memfd:` prefix the kernel puts before the name. */
const MAX_NAME_BYTES = 249;

// One buffer for every fstat: JavaScript runs on one thread, and readStat copies out of it.
const statBuffer = new Uint8Array(STAT_SIZE);

/** An offset or a length: what fits `off_t` and a JavaScript number exactly. */
function requireCount(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${what} must be a non-negative integer (it is ${value})`);
  }
}

/**
 * An anonymous file in memory and its single owner: closed exactly once, by
 * {@link close} or `using`. Reads and writes take an explicit offset
 * (`pread`/`pwrite`), so no file position is shared with whoever else holds
 * the descriptor, systemd's file descriptor store included.
 *
 * It is created without `MFD_ALLOW_SEALING`: nobody, us included, can seal
 * it and so make our own later writes fail.
 *
 * @example Keeping state across a restart
 * ```ts
 * import { MemoryFile } from "./memory_file.ts";
 * import { sendDatagram } from "./socket.ts";
 *
 * using state = MemoryFile.create("one-socket-state");
 * state.write(new TextEncoder().encode('{"connections":[]}'), 0);
 * // Hand a copy of the descriptor to systemd, which gives it back on the next start.
 * sendDatagram(
 *   Deno.env.get("NOTIFY_SOCKET")!,
 *   new TextEncoder().encode("FDSTORE=1\nFDNAME=state"),
 *   [state.fd],
 * );
 * // After the restart, fd 3 (say) is that file again:
 * using again = MemoryFile.adopt(3);
 * console.log(new TextDecoder().decode(again.read(0, again.size)));
 * ```
 */
export class MemoryFile implements Disposable {
  #fd: number;
  // What errors name: `memfd:<name>` as /proc shows it, or `fd <n>` for an adopted one.
  readonly #label: string;

  private constructor(fd: number, label: string) {
    this.#fd = fd;
    this.#label = label;
  }

  /**
   * A new, empty memory file, close-on-exec (a child we start must not
   * inherit our state). `name` is only a label (`/proc/<pid>/fd` shows
   * `/memfd:<name>`); several files may share it.
   *
   * @throws {RangeError} when `name` has a NUL byte or more than 249 bytes
   * @throws {OsError} `memfd_create` (EMFILE, ENOMEM…)
   */
  static create(name: string): MemoryFile {
    const bytes = cString(name);
    // cString would cut the name at a NUL; the kernel refuses a long one with a bare EINVAL.
    if (bytes.indexOf(0) !== bytes.length - 1) {
      throw new RangeError(`memory file name ${JSON.stringify(name)} contains a NUL byte`);
    }
    if (bytes.length - 1 > MAX_NAME_BYTES) {
      throw new RangeError(
        `memory file name must be at most ${MAX_NAME_BYTES} bytes (it is ${bytes.length - 1})`,
      );
    }
    const fd = libc.memfd_create(bytes, MFD_CLOEXEC);
    if (fd < 0) throw new OsError("memfd_create", errno(), name);
    return new MemoryFile(fd, `memfd:${name}`);
  }

  /**
   * Takes ownership of `fd`, a memory file handed back by the service
   * manager (or any regular file open for reading and writing), and makes
   * it close-on-exec: inherited descriptors are not, and a child must not
   * get our state. Refused when `fd` is not a regular file; the caller
   * then still owns it.
   *
   * @throws {Error} naming `fd` when it is not a regular file
   * @throws {OsError} `fstat` (EBADF: not open) or `fcntl F_SETFD`
   */
  static adopt(fd: number): MemoryFile {
    const label = `fd ${fd}`;
    if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`${fd} is not a descriptor`);
    if (libc.fstat(fd, statBuffer) < 0) throw new OsError("fstat", errno(), label);
    const type = readStat(statBuffer).mode & S_IFMT;
    if (type !== S_IFREG) {
      const what = FILE_TYPES[type] ?? `a file of type ${type.toString(8)}`;
      throw new Error(`fd ${fd} is ${what}, not a regular file; refusing to adopt it`);
    }
    const flags = libc.fcntl(fd, F_GETFD, 0);
    if (flags < 0 || libc.fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0) {
      throw new OsError("fcntl F_SETFD", errno(), label);
    }
    return new MemoryFile(fd, label);
  }

  /** The descriptor number, to hand on (say, to the fd store); -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /**
   * Writes all of `bytes` at `offset`; a write past the end grows the file
   * and leaves zeros in between.
   *
   * @throws {OsError} `pwrite` (ENOSPC, EFBIG…)
   */
  write(bytes: Uint8Array, offset: number): void {
    const fd = this.#requireOpen();
    requireCount(offset, "offset");
    // Linux moves at most 0x7ffff000 bytes a call, so each count fits the i32 result.
    for (let written = 0; written < bytes.length;) {
      const rest = bytes.subarray(written) as Uint8Array<ArrayBuffer>;
      const count = libc.pwrite(fd, rest, sizeArgument(rest.length), BigInt(offset + written));
      if (count < 0) {
        const code = errno();
        if (code === Errno.EINTR) continue;
        throw new OsError("pwrite", code, this.#label);
      }
      written += count;
    }
  }

  /**
   * Up to `length` bytes from `offset`: fewer only where the file ends,
   * none from at or past its end.
   *
   * @throws {OsError} `pread`
   */
  read(offset: number, length: number): Uint8Array {
    const fd = this.#requireOpen();
    requireCount(offset, "offset");
    requireCount(length, "length");
    const buffer = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const rest = buffer.subarray(done);
      const count = libc.pread(fd, rest, sizeArgument(rest.length), BigInt(offset + done));
      if (count < 0) {
        const code = errno();
        if (code === Errno.EINTR) continue;
        throw new OsError("pread", code, this.#label);
      }
      if (count === 0) break;
      done += count;
    }
    return done === length ? buffer : buffer.subarray(0, done);
  }

  /** The length of the file in bytes (`st_size`), as whoever else holds it left it. */
  get size(): number {
    if (libc.fstat(this.#requireOpen(), statBuffer) < 0) {
      throw new OsError("fstat", errno(), this.#label);
    }
    return readStat(statBuffer).size;
  }

  /**
   * Cuts the file to `length` bytes, or grows it with zeros to that length.
   *
   * @throws {OsError} `ftruncate`
   */
  truncate(length: number): void {
    const fd = this.#requireOpen();
    requireCount(length, "length");
    if (libc.ftruncate(fd, BigInt(length)) < 0) {
      throw new OsError("ftruncate", errno(), this.#label);
    }
  }

  /**
   * Closes our descriptor; further calls do nothing. The memory goes when
   * the last descriptor does: a copy in the fd store keeps the contents.
   */
  close(): void {
    if (this.#fd < 0) return;
    // Linux releases the descriptor even when close reports EINTR: never retry.
    libc.close(this.#fd);
    this.#fd = -1;
  }

  /** Same as {@link close}. */
  [Symbol.dispose](): void {
    this.close();
  }

  #requireOpen(): number {
    if (this.#fd < 0) throw new Deno.errors.BadResource(`${this.#label}: memory file is closed`);
    return this.#fd;
  }
}
