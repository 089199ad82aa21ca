import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { AccessPolicy } from "../broker/policy.ts";
import { BrokerClosedError, getPair } from "../client/pair.ts";
import { encodeGetPair } from "../client/protocol.ts";
import { buildCProgram, eventually, RawClient, withBroker } from "./helpers.ts";
import { startBroker, withScope } from "./processes.ts";

/** Another uid to connect as: the tests run as root wherever CI runs them. */
const OTHER_UID = 65534;
const cClient = await buildCProgram("sp_client");
const canSwitchUid = Deno.uid() === 0 && cClient !== undefined;
// The program must be reachable for the other uid too.
if (cClient) await Deno.chmod(cClient.slice(0, cClient.lastIndexOf("/")), 0o755);
if (!canSwitchUid) {
  console.warn("access_test: not root or no cc; tests with a second uid are ignored");
}

/** Lets OTHER_UID reach the broker socket inside the test's private directory. */
async function openToOthers(path: string): Promise<void> {
  await Deno.chmod(path.slice(0, path.lastIndexOf("/")), 0o755);
  await Deno.chmod(path, 0o666);
}

/** Runs the C client as OTHER_UID; resolves to its exit code and stderr. */
function runAsOtherUid(path: string, key: string, mode: "server" | "client") {
  // node:child_process's uid option fails with EPERM under Deno here; setpriv does the same job.
  const child = spawn("setpriv", [
    `--reuid=${OTHER_UID}`,
    `--regid=${OTHER_UID}`,
    "--clear-groups",
    cClient!,
    path,
    key,
    mode,
  ]);
  let stderr = "";
  child.stderr.on("data", (chunk) => stderr += chunk);
  const done = new Promise<{ code: number | null; stderr: string }>((resolve) =>
    child.on("close", (code) => resolve({ code, stderr }))
  );
  return { child, done };
}

const policy = AccessPolicy.parse(
  JSON.stringify({
    rules: [
      { action: "allow", prefix: "root-", uids: [0] },
      { action: "allow", prefix: "shared-", cross_uid: true },
      { action: "allow", prefix: "any-" },
    ],
  }),
  "json",
  "test policy",
);
const authorize = (request: Parameters<AccessPolicy["decide"]>[0]) => policy.decide(request);

Deno.test("policy: allowed keys pair, a denied request is closed and counted", () =>
  withBroker(async (broker, path) => {
    const [a, b] = await Promise.all([
      getPair("root-1", { socket: path, mode: "server" }),
      getPair("root-1", { socket: path, mode: "client" }),
    ]);
    a.close();
    b.close();
    await assert.rejects(getPair("unlisted", { socket: path }), BrokerClosedError);
    assert.equal(broker.metrics.dropped.policy, 1);
    assert.equal(broker.stats.waiting, 0);
  }, { authorize }));

Deno.test({
  name: "policy: another uid is denied a key reserved for root, allowed an open one",
  ignore: !canSwitchUid,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      const denied = runAsOtherUid(path, "root-2", "server");
      const result = await denied.done;
      assert.notEqual(result.code, 0, "the broker should have closed the request");
      assert.match(result.stderr, /reply of 0 bytes/);
      assert.equal(broker.metrics.dropped.policy, 1);
      const allowed = runAsOtherUid(path, "any-1", "server");
      await eventually(() => broker.stats.waiting === 1, "the other uid's request to wait");
      allowed.child.kill();
      await allowed.done;
    }, { authorize }),
});

Deno.test({
  name: "isolate-uids: same key, different uids do not pair unless the policy allows",
  ignore: !canSwitchUid,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      const isolated = runAsOtherUid(path, "any-2", "server");
      await eventually(() => broker.stats.waiting === 1, "the other uid to wait");
      await assert.rejects(
        getPair("any-2", { socket: path, mode: "client", signal: AbortSignal.timeout(200) }),
        { name: "TimeoutError" },
      );
      isolated.child.kill();
      await isolated.done;
      // A cross_uid rule lets the two uids meet, and the C server's echo proves the pair.
      const shared = runAsOtherUid(path, "shared-1", "server");
      await eventually(() => broker.stats.waiting === 1, "the other uid to wait");
      const socket = await getPair("shared-1", { socket: path, mode: "client" });
      await socket.write(new TextEncoder().encode("ping"));
      const reply = new Uint8Array(4);
      assert.equal(await socket.read(reply), 4);
      assert.equal(new TextDecoder().decode(reply), "Ping");
      socket.close();
      assert.equal((await shared.done).code, 0);
    }, { authorize, isolateUids: true }),
});

Deno.test("isolate-uids: clients of one uid still pair", () =>
  withBroker(async (_broker, path) => {
    const [a, b] = await Promise.all([
      getPair("any-3", { socket: path }),
      getPair("any-3", { socket: path }),
    ]);
    a.close();
    b.close();
  }, { isolateUids: true }));

Deno.test("per-uid limit: the request over the limit is closed; a request that pairs is not", () =>
  withBroker(async (broker, path) => {
    const waiting = [1, 2].map((i) => getPair(`limit-${i}`, { socket: path, mode: "server" }));
    await eventually(() => broker.stats.waiting === 2, "two requests to wait");
    await assert.rejects(getPair("limit-3", { socket: path }), BrokerClosedError);
    assert.equal(broker.metrics.dropped.uid_limit, 1);
    // At the limit, a request that finds its partner is still served, and frees a slot.
    const partner = await getPair("limit-1", { socket: path, mode: "client" });
    partner.close();
    (await waiting[0]).close();
    const third = getPair("limit-3", { socket: path, mode: "server" });
    await eventually(() => broker.stats.waiting === 2, "the freed slot to be taken");
    const [x, y] = await Promise.all([
      getPair("limit-2", { socket: path, mode: "client" }),
      getPair("limit-3", { socket: path, mode: "client" }),
    ]);
    for (const socket of [x, y, await waiting[1], await third]) socket.close();
  }, { maxWaitingPerUid: 2 }));

Deno.test({
  name: "per-uid limit: one uid at its limit does not stop another",
  ignore: !canSwitchUid,
  fn: () =>
    withBroker(async (broker, path) => {
      await openToOthers(path);
      const mine = getPair("mine", { socket: path });
      await eventually(() => broker.stats.waiting === 1, "our request to wait");
      const theirs = runAsOtherUid(path, "theirs", "server");
      await eventually(() => broker.stats.waiting === 2, "the other uid to wait too");
      assert.equal(broker.metrics.dropped.uid_limit, undefined);
      theirs.child.kill();
      await theirs.done;
      await broker.close();
      await assert.rejects(mine, BrokerClosedError);
    }, { maxWaitingPerUid: 1 }),
});

Deno.test("handshake timeout: a silent client and a slow drip are both closed", () =>
  withBroker(async (broker, path) => {
    using silent = await RawClient.connect(path);
    using drip = await RawClient.connect(path);
    const request = encodeGetPair("slow", "none");
    const started = Date.now();
    let sent = 0;
    const dripping = setInterval(() => {
      try {
        drip.send(request.subarray(sent, sent + 1));
        sent++;
      } catch {
        clearInterval(dripping); // closed by the broker: EPIPE
      }
    }, 20);
    try {
      const replies = await Promise.all([silent.readToEnd(3000), drip.readToEnd(3000)]);
      const elapsed = Date.now() - started;
      assert.ok(elapsed >= 300 && elapsed < 1500, `closed after ${elapsed} ms`);
      assert.deepEqual(replies.map((reply) => reply.bytes.length), [0, 0]);
      assert.equal(broker.metrics.dropped.handshake_timeout, 2);
    } finally {
      clearInterval(dripping);
    }
  }, { handshakeTimeoutMs: 300 }));

Deno.test("pair timeout: an unpaired request is closed after the timeout, not before", () =>
  withBroker(async (broker, path) => {
    const started = Date.now();
    await assert.rejects(getPair("lonely", { socket: path }), BrokerClosedError);
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 400 && elapsed < 1500, `closed after ${elapsed} ms`);
    assert.equal(broker.metrics.dropped.pair_timeout, 1);
  }, { pairTimeoutMs: 400 }));

Deno.test("a waiting client is not subject to the handshake timeout", () =>
  withBroker(async (broker, path) => {
    const waiting = getPair("patient", { socket: path });
    await new Promise((resolve) => setTimeout(resolve, 700));
    assert.equal(broker.stats.waiting, 1);
    const peer = await getPair("patient", { socket: path });
    peer.close();
    (await waiting).close();
  }, { handshakeTimeoutMs: 200 }));

Deno.test({
  name: "isolate-uids: a cross-uid key cannot be crafted to reach another uid's private key",
  ignore: !canSwitchUid,
  fn: () => {
    const crossEverything = AccessPolicy.parse(
      JSON.stringify({
        rules: [
          { action: "allow", glob: "*", uids: [0], cross_uid: true },
          { action: "allow", prefix: "vhost-" },
        ],
      }),
      "json",
      "attack policy",
    );
    return withBroker(async (broker, path) => {
      await openToOthers(path);
      const victim = runAsOtherUid(path, "vhost-user-1", "server");
      await eventually(() => broker.stats.waiting === 1, "the victim to wait");
      // The victim's key as the matcher holds it: its uid, big-endian, then the key.
      const forged = new Uint8Array([
        0,
        0,
        0xff,
        0xfe,
        ...new TextEncoder().encode("vhost-user-1"),
      ]);
      await assert.rejects(
        getPair(forged, { socket: path, mode: "client", signal: AbortSignal.timeout(300) }),
        { name: "TimeoutError" },
      );
      assert.equal(broker.stats.paired, 0);
      victim.child.kill();
      await victim.done;
    }, { authorize: (request) => crossEverything.decide(request), isolateUids: true });
  },
});

Deno.test("isolate uids: the log names the key as the client sent it, without its uid scope", async () => {
  await withScope(async (scope) => {
    const broker = await startBroker(scope, [
      "--socket",
      scope.socket,
      "--isolate-uids",
      "--log-level",
      "debug",
    ]);
    const signal = AbortSignal.timeout(5000);
    const pair = await Promise.all([
      getPair("iso-key", { socket: scope.socket, signal }),
      getPair("iso-key", { socket: scope.socket, signal }),
    ]);
    pair.forEach((socket) => socket.close());
    await broker.waitForOutput('on key "iso-key"');
    assert.doesNotMatch(broker.output, /\\x00\\x00/);
  });
});
