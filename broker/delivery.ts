/**
 * {@link Delivery}: makes the pair and sends each client its `SET_PAIR` with
 * one end (v1's fixed 1044 bytes, or v2's with the partner's credentials and,
 * if asked for, its pidfd), and v2's `HELLO` and `REFUSED`. The only place
 * the broker sends descriptors or replies.
 *
 * @module
 */

import { encodeSetPair, MESSAGE_SIZE } from "../client/protocol.ts";
import {
  Capability,
  encodeHello,
  encodeRefused,
  encodeSetPair as encodeSetPairV2,
  HELLO_SIZE,
  SET_PAIR_SIZE as V2_SET_PAIR_SIZE,
  type SetPair as SetPairV2,
  SOCKET_TYPES,
} from "../client/protocol_v2.ts";
import { Errno, errnoName } from "../ffi/errors.ts";
import { SOCK_DGRAM, SOCK_SEQPACKET, SOCK_STREAM } from "../ffi/libc.ts";
import {
  closeDescriptor,
  createSocketPair,
  peerPidfd,
  sendFrom,
  sendMessage,
} from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import type { Connection } from "./connections.ts";

/** How one delivery ended. */
export const Delivered = {
  /** Both clients have their end. */
  Paired: 0,
  /** The waiting partner had gone before anything reached it: match the newcomer again. */
  PartnerGone: 1,
  /** Neither has a usable pair; {@link Delivery.failure} says why. */
  Failed: 2,
} as const;
/** One of {@link Delivered}'s values. */
export type Delivered = typeof Delivered[keyof typeof Delivered];

/** Send errors that mean the receiving client has closed its connection. */
function clientLeft(errno: number): boolean {
  return errno === Errno.EPIPE || errno === Errno.ECONNRESET || errno === Errno.ENOTCONN;
}

/** Why a send of a descriptor failed, for the log: the errno name and what it means here. */
function sendFailure(errno: number, id: number): string {
  const code = errnoName(errno);
  if (errno === Errno.ETOOMANYREFS) {
    return `sendmsg to client ${id}: ${code} (descriptors in flight to clients that do not ` +
      "read their replies exceed the broker's RLIMIT_NOFILE)";
  }
  return `sendmsg to client ${id}: ${code}`;
}

/** Wire socket types (0 stream, 1 seqpacket, 2 dgram) as `socketpair` types. */
const SOCKETPAIR_TYPES = [SOCK_STREAM, SOCK_SEQPACKET, SOCK_DGRAM];

/** Whether this kernel hands out pidfds of socket peers (`SO_PEERPIDFD`, Linux 6.5). */
function kernelHasPeerPidfd(): boolean {
  const pair = new Int32Array(2);
  if (createSocketPair(pair) < 0) return false;
  const pidfd = peerPidfd(pair[0]);
  closeDescriptor(pair[0]);
  closeDescriptor(pair[1]);
  if (pidfd < 0) return false;
  closeDescriptor(pidfd);
  return true;
}

/** See the module documentation. */
export class Delivery {
  /** After {@link Delivered.Failed}: what failed, with the errno name. */
  failure = "";
  /** After {@link Delivered.Failed}: the client a send to failed; undefined if no pair was made. */
  failedSide: Connection | undefined = undefined;
  /** Protocol v2 capability bits of this broker. */
  readonly capabilities: number = Capability.Listen | Capability.Seqpacket | Capability.Dgram |
    (kernelHasPeerPidfd() ? Capability.Pidfd : 0);
  // One send header per reply format and one pair for the whole broker: every call is synchronous.
  readonly #outbound = new MessageHeader(encodeSetPair() as Uint8Array<ArrayBuffer>, 1);
  readonly #outboundV2 = new MessageHeader(new Uint8Array(V2_SET_PAIR_SIZE), 2);
  readonly #reply: SetPairV2 = {
    delivery: "socketpair",
    type: "stream",
    descriptors: 1,
    peer: { pid: 0, uid: 0, gid: 0 },
    peerListener: false,
    peerVersion: 1,
    capabilities: this.capabilities,
    peerId: 0,
  };
  readonly #hello = new Uint8Array(HELLO_SIZE);
  readonly #pair = new Int32Array(2);

  /**
   * Sends one end of a new socketpair (of their requests' type) to each
   * client, `first` first, each in the `SET_PAIR` of its protocol version,
   * and closes the broker's copies. The caller closes the clients it no
   * longer needs afterwards, whatever the outcome.
   */
  deliver(first: Connection, second: Connection): Delivered {
    this.failedSide = undefined;
    const pair = this.#pair;
    const created = createSocketPair(pair, SOCKETPAIR_TYPES[first.socketType]);
    if (created < 0) {
      this.failure = `socketpair: ${errnoName(-created)}`;
      return Delivered.Failed;
    }
    try {
      const toFirst = this.#sendSetPair(first, second, pair[0]);
      if (toFirst < 0) {
        if (clientLeft(-toFirst)) return Delivered.PartnerGone;
        this.failure = sendFailure(-toFirst, first.id);
        this.failedSide = first;
        return Delivered.Failed;
      }
      const toSecond = this.#sendSetPair(second, first, pair[1]);
      if (toSecond < 0) {
        this.failure = sendFailure(-toSecond, second.id);
        this.failedSide = second;
        return Delivered.Failed;
      }
      return Delivered.Paired;
    } finally {
      closeDescriptor(pair[0]);
      closeDescriptor(pair[1]);
    }
  }

  /**
   * Sends a v2 client its `HELLO`: its request is accepted and waits (or it
   * listens, with `backlog`). Returns false if it could not be sent whole.
   */
  sendHello(connection: Connection, backlog: number): boolean {
    encodeHello(this.capabilities, backlog, this.#hello);
    return sendFrom(connection.fd, this.#hello) === HELLO_SIZE;
  }

  /**
   * Tells a client why it is about to be closed, if it hears reasons (a v2
   * client whose request was valid; v1 has no word for it). Best effort: it
   * may be gone.
   */
  refuse(connection: Connection, reason: string): void {
    // A closed connection's descriptor number may be someone else's already.
    if (!connection.hearsReasons || !connection.isOpen) return;
    sendFrom(connection.fd, encodeRefused(reason) as Uint8Array<ArrayBuffer>);
  }

  /**
   * 0 when the whole reply went out with `fd` (and the partner's pidfd, if
   * asked for and to be had), otherwise -errno (a short send counts as EPIPE).
   */
  #sendSetPair(connection: Connection, partner: Connection, fd: number): number {
    if (connection.version === 1) {
      this.#outbound.prepareSend(MESSAGE_SIZE, fd);
      return this.#sent(sendMessage(connection.fd, this.#outbound), MESSAGE_SIZE);
    }
    const pidfd = connection.wantsPidfd && (this.capabilities & Capability.Pidfd) !== 0
      ? peerPidfd(partner.fd)
      : -1;
    try {
      const reply = this.#reply;
      reply.type = SOCKET_TYPES[connection.socketType];
      reply.descriptors = pidfd < 0 ? 1 : 2;
      reply.peer = partner.peer;
      reply.peerListener = partner.registration !== undefined;
      reply.peerVersion = partner.version;
      reply.peerId = partner.id >>> 0;
      encodeSetPairV2(reply, this.#outboundV2.data);
      this.#outboundV2.prepareSend(V2_SET_PAIR_SIZE, fd, pidfd);
      return this.#sent(sendMessage(connection.fd, this.#outboundV2), V2_SET_PAIR_SIZE);
    } finally {
      if (pidfd >= 0) closeDescriptor(pidfd);
    }
  }

  #sent(sent: number, size: number): number {
    if (sent < 0) return sent;
    return sent === size ? 0 : -Errno.EPIPE;
  }
}
