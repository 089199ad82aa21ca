/**
 * The control API and `one-socket ctl`: endpoints against a broker in this
 * process, then the command line against real `one-socket broker` processes.
 */

import assert from "node:assert/strict";
import type { Broker, BrokerOptions } from "../broker/broker.ts";
import {
  type ControlClient,
  type ControlClientsPage,
  type ControlListener,
  type ControlListenersPage,
  type ControlStatus,
  serveControl,
} from "../broker/control.ts";
import { getPair } from "../client/pair.ts";
import { encodeGetPair, MESSAGE_SIZE } from "../client/protocol.ts";
import { decodeRefused, encodeRequest, type Reply } from "../client/protocol_v2.ts";
import { countOpenDescriptors } from "../ffi/process.ts";
import { closeDescriptor, listenUnix } from "../ffi/socket.ts";
import denoConfig from "../deno.json" with { type: "json" };
import { eventually, RawClient, withBroker } from "./helpers.ts";
import { parsePrometheus } from "./prometheus_text.ts";
import { listen, readMessage, reply } from "./raw_v2.ts";
import { ControlHttp, startWithControl } from "./control_support.ts";
import { exists, type Scope, sleep, startBroker, WAIT_MS, withScope } from "./processes.ts";

const decoder = new TextDecoder();

/** A broker in this process with its control API, both on temporary sockets. */
function withControl(
  body: (broker: Broker, socket: string, http: ControlHttp) => Promise<void>,
  options: Omit<BrokerOptions, "socket"> = {},
): Promise<void> {
  return withBroker(async (broker, socket) => {
    await using control = await serveControl(broker, { socket: `${socket}.control` });
    using http = new ControlHttp(control.path);
    await body(broker, socket, http);
  }, options);
}

/**
 * Follows `resource`'s cursor from the start with `limit`; checks that ids
 * ascend, that pages are bounded in count and size and that the walk ends.
 * Resolves to the entries in order and the number of pages.
 */
async function walk<T extends { id: number }>(
  http: ControlHttp,
  resource: "/clients" | "/listeners",
  limit: number,
): Promise<{ entries: T[]; pages: number }> {
  const entries: T[] = [];
  let after = 0;
  for (let pages = 1;; pages++) {
    assert.ok(pages <= 10_000, `${resource}: the cursor does not end`);
    const answer = await http.send("GET", `${resource}?limit=${limit}&after=${after}`);
    assert.equal(answer.status, 200, answer.text);
    assert.ok(answer.text.length < 70_000, `a page of ${answer.text.length} bytes`);
    const page = JSON.parse(answer.text);
    const listed: T[] = page[resource.slice(1)];
    assert.ok(listed.length <= limit, `${listed.length} entries past the limit ${limit}`);
    for (const entry of listed) {
      assert.ok(entry.id > after, `id ${entry.id} after ${after}: not ascending`);
      after = entry.id;
      entries.push(entry);
    }
    if (page.next === undefined) return { entries, pages };
    assert.equal(page.next, after);
  }
}

async function pairOnce(socket: string, key: string): Promise<void> {
  const sockets = await Promise.all(
    (["server", "client"] as const).map((mode) => getPair(key, { socket, mode })),
  );
  sockets.forEach((paired) => paired.close());
}

async function metrics(http: ControlHttp): Promise<Map<string, number>> {
  const answer = await http.send("GET", "/metrics");
  assert.equal(answer.status, 200);
  assert.equal(answer.headers.get("content-type"), "text/plain; version=0.0.4; charset=utf-8");
  return parsePrometheus(answer.text).samples;
}

// --- endpoints ---------------------------------------------------------------------------------

Deno.test("control: GET /status reports paths and counts that follow a pairing", async () => {
  await withControl(async (_broker, socket, http) => {
    const before = await http.json<ControlStatus>("/status");
    assert.equal(before.version, denoConfig.version);
    assert.equal(before.pid, Deno.pid);
    assert.equal(before.socket, socket);
    assert.equal(before.control, `${socket}.control`);
    assert.ok(before.uptimeSeconds >= 0 && before.uptimeSeconds < 60, `${before.uptimeSeconds}`);
    assert.deepEqual(before.counts, {
      waiting: 0,
      waitingByMode: { none: 0, client: 0, server: 0 },
      listeners: 0,
      pairedTotal: 0,
      listenerDeliveriesTotal: 0,
      rejectedTotal: 0,
      acceptedTotal: 0,
      adoptedTotal: 0,
      connectionsOpen: 0,
    });

    await pairOnce(socket, "status-key");
    using waiting = await RawClient.connect(socket);
    waiting.send(encodeGetPair("lonely", "client"));
    using broken = await RawClient.connect(socket);
    broken.send(new Uint8Array(1044)); // request 0: a protocol error
    await broken.readToEnd();

    const after = await http.json<ControlStatus>("/status");
    assert.deepEqual(after.counts, {
      waiting: 1,
      waitingByMode: { none: 0, client: 1, server: 0 },
      listeners: 0,
      pairedTotal: 1,
      listenerDeliveriesTotal: 0,
      rejectedTotal: 1,
      acceptedTotal: 4,
      adoptedTotal: 0,
      connectionsOpen: 1,
    });
  });
});

Deno.test("control: GET /clients lists a waiting client; DELETE kicks it, then 404", async () => {
  await withControl(async (broker, socket, http) => {
    assert.deepEqual(await http.json("/clients"), { clients: [] });
    const key = new Uint8Array([0x6b, 0x00, 0xff, 0x22, 0x5c, 0x0a]); // k NUL 0xff " \ LF
    using client = await RawClient.connect(socket);
    client.send(encodeGetPair(key, "server"));
    await eventually(() => broker.stats.waiting === 1, "the client to wait");

    const { clients } = await http.json<{ clients: ControlClient[] }>("/clients");
    assert.equal(clients.length, 1);
    const [listed] = clients;
    assert.equal(listed.key, String.raw`k\x00\xff\"\\\x0a`);
    assert.equal(listed.keyHex, "6b00ff225c0a");
    assert.equal(listed.mode, "server");
    assert.equal(listed.type, "stream");
    assert.equal(listed.version, 1);
    assert.equal(listed.pid, Deno.pid);
    assert.equal(listed.uid, Deno.uid());
    assert.equal(listed.gid, Deno.gid());
    assert.ok(Math.abs(Date.parse(listed.since) - Date.now()) < 10_000, listed.since);
    assert.ok(listed.waitingSeconds >= 0 && listed.waitingSeconds < 10, `${listed.waitingSeconds}`);

    const kicked = await http.send("DELETE", `/clients/${listed.id}`);
    assert.equal(kicked.status, 204);
    assert.equal(kicked.text, "");
    const reply = await client.readToEnd();
    assert.equal(reply.bytes.length, 0, "a kicked client reads end of stream, no reply");
    assert.deepEqual(reply.descriptors, []);
    assert.deepEqual(await http.json("/clients"), { clients: [] });
    assert.match(
      await (await http.send("GET", "/metrics")).text,
      /^one_socket_dropped_total\{reason="kicked"\} 1$/m,
    );

    const again = await http.send("DELETE", `/clients/${listed.id}`);
    assert.equal(again.status, 404);
    assert.deepEqual(JSON.parse(again.text), { error: `no client ${listed.id}` });
  });
});

Deno.test("control: unknown paths 404, wrong methods 405, bad ids 400, all as JSON", async () => {
  await withControl(async (_broker, _socket, http) => {
    const cases: [method: string, resource: string, status: number, allow?: string][] = [
      ["GET", "/", 404],
      ["GET", "/nothing", 404],
      ["GET", "/clients/1/more", 404],
      ["POST", "/status", 405, "GET"],
      ["DELETE", "/metrics", 405, "GET"],
      ["GET", "/clients/1", 405, "DELETE"],
      ["POST", "/listeners", 405, "GET"],
      ["DELETE", "/listeners", 405, "GET"],
      ["GET", "/listeners/1", 404],
      ["GET", "/listeners?limit=0", 400],
      ["GET", "/listeners?limit=1001", 400],
      ["GET", "/listeners?after=-1", 400],
      ["GET", "/listeners?limit=1&limit=2", 400],
      ["GET", "/listeners?offset=1", 400],
      ["DELETE", "/clients/abc", 400],
      ["DELETE", "/clients/-1", 400],
      ["DELETE", "/clients/99", 404],
    ];
    for (const [method, resource, status, allow] of cases) {
      const answer = await http.send(method, resource);
      const name = `${method} ${resource}`;
      assert.equal(answer.status, status, `${name}: ${answer.text}`);
      assert.match(answer.headers.get("content-type") ?? "", /^application\/json/, name);
      const body = JSON.parse(answer.text);
      assert.deepEqual(Object.keys(body), ["error"], name);
      assert.equal(typeof body.error, "string", name);
      if (allow) assert.equal(answer.headers.get("allow"), allow, name);
    }
  });
});

Deno.test("control: GET /metrics parses; pairs and the wait histogram add up", async () => {
  await withControl(async (broker, socket, http) => {
    const before = await metrics(http);
    assert.equal(before.get("one_socket_pairs_total"), 0);
    await pairOnce(socket, "metrics-1");
    await pairOnce(socket, "metrics-2");
    using waiting = await RawClient.connect(socket);
    waiting.send(encodeGetPair("metrics-waiting", "server"));
    await eventually(() => broker.stats.waiting === 1, "the client to wait");

    const after = await metrics(http);
    assert.equal(after.get("one_socket_pairs_total"), 2);
    assert.equal(after.get("one_socket_accepts_total"), 5);
    assert.equal(after.get('one_socket_waiting_clients{mode="server"}'), 1);
    assert.equal(after.get("one_socket_connections_open"), 1);
    const buckets = [...after].filter(([key]) =>
      key.startsWith("one_socket_pair_wait_seconds_bucket")
    );
    assert.ok(buckets.length > 1);
    assert.equal(buckets.at(-1)![0], 'one_socket_pair_wait_seconds_bucket{le="+Inf"}');
    buckets.reduce((previous, [key, value]) => {
      assert.ok(value >= previous, `${key} ${value} < ${previous}: buckets must be cumulative`);
      return value;
    }, 0);
    assert.equal(buckets.at(-1)![1], 2);
    assert.equal(after.get("one_socket_pair_wait_seconds_count"), 2);
    assert.ok(after.get("one_socket_pair_wait_seconds_sum")! >= 0);
    const fds = after.get("one_socket_open_fds")!;
    assert.ok(fds > 3 && fds <= after.get("one_socket_max_fds")!, `open fds ${fds}`);
    assert.ok(after.get("one_socket_resident_memory_bytes")! > 1_000_000);
  });
});

Deno.test("control: GET /listeners lists v2 listeners; /clients shows type and version; status and metrics count them", async () => {
  await withControl(async (broker, socket, http) => {
    assert.deepEqual(await http.json("/listeners"), { listeners: [] });
    const key = new Uint8Array([0x73, 0x76, 0x63, 0x00, 0xfe]); // s v c NUL 0xfe
    const stream = await listen(socket, key, { mode: "server", backlog: 2 });
    using _stream = stream.raw;
    assert.equal(stream.backlog, 2);
    const seq = await listen(socket, "seq-svc", { mode: "client", type: "seqpacket" });
    using _seq = seq.raw;
    // One delivery to the stream listener, from a v1 client: served 1, in flight 1.
    using served = await RawClient.connect(socket);
    served.send(encodeGetPair(key, "client"));
    const delivery = await nextReply(stream.raw);
    assert.equal(delivery.request, "set_pair");
    const end = await served.readToEnd();
    assert.equal(end.bytes.length, MESSAGE_SIZE);
    end.descriptors.forEach(closeDescriptor);
    // And two waiting clients: a v1 one and a v2 seqpacket one that no listener serves.
    using v1 = await RawClient.connect(socket);
    v1.send(encodeGetPair("waiting-v1", "none"));
    using v2 = await RawClient.connect(socket);
    v2.send(encodeRequest("get_pair", "waiting-v2", { mode: "server", type: "seqpacket" }));
    assert.equal((await nextReply(v2)).request, "hello");
    await eventually(() => broker.stats.waiting === 2, "both clients to wait");

    const { listeners } = await http.json<ControlListenersPage>("/listeners");
    assert.equal(listeners.length, 2);
    const [first, second] = listeners;
    assert.ok(first.id < second.id);
    const now = Date.now();
    for (const listener of listeners) {
      assert.equal(listener.pid, Deno.pid);
      assert.equal(listener.uid, Deno.uid());
      assert.equal(listener.gid, Deno.gid());
      assert.ok(Math.abs(Date.parse(listener.since) - now) < 10_000, listener.since);
      assert.ok(listener.listeningSeconds >= 0 && listener.listeningSeconds < 10);
    }
    const fields = ({ key, keyHex, mode, type, backlog, inFlight, served }: ControlListener) => ({
      key,
      keyHex,
      mode,
      type,
      backlog,
      inFlight,
      served,
    });
    assert.deepEqual(fields(first), {
      key: String.raw`svc\x00\xfe`,
      keyHex: "73766300fe",
      mode: "server",
      type: "stream",
      backlog: 2,
      inFlight: 1,
      served: 1,
    });
    assert.deepEqual(fields(second), {
      key: "seq-svc",
      keyHex: new TextEncoder().encode("seq-svc").toHex(),
      mode: "client",
      type: "seqpacket",
      backlog: seq.backlog,
      inFlight: 0,
      served: 0,
    });
    assert.ok(seq.backlog > 0, "the broker's default backlog");

    const { clients } = await http.json<ControlClientsPage>("/clients");
    assert.deepEqual(
      clients.map(({ key, mode, type, version }) => ({ key, mode, type, version })),
      [
        { key: "waiting-v1", mode: "none", type: "stream", version: 1 },
        { key: "waiting-v2", mode: "server", type: "seqpacket", version: 2 },
      ],
      "listeners are not waiting clients",
    );
    assert.ok(
      !listeners.some((listener) => clients.some((client) => client.id === listener.id)),
      "waiting clients are not listeners",
    );

    const status = await http.json<ControlStatus>("/status");
    assert.equal(status.counts.listeners, 2);
    assert.equal(status.counts.waiting, 2);
    assert.equal(status.counts.pairedTotal, 1);
    assert.equal(status.counts.listenerDeliveriesTotal, 1);
    assert.equal(status.counts.connectionsOpen, 4);

    // A pair of two waiting clients is a pair, not a listener delivery.
    await pairOnce(socket, "plain");
    const samples = await metrics(http);
    assert.equal(samples.get("one_socket_listeners"), 2);
    assert.equal(samples.get("one_socket_listener_deliveries_total"), 1);
    assert.equal(samples.get("one_socket_pairs_total"), 2);
    assert.equal(samples.get("one_socket_connections_open"), 4);
  });
});

Deno.test("control: GET /listeners pages by ascending id, each listener once, bounded in count and bytes", async () => {
  await withControl(async (broker, socket, http) => {
    const held: RawClient[] = [];
    try {
      // Registered out of connection order: the later connection listens first.
      const early = await RawClient.connect(socket);
      held.push(early);
      const late = await listen(socket, "late-connect");
      held.push(late.raw);
      early.send(encodeRequest("listen", "early-connect"));
      assert.equal((await nextReply(early)).request, "hello");
      // Long keys, every byte escaped in `key`: a page of a thousand would be megabytes.
      const count = 40;
      const expected = new Set(["late-connect", "early-connect"]);
      for (let i = 0; i < count; i++) {
        const key = new Uint8Array(1024).fill(0xff);
        new DataView(key.buffer).setUint32(0, i);
        expected.add(key.toHex());
        held.push((await listen(socket, key, { mode: "server", backlog: 1 })).raw);
      }
      const hexOf = (listener: ControlListener) =>
        listener.keyHex.length === 2048 ? listener.keyHex : listener.key;
      assert.equal(broker.stats.listeners, count + 2);
      assert.equal((await http.json<ControlStatus>("/status")).counts.listeners, count + 2);

      for (const limit of [1, 7, 1000]) {
        const { entries, pages } = await walk<ControlListener>(http, "/listeners", limit);
        assert.equal(entries.length, count + 2, `limit ${limit}: a listener missed or repeated`);
        assert.deepEqual(new Set(entries.map(hexOf)), expected, `limit ${limit}`);
        if (limit === 1000) assert.ok(pages > 1, "one page held every long key");
      }
      const firstPage = await http.json<ControlListenersPage>("/listeners");
      assert.ok(firstPage.listeners.length < count, "the byte cap, not the default limit");
      assert.equal(firstPage.next, firstPage.listeners.at(-1)!.id);
      const { entries } = await walk<ControlClient>(http, "/clients", 1000);
      assert.deepEqual(entries, [], "no listener is listed as waiting");
    } finally {
      held.forEach((raw) => raw[Symbol.dispose]());
    }
  }, { maxListenersPerUid: 64 });
});

Deno.test("control: DELETE /clients/ID kicks a listener: it hears REFUSED kicked, its key and place are free", async () => {
  await withControl(async (broker, socket, http) => {
    const first = await listen(socket, "kick-svc", { mode: "server" });
    using listener = first.raw;
    const [listed] = (await http.json<ControlListenersPage>("/listeners")).listeners;
    assert.equal(listed.key, "kick-svc");

    const kicked = await http.send("DELETE", `/clients/${listed.id}`);
    assert.equal(kicked.status, 204, kicked.text);
    const refused = await readMessage(listener);
    assert.ok(refused, "a REFUSED before the close");
    assert.equal(decodeRefused(refused.bytes), "kicked");
    assert.equal(await readMessage(listener), undefined, "then end of stream");
    assert.equal(broker.stats.listeners, 0);
    assert.deepEqual(await http.json("/listeners"), { listeners: [] });
    assert.equal((await http.json<ControlStatus>("/status")).counts.listeners, 0);
    const samples = await metrics(http);
    assert.equal(samples.get("one_socket_listeners"), 0);
    assert.equal(samples.get('one_socket_dropped_total{reason="kicked"}'), 1);
    const again = await http.send("DELETE", `/clients/${listed.id}`);
    assert.equal(again.status, 404);
    assert.deepEqual(JSON.parse(again.text), { error: `no client ${listed.id}` });

    // The key is free: a client for it now waits, where the listener would have served it.
    using client = await RawClient.connect(socket);
    client.send(encodeGetPair("kick-svc", "client"));
    await eventually(() => broker.stats.waiting === 1, "the client to wait");
    assert.equal((await http.json<ControlClientsPage>("/clients")).clients[0].key, "kick-svc");
    // And so is the uid's only listener place: a new listener registers and serves it at once.
    const second = await listen(socket, "kick-svc", { mode: "server" });
    using replacement = second.raw;
    assert.equal((await nextReply(replacement)).request, "set_pair");
    const end = await client.readToEnd();
    assert.equal(end.descriptors.length, 1);
    end.descriptors.forEach(closeDescriptor);
    const [now] = (await http.json<ControlListenersPage>("/listeners")).listeners;
    assert.notEqual(now.id, listed.id);
    assert.equal(now.served, 1);
    assert.equal((await metrics(http)).get("one_socket_listener_deliveries_total"), 1);
  }, { maxListenersPerUid: 1 });
});

Deno.test("control: a stale socket file is replaced; a live one or a non-socket is refused", async () => {
  await withBroker(async (broker, socket) => {
    const path = `${socket}.control`;
    listenUnix(path, 1).close(); // a socket file nobody listens on
    const control = await serveControl(broker, { socket: path });
    try {
      await assert.rejects(
        serveControl(broker, { socket: path }),
        /already listening on .*\.control/,
      );
      using http = new ControlHttp(path);
      assert.equal((await http.send("GET", "/status")).status, 200, "the first one still serves");
    } finally {
      await control.close();
    }
    assert.ok(!exists(path), "close removes the control socket file");

    await Deno.writeTextFile(path, "not a socket");
    await assert.rejects(serveControl(broker, { socket: path }), /not a socket/);
    assert.equal(await Deno.readTextFile(path), "not a socket");
    await assert.rejects(serveControl(broker, { socket: "@abstract" }), /abstract/);
  });
});

Deno.test("metrics: countOpenDescriptors (libc) agrees with a /proc/self/fd listing", () => {
  // The listing holds one descriptor of its own while it runs.
  const listed = () => [...Deno.readDirSync("/proc/self/fd")].length - 1;
  assert.equal(countOpenDescriptors(), listed());
  const file = Deno.openSync(new URL(import.meta.url));
  try {
    assert.equal(countOpenDescriptors(), listed());
  } finally {
    file.close();
  }
});

// --- one-socket ctl ----------------------------------------------------------------------------

/** Runs `one-socket ctl ...args`; it must exit 0. Returns its stdout. */
async function ctl(scope: Scope, args: string[], env?: Record<string, string>): Promise<string> {
  const done = await scope.spawn(["ctl", ...args], { env }).finish();
  assert.equal(done.code, 0, `ctl ${args.join(" ")}: exit code; stderr:\n${done.stderr}`);
  assert.equal(done.stderr, "", `ctl ${args.join(" ")}: stderr`);
  return decoder.decode(done.stdout);
}

/** Polls the async `condition` until it holds, for at most {@link WAIT_MS}. */
async function until(what: string, condition: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!await condition()) {
    if (Date.now() > deadline) assert.fail(`no ${what} after ${WAIT_MS} ms`);
    await sleep(20);
  }
}

Deno.test("ctl: status, clients, kick and metrics against a broker process", async () => {
  await withScope(async (scope) => {
    const control = `${scope.dir}/broker.socket.control`;
    const broker = await startWithControl(scope, control);

    const status = await ctl(scope, ["status", "--control", control]);
    assert.match(
      status,
      new RegExp(`^one-socket ${denoConfig.version} \\(pid ${broker.pid}\\), up `),
    );
    assert.match(status, new RegExp(`^socket +${scope.socket}$`, "m"));
    assert.match(status, /^waiting +0 \(none 0, client 0, server 0\)$/m);
    // Without --control: $ONE_SOCKET_PATH plus ".control".
    const json = await ctl(scope, ["status", "--json"], { ONE_SOCKET_PATH: scope.socket });
    const parsed: ControlStatus = JSON.parse(json);
    assert.equal(parsed.control, control);
    assert.equal(parsed.pid, broker.pid);

    const waiting = scope.spawn(["pair", "ctl key", "--mode", "server", "--socket", scope.socket]);
    await until("the pair client to wait", async () => {
      using http = new ControlHttp(control);
      return (await http.json<ControlStatus>("/status")).counts.waiting === 1;
    });
    const table = (await ctl(scope, ["clients"], { ONE_SOCKET_CONTROL: control })).split("\n");
    assert.equal(table.length, 3, table.join("\n"));
    assert.equal(table[2], "");
    assert.match(table[0], /^ID +MODE +TYPE +PROTO +WAITING +PID +UID +KEY$/);
    assert.match(
      table[1],
      new RegExp(
        `^\\d+ +server +stream +v[12] +\\d+\\.\\ds +${waiting.pid} +${Deno.uid()} +"ctl key"$`,
      ),
    );
    const { clients }: { clients: ControlClient[] } = JSON.parse(
      await ctl(scope, ["clients", "--json", "--control", control]),
    );
    assert.equal(clients[0].pid, waiting.pid);

    const id = String(clients[0].id);
    assert.equal(
      await ctl(scope, ["kick", id, "--control", control]),
      `disconnected client ${id}\n`,
    );
    const left = await waiting.finish();
    assert.notEqual(left.code, 0);
    assert.match(left.stderr, /^[^\n]+\n$/, "one line");
    const again = await scope.spawn(["ctl", "kick", id, "--control", control]).finish();
    assert.equal(again.code, 1);
    assert.equal(again.stderr, `one-socket ctl: no client ${id}\n`);

    const text = await ctl(scope, ["metrics", "--control", control]);
    const samples = parsePrometheus(text).samples;
    assert.equal(samples.get("one_socket_accepts_total"), 1);
    assert.ok(samples.get("one_socket_open_fds")! > 0);

    broker.kill("SIGTERM");
    const done = await broker.finish();
    assert.equal(done.code, 0, done.stderr);
    assert.ok(!exists(control), "the control socket file is removed at shutdown");
    assert.ok(!exists(scope.socket));
  });
});

Deno.test("ctl: listeners, the waiting clients' type and version, status's count, kick of a listener", async () => {
  await withScope(async (scope) => {
    const control = `${scope.dir}/broker.socket.control`;
    const broker = await startWithControl(scope, control);
    assert.equal(await ctl(scope, ["listeners", "--control", control]), "no listeners\n");
    assert.deepEqual(
      JSON.parse(await ctl(scope, ["listeners", "--json", "--control", control])),
      { listeners: [] },
    );
    const stream = await listen(scope.socket, "ctl\nsvc", { mode: "server", backlog: 3 });
    using _stream = stream.raw;
    const seq = await listen(scope.socket, "ctl-seq", { mode: "client", type: "seqpacket" });
    using _seq = seq.raw;
    using served = await RawClient.connect(scope.socket);
    served.send(encodeGetPair("ctl\nsvc", "client"));
    assert.equal((await nextReply(stream.raw)).request, "set_pair");
    (await served.readToEnd()).descriptors.forEach(closeDescriptor);
    using v2 = await RawClient.connect(scope.socket);
    v2.send(encodeRequest("get_pair", "ctl-wait", { mode: "server", type: "seqpacket" }));
    assert.equal((await nextReply(v2)).request, "hello");

    const table = (await ctl(scope, ["listeners", "--control", control])).split("\n");
    assert.equal(table.length, 4, table.join("\n"));
    assert.equal(table[3], "");
    assert.match(
      table[0],
      /^ID +MODE +TYPE +BACKLOG +INFLIGHT +SERVED +LISTENING +PID +UID +KEY$/,
    );
    const uid = Deno.uid();
    assert.match(
      table[1],
      new RegExp(
        `^\\d+ +server +stream +3 +1 +1 +\\d+\\.\\ds +${Deno.pid} +${uid} +"ctl\\\\x0asvc"$`,
      ),
    );
    assert.match(
      table[2],
      new RegExp(
        `^\\d+ +client +seqpacket +${seq.backlog} +0 +0 +\\d+\\.\\ds +${Deno.pid} +${uid} +"ctl-seq"$`,
      ),
    );
    const { listeners }: { listeners: ControlListener[] } = JSON.parse(
      await ctl(scope, ["listeners", "--json", "--control", control]),
    );
    assert.deepEqual(listeners.map((listener) => [listener.key, listener.served]), [
      ["ctl\\x0asvc", 1],
      ["ctl-seq", 0],
    ]);

    const clients = (await ctl(scope, ["clients", "--control", control])).split("\n");
    assert.match(
      clients[1],
      new RegExp(`^\\d+ +server +seqpacket +v2 +\\d+\\.\\ds +${Deno.pid} +${uid} +"ctl-wait"$`),
    );
    const status = await ctl(scope, ["status", "--control", control]);
    assert.match(status, /^listeners +2$/m);
    assert.match(status, /^paired +1 \(1 to listeners\)$/m);
    assert.match(status, /^waiting +1 \(none 0, client 0, server 1\)$/m);
    const samples = parsePrometheus(await ctl(scope, ["metrics", "--control", control])).samples;
    assert.equal(samples.get("one_socket_listeners"), 2);
    assert.equal(samples.get("one_socket_listener_deliveries_total"), 1);

    const id = String(listeners[0].id);
    assert.equal(
      await ctl(scope, ["kick", id, "--control", control]),
      `disconnected client ${id}\n`,
    );
    assert.equal(decodeRefused((await readMessage(stream.raw))!.bytes), "kicked");
    assert.equal(await readMessage(stream.raw), undefined);
    const left = JSON.parse(await ctl(scope, ["listeners", "--json", "--control", control]));
    assert.deepEqual(left.listeners.map((listener: ControlListener) => listener.key), ["ctl-seq"]);
    assert.match(await ctl(scope, ["status", "--control", control]), /^listeners +1$/m);
    const again = await scope.spawn(["ctl", "kick", id, "--control", control]).finish();
    assert.equal(again.code, 1);
    assert.equal(again.stderr, `one-socket ctl: no client ${id}\n`);

    broker.kill("SIGTERM");
    assert.equal((await broker.finish()).code, 0);
  });
});

Deno.test("ctl pointed at the broker socket says that is not the control socket", () =>
  withScope(async (scope) => {
    const broker = await startBroker(scope);
    const done = await scope.spawn(["ctl", "status", "--control", scope.socket]).finish();
    assert.equal(done.code, 1, done.stderr);
    assert.match(
      done.stderr,
      /no HTTP answer .*is it the control socket\? The broker socket is not/,
    );
    broker.kill("SIGTERM");
    await broker.finish();
  }));

Deno.test("ctl: no broker is one line and exit 1; usage errors exit 2", async () => {
  await withScope(async (scope) => {
    const missing = `${scope.dir}/missing.control`;
    const runs = await Promise.all([
      scope.spawn(["ctl", "status", "--control", missing]).finish(),
      scope.spawn(["ctl", "clients"], { env: { ONE_SOCKET_CONTROL: missing } }).finish(),
    ]);
    for (const done of runs) {
      assert.equal(done.code, 1, done.stderr);
      assert.equal(done.stdout.length, 0);
      assert.equal(
        done.stderr,
        `one-socket ctl: connect ${missing}: ENOENT (is the broker running with --control?)\n`,
      );
    }
    const usage: [string[], RegExp][] = [
      [[], /missing command/],
      [["frobnicate"], /unknown command frobnicate/],
      [["kick"], /kick takes one client ID/],
      [["status", "extra"], /unexpected argument extra/],
      [["metrics", "--json"], /--json applies to status, clients and listeners, not metrics/],
      [["kick", "7", "--json"], /--json applies to status, clients and listeners, not kick/],
      [["listeners", "extra"], /unexpected argument extra/],
      [["status", "--bogus"], /bogus/],
    ];
    const results = await Promise.all(
      usage.map(([args]) => scope.spawn(["ctl", ...args]).finish()),
    );
    usage.forEach(([args, reason], i) => {
      const done = results[i];
      assert.equal(done.code, 2, `ctl ${args.join(" ")}: ${done.stderr}`);
      assert.match(done.stderr, reason);
      assert.match(done.stderr, /Usage: one-socket ctl/);
    });
  });
});

Deno.test("ctl: a second broker on a live control socket exits 1 and leaves it alone", async () => {
  await withScope(async (scope) => {
    const control = `${scope.dir}/shared.control`;
    const first = await startWithControl(scope, control);
    const second = await scope.spawn([
      "broker",
      "--socket",
      `${scope.dir}/second.socket`,
      "--control",
      control,
    ]).finish();
    assert.equal(second.code, 1, second.stderr);
    assert.match(
      second.stderr,
      /\none-socket broker: another broker is already listening on .*shared\.control\n$/,
    );
    assert.ok(!exists(`${scope.dir}/second.socket`), "the second broker cleans up its own socket");
    assert.ok(!first.exited);
    assert.match(await ctl(scope, ["status", "--control", control]), /^socket +.*broker\.socket$/m);
  });
});

/** The next v2 message, decoded; its descriptors are closed. */
async function nextReply(raw: RawClient): Promise<Reply> {
  const answer = await reply(raw);
  answer.descriptors.forEach(closeDescriptor);
  return answer.reply;
}
