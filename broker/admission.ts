/**
 * {@link Admission}: who may wait, and who leaves when the broker is full.
 *
 * - The authorizer (an access policy) and uid isolation decide each request.
 * - Per uid: at most `maxIncompletePerUid` connections still sending their
 *   request (dbus-daemon's anchor: 64) and `maxWaitingPerUid` waiting; both
 *   can be set for single uids.
 * - At capacity, a newcomer that must stay takes the place of the oldest
 *   connection of the uid holding the most (its listeners last), unless that
 *   is its own uid: one uid can fill the broker only until another uid comes.
 *
 * A request that pairs at once is never refused for a limit: it frees
 * capacity rather than taking it.
 *
 * @module
 */

import { describeKey, type Mode } from "../client/protocol.ts";
import { SOCKET_TYPES } from "../client/protocol_v2.ts";
import type { AccessDecision, AccessRequest } from "./broker.ts";
import type { Connection, ConnectionTable, UidAccount } from "./connections.ts";
import { NO_SCOPE } from "./matcher.ts";
import type { DropReason } from "./metrics.ts";

/** Limits of one uid, overriding the broker's per-uid defaults. */
export interface UidLimits {
  /** Most of its clients waiting at once. */
  maxWaiting?: number;
  /** Most of its connections still sending their request. */
  maxIncomplete?: number;
}

/** How {@link Admission} is set up; see `BrokerOptions` for each. */
export interface AdmissionOptions {
  authorize?: (request: AccessRequest) => AccessDecision;
  isolateUids?: boolean;
  maxConnections?: number;
  maxWaitingPerUid?: number;
  maxIncompletePerUid?: number;
  maxListenersPerUid?: number;
  uidLimits?: ReadonlyMap<number, UidLimits>;
}

/** Default most connections of one uid still sending their request. */
export const DEFAULT_MAX_INCOMPLETE_PER_UID = 64;

/** Default most listeners of one uid. */
export const DEFAULT_MAX_LISTENERS_PER_UID = 16;

/** The scope of keys a policy lets pair across uids: `(uid_t)-1` is nobody's uid (and not NO_SCOPE). */
const CROSS_UID_SCOPE = 0xffffffff;

/** A refusal: the drop reason for the metrics and the log line's detail. */
export interface Refusal {
  reason: DropReason;
  detail: string;
}

/** See the module documentation. */
export class Admission {
  /** Most client connections open at once (Infinity: only the kernel's limit). */
  readonly capacity: number;
  readonly #options: AdmissionOptions;
  readonly #table: ConnectionTable;
  /** Whether requests need a decision at all: most brokers run with neither option. */
  readonly #decides: boolean;

  constructor(options: AdmissionOptions, table: ConnectionTable) {
    this.#options = options;
    this.#table = table;
    this.capacity = options.maxConnections ?? Infinity;
    this.#decides = options.authorize !== undefined || options.isolateUids === true;
  }

  /**
   * Applies the authorizer and uid isolation to a validated request (or,
   * with `listen`, a registration) whose key is in `frame`. Returns the scope the matcher should file the key in
   * ({@link NO_SCOPE} unless uids are isolated), or a {@link Refusal}. With
   * neither option it only returns: nothing is read or built.
   */
  scopeFor(
    connection: Connection,
    frame: Uint8Array,
    keyOffset: number,
    keyLength: number,
    mode: Mode,
    listen: boolean,
  ): number | Refusal {
    if (!this.#decides) return NO_SCOPE;
    const { authorize, isolateUids } = this.#options;
    let crossUid = false;
    if (authorize) {
      const key = frame.slice(keyOffset, keyOffset + keyLength);
      const type = SOCKET_TYPES[connection.socketType];
      const decision = authorize({ key, mode, peer: connection.peer, listen, type });
      if (!decision.allowed) {
        const what = listen
          ? `listening on key "${describeKey(key)}"`
          : `key "${describeKey(key)}"`;
        return {
          reason: "policy",
          detail: `${what} as ${mode} denied by ${decision.rule}`,
        };
      }
      crossUid = decision.crossUid ?? false;
    }
    if (!isolateUids) return NO_SCOPE;
    // Every key gets a scope, cross-uid ones too: a raw key could otherwise be
    // crafted to equal another user's scoped one.
    return crossUid ? CROSS_UID_SCOPE : connection.uid;
  }

  /** Why `connection` may not go on sending its request, if it may not. */
  refuseIncomplete(connection: Connection): Refusal | undefined {
    const uid = connection.uid;
    const limit = this.#options.uidLimits?.get(uid)?.maxIncomplete ??
      this.#options.maxIncompletePerUid ?? DEFAULT_MAX_INCOMPLETE_PER_UID;
    const incomplete = this.#table.account(uid)?.incomplete ?? 0;
    if (incomplete < limit) return undefined;
    return {
      reason: "incomplete_limit",
      detail: `uid ${uid} already has ${incomplete} connections sending their request`,
    };
  }

  /** Why `connection` may not wait, if it may not. */
  refuseWaiting(connection: Connection): Refusal | undefined {
    const { maxWaitingPerUid, uidLimits } = this.#options;
    if (maxWaitingPerUid === undefined && uidLimits === undefined) return undefined;
    const uid = connection.uid;
    const limit = uidLimits?.get(uid)?.maxWaiting ?? maxWaitingPerUid ?? Infinity;
    const waiting = this.#table.account(uid)?.waiting ?? 0;
    if (waiting < limit) return undefined;
    return { reason: "uid_limit", detail: `uid ${uid} already has ${waiting} clients waiting` };
  }

  /**
   * Why `connection` may not register as a listener, if it may not: its uid
   * has `maxListenersPerUid` already. A walk over the listeners, which are
   * few and register rarely.
   */
  refuseListening(connection: Connection): Refusal | undefined {
    const limit = this.#options.maxListenersPerUid ?? DEFAULT_MAX_LISTENERS_PER_UID;
    const uid = connection.uid;
    let held = 0;
    for (const listener of this.#table.listening) if (listener.uid === uid) held++;
    if (held < limit) return undefined;
    return { reason: "listener_limit", detail: `uid ${uid} already has ${held} listeners` };
  }

  /**
   * Over capacity after `newcomer` came to stay: the connection to close. It
   * is the oldest of the uid holding the most, if that uid holds more than the
   * newcomer's; otherwise the newcomer itself.
   */
  victim(newcomer: Connection): Connection {
    const heaviest: UidAccount | undefined = this.#table.heaviest();
    const own = newcomer.account;
    if (heaviest === undefined || heaviest === own || own === undefined) return newcomer;
    return heaviest.held > own.held ? oldestShed(heaviest) : newcomer;
  }

  /** Whether the table holds more than the capacity. */
  get overCapacity(): boolean {
    return this.#table.size > this.capacity;
  }
}

/**
 * The connection of `account` to shed first: its oldest, passing over its
 * listeners (at most `maxListenersPerUid` of them) while it holds anything
 * else, since a listener serves many clients and a waiter one.
 */
function oldestShed(account: UidAccount): Connection {
  for (let held = account.oldest; held !== undefined; held = held.newerOfUid) {
    if (held.registration === undefined) return held;
  }
  return account.oldest!;
}
