/**
 * The Prometheus rendering on plain data: names, labels, histogram
 * arithmetic, and text a strict reader accepts.
 */

import assert from "node:assert/strict";
import { type MetricsSnapshot, renderPrometheus } from "../broker/prometheus.ts";
import { parsePrometheus } from "./prometheus_text.ts";

function snapshot(overrides: Partial<MetricsSnapshot> = {}): MetricsSnapshot {
  return {
    accepted: 7,
    paired: 3,
    listenerDeliveries: 2,
    acceptPauses: 1,
    descriptorExhaustions: 1,
    protocolErrors: { key_len: 2, flags: 1 },
    dropped: { pair_timeout: 4 },
    pairWait: { bounds: [0.001, 0.5, 10], counts: [1, 0, 2, 0], sum: 4.25, count: 3 },
    waitingByMode: { none: 1, client: 0, server: 2 },
    listeners: 4,
    connectionsOpen: 5,
    openDescriptors: 40,
    maxDescriptors: 1024,
    memory: { rss: 50_000_000, heapTotal: 8_000_000, heapUsed: 6_000_000, external: 1_000_000 },
    startTimeSeconds: 1_700_000_000.5,
    ...overrides,
  };
}

Deno.test("prometheus: every family and sample, with its value", () => {
  const { types, samples } = parsePrometheus(renderPrometheus(snapshot()));
  assert.deepEqual(Object.fromEntries(types), {
    one_socket_accepts_total: "counter",
    one_socket_pairs_total: "counter",
    one_socket_listener_deliveries_total: "counter",
    one_socket_protocol_errors_total: "counter",
    one_socket_dropped_total: "counter",
    one_socket_accept_pauses_total: "counter",
    one_socket_descriptor_exhaustions_total: "counter",
    one_socket_waiting_clients: "gauge",
    one_socket_listeners: "gauge",
    one_socket_connections_open: "gauge",
    one_socket_pair_wait_seconds: "histogram",
    one_socket_open_fds: "gauge",
    one_socket_max_fds: "gauge",
    one_socket_resident_memory_bytes: "gauge",
    one_socket_heap_used_bytes: "gauge",
    one_socket_heap_total_bytes: "gauge",
    one_socket_external_memory_bytes: "gauge",
    one_socket_start_time_seconds: "gauge",
  });
  assert.deepEqual(Object.fromEntries(samples), {
    one_socket_accepts_total: 7,
    one_socket_pairs_total: 3,
    one_socket_listener_deliveries_total: 2,
    'one_socket_protocol_errors_total{field="key_len"}': 2,
    'one_socket_protocol_errors_total{field="flags"}': 1,
    'one_socket_dropped_total{reason="pair_timeout"}': 4,
    one_socket_accept_pauses_total: 1,
    one_socket_descriptor_exhaustions_total: 1,
    'one_socket_waiting_clients{mode="none"}': 1,
    'one_socket_waiting_clients{mode="client"}': 0,
    'one_socket_waiting_clients{mode="server"}': 2,
    one_socket_listeners: 4,
    one_socket_connections_open: 5,
    'one_socket_pair_wait_seconds_bucket{le="0.001"}': 1,
    'one_socket_pair_wait_seconds_bucket{le="0.5"}': 1,
    'one_socket_pair_wait_seconds_bucket{le="10"}': 3,
    'one_socket_pair_wait_seconds_bucket{le="+Inf"}': 3,
    one_socket_pair_wait_seconds_sum: 4.25,
    one_socket_pair_wait_seconds_count: 3,
    one_socket_open_fds: 40,
    one_socket_max_fds: 1024,
    one_socket_resident_memory_bytes: 50_000_000,
    one_socket_heap_used_bytes: 6_000_000,
    one_socket_heap_total_bytes: 8_000_000,
    one_socket_external_memory_bytes: 1_000_000,
    one_socket_start_time_seconds: 1_700_000_000.5,
  });
});

Deno.test("prometheus: a histogram is HELP, TYPE, cumulative buckets to +Inf, sum, count", () => {
  const text = renderPrometheus(snapshot({
    pairWait: { bounds: [0.0001, 1], counts: [2, 3, 1], sum: 9.5, count: 6 },
  }));
  const start = text.indexOf("# HELP one_socket_pair_wait_seconds ");
  const block = text.slice(start).split("\n").slice(0, 7);
  assert.deepEqual(block, [
    "# HELP one_socket_pair_wait_seconds How long the first client of each pair waited for its partner.",
    "# TYPE one_socket_pair_wait_seconds histogram",
    'one_socket_pair_wait_seconds_bucket{le="0.0001"} 2',
    'one_socket_pair_wait_seconds_bucket{le="1"} 5',
    'one_socket_pair_wait_seconds_bucket{le="+Inf"} 6',
    "one_socket_pair_wait_seconds_sum 9.5",
    "one_socket_pair_wait_seconds_count 6",
  ]);
});

Deno.test("prometheus: a family with nothing counted yet is declared without samples", () => {
  const text = renderPrometheus(snapshot({ protocolErrors: {}, dropped: {} }));
  const { types, samples } = parsePrometheus(text);
  assert.equal(types.get("one_socket_protocol_errors_total"), "counter");
  assert.equal(types.get("one_socket_dropped_total"), "counter");
  const keys = [...samples.keys()];
  assert.ok(!keys.some((key) => key.startsWith("one_socket_protocol_errors_total")));
  assert.ok(!keys.some((key) => key.startsWith("one_socket_dropped_total")));
});

Deno.test("prometheus: the listener families are HELP, TYPE and one sample, zero included", () => {
  const text = renderPrometheus(snapshot({ listeners: 0, listenerDeliveries: 0 }));
  const lines = text.split("\n");
  for (
    const [name, type] of [["one_socket_listeners", "gauge"], [
      "one_socket_listener_deliveries_total",
      "counter",
    ]]
  ) {
    const start = lines.findIndex((line) => line.startsWith(`# HELP ${name} `));
    assert.ok(start >= 0, `no HELP for ${name}`);
    assert.match(lines[start], /protocol v2/);
    assert.deepEqual(lines.slice(start + 1, start + 3), [`# TYPE ${name} ${type}`, `${name} 0`]);
    assert.ok(!lines[start + 3].startsWith(name), `${name}: a single sample`);
  }
  const { samples } = parsePrometheus(
    renderPrometheus(snapshot({ listeners: 16, listenerDeliveries: 9 })),
  );
  assert.equal(samples.get("one_socket_listeners"), 16);
  assert.equal(samples.get("one_socket_listener_deliveries_total"), 9);
});

Deno.test("prometheus: the strict reader rejects what a scraper would", () => {
  const bad: [string, RegExp][] = [
    ["one_socket_x 1", /end with a newline/],
    ["one_socket_x 1\n", /before its family's TYPE/],
    ["# TYPE one_socket_x gauge\none_socket_x one\n", /not a sample/],
    ["# TYPE one_socket_x gauge\none_socket_x{mode=server} 1\n", /not a sample/],
    ["# TYPE one_socket_x gauge\none_socket_x 1\none_socket_x 2\n", /duplicate/],
  ];
  for (const [text, why] of bad) assert.throws(() => parsePrometheus(text), why);
});
