/**
 * Byte layouts of the C structs we hand to libc, for Linux x86_64 and aarch64
 * (both LP64: pointers and `size_t` are 8 bytes). Two differ: x86_64 packs
 * `epoll_event` to 12 bytes where aarch64 pads it to 16, and `struct stat`
 * has its own x86_64 layout while aarch64 takes the generic one.
 *
 * @module
 */

import { AF_UNIX, MSG_CTRUNC, SCM_RIGHTS, SOL_SOCKET, withFfiPermission } from "./libc.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** `sizeof(sun_path)`: a filesystem path may use 107 bytes plus its NUL. */
const SUN_PATH_SIZE = 108;

/**
 * A `struct sockaddr_un` for `path`, cut to the length to pass as `socklen_t`.
 * A leading `@` names a Linux abstract socket (no file; `@name` → `\0name`).
 */
export function sockaddrUn(path: string): Uint8Array {
  const abstract = path.startsWith("@");
  const name = encoder.encode(abstract ? path.slice(1) : path);
  // A filesystem path needs its terminating NUL; an abstract name is counted exactly.
  const length = 2 + (abstract ? 1 + name.length : name.length + 1);
  if (name.length === 0 || length > 2 + SUN_PATH_SIZE) {
    throw new RangeError(
      `socket path ${JSON.stringify(path)} must be 1 to ${SUN_PATH_SIZE - 1} bytes ` +
        `(it is ${name.length})`,
    );
  }
  if (!abstract && name.includes(0)) {
    throw new RangeError(`socket path ${JSON.stringify(path)} contains a NUL byte`);
  }
  const address = new Uint8Array(length);
  address[0] = AF_UNIX; // sa_family_t is little-endian u16
  address.set(name, abstract ? 3 : 2);
  return address;
}

/** `sizeof(struct sockaddr_un)` */
export const SOCKADDR_UN_SIZE: number = 2 + SUN_PATH_SIZE;

/**
 * The path in a `struct sockaddr_un` of the length the kernel reported:
 * `@name` for an abstract address, "" for an unbound socket.
 */
export function readSockaddrUn(address: Uint8Array): string {
  const name = address.subarray(2);
  if (name.length === 0) return "";
  if (name[0] === 0) return `@${decoder.decode(name.subarray(1))}`;
  const end = name.indexOf(0);
  return decoder.decode(end < 0 ? name : name.subarray(0, end));
}

/** A NUL-terminated C string. */
export function cString(text: string): Uint8Array {
  const bytes = encoder.encode(text);
  const terminated = new Uint8Array(bytes.length + 1);
  terminated.set(bytes);
  return terminated;
}

/** `sizeof(struct epoll_event)` on this machine. */
export const EPOLL_EVENT_SIZE: number = Deno.build.arch === "x86_64" ? 12 : 16;
/** `offsetof(struct epoll_event, data)` on this machine. */
export const EPOLL_DATA_OFFSET: number = Deno.build.arch === "x86_64" ? 4 : 8;

/** Writes one `epoll_event` whose 64-bit data carries `fd` (low half) and `tag` (high half). */
export function writeEpollEvent(view: DataView, events: number, fd: number, tag: number): void {
  view.setUint32(0, events, true);
  view.setInt32(EPOLL_DATA_OFFSET, fd, true);
  view.setUint32(EPOLL_DATA_OFFSET + 4, tag, true);
}

/** `struct ucred` as `SO_PEERCRED` returns it. */
export interface PeerCredentials {
  /** Process id of the peer when it connected. */
  pid: number;
  /** Its user id. */
  uid: number;
  /** Its group id. */
  gid: number;
}

/** `sizeof(struct ucred)` */
export const UCRED_SIZE = 12;

const pointerValue = (buffer: Uint8Array): bigint =>
  withFfiPermission(() =>
    BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buffer as Uint8Array<ArrayBuffer>)))
  );

/** `CMSG_SPACE(4 * fds)`: a `cmsghdr` (16 bytes) plus the descriptors, 8-aligned. */
const cmsgSpace = (fds: number) => 16 + ((4 * fds + 7) & ~7);

/** Reads the `int` array of one SCM_RIGHTS control message. */
function collectDescriptors(control: DataView, used: number, into: number[]): void {
  let offset = 0;
  while (offset + 16 <= used) {
    const length = Number(control.getBigUint64(offset, true));
    if (length < 16) break;
    if (control.getInt32(offset + 8, true) === SOL_SOCKET) {
      if (control.getInt32(offset + 12, true) === SCM_RIGHTS) {
        for (let at = offset + 16; at + 4 <= offset + length; at += 4) {
          into.push(control.getInt32(at, true));
        }
      }
    }
    offset += (length + 7) & ~7;
  }
}

/**
 * A `struct msghdr` with one `iovec` and a control buffer, built once and
 * reused: the pointers inside are taken a single time, at construction, so
 * each `sendmsg`/`recvmsg` only rewrites lengths.
 *
 * The buffers stay referenced by this object for as long as it lives, which
 * keeps the pointers written into the header valid.
 *
 * Layout (the same on x86_64 and aarch64, 56 bytes): `msg_name` 0,
 * `msg_namelen` 8, `msg_iov` 16, `msg_iovlen` 24, `msg_control` 32,
 * `msg_controllen` 40, `msg_flags` 48.
 */
export class MessageHeader {
  /** The `struct msghdr` to pass to `sendmsg`/`recvmsg`. */
  readonly header: Uint8Array<ArrayBuffer> = new Uint8Array(56);
  /** Where the message bytes go (receive) or come from (send). */
  readonly data: Uint8Array<ArrayBuffer>;
  /** Descriptors found by the last {@link readDescriptors}. */
  readonly descriptors: number[] = [];
  readonly #headerView: DataView;
  readonly #iovec: Uint8Array<ArrayBuffer> = new Uint8Array(16);
  readonly #iovecView: DataView;
  readonly #control: Uint8Array<ArrayBuffer>;
  readonly #controlView: DataView;
  readonly #maxDescriptors: number;
  // Held only so that the msg_name pointer stays valid as long as the header.
  readonly #destination?: Uint8Array;

  /**
   * Builds the header around `data` and a control buffer of its own.
   *
   * @param data the single buffer the iovec points at
   * @param maxDescriptors room in the control buffer; the kernel closes any beyond it
   * @param destination a `struct sockaddr_un` (from {@link sockaddrUn}) that every
   *   `sendmsg` of this header goes to, for an unconnected datagram socket. Only
   *   for sending: `recvmsg` would write the sender's address over it.
   */
  constructor(data: Uint8Array<ArrayBuffer>, maxDescriptors: number, destination?: Uint8Array) {
    this.data = data;
    this.#maxDescriptors = maxDescriptors;
    this.#control = new Uint8Array(cmsgSpace(maxDescriptors));
    this.#headerView = new DataView(this.header.buffer);
    this.#iovecView = new DataView(this.#iovec.buffer);
    this.#controlView = new DataView(this.#control.buffer);
    this.#iovecView.setBigUint64(0, pointerValue(data), true);
    this.#iovecView.setBigUint64(8, BigInt(data.length), true);
    this.#headerView.setBigUint64(16, pointerValue(this.#iovec), true); // msg_iov
    this.#headerView.setBigUint64(24, 1n, true); // msg_iovlen
    this.#headerView.setBigUint64(32, pointerValue(this.#control), true); // msg_control
    if (destination !== undefined) {
      this.#destination = destination;
      this.#headerView.setBigUint64(0, pointerValue(destination), true); // msg_name
      this.#headerView.setUint32(8, destination.length, true); // msg_namelen
    }
  }

  /** Prepares to receive at most `length` bytes and `maxDescriptors` descriptors. */
  prepareReceive(length: number): void {
    this.#iovecView.setUint32(8, length, true);
    this.#headerView.setUint32(40, this.#control.length, true);
    this.#headerView.setInt32(48, 0, true);
  }

  /**
   * Prepares to send the first `length` bytes of `data`, with `fd` attached
   * unless it is -1, and `second` after it unless that is -1 (the header
   * must have room for two).
   */
  prepareSend(length: number, fd: number, second = -1): void {
    this.#iovecView.setUint32(8, length, true);
    if (fd < 0) {
      this.#headerView.setUint32(40, 0, true);
      return;
    }
    const count = second < 0 ? 1 : 2;
    this.#controlView.setBigUint64(0, count === 1 ? 20n : 24n, true); // CMSG_LEN(count * sizeof(int))
    this.#controlView.setInt32(8, SOL_SOCKET, true);
    this.#controlView.setInt32(12, SCM_RIGHTS, true);
    this.#controlView.setInt32(16, fd, true);
    if (count === 2) this.#controlView.setInt32(20, second, true);
    this.#headerView.setUint32(40, cmsgSpace(count), true);
  }

  /**
   * Prepares to send the first `length` bytes of `data` with all of `fds` in
   * one SCM_RIGHTS control message (none at all when `fds` is empty). Not
   * for the hot path, which has {@link prepareSend}: this one checks its
   * arguments, since a wrong length would have the kernel read past `data`
   * and a fractional descriptor would be sent as another one. The kernel
   * takes at most 253 descriptors in one message (`SCM_MAX_FD`), EINVAL
   * beyond.
   *
   * @throws {RangeError} when `length` is not within `data`, a descriptor is
   *   not a non-negative integer, or there are more descriptors than the
   *   header was built for
   */
  prepareSendDescriptors(length: number, fds: readonly number[]): void {
    if (!Number.isInteger(length) || length < 0 || length > this.data.length) {
      throw new RangeError(`cannot send ${length} bytes of a ${this.data.length}-byte buffer`);
    }
    const count = fds.length;
    if (count > this.#maxDescriptors) {
      throw new RangeError(
        `${count} descriptors do not fit a message header built for ${this.#maxDescriptors}`,
      );
    }
    // All checked before anything is written: a refused call leaves the header as it was.
    for (const fd of fds) {
      if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) {
        throw new RangeError(`${fd} is not a descriptor`);
      }
    }
    this.#iovecView.setUint32(8, length, true);
    if (count === 0) {
      this.#headerView.setUint32(40, 0, true);
      return;
    }
    this.#controlView.setBigUint64(0, BigInt(16 + 4 * count), true); // CMSG_LEN(count * sizeof(int))
    this.#controlView.setInt32(8, SOL_SOCKET, true);
    this.#controlView.setInt32(12, SCM_RIGHTS, true);
    for (let i = 0; i < count; i++) this.#controlView.setInt32(16 + 4 * i, fds[i], true);
    this.#headerView.setUint32(40, cmsgSpace(count), true);
  }

  /**
   * After a successful `recvmsg`: fills {@link descriptors} with what arrived
   * and returns true when the kernel had to drop some (MSG_CTRUNC).
   */
  readDescriptors(): boolean {
    this.descriptors.length = 0;
    const used = this.#headerView.getUint32(40, true);
    if (used > 0) collectDescriptors(this.#controlView, used, this.descriptors);
    return (this.#headerView.getInt32(48, true) & MSG_CTRUNC) !== 0;
  }
}

/** A `struct rlimit` (two 64-bit counts). */
export const RLIMIT_SIZE = 16;

/** The fields of a `struct stat` that decide whether a file may be trusted. */
export interface StatFields {
  /** Device of the file system. */
  dev: bigint;
  /** Inode number; with `dev`, the file's identity. */
  ino: bigint;
  /** Type and permission bits (`st_mode`). */
  mode: number;
  /** Hard links to the inode. */
  nlink: number;
  /** Owner. */
  uid: number;
  /** Group. */
  gid: number;
  /** Bytes in the file. */
  size: number;
}

const STAT_X86_64 = { size: 144, nlink: 16, mode: 24, uid: 28, gid: 32 };
// aarch64 takes the generic layout: st_mode before a 32-bit st_nlink.
const STAT_AARCH64 = { size: 128, nlink: 20, mode: 16, uid: 24, gid: 28 };
const statLayout = Deno.build.arch === "x86_64" ? STAT_X86_64 : STAT_AARCH64;

/** `sizeof(struct stat)` on this machine. */
export const STAT_SIZE: number = statLayout.size;

/** Reads the fields we use from a `struct stat` filled by `fstat`. */
export function readStat(bytes: Uint8Array): StatFields {
  const view = new DataView(bytes.buffer, bytes.byteOffset, STAT_SIZE);
  const x86 = statLayout === STAT_X86_64;
  return {
    dev: view.getBigUint64(0, true),
    ino: view.getBigUint64(8, true),
    mode: view.getUint32(statLayout.mode, true),
    nlink: x86
      ? Number(view.getBigUint64(statLayout.nlink, true))
      : view.getUint32(statLayout.nlink, true),
    uid: view.getUint32(statLayout.uid, true),
    gid: view.getUint32(statLayout.gid, true),
    // st_size is at 48 in both.
    size: Number(view.getBigInt64(48, true)),
  };
}

/** `sizeof(struct flock)`: `short l_type, l_whence; off_t l_start, l_len; pid_t l_pid`, padded. */
export const FLOCK_SIZE = 32;

/**
 * A `struct flock` over the whole file (`l_start` 0 from `whence`, `l_len` 0:
 * to its end, however it grows) of lock type `type`, `l_pid` 0 as the
 * `F_OFD_*` commands require.
 */
export function wholeFileLock(type: number, whence: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(FLOCK_SIZE);
  const view = new DataView(bytes.buffer);
  view.setInt16(0, type, true); // l_type
  view.setInt16(2, whence, true); // l_whence; l_start (8), l_len (16), l_pid (24) stay 0
  return bytes;
}

/** The `l_type` of a `struct flock` (what F_OFD_GETLK wrote back). */
export function readFlockType(bytes: Uint8Array): number {
  return new DataView(bytes.buffer, bytes.byteOffset, FLOCK_SIZE).getInt16(0, true);
}
