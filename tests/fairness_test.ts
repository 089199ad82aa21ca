/**
 * Attacks by a hostile second uid on a real broker process: holding every
 * place, cycling silent connections, flooding malformed requests, filing
 * keys crafted to collide, hoarding descriptors in flight. Each reproduces a
 * finding of issue 8 and failed on the broker before its fix.
 */
import assert from "node:assert/strict";
import { BrokerClosedError, getPair } from "../client/pair.ts";
import { encodeGetPair } from "../client/protocol.ts";
import { Errno } from "../ffi/errors.ts";
import { connectUnix, readInto, sendFrom, type UnixSocket } from "../ffi/socket.ts";
import { fnvMulticollision } from "./collisions.ts";
import { buildCProgram, countOpenDescriptors, eventually } from "./helpers.ts";
import {
  type Cli,
  exists,
  MOD,
  PERMISSIONS,
  type Scope,
  sleep,
  startBroker,
  withScope,
} from "./processes.ts";

/** The attacker's uid: a real second user. */
const ATTACKER_UID = 65534;
const hostile = await buildCProgram("hostile");
const canSwitchUid = Deno.uid() === 0 && hostile !== undefined;
if (hostile) await Deno.chmod(hostile.slice(0, hostile.lastIndexOf("/")), 0o755);
const ignore = !canSwitchUid;
if (ignore) console.warn("fairness_test: not root or no cc; the attacks are not run");

/** A broker whose socket every uid may use, in a directory they can reach. */
async function openBroker(scope: Scope, args: string[] = [], descriptorLimit = 256) {
  await Deno.chmod(scope.dir, 0o755);
  const broker = await startBroker(
    scope,
    ["--socket", scope.socket, "--socket-mode", "0666", ...args],
    { descriptorLimit },
  );
  await broker.waitForOutput("room for");
  const capacity = Number(/room for (\d+) clients/.exec(broker.output)?.[1]);
  return { broker, capacity };
}

/** Starts the hostile client as the attacker's uid, against `socket` (the scope's by default). */
async function attack(scope: Scope, args: string[], socket = scope.socket): Promise<Cli> {
  const command = [
    "setpriv",
    `--reuid=${ATTACKER_UID}`,
    `--regid=${ATTACKER_UID}`,
    "--clear-groups",
    hostile!,
    socket,
  ];
  const attacker = scope.spawn(args, { command, descriptorLimit: 4096 });
  await attacker.waitForOutput("up");
  return attacker;
}

/** Pairs up to `count` times as this (root) process, each within `ms`; stops at the first failure. */
async function honestPairings(socket: string, count: number, ms = 5000): Promise<number> {
  let paired = 0;
  for (let i = 0; i < count; i++) {
    const signal = AbortSignal.timeout(ms);
    try {
      const [a, b] = await Promise.all([
        getPair(`honest-${i}`, { socket, mode: "server", signal }),
        getPair(`honest-${i}`, { socket, mode: "client", signal }),
      ]);
      a.close();
      b.close();
      paired++;
    } catch {
      break; // locked out: no need to wait for the rest
    }
  }
  return paired;
}

Deno.test({
  name: "fairness: one uid holding every place and cycling silent connections locks nobody out",
  ignore,
  fn: () =>
    withScope(async (scope) => {
      const { broker, capacity } = await openBroker(scope, ["--handshake-timeout", "1"]);
      // Twice the capacity in waiting requests, reconnecting whenever one is closed, and
      // silent connections that reconnect the moment they are refused or time out.
      await attack(scope, ["hold", String(2 * capacity), "attacker"]);
      const silent = await attack(scope, ["silent", "200"]);
      await sleep(500);
      assert.equal(await honestPairings(scope.socket, 75), 75, "every honest pairing succeeds");
      assert.ok(!broker.exited, broker.output);
      // The silent ones are turned away: by the limit of 64 still sending, because the
      // attacker's waiters fill the broker, or at the handshake timeout (whichever the log,
      // budgeted per cause, shows first).
      const refused = new RegExp(
        `\\(pid ${silent.pid}, uid 65534\\): (uid 65534 already has 64|broker full|no complete request)`,
      );
      await broker.waitUntil("the silent connections refused", () => refused.test(broker.output));
    }),
});

Deno.test({
  name: "fairness: a full broker makes room for another uid by closing the heaviest uid's oldest",
  ignore,
  fn: () =>
    withScope(async (scope) => {
      const { broker, capacity } = await openBroker(scope);
      await attack(scope, ["hold", String(capacity + 50), "attacker"]);
      // Full: the attacker's own extra requests are being turned away.
      await broker.waitForOutput("and uid 65534 holds the most");
      assert.equal(await honestPairings(scope.socket, 20), 20, "every honest pairing succeeds");
      await broker.waitForOutput(
        `making room for uid 0, as uid 65534 holds the most (${capacity})`,
      );
      assert.ok(!broker.exited, broker.output);
    }),
});

Deno.test({
  name: "fairness: connections still sending count for their uid, at most 64 of them",
  ignore,
  fn: () =>
    withScope(async (scope) => {
      const { broker } = await openBroker(scope);
      const baseline = countOpenDescriptors(broker.pid);
      const attacker = await attack(scope, ["silent", "100"]);
      await sleep(300);
      // 64 held, the rest refused as they come: the broker holds no more than that.
      const held = countOpenDescriptors(broker.pid) - baseline;
      assert.ok(held >= 64 && held <= 66, `${held} descriptors for 100 silent connections`);
      attacker.kill("SIGKILL");
      await attacker.finish();
      await eventually(
        () => countOpenDescriptors(broker.pid) === baseline,
        "the broker's descriptors to return to their baseline",
      );
    }),
});

Deno.test({
  name: "fairness: --uid-limit sets one uid's limits; a malformed one is a usage error",
  ignore,
  fn: () =>
    withScope(async (scope) => {
      const { broker } = await openBroker(scope, ["--uid-limit", "65534:1:5"]);
      const baseline = countOpenDescriptors(broker.pid);
      await attack(scope, ["silent", "20"]);
      await attack(scope, ["hold", "3", "limited"]);
      await broker.waitForOutput("uid 65534 already has 1 clients waiting");
      // Five silent and one waiting connection held, the rest refused as they come.
      await eventually(
        () => countOpenDescriptors(broker.pid) - baseline === 6,
        "the broker to hold 6 of the attacker's connections",
      );
      for (const bad of ["65534", "x:1", "1:0", "1:2:3:4"]) {
        const refused = await scope.spawn(["broker", "--uid-limit", bad]).finish();
        assert.equal(refused.code, 2, bad);
        assert.match(refused.stderr, /--uid-limit/);
      }
    }),
});

/** Runs the C load generator against `socket` and returns pairs per second. */
async function pairsPerSecond(loadgen: string, socket: string): Promise<number> {
  const { success, stdout, stderr } = await new Deno.Command(loadgen, {
    args: ["pair", socket, "--concurrency", "16", "--pairs", "20000"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(success, new TextDecoder().decode(stderr));
  return JSON.parse(new TextDecoder().decode(stdout)).pairsPerSecond;
}

/** Compiles `scripts/NAME.c` (the benchmark's C tools) into `directory`. */
async function buildScriptTool(name: string, directory: string): Promise<string> {
  const source = new URL(`../scripts/${name}.c`, import.meta.url).pathname;
  const output = `${directory}/${name}`;
  const { success } = await new Deno.Command("cc", { args: ["-O2", "-o", output, source] })
    .output();
  assert.ok(success, `cc scripts/${name}.c`);
  return output;
}

/**
 * Honest pairs per second through the broker at `socket` under a flood of
 * three attackers sending malformed requests, as a share of its rate without
 * them, in one round.
 */
async function floodShare(scope: Scope, loadgen: string, socket: string): Promise<number> {
  const quiet = await pairsPerSecond(loadgen, socket);
  const attackers = await Promise.all([1, 2, 3].map(() => attack(scope, ["malformed"], socket)));
  await sleep(200);
  const share = await pairsPerSecond(loadgen, socket) / quiet;
  attackers.forEach((attacker) => attacker.kill("SIGKILL"));
  await Promise.all(attackers.map((attacker) => attacker.finish()));
  return share;
}

const median = (values: number[]) => values.sort((x, y) => x - y)[values.length >> 1];

Deno.test({
  name:
    "flood: malformed requests cost honest pairing no more than they cost the C floor, and the log stays small",
  ignore,
  fn: () =>
    withScope(async (scope) => {
      await Deno.chmod(scope.dir, 0o755);
      const [loadgen, floor] = await Promise.all([
        buildScriptTool("loadgen", scope.dir),
        buildScriptTool("floor", scope.dir),
      ]);
      // Both brokers serve at once and take turns round by round, so that what else the
      // machine does weighs on both alike; on two cores the attackers' own CPU costs any
      // broker a share.
      const floorSocket = `${scope.dir}/floor.socket`;
      const floorBroker = scope.spawn([floorSocket], { command: [floor] });
      await floorBroker.waitUntil("its socket", () => exists(floorSocket));
      await Deno.chmod(floorSocket, 0o666);
      const logFile = `${scope.dir}/broker.log`;
      const broker = await startBroker(scope, [
        "--socket",
        scope.socket,
        "--socket-mode",
        "0666",
        "--log-file",
        logFile,
      ]);
      const floorShares: number[] = [];
      const shares: number[] = [];
      let seconds = 0; // ours under the flood, for the log's rate
      for (let round = 0; round < 3; round++) {
        floorShares.push(await floodShare(scope, loadgen, floorSocket));
        const started = performance.now();
        shares.push(await floodShare(scope, loadgen, scope.socket));
        seconds += (performance.now() - started) / 1000;
      }
      floorBroker.kill("SIGTERM");
      await floorBroker.finish();
      const floorShare = median(floorShares);
      const share = median(shares);
      console.log(
        `flood: ours keeps ${share.toFixed(2)} of its rate, the floor ${floorShare.toFixed(2)}`,
      );
      assert.ok(
        // Measured with attackers that survive refusals: ours 0.50-0.75, the floor 0.55-0.83,
        // run by run; ours/floor 0.79 at worst in 12 runs. 0.7 leaves room for this noise.
        share >= 0.7 * floorShare,
        `under the flood ours keeps ${share.toFixed(2)} of its rate, the floor ${
          floorShare.toFixed(2)
        }`,
      );
      assert.ok(!broker.exited, broker.output);
      // Stopping says what the current window held back.
      broker.kill("SIGTERM");
      assert.equal((await broker.finish()).code, 0);
      const log = await Deno.readTextFile(logFile);
      // 20 lines per cause per 10 s, and a summary of what was held back: the old broker
      // wrote about 15 MB a second here.
      const perSecond = log.length / seconds;
      assert.ok(perSecond < 20_000, `${Math.round(perSecond)} bytes of log per second`);
      assert.match(log, /held back \d+ similar warnings \(protocol:request\)/);
    }),
});

Deno.test("collisions: 4096 keys crafted against the old hash neither slow filing nor pairing", async () => {
  await withScope(async (scope) => {
    const broker = await startBroker(scope);
    const keys = fnvMulticollision(12);
    const sockets: UnixSocket[] = [];
    try {
      const started = performance.now();
      for (const key of keys) {
        const socket = await connectUnix(scope.socket);
        sockets.push(socket);
        const request = encodeGetPair(key, "server") as Uint8Array<ArrayBuffer>;
        assert.equal(sendFrom(socket.fd, request), request.length);
      }
      // The honest pairing right behind them is served at once.
      const signal = AbortSignal.timeout(2000);
      const [a, b] = await Promise.all([
        getPair("honest", { socket: scope.socket, signal }),
        getPair("honest", { socket: scope.socket, signal }),
      ]);
      a.close();
      b.close();
      const filing = performance.now() - started;
      // On the old hash, the broker spent about 33 s of CPU on these.
      assert.ok(filing < 5000, `filing 4096 crafted keys took ${Math.round(filing)} ms`);
      const stillWaiting = sockets.filter((s) =>
        readInto(s.fd, new Uint8Array(1)) === -Errno.EAGAIN
      );
      assert.equal(stillWaiting.length, keys.length);
    } finally {
      sockets.forEach((socket) => socket.close());
    }
    assert.ok(!broker.exited, broker.output);
  });
});

/**
 * A broker under a descriptor limit of 64 without the capabilities `caps`.
 * The kernel refuses SCM_RIGHTS once the sender's user has more descriptors
 * in flight than its RLIMIT_NOFILE, unless it holds CAP_SYS_RESOURCE or
 * CAP_SYS_ADMIN, which a root test process has.
 */
function brokerWithout(scope: Scope, caps: string[]): Promise<Cli> {
  const dropped = caps.map((cap) => `-${cap}`).join(",");
  return startBroker(scope, ["--socket", scope.socket], {
    descriptorLimit: 64,
    command: [
      ...(caps.length ? ["setpriv", `--bounding-set=${dropped}`, `--inh-caps=${dropped}`] : []),
      Deno.execPath(),
      "run",
      ...PERMISSIONS,
      MOD,
    ],
  });
}

Deno.test({
  name:
    "hoarding: descriptors a client never reads make sends fail with ETOOMANYREFS: named, and both clients told at once",
  ignore,
  fn: () =>
    withScope(async (scope) => {
      const broker = await brokerWithout(scope, ["sys_resource", "sys_admin"]);
      const waiting = await connectUnix(scope.socket);
      try {
        const request = encodeGetPair("victim", "server") as Uint8Array<ArrayBuffer>;
        assert.equal(sendFrom(waiting.fd, request), request.length);
        // 40 pairings whose replies nobody reads: 80 descriptors in flight, past 64.
        const hoarder = scope.spawn(["hoard", "40", "hoard"], {
          command: [hostile!, scope.socket],
        });
        await hoarder.waitForOutput("up");
        await broker.waitForOutput("ETOOMANYREFS (descriptors in flight");
        // The waiting partner is not taken for gone: the newcomer is closed with it, at once.
        await assert.rejects(
          getPair("victim", {
            socket: scope.socket,
            mode: "client",
            signal: AbortSignal.timeout(3000),
          }),
          BrokerClosedError,
        );
        await eventually(
          () => readInto(waiting.fd, new Uint8Array(1)) === 0,
          "the waiting partner to be closed",
        );
        hoarder.kill("SIGKILL");
        await hoarder.finish();
      } finally {
        waiting.close();
      }
      // Once the hoarder is gone, so are its descriptors in flight.
      const signal = AbortSignal.timeout(5000);
      const [a, b] = await Promise.all([
        getPair("after", { socket: scope.socket, signal }),
        getPair("after", { socket: scope.socket, signal }),
      ]);
      a.close();
      b.close();
      assert.ok(!broker.exited, broker.output);
    }),
});

// The shipped unit grants CAP_SYS_RESOURCE for this; this sandbox has none to give, so the
// test shows the kernel's exemption with the other capability it honours.
Deno.test({
  name: "hoarding: a broker holding CAP_SYS_ADMIN or CAP_SYS_RESOURCE is not blocked",
  ignore,
  fn: () =>
    withScope(async (scope) => {
      const broker = await brokerWithout(scope, []);
      const hoarder = scope.spawn(["hoard", "40", "hoard"], { command: [hostile!, scope.socket] });
      await hoarder.waitForOutput("up");
      const signal = AbortSignal.timeout(5000);
      try {
        const [a, b] = await Promise.all([
          getPair("honest", { socket: scope.socket, signal }),
          getPair("honest", { socket: scope.socket, signal }),
        ]);
        a.close();
        b.close();
      } catch (error) {
        throw new Error(`no pair; the broker said:\n${broker.output}`, { cause: error });
      }
      assert.doesNotMatch(broker.output, /ETOOMANYREFS/);
    }),
});
