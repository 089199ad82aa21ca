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
import { connectUnix, sendFrom } from "../ffi/socket.ts";
import {
  brokerCommand,
  existingBroker,
  processUsage,
  startBroker,
  temporaryDirectory,
} from "./bench_support.ts";

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

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

/** A client that sends part of its request, or all of it, and goes away before its pair. */
async function vanish(path: string, serial: number): Promise<void> {
  const socket = await connectUnix(path);
  const request = encodeGetPair(`vanishing-${serial}`, "server") as Uint8Array<ArrayBuffer>;
  const midRequest = serial % 2 === 0;
  sendFrom(socket.fd, midRequest ? request.subarray(0, serial % GET_PAIR_MIN_SIZE) : request);
  if (!midRequest) await sleep(serial % 5);
  socket.close();
}

async function pairOnce(path: string, serial: number): Promise<void> {
  const key = `soak-${serial}`;
  const [a, b] = await Promise.all([
    getPair(key, { socket: path, mode: "server" }),
    getPair(key, { socket: path, mode: "client" }),
  ]);
  a.close();
  b.close();
}

const directory = await temporaryDirectory();
const ownSocket = `${directory.path}/broker.socket`;
const broker = values.socket
  ? await existingBroker(values.socket)
  : await startBroker(brokerCommand("ours", ownSocket), ownSocket);
const usage = () => processUsage(broker.pid);

// Warm up so that the baseline includes the JIT and the lazily created reactor.
for (let i = 0; i < 2000; i++) await pairOnce(broker.socket, -i - 1);
await sleep(500);
const baseline = usage();
let peakRss = baseline.rssBytes;
console.log(`broker pid ${broker.pid}; baseline: ${JSON.stringify(baseline)}`);

let paired = 0;
let vanished = 0;
let serial = 0;
const started = performance.now();
const sampler = setInterval(() => {
  const now = usage();
  peakRss = Math.max(peakRss, now.rssBytes);
  const rate = paired / ((performance.now() - started) / 1000);
  console.log(
    `${paired} pairs, ${vanished} vanished, ${rate.toFixed(0)} pairs/s, ` +
      `broker fds ${now.fds}, RSS ${mib(now.rssBytes)}`,
  );
}, 5000);

await Promise.all(Array.from({ length: workers }, async () => {
  while (paired < pairings) {
    const mine = serial++;
    if ((mine * 2654435761 >>> 0) / 2 ** 32 < vanishShare) {
      await vanish(broker.socket, mine);
      vanished++;
    } else {
      await pairOnce(broker.socket, mine);
      paired++;
    }
  }
}));
clearInterval(sampler);
const elapsed = (performance.now() - started) / 1000;
const busy = usage();
await sleep(3000); // let the broker see the last hang-ups
const after = usage();
peakRss = Math.max(peakRss, busy.rssBytes, after.rssBytes);
await broker[Symbol.asyncDispose]();
await directory[Symbol.asyncDispose]();

console.log(`
${paired} pairings and ${vanished} vanishing clients in ${elapsed.toFixed(1)} s (${
  (paired / elapsed).toFixed(0)
} pairs/s); broker CPU ${(busy.cpuSeconds - baseline.cpuSeconds).toFixed(1)} s
broker descriptors: baseline ${baseline.fds}, after ${after.fds}${
  after.fds === baseline.fds ? " (back to baseline)" : " (LEAK?)"
}
broker RSS: baseline ${mib(baseline.rssBytes)}, peak ${mib(peakRss)}, after ${
  mib(after.rssBytes)
}`);
if (after.fds !== baseline.fds) Deno.exit(1);
