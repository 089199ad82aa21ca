/**
 * Scale check: holds N clients waiting at once (distinct keys), measures the
 * broker's memory per waiting client, and compares pairing throughput and
 * broker CPU per pairing with those waiters present against none.
 *
 * Usage:
 * ```sh
 * deno task scale [--waiters 100000] [--pairings 20000] [--concurrency 16] [--runs 3]
 * ```
 *
 * Each waiter costs a descriptor in the broker and one here. N is capped by
 * both processes' descriptor limits (the hard limit of an ordinary process;
 * raise it with `prlimit --nofile=…` where the kernel lets you), and the cap
 * is reported.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { getPair } from "../mod.ts";
import { encodeGetPair } from "../client/protocol.ts";
import { Errno } from "../ffi/errors.ts";
import { descriptorLimit, raiseDescriptorLimit } from "../ffi/process.ts";
import { connectUnix, readInto, sendFrom, type UnixSocket } from "../ffi/socket.ts";
import {
  brokerCommand,
  median,
  processUsage,
  startBroker,
  temporaryDirectory,
} from "./bench_support.ts";

const { values } = parseArgs({
  options: {
    waiters: { type: "string", default: "100000" },
    pairings: { type: "string", default: "20000" },
    concurrency: { type: "string", default: "16" },
    runs: { type: "string", default: "3" },
  },
});

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const directory = await temporaryDirectory();
const path = `${directory.path}/broker.socket`;
const broker = await startBroker(brokerCommand("ours", path), path);
const usage = () => processUsage(broker.pid);

let serial = 0;
/** Pairs at the given concurrency; pairs/s and broker CPU µs per pairing. */
async function measurePairing(count: number, concurrency: number) {
  const cpuBefore = usage().cpuSeconds;
  const started = performance.now();
  let done = 0;
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (done < count) {
      done++;
      const key = `pair-${serial++}`;
      const [a, b] = await Promise.all([
        getPair(key, { socket: path, mode: "server" }),
        getPair(key, { socket: path, mode: "client" }),
      ]);
      a.close();
      b.close();
    }
  }));
  const seconds = (performance.now() - started) / 1000;
  return {
    pairsPerSecond: done / seconds,
    cpuMicros: (usage().cpuSeconds - cpuBefore) * 1e6 / done,
  };
}

async function measureRuns(label: string) {
  const runs = [];
  for (let run = 0; run < Number(values.runs); run++) {
    runs.push(await measurePairing(Number(values.pairings), Number(values.concurrency)));
  }
  const result = {
    pairsPerSecond: median(runs.map((r) => r.pairsPerSecond)),
    cpuMicros: median(runs.map((r) => r.cpuMicros)),
  };
  console.log(
    `${label}: ${result.pairsPerSecond.toFixed(0)} pairs/s, broker CPU ${
      result.cpuMicros.toFixed(1)
    } µs/pairing ` +
      `(median of ${runs.length}: ${
        runs.map((r) => r.pairsPerSecond.toFixed(0)).join(", ")
      } pairs/s)`,
  );
  return result;
}

await measurePairing(2000, 16); // warm-up: JIT, heap sizing
const idle = await measureRuns("no waiters");
await sleep(500);
const before = usage();

raiseDescriptorLimit();
const room = Math.min(descriptorLimit().soft, before.hardLimit) - 256;
const wanted = Number(values.waiters);
const count = Math.min(wanted, room);
if (count < wanted) {
  console.log(
    `holding ${count} waiters, not ${wanted}: descriptor limits allow no more ` +
      `(ours ${descriptorLimit().soft}, the broker's ${before.hardLimit})`,
  );
}
const waiters: UnixSocket[] = [];
const openStarted = performance.now();
for (let i = 0; i < count; i++) {
  const socket = await connectUnix(path);
  const request = encodeGetPair(`waiter-${i}`, "server") as Uint8Array<ArrayBuffer>;
  if (sendFrom(socket.fd, request) !== request.length) throw new Error(`waiter ${i}: short send`);
  waiters.push(socket);
}
while (usage().fds < before.fds + count) await sleep(50);
await sleep(1000);
const held = usage();
console.log(
  `${count} waiters filed in ${
    ((performance.now() - openStarted) / 1000).toFixed(1)
  } s; broker RSS ` +
    `${(before.rssBytes / 2 ** 20).toFixed(1)} → ${(held.rssBytes / 2 ** 20).toFixed(1)} MiB: ` +
    `${((held.rssBytes - before.rssBytes) / count).toFixed(0)} bytes per waiting client`,
);

const busy = await measureRuns(`with ${count} waiters`);
const evicted =
  waiters.filter((socket) => readInto(socket.fd, new Uint8Array(1)) !== -Errno.EAGAIN).length;
console.log(`evicted or answered while waiting: ${evicted} of ${count}`);
console.log(
  `with waiters / without: pairs/s ${(busy.pairsPerSecond / idle.pairsPerSecond).toFixed(3)}, ` +
    `broker CPU per pairing ${(busy.cpuMicros / idle.cpuMicros).toFixed(3)}`,
);

waiters.forEach((socket) => socket.close());
await broker[Symbol.asyncDispose]();
await directory[Symbol.asyncDispose]();
if (evicted > 0) Deno.exit(1);
