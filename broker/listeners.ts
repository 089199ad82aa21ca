/**
 * {@link Listeners}: protocol v2 listeners, servers that register a key once
 * and get a connection for every compatible request.
 *
 * A listener with credit is filed in the matcher, where requests find it
 * before any waiting partner, listeners of one key taking turns. Every
 * delivery spends one credit; a listener out of credit leaves the matcher,
 * so that requests for its key wait as usual, and it is served from them
 * first when its `CREDIT` comes. A listener that stops reading thus holds at
 * most its backlog of connections and costs nobody else anything.
 *
 * @module
 */

import type { Mode } from "../client/protocol.ts";
import { CREDIT_SIZE, creditCount, ProtocolError, validateCredit } from "../client/protocol_v2.ts";
import type { Connection, ConnectionTable } from "./connections.ts";
import { Delivered, type Delivery } from "./delivery.ts";
import type { Matcher } from "./matcher.ts";

/** Backlog granted to a `LISTEN` that leaves it to the broker. */
export const DEFAULT_BACKLOG = 16;
/**
 * Most connections in flight to one listener (half as many with pidfds):
 * each is a descriptor the kernel counts against the broker's own limit
 * until the listener reads it.
 */
export const MAX_BACKLOG = 64;

/** What a listener registered: its key, how it pairs and its credit. */
export class Registration {
  /** The key, copied out of the request. */
  readonly key: Uint8Array;
  /** The listener's mode: requests in its peer mode are served. */
  readonly mode: Mode;
  /** The socket type's wire value. */
  readonly type: number;
  /** The key's scope (see `Admission.scopeFor`). */
  readonly scope: number;
  /** Connections it may have in flight. */
  readonly backlog: number;
  /** Connections it may be sent now: the backlog less those not yet credited back. */
  credit: number;
  /** Connections delivered to it. */
  served = 0;

  constructor(key: Uint8Array, mode: Mode, type: number, scope: number, backlog: number) {
    this.key = key;
    this.mode = mode;
    this.type = type;
    this.scope = scope;
    this.backlog = backlog;
    this.credit = backlog;
  }
}

/**
 * The broker's delivery of one pair, with its counting and logging; the
 * caller closes what the outcome leaves it.
 */
export type Pair = (
  first: Connection,
  second: Connection,
  now: number,
  key: Uint8Array,
) => Delivered;

/** See the module documentation. */
export class Listeners {
  readonly #matcher: Matcher<Connection>;
  readonly #table: ConnectionTable;
  readonly #delivery: Delivery;
  readonly #pair: Pair;

  constructor(
    matcher: Matcher<Connection>,
    table: ConnectionTable,
    delivery: Delivery,
    pair: Pair,
  ) {
    this.#matcher = matcher;
    this.#table = table;
    this.#delivery = delivery;
    this.#pair = pair;
  }

  /**
   * Registers `connection`, whose validated `LISTEN` is in `frame`: grants
   * its backlog, says so in a `HELLO`, serves the requests already waiting
   * and files it. Returns false if the `HELLO` could not be sent (the
   * connection is closed then).
   */
  register(
    connection: Connection,
    frame: Uint8Array,
    keyOffset: number,
    keyLength: number,
    mode: Mode,
    scope: number,
    requestedBacklog: number,
    now: number,
  ): boolean {
    // With pidfds every delivery carries two descriptors: half as many keep the same bound.
    const most = connection.wantsPidfd ? MAX_BACKLOG / 2 : MAX_BACKLOG;
    // One handed over from another broker keeps the backlog it was granted and its credit.
    const adopted = connection.adopted?.listener;
    const backlog = adopted?.backlog ??
      Math.min(requestedBacklog === 0 ? DEFAULT_BACKLOG : requestedBacklog, most);
    const key = frame.slice(keyOffset, keyOffset + keyLength);
    const registration = new Registration(key, mode, connection.socketType, scope, backlog);
    connection.registration = registration;
    connection.received = 0; // from now on, bytes of the CREDIT being read
    if (adopted !== undefined) {
      registration.credit = adopted.credit;
      registration.served = adopted.served;
    } else if (!this.#delivery.sendHello(connection, backlog)) {
      this.#table.close(connection);
      return false;
    }
    this.#table.startListening(connection, now);
    this.#serveWaiting(connection, now);
    return true;
  }

  /**
   * Hands `newcomer` to `listener`, which the matcher just returned for it,
   * the listener first. Returns false when the listener turned out to be
   * gone (it is closed then), so that the newcomer can be matched again.
   */
  serve(listener: Connection, newcomer: Connection, now: number): boolean {
    const outcome = this.#pair(listener, newcomer, now, listener.registration!.key);
    if (outcome === Delivered.PartnerGone) {
      this.#table.close(listener);
      return false;
    }
    if (outcome === Delivered.Paired) {
      this.#table.close(newcomer);
      this.#spend(listener);
    } else this.#failed(listener, newcomer);
    return true;
  }

  /**
   * After a delivery that failed (no pair made, or a send failed for a
   * reason other than the receiver having left): the client is told and
   * closed; the listener keeps its registration, and its credit unless it
   * was sent its end. A send to a listener failing so is the broker's
   * trouble (descriptors in flight past its limit, say), not the listener's.
   */
  #failed(listener: Connection, client: Connection): void {
    this.#delivery.refuse(client, "delivery_failed");
    this.#table.close(client);
    if (this.#delivery.failedSide === client) this.#spend(listener);
  }

  /**
   * Takes what a listener sent after its `LISTEN`: part of a `CREDIT`,
   * framed in `connection.frame`. The broker reads at most the rest of one
   * `CREDIT` at a time, so at most one completes here. Returns the protocol
   * error to close it with, if any.
   */
  receive(
    connection: Connection,
    bytes: Uint8Array,
    count: number,
    now: number,
  ): ProtocolError | undefined {
    const frame = connection.frame ??= new Uint8Array(CREDIT_SIZE);
    frame.set(bytes.subarray(0, count), connection.received);
    connection.received += count;
    if (connection.received < CREDIT_SIZE) return undefined;
    connection.received = 0;
    return validateCredit(frame) ?? this.#credit(connection, creditCount(frame), now);
  }

  #credit(connection: Connection, count: number, now: number): ProtocolError | undefined {
    const registration = connection.registration!;
    const outstanding = registration.backlog - registration.credit;
    if (count > outstanding) {
      return new ProtocolError(
        "CREDIT",
        "count",
        count,
        `must be at most the ${outstanding} connections delivered and not yet credited`,
      );
    }
    const wasOut = registration.credit === 0;
    registration.credit += count;
    if (wasOut) this.#serveWaiting(connection, now);
    return undefined;
  }

  /**
   * Serves the requests waiting for the listener's key while it has credit,
   * oldest first, then files it. The listener is sent its end first: if it
   * has gone, the request keeps its place; if the delivery fails otherwise,
   * the request is closed as a failed pairing is.
   */
  #serveWaiting(listener: Connection, now: number): void {
    const registration = listener.registration!;
    const { key, mode, scope, type } = registration;
    while (registration.credit > 0) {
      const request = this.#matcher.oldestRequest(key, 0, key.length, mode, scope, type);
      if (request === undefined) break;
      const outcome = this.#pair(listener, request, now, key);
      if (outcome === Delivered.PartnerGone) {
        this.#table.close(listener);
        return;
      }
      if (outcome === Delivered.Paired) {
        this.#table.close(request);
        this.#spend(listener);
        continue;
      }
      const nothingSent = this.#delivery.failedSide !== request;
      this.#failed(listener, request);
      // No pair could be made, or the send to the listener failed: the next would fare no better.
      if (nothingSent) break;
    }
    if (registration.credit > 0 && !listener.isWaiting) {
      this.#matcher.listen(listener, key, 0, key.length, mode, scope, type);
    }
  }

  /** One connection sent: out of credit, the listener leaves the matcher until it credits back. */
  #spend(listener: Connection): void {
    const registration = listener.registration!;
    registration.served++;
    if (--registration.credit === 0) listener.stopWaiting();
  }
}
