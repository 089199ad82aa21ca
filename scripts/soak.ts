/**
 * Soak test: a million pairings through one broker while other clients
 * connect and vanish mid-request or while waiting, then checks that the
 * broker's descriptor count and memory come back to where they started.
 *
 * Usage:
 * ```sh
 * deno task soak [--pairings 1000000] [--workers 64] [--vanish 0.1] [--socket PATH]
 * ```
 *
 * Without `--socket` it starts `one-socket broker` as a separate process
 * (which it can then inspect through /proc); with `--socket` it only drives
 * the load and reports what it can see from the outside.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { getPair } from "../mod.ts";
import { encodeGetPair, GET_PAIR_MIN_SIZE } from "../client/protocol.ts";
import { connectUnix, peerCredentials, sendFrom } from "../ffi/socket.ts";

const { values } = parseArgs({
  options: {
    pairings: { type: "string", default: "1000000" },
    workers: { type: "string", default: "64" },
    vanish: { type: "string", default: "0.1" },
    socket: { type: "string" },
  },
});
const pairings = Number(values.pairings);
const workers = Number(values.workers);
const vanishShare = Number(values.vanish);

interface Usage {
  fds: number;
  rssKiB: number;
  cpuSeconds: number;
}

function usage(pid: number): Usage {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return {
    fds: [...Deno.readDirSync(`/proc/${pid}/fd`)].length,
    rssKiB: Number(/VmRSS:\s+(\d+)/.exec(status)![1]),
    cpuSeconds: (Number(fields[11]) + Number(fields[12])) / 100,
  };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function startBroker(): Promise<{ path: string; stop(): Promise<void> }> {
  const directory = await Deno.makeTempDir({ prefix: "one-socket-soak-" });
  const path = `${directory}/broker.socket`;
  const mod = new URL("../mod.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", mod, "broker", "--socket", path, "--log-level", "error"],
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
  for (let i = 0; i < 200 && !(await Deno.lstat(path).then(() => true, () => false)); i++) {
    await sleep(25);
  }
  return {
    path,
    async stop() {
      child.kill("SIGTERM");
      await child.status;
      await Deno.remove(directory, { recursive: true });
    },
  };
}

/** A client that sends part of its request, or all of it, and goes away before its pair. */
async function vanish(path: string, serial: number): Promise<void> {
  const socket = await connectUnix(path);
  const request = encodeGetPair(`vanishing-${serial}`, "server") as Uint8Array<ArrayBuffer>;
  const midRequest = serial % 2 === 0;
  sendFrom(socket.fd, midRequest ? request.subarray(0, serial % GET_PAIR_MIN_SIZE) : request);
  if (!midRequest) await sleep(serial % 5);
  socket.close();
}

async function pairOnce(path: string, serial: number): Promise<number> {
  const started = performance.now();
  const key = `soak-${serial}`;
  const [a, b] = await Promise.all([
    getPair(key, { socket: path, mode: "server" }),
    getPair(key, { socket: path, mode: "client" }),
  ]);
  a.close();
  b.close();
  return performance.now() - started;
}

const broker = values.socket
  ? { path: values.socket, stop: () => Promise.resolve() }
  : await startBroker();
const probe = await connectUnix(broker.path);
const brokerPid = peerCredentials(probe.fd).pid;
probe.close();

// Warm up so that the baseline includes the JIT and the lazily created reactor.
for (let i = 0; i < 2000; i++) await pairOnce(broker.path, -i - 1);
await sleep(500);
const baseline = usage(brokerPid);
let peakRss = baseline.rssKiB;
console.log(`broker pid ${brokerPid}; baseline: ${JSON.stringify(baseline)}`);

let paired = 0;
let vanished = 0;
let serial = 0;
const started = performance.now();
const sampler = setInterval(() => {
  const now = usage(brokerPid);
  peakRss = Math.max(peakRss, now.rssKiB);
  const rate = paired / ((performance.now() - started) / 1000);
  console.log(
    `${paired} pairs, ${vanished} vanished, ${rate.toFixed(0)} pairs/s, ` +
      `broker fds ${now.fds}, RSS ${(now.rssKiB / 1024).toFixed(1)} MiB`,
  );
}, 5000);

await Promise.all(Array.from({ length: workers }, async () => {
  while (paired < pairings) {
    const mine = serial++;
    if ((mine * 2654435761 >>> 0) / 2 ** 32 < vanishShare) {
      await vanish(broker.path, mine);
      vanished++;
    } else {
      await pairOnce(broker.path, mine);
      paired++;
    }
  }
}));
clearInterval(sampler);
const elapsed = (performance.now() - started) / 1000;
const busy = usage(brokerPid);
await sleep(3000); // let the broker see the last hang-ups
const after = usage(brokerPid);
peakRss = Math.max(peakRss, busy.rssKiB, after.rssKiB);
await broker.stop();

const mib = (kib: number) => `${(kib / 1024).toFixed(1)} MiB`;
console.log(`
${paired} pairings and ${vanished} vanishing clients in ${elapsed.toFixed(1)} s (${
  (paired / elapsed).toFixed(0)
} pairs/s); broker CPU ${(busy.cpuSeconds - baseline.cpuSeconds).toFixed(1)} s
broker descriptors: baseline ${baseline.fds}, after ${after.fds}${
  after.fds === baseline.fds ? " (back to baseline)" : " (LEAK?)"
}
broker RSS: baseline ${mib(baseline.rssKiB)}, peak ${mib(peakRss)}, after ${mib(after.rssKiB)}`);
if (after.fds !== baseline.fds) Deno.exit(1);
