/**
 * Unix stream sockets over libc: typed wrappers that hide pointers and errno.
 *
 * Calls on the broker's hot path return a count or minus the errno (the
 * kernel's own convention), so that `EAGAIN` costs no exception. Everything
 * else throws {@link OsError}.
 *
 * @module
 */

import {
  AF_UNIX,
  AT_FDCWD,
  AT_SYMLINK_NOFOLLOW,
  errno,
  F_GETFD,
  F_GETFL,
  F_SETFD,
  F_SETFL,
  FD_CLOEXEC,
  FIONREAD,
  libc,
  MSG_CMSG_CLOEXEC,
  MSG_DONTWAIT,
  MSG_NOSIGNAL,
  MSG_PEEK,
  MSG_TRUNC,
  O_NONBLOCK,
  SHUT_WR,
  sizeArgument,
  SO_ACCEPTCONN,
  SO_DOMAIN,
  SO_PEERCRED,
  SO_PEERPIDFD,
  SO_TYPE,
  SOCK_CLOEXEC,
  SOCK_DGRAM,
  SOCK_NONBLOCK,
  SOCK_SEQPACKET,
  SOCK_STREAM,
  SOL_SOCKET,
} from "./libc.ts";
import { Errno, OsError } from "./errors.ts";
import { Readiness } from "./reactor.ts";
import {
  cString,
  MessageHeader,
  type PeerCredentials,
  readSockaddrUn,
  SOCKADDR_UN_SIZE,
  sockaddrUn,
  UCRED_SIZE,
} from "./structs.ts";

/**
 * A socket descriptor and its single owner: closed exactly once, by
 * {@link close} or `using`, unless {@link detach} handed it on.
 */
export class UnixSocket implements Disposable {
  #fd: number;
  #readiness?: Readiness;

  /** Takes ownership of `fd`. */
  constructor(fd: number) {
    this.#fd = fd;
  }

  /** The descriptor number; -1 once closed or detached. */
  get fd(): number {
    return this.#fd;
  }

  /** Readiness promises for this descriptor (registers it with the reactor on first wait). */
  get readiness(): Readiness {
    return this.#readiness ??= new Readiness(this.#fd);
  }

  /** Gives up ownership: the caller now closes the returned descriptor. */
  detach(): number {
    const fd = this.#requireOpen("detach");
    this.#readiness?.cancel(false);
    this.#fd = -1;
    return fd;
  }

  /** Closes the descriptor; further calls do nothing. */
  close(): void {
    if (this.#fd < 0) return;
    this.#readiness?.cancel(true);
    closeDescriptor(this.#fd);
    this.#fd = -1;
  }

  /** Same as {@link close}. */
  [Symbol.dispose](): void {
    this.close();
  }

  #requireOpen(operation: string): number {
    if (this.#fd < 0) throw new Deno.errors.BadResource(`${operation}: socket is closed`);
    return this.#fd;
  }
}

/**
 * Closes a descriptor: 0, or -errno (`EBADF`: it was not open). Linux
 * releases it even when close reports EINTR, so never retry.
 */
export function closeDescriptor(fd: number): number {
  return libc.close(fd) < 0 ? -errno() : 0;
}

function newSocket(type: number, path: string): number {
  const fd = libc.socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new OsError("socket", errno(), path);
  return fd;
}

/**
 * A new nonblocking socket of `type` bound to `path`, then `prepare`d. With
 * `fileMode`, the socket file is created with at most those permission bits
 * (less the umask): Linux gives it the mode of the socket's inode at `bind`.
 */
function boundSocket(
  type: number,
  path: string,
  prepare?: (fd: number) => void,
  fileMode?: number,
): UnixSocket {
  const address = sockaddrUn(path);
  const socket = new UnixSocket(newSocket(type, path));
  try {
    if (fileMode !== undefined && libc.fchmod(socket.fd, fileMode) < 0) {
      throw new OsError("fchmod", errno(), path);
    }
    if (libc.bind(socket.fd, address, address.length) < 0) {
      throw new OsError("bind", errno(), path);
    }
    prepare?.(socket.fd);
    return socket;
  } catch (error) {
    socket.close();
    throw error;
  }
}

/** Who may connect to a socket file (connecting needs write permission on it). */
export interface SocketFileAccess {
  /** Permission bits, e.g. `0o660`. Default: what the umask leaves of 0777, as `bind` makes it. */
  mode?: number;
  /** Group to own the file. Default: the process's. */
  gid?: number;
}

/** The process umask. Set to 0777 for an instant: any file created meanwhile comes out narrower. */
function currentUmask(): number {
  const mask = libc.umask(0o777);
  libc.umask(mask);
  return mask;
}

/**
 * Binds a new nonblocking socket to `path` and listens on it. With `access`,
 * the file is never more open than asked: it is created with at most the
 * owner's share of the mode while its group is still the process's, then
 * given its group and full mode, and only then does the socket listen
 * (before `listen`, a connect is refused whatever the file's mode).
 */
export function listenUnix(
  path: string,
  backlog: number,
  access: SocketFileAccess = {},
): UnixSocket {
  const { mode, gid } = access;
  const restricted = mode !== undefined || gid !== undefined;
  // A mode that opens the file to a group must not briefly apply to the old group.
  const bindMode = gid === undefined ? mode : (mode ?? 0o777) & 0o700;
  return boundSocket(SOCK_STREAM, path, (fd) => {
    if (restricted) setGroupAndMode(path, gid, mode ?? (0o777 & ~currentUmask()));
    if (libc.listen(fd, backlog) < 0) throw new OsError("listen", errno(), path);
  }, bindMode);
}

/**
 * Sets the group, then the permission bits, of the file at `path` itself:
 * neither call follows a symlink that may have replaced our file.
 */
function setGroupAndMode(path: string, gid: number | undefined, mode: number): void {
  const name = cString(path);
  // (uid_t)-1 leaves the owner as it is.
  if (gid !== undefined && libc.lchown(name, 0xffffffff, gid) < 0) {
    throw new OsError("chown", errno(), path);
  }
  if (libc.fchmodat(AT_FDCWD, name, mode, AT_SYMLINK_NOFOLLOW) < 0) {
    throw new OsError("chmod", errno(), path);
  }
}

/** Binds a new nonblocking datagram socket to `path`, to receive with {@link receiveDatagram}. */
export function bindDatagram(path: string): UnixSocket {
  return boundSocket(SOCK_DGRAM, path);
}

/**
 * Sends one datagram to the socket bound at `path` (`@name`: abstract), from
 * a fresh unbound socket (as sd_notify does). Nonblocking: a receiver whose
 * queue is full costs an `EAGAIN`, never a stalled caller.
 *
 * With `descriptors`, they travel in the same datagram (one SCM_RIGHTS
 * message, at most 253), as systemd's `FDSTORE=1` wants them; the receiver
 * gets its own copies, ours stay open. Errors are {@link OsError}s naming
 * `path`: `sendmsg` with descriptors, `sendto` without.
 */
export function sendDatagram(
  path: string,
  bytes: Uint8Array<ArrayBuffer>,
  descriptors: readonly number[] = [],
): void {
  const address = sockaddrUn(path);
  // Built and checked before the socket: a RangeError costs no descriptor.
  const message = descriptors.length === 0
    ? undefined
    : new MessageHeader(bytes, descriptors.length, address);
  message?.prepareSendDescriptors(bytes.length, descriptors);
  using socket = new UnixSocket(newSocket(SOCK_DGRAM, path));
  if (message !== undefined) {
    if (libc.sendmsg(socket.fd, message.header, MSG_NOSIGNAL) < 0) {
      throw new OsError("sendmsg", errno(), path);
    }
    return;
  }
  const sent = libc.sendto(
    socket.fd,
    bytes,
    sizeArgument(bytes.length),
    MSG_NOSIGNAL,
    address,
    address.length,
  );
  if (sent < 0) throw new OsError("sendto", errno(), path);
}

/** The next datagram already queued on `socket` (a view into `buffer`), or undefined. */
export function pollDatagram(
  socket: UnixSocket,
  buffer: Uint8Array<ArrayBuffer>,
): Uint8Array | undefined {
  const count = readInto(socket.fd, buffer);
  if (count >= 0) return buffer.subarray(0, count);
  if (count === -Errno.EAGAIN) return undefined;
  throw new OsError("recv", -count);
}

/** Waits for the next datagram on `socket` and returns it (a view into `buffer`). */
export async function receiveDatagram(
  socket: UnixSocket,
  buffer: Uint8Array<ArrayBuffer>,
): Promise<Uint8Array> {
  for (;;) {
    const datagram = pollDatagram(socket, buffer);
    if (datagram !== undefined) return datagram;
    await socket.readiness.readable();
  }
}

// A client connects to the same broker path again and again: encode it once.
let lastPath = "";
let lastAddress: Uint8Array = new Uint8Array(0);

function addressOf(path: string): Uint8Array {
  if (path !== lastPath) {
    lastAddress = sockaddrUn(path);
    lastPath = path;
  }
  return lastAddress;
}

/** How long to back off when the listener's backlog is full (AF_UNIX reports EAGAIN). */
const CONNECT_RETRY_MS = [1, 2, 5, 10, 20, 50, 100];

/**
 * One attempt of {@link connectUnix}, synchronous: the connected socket, or
 * undefined when the listener's backlog is full (`EAGAIN`).
 */
export function tryConnectUnix(path: string): UnixSocket | undefined {
  const address = addressOf(path);
  const socket = new UnixSocket(newSocket(SOCK_STREAM, path));
  if (libc.connect(socket.fd, address, address.length) === 0) return socket;
  const code = errno();
  socket.close();
  if (code !== Errno.EAGAIN) throw new OsError("connect", code, path);
  return undefined;
}

/**
 * Connects a new nonblocking socket to the listener at `path`. A full backlog
 * is retried with a short back-off until `signal` aborts.
 */
export async function connectUnix(path: string, signal?: AbortSignal): Promise<UnixSocket> {
  for (let attempt = 0;; attempt++) {
    signal?.throwIfAborted();
    const socket = tryConnectUnix(path);
    if (socket !== undefined) return socket;
    const delay = CONNECT_RETRY_MS[Math.min(attempt, CONNECT_RETRY_MS.length - 1)];
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

/** Accepts one pending connection: its descriptor (nonblocking, close-on-exec), or -errno. */
export function acceptConnection(listenFd: number): number {
  const fd = libc.accept4(listenFd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
  return fd >= 0 ? fd : -errno();
}

/**
 * A connected pair of blocking, close-on-exec sockets of `type`
 * (`SOCK_STREAM` by default), written to `into`. Blocking on purpose: the
 * file status flags travel with a passed descriptor, and its receiver (often
 * a C program) expects a plain socket. Returns 0 or -errno.
 */
export function createSocketPair(
  into: Int32Array<ArrayBuffer>,
  type: number = SOCK_STREAM,
): number {
  return libc.socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, into) < 0 ? -errno() : 0;
}

/**
 * A pidfd of the peer of `fd` as of its `connect` (`SO_PEERPIDFD`, Linux
 * 6.5), close-on-exec; or -errno (`ENOPROTOOPT` on older kernels, `ESRCH`
 * when the peer process is gone).
 */
export function peerPidfd(fd: number): number {
  intOptionLength[0] = 4;
  if (libc.getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, intOption, intOptionLength) < 0) {
    return -errno();
  }
  return intOption[0];
}

/** `sendmsg` of `header`'s prepared message: bytes sent, or -errno. */
export function sendMessage(fd: number, header: MessageHeader): number {
  const sent = libc.sendmsg(fd, header.header, MSG_NOSIGNAL);
  return sent >= 0 ? sent : -errno();
}

/**
 * `recvmsg` into `header` (descriptors arrive close-on-exec): bytes received
 * (0 at end of stream), or -errno. Then read `header.descriptors`.
 */
export function receiveMessage(fd: number, header: MessageHeader): number {
  const received = libc.recvmsg(fd, header.header, MSG_CMSG_CLOEXEC);
  return received >= 0 ? received : -errno();
}

/** Reads into `buffer`: bytes read (0 at end of stream), or -errno. */
export function readInto(fd: number, buffer: Uint8Array<ArrayBuffer>): number {
  const count = libc.read(fd, buffer, sizeArgument(buffer.length));
  return count >= 0 ? count : -errno();
}

const peekByte = new Uint8Array(1);

/**
 * The length of the next message queued on a `SOCK_SEQPACKET` or
 * `SOCK_DGRAM` socket, left queued (`recv` with `MSG_PEEK | MSG_TRUNC`), or
 * -errno (`EAGAIN`: none yet). On seqpacket, 0 is end of stream (or an
 * empty message, which the kernel does not tell apart).
 */
export function nextMessageLength(fd: number): number {
  const length = libc.recv(fd, peekByte, sizeArgument(1), MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
  return length >= 0 ? length : -errno();
}

/** Sends from `buffer` without raising SIGPIPE: bytes sent, or -errno. */
export function sendFrom(fd: number, buffer: Uint8Array<ArrayBuffer>): number {
  const count = libc.send(fd, buffer, sizeArgument(buffer.length), MSG_NOSIGNAL);
  return count >= 0 ? count : -errno();
}

/** Ends our sending direction; the peer reads end of stream. */
export function shutdownWrite(fd: number): void {
  if (libc.shutdown(fd, SHUT_WR) < 0) throw new OsError("shutdown", errno());
}

const unreadCount = new Int32Array(1);

/** Bytes the kernel holds for `fd` that nobody has read yet (`FIONREAD`). */
export function unreadBytes(fd: number): number {
  if (libc.ioctl_int(fd, sizeArgument(FIONREAD), unreadCount) < 0) {
    throw new OsError("ioctl FIONREAD", errno(), `fd ${fd}`);
  }
  return unreadCount[0];
}

/** Makes a descriptor (say, one received from the broker) nonblocking. */
export function setNonblocking(fd: number): void {
  const flags = libc.fcntl(fd, F_GETFL, 0);
  if (flags < 0 || libc.fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    throw new OsError("fcntl", errno());
  }
}

// struct ucred { pid_t pid; uid_t uid; gid_t gid; }, read in place: no view allocated per call.
const ucred = new Uint32Array(UCRED_SIZE / 4);
const ucredLength = new Uint32Array(1);

/** The peer's pid, uid and gid as of its `connect` (`SO_PEERCRED`). */
export function peerCredentials(fd: number): PeerCredentials {
  readPeerCredentials(fd);
  return { pid: ucred[0] | 0, uid: ucred[1], gid: ucred[2] };
}

/** The peer's uid alone, as of its `connect`: no object allocated. */
export function peerUid(fd: number): number {
  readPeerCredentials(fd);
  return ucred[1];
}

function readPeerCredentials(fd: number): void {
  ucredLength[0] = UCRED_SIZE;
  if (libc.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ucred, ucredLength) < 0) {
    throw new OsError("getsockopt SO_PEERCRED", errno());
  }
}

const DOMAIN_NAMES: Record<number, string> = { [AF_UNIX]: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6" };
const TYPE_NAMES: Record<number, string> = {
  [SOCK_STREAM]: "SOCK_STREAM",
  [SOCK_DGRAM]: "SOCK_DGRAM",
  [SOCK_SEQPACKET]: "SOCK_SEQPACKET",
};

/** What a socket descriptor is, as `getsockopt` tells. */
export interface SocketKind {
  /** Its address family: `AF_UNIX`, `AF_INET`… */
  domain: string;
  /** Its type: `SOCK_STREAM`, `SOCK_DGRAM`… */
  type: string;
  /** Whether `listen` was called on it. */
  listening: boolean;
}

const intOption = new Int32Array(1);
const intOptionLength = new Uint32Array(1);

function socketOption(fd: number, option: number, name: string): number {
  intOptionLength[0] = 4;
  if (libc.getsockopt(fd, SOL_SOCKET, option, intOption, intOptionLength) < 0) {
    throw new OsError(`getsockopt ${name}`, errno(), `fd ${fd}`);
  }
  return intOption[0];
}

/** Family, type and listening state of `fd`; `ENOTSOCK` when it is not a socket. */
export function socketKind(fd: number): SocketKind {
  const domain = socketOption(fd, SO_DOMAIN, "SO_DOMAIN");
  const type = socketOption(fd, SO_TYPE, "SO_TYPE");
  return {
    domain: DOMAIN_NAMES[domain] ?? `AF_${domain}`,
    type: TYPE_NAMES[type] ?? `SOCK_${type}`,
    listening: socketOption(fd, SO_ACCEPTCONN, "SO_ACCEPTCONN") !== 0,
  };
}

/** The path a Unix socket is bound to (`@name` when abstract, "" when unbound). */
export function socketPath(fd: number): string {
  const address = new Uint8Array(SOCKADDR_UN_SIZE);
  const length = new Uint32Array([SOCKADDR_UN_SIZE]);
  if (libc.getsockname(fd, address, length) < 0) {
    throw new OsError("getsockname", errno(), `fd ${fd}`);
  }
  return readSockaddrUn(address.subarray(0, length[0]));
}

/**
 * Sets or clears close-on-exec on `fd`: an inherited descriptor stays ours
 * alone, and one meant for a child can be handed over.
 */
export function setCloseOnExec(fd: number, on: boolean): void {
  const flags = libc.fcntl(fd, F_GETFD, 0);
  const wanted = on ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC;
  if (flags < 0 || libc.fcntl(fd, F_SETFD, wanted) < 0) {
    throw new OsError("fcntl F_SETFD", errno(), `fd ${fd}`);
  }
}

/** Removes a socket file; a missing file is not an error. */
export function unlinkPath(path: string): void {
  if (libc.unlink(cString(path)) < 0 && errno() !== Errno.ENOENT) {
    throw new OsError("unlink", errno(), path);
  }
}

/** The real user id of this process. */
export function currentUid(): number {
  return libc.getuid();
}
