/**
 * {@link Delivery}: makes the pair and sends each client its `SET_PAIR` with
 * one end. The only place the broker sends descriptors.
 *
 * @module
 */

import { encodeSetPair, MESSAGE_SIZE } from "../client/protocol.ts";
import { Errno, errnoName } from "../ffi/errors.ts";
import { closeDescriptor, createSocketPair, sendMessage } from "../ffi/socket.ts";
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

/** See the module documentation. */
export class Delivery {
  /** After {@link Delivered.Failed}: what failed, with the errno name. */
  failure = "";
  // One send header and one pair for the whole broker: every call is synchronous.
  readonly #outbound = new MessageHeader(encodeSetPair() as Uint8Array<ArrayBuffer>, 1);
  readonly #pair = new Int32Array(2);

  /**
   * Sends one end of a new socketpair to each client, the waiting partner
   * first, and closes the broker's copies. The caller closes both
   * connections afterwards, whatever the outcome.
   */
  deliver(partner: Connection, newcomer: Connection): Delivered {
    const pair = this.#pair;
    const created = createSocketPair(pair);
    if (created < 0) {
      this.failure = `socketpair: ${errnoName(-created)}`;
      return Delivered.Failed;
    }
    try {
      const toPartner = this.#sendSetPair(partner, pair[0]);
      if (toPartner < 0) {
        if (clientLeft(-toPartner)) return Delivered.PartnerGone;
        this.failure = sendFailure(-toPartner, partner.id);
        return Delivered.Failed;
      }
      const toNewcomer = this.#sendSetPair(newcomer, pair[1]);
      if (toNewcomer < 0) {
        this.failure = sendFailure(-toNewcomer, newcomer.id);
        return Delivered.Failed;
      }
      return Delivered.Paired;
    } finally {
      closeDescriptor(pair[0]);
      closeDescriptor(pair[1]);
    }
  }

  /** 0 when the whole reply went out with `fd`, otherwise -errno (a short send counts as EPIPE). */
  #sendSetPair(connection: Connection, fd: number): number {
    this.#outbound.prepareSend(MESSAGE_SIZE, fd);
    const sent = sendMessage(connection.fd, this.#outbound);
    if (sent < 0) return sent;
    return sent === MESSAGE_SIZE ? 0 : -Errno.EPIPE;
  }
}
