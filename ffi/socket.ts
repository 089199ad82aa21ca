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
  errno,
  F_GETFL,
  F_SETFL,
  libc,
  MSG_CMSG_CLOEXEC,
  MSG_NOSIGNAL,
  O_NONBLOCK,
  SHUT_WR,
  sizeArgument,
  SO_PEERCRED,
  SOCK_CLOEXEC,
  SOCK_NONBLOCK,
  SOCK_STREAM,
  SOL_SOCKET,
} from "./libc.ts";
import { Errno, OsError } from "./errors.ts";
import { Readiness } from "./reactor.ts";
import {
  cString,
  type MessageHeader,
  type PeerCredentials,
  readUcred,
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

/** Closes a descriptor. Linux releases it even when close reports EINTR, so never retry. */
export function closeDescriptor(fd: number): void {
  libc.close(fd);
}

function newStreamSocket(path: string): number {
  const fd = libc.socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new OsError("socket", errno(), path);
  return fd;
}

/** Binds a new nonblocking socket to `path` and listens on it. */
export function listenUnix(path: string, backlog: number): UnixSocket {
  const address = sockaddrUn(path);
  const socket = new UnixSocket(newStreamSocket(path));
  try {
    if (libc.bind(socket.fd, address, address.length) < 0) {
      throw new OsError("bind", errno(), path);
    }
    if (libc.listen(socket.fd, backlog) < 0) throw new OsError("listen", errno(), path);
    return socket;
  } catch (error) {
    socket.close();
    throw error;
  }
}

/** How long to back off when the listener's backlog is full (AF_UNIX reports EAGAIN). */
const CONNECT_RETRY_MS = [1, 2, 5, 10, 20, 50, 100];

/**
 * Connects a new nonblocking socket to the listener at `path`. A full backlog
 * is retried with a short back-off until `signal` aborts.
 */
export async function connectUnix(path: string, signal?: AbortSignal): Promise<UnixSocket> {
  const address = sockaddrUn(path);
  for (let attempt = 0;; attempt++) {
    signal?.throwIfAborted();
    const socket = new UnixSocket(newStreamSocket(path));
    if (libc.connect(socket.fd, address, address.length) === 0) return socket;
    const code = errno();
    socket.close();
    if (code !== Errno.EAGAIN) throw new OsError("connect", code, path);
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
 * A connected pair of blocking, close-on-exec stream sockets, written to
 * `into`. Blocking on purpose: the file status flags travel with a passed
 * descriptor, and its receiver (often a C program) expects a plain socket.
 * Returns 0 or -errno.
 */
export function createSocketPair(into: Int32Array<ArrayBuffer>): number {
  return libc.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, into) < 0 ? -errno() : 0;
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

/** Sends from `buffer` without raising SIGPIPE: bytes sent, or -errno. */
export function sendFrom(fd: number, buffer: Uint8Array<ArrayBuffer>): number {
  const count = libc.send(fd, buffer, sizeArgument(buffer.length), MSG_NOSIGNAL);
  return count >= 0 ? count : -errno();
}

/** Ends our sending direction; the peer reads end of stream. */
export function shutdownWrite(fd: number): void {
  if (libc.shutdown(fd, SHUT_WR) < 0) throw new OsError("shutdown", errno());
}

/** Makes a descriptor (say, one received from the broker) nonblocking. */
export function setNonblocking(fd: number): void {
  const flags = libc.fcntl(fd, F_GETFL, 0);
  if (flags < 0 || libc.fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    throw new OsError("fcntl", errno());
  }
}

const ucred = new Uint8Array(UCRED_SIZE);
const ucredLength = new Uint32Array(1);

/** The peer's pid, uid and gid as of its `connect` (`SO_PEERCRED`). */
export function peerCredentials(fd: number): PeerCredentials {
  ucredLength[0] = UCRED_SIZE;
  if (libc.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, ucred, ucredLength) < 0) {
    throw new OsError("getsockopt SO_PEERCRED", errno());
  }
  return readUcred(ucred);
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
