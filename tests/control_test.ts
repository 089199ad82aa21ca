/**
 * The control API and `one-socket ctl`: endpoints against a broker in this
 * process, then the command line against real `one-socket broker` processes.
 */

import assert from "node:assert/strict";
import type { Broker } from "../broker/broker.ts";
import { type ControlClient, type ControlStatus, serveControl } from "../broker/control.ts";
import { getPair } from "../client/pair.ts";
import { encodeGetPair } from "../client/protocol.ts";
import { countOpenDescriptors } from "../ffi/process.ts";
import { listenUnix } from "../ffi/socket.ts";
import denoConfig from "../deno.json" with { type: "json" };
import { eventually, RawClient, withBroker } from "./helpers.ts";
import { parsePrometheus } from "./prometheus_text.ts";
import { ControlHttp, startWithControl } from "./control_support.ts";
import { exists, type Scope, sleep, WAIT_MS, withScope } from "./processes.ts";

const decoder = new TextDecoder();

/** A broker in this process with its control API, both on temporary sockets. */
function withControl(
  body: (broker: Broker, socket: string, http: ControlHttp) => Promise<void>,
): Promise<void> {
  return withBroker(async (broker, socket) => {
    await using control = await serveControl(broker, { socket: `${socket}.control` });
    using http = new ControlHttp(control.path);
    await body(broker, socket, http);
  });
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
      pairedTotal: 0,
      rejectedTotal: 0,
      acceptedTotal: 0,
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
      pairedTotal: 1,
      rejectedTotal: 1,
      acceptedTotal: 4,
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
    assert.match(table[0], /^ID +MODE +WAITING +PID +UID +KEY$/);
    assert.match(
      table[1],
      new RegExp(`^\\d+ +server +\\d+\\.\\ds +${waiting.pid} +${Deno.uid()} +"ctl key"$`),
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
      [["metrics", "--json"], /--json applies to status and clients/],
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
