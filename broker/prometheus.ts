/**
 * The broker's metrics in the Prometheus text exposition format 0.0.4, the
 * body of `GET /metrics` on the control socket.
 *
 * @module
 */

import type { Mode, ProtocolErrorField } from "../client/protocol.ts";
import type { DropReason } from "./metrics.ts";

/** The `Content-Type` of {@link renderPrometheus}'s output. */
export const PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/** A histogram as `Histogram` (metrics.ts) keeps it: counts per bucket, not cumulative. */
export interface HistogramData {
  /** Upper bounds, ascending; an implicit +Inf bucket follows. */
  readonly bounds: readonly number[];
  /** Observations per bucket, the +Inf bucket last. */
  readonly counts: readonly number[];
  /** Sum of all observations. */
  readonly sum: number;
  /** Number of observations. */
  readonly count: number;
}

/** Everything `GET /metrics` reports, as plain data. */
export interface MetricsSnapshot {
  /** Connections accepted. */
  accepted: number;
  /** Pairs delivered. */
  paired: number;
  /** Pairs delivered to listeners (counted in `paired` too). */
  listenerDeliveries: number;
  /** Times accepting paused because descriptors ran out. */
  acceptPauses: number;
  /** Episodes of running out of descriptors. */
  descriptorExhaustions: number;
  /** Connections closed for breaking the protocol, by offending field. */
  protocolErrors: Readonly<Partial<Record<ProtocolErrorField, number>>>;
  /** Connections closed for other reasons. */
  dropped: Readonly<Partial<Record<DropReason, number>>>;
  /** Seconds the first client of each pair waited. */
  pairWait: HistogramData;
  /** Clients waiting now, by mode. */
  waitingByMode: Readonly<Record<Mode, number>>;
  /** Listeners (protocol v2) registered now. */
  listeners: number;
  /** Client connections open now. */
  connectionsOpen: number;
  /** Descriptors the process has open. */
  openDescriptors: number;
  /** The soft descriptor limit. */
  maxDescriptors: number;
  /** `Deno.memoryUsage()`. */
  memory: Deno.MemoryUsage;
  /** When the broker started serving, in seconds since the Unix epoch. */
  startTimeSeconds: number;
}

type MetricType = "counter" | "gauge" | "histogram";

// Label values here are field names, drop reasons, modes and numbers: none
// needs the escaping the format defines for `\`, `"` and newlines.
function sample(name: string, value: number, labels = ""): string {
  return `${name}${labels === "" ? "" : `{${labels}}`} ${formatValue(value)}\n`;
}

function formatValue(value: number): string {
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  return String(value);
}

function header(name: string, type: MetricType, help: string): string {
  return `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n`;
}

function single(name: string, type: MetricType, help: string, value: number): string {
  return header(name, type, help) + sample(name, value);
}

function byLabel(
  name: string,
  type: MetricType,
  help: string,
  label: string,
  values: Readonly<Partial<Record<string, number>>>,
): string {
  let text = header(name, type, help);
  for (const [key, value] of Object.entries(values)) {
    text += sample(name, value ?? 0, `${label}="${key}"`);
  }
  return text;
}

function histogram(name: string, help: string, data: HistogramData): string {
  let text = header(name, "histogram", help);
  let cumulative = 0;
  data.counts.forEach((count, bucket) => {
    cumulative += count;
    text += sample(
      `${name}_bucket`,
      cumulative,
      `le="${formatValue(data.bounds[bucket] ?? Infinity)}"`,
    );
  });
  return text + sample(`${name}_sum`, data.sum) + sample(`${name}_count`, data.count);
}

/**
 * Renders a snapshot as Prometheus text. Families that count by a label
 * (`reason`, `field`) list only the values seen so far.
 */
export function renderPrometheus(snapshot: MetricsSnapshot): string {
  return [
    single(
      "one_socket_accepts_total",
      "counter",
      "Client connections accepted.",
      snapshot.accepted,
    ),
    single("one_socket_pairs_total", "counter", "Pairs delivered.", snapshot.paired),
    single(
      "one_socket_listener_deliveries_total",
      "counter",
      "Pairs delivered to listeners (protocol v2), counted in one_socket_pairs_total too.",
      snapshot.listenerDeliveries,
    ),
    byLabel(
      "one_socket_protocol_errors_total",
      "counter",
      "Connections closed for breaking the protocol, by offending field.",
      "field",
      snapshot.protocolErrors,
    ),
    byLabel(
      "one_socket_dropped_total",
      "counter",
      "Connections closed without a pair for another reason (timeouts, limits, shedding, policy).",
      "reason",
      snapshot.dropped,
    ),
    single(
      "one_socket_accept_pauses_total",
      "counter",
      "Times accepting paused because descriptors ran out (one per 100 ms retry).",
      snapshot.acceptPauses,
    ),
    single(
      "one_socket_descriptor_exhaustions_total",
      "counter",
      "Episodes of running out of descriptors, from the first failed accept to the next success.",
      snapshot.descriptorExhaustions,
    ),
    byLabel(
      "one_socket_waiting_clients",
      "gauge",
      "Clients waiting for a partner, by mode.",
      "mode",
      snapshot.waitingByMode,
    ),
    single(
      "one_socket_listeners",
      "gauge",
      "Listeners registered (protocol v2), with credit or not.",
      snapshot.listeners,
    ),
    single(
      "one_socket_connections_open",
      "gauge",
      "Client connections open (waiting, listening or still sending their request).",
      snapshot.connectionsOpen,
    ),
    histogram(
      "one_socket_pair_wait_seconds",
      "How long the first client of each pair waited for its partner.",
      snapshot.pairWait,
    ),
    single(
      "one_socket_open_fds",
      "gauge",
      "Descriptors open in the broker process.",
      snapshot.openDescriptors,
    ),
    single(
      "one_socket_max_fds",
      "gauge",
      "The broker process's descriptor limit (soft).",
      snapshot.maxDescriptors,
    ),
    single(
      "one_socket_resident_memory_bytes",
      "gauge",
      "Resident set size of the broker process.",
      snapshot.memory.rss,
    ),
    single(
      "one_socket_heap_used_bytes",
      "gauge",
      "JavaScript heap in use.",
      snapshot.memory.heapUsed,
    ),
    single(
      "one_socket_heap_total_bytes",
      "gauge",
      "JavaScript heap allocated.",
      snapshot.memory.heapTotal,
    ),
    single(
      "one_socket_external_memory_bytes",
      "gauge",
      "Memory held outside the JavaScript heap by objects it references.",
      snapshot.memory.external,
    ),
    single(
      "one_socket_start_time_seconds",
      "gauge",
      "When the broker started serving, in seconds since the Unix epoch.",
      snapshot.startTimeSeconds,
    ),
  ].join("");
}
