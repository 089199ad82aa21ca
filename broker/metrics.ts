/**
 * The broker's counters and histograms, cheap enough to update on every
 * pairing (`prometheus.ts` renders them for the control API).
 *
 * @module
 */

import type { ProtocolErrorField } from "../client/protocol.ts";

/**
 * A cumulative histogram over fixed upper bounds (seconds), as Prometheus
 * expects. Observing is a short scan over a dozen bounds: no allocation.
 */
export class Histogram {
  /** Upper bounds, ascending; an implicit +Inf bucket follows. */
  readonly bounds: readonly number[];
  /** Observations per bucket (not cumulative); the last is +Inf. */
  readonly counts: number[];
  /** Sum of all observations. */
  sum = 0;
  /** Number of observations. */
  count = 0;

  /**
   * An empty histogram.
   *
   * @param bounds ascending upper bounds
   */
  constructor(bounds: readonly number[]) {
    this.bounds = bounds;
    this.counts = new Array(bounds.length + 1).fill(0);
  }

  /** Records one observation. */
  observe(value: number): void {
    let bucket = 0;
    while (bucket < this.bounds.length && value > this.bounds[bucket]) bucket++;
    this.counts[bucket]++;
    this.sum += value;
    this.count++;
  }
}

/** Why a connection was closed without a pair, beyond protocol violations. */
export type DropReason =
  | "handshake_timeout"
  | "pair_timeout"
  | "uid_limit"
  | "incomplete_limit"
  | "capacity"
  | "shed"
  | "delivery_failed"
  | "policy"
  | "kicked"
  | "listener_limit"
  | "takeover_refused";

/** Everything the broker counts. */
export class BrokerMetrics {
  /** Connections accepted. */
  accepted = 0;
  /** Connections taken over from another broker (`--takeover`, or systemd's descriptor store). */
  adopted = 0;
  /** Pairs delivered. */
  paired = 0;
  /** Pairs delivered to listeners (counted in `paired` too). */
  listenerDeliveries = 0;
  /** Times accepting paused, out of descriptors or memory (one per retry interval). */
  acceptPauses = 0;
  /** Episodes of not accepting, out of descriptors or memory (each logged once). */
  descriptorExhaustions = 0;
  /** Connections closed for breaking the protocol, by offending field. */
  readonly protocolErrors: Partial<Record<ProtocolErrorField, number>> = {};
  /** Connections closed for other reasons. */
  readonly dropped: Partial<Record<DropReason, number>> = {};
  /** How long the first client of each pair waited for its partner, in seconds. */
  readonly pairWait: Histogram = new Histogram([
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1,
    5,
    30,
    300,
  ]);

  /** Connections closed for breaking the protocol, all fields together. */
  get rejected(): number {
    let total = 0;
    for (const count of Object.values(this.protocolErrors)) total += count ?? 0;
    return total;
  }

  /** Counts one protocol violation. */
  countProtocolError(field: ProtocolErrorField): void {
    this.protocolErrors[field] = (this.protocolErrors[field] ?? 0) + 1;
  }

  /** Counts one connection dropped for `reason`. */
  countDrop(reason: DropReason): void {
    this.dropped[reason] = (this.dropped[reason] ?? 0) + 1;
  }
}
