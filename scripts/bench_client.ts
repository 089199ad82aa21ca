/**
 * Client-side benchmarks: what the library costs an application, against C
 * doing the same.
 *
 * - Pairing round trip on an idle broker: one pairing at a time, a `server`
 *   and a `client` {@link getPair} on a fresh key started together, timed
 *   until both have their socket; against the C generator doing the same
 *   (`loadgen pair --concurrency 1`), on the same broker. Each broker, ours
 *   and the C floor, is started fresh for every run.
 * - Bytes per second through a paired socket: our {@link PairedSocket}
 *   `writable` feeding a C reader, and a C writer feeding our `readable`,
 *   against a plain C write loop and read loop on a socketpair (`loadgen
 *   socketpair`). The rate is the reader's, from its first byte to end of
 *   stream; the CPU time is ours where we take part.
 *
 * Usage:
 * ```sh
 * deno task bench:client [--pairs N] [--warmup N] [--bytes N] [--chunk N] [--runs N] [--json]
 * ```
 *
 * @module
 */

import process from "node:process";
import { parseArgs } from "node:util";
import { getPair, type PairedSocket } from "../mod.ts";
import {
  brokerCommand,
  type BrokerHandle,
  type BrokerKind,
  integer,
  integerOption,
  loadgen,
  machineLines,
  median,
  percentile,
  startBroker,
  startScript,
  tableLine,
  temporaryDirectory,
  UsageError,
} from "./bench_support.ts";

const USAGE = `Usage: deno task bench:client [OPTIONS]

Times a pairing round trip through the library against the C generator on an
idle broker (ours and the C floor), and bytes per second through a paired
socket with the library's streams against a plain C loop on a socketpair.
Needs \`deno task build:c\` (the task runs it).

Options:
  --pairs N    measured pairings per round-trip run (default 5000)
  --warmup N   unmeasured pairings before each round-trip run (default 500)
  --bytes N    bytes per throughput run (default 1073741824, 1 GiB)
  --chunk N    bytes per read or write (default 65536, the library's stream chunk)
  --runs N     runs of each measurement; medians are reported (default 3)
  --json       print one JSON object instead of the tables
  -h, --help   show this help`;

interface Options {
  pairs: number;
  warmup: number;
  bytes: number;
  chunk: number;
  runs: number;
  json: boolean;
}

function parseOptions(args: string[]): Options | undefined {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    strict: true,
    options: {
      pairs: { type: "string", default: "5000" },
      warmup: { type: "string", default: "500" },
      bytes: { type: "string", default: String(2 ** 30) },
      chunk: { type: "string", default: "65536" },
      runs: { type: "string", default: "3" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${positionals[0]}`);
  return {
    pairs: integerOption("pairs", values.pairs),
    warmup: integerOption("warmup", values.warmup, true),
    bytes: integerOption("bytes", values.bytes),
    chunk: integerOption("chunk", values.chunk),
    runs: integerOption("runs", values.runs),
    json: values.json,
  };
}

interface RoundTrip {
  p50Micros: number;
  p99Micros: number;
  /** The client side's CPU time per pairing: this process, or the C generator. */
  clientCpuMicrosPerPair: number;
}

interface Transfer {
  bytesPerSecond: number;
  /** This process's CPU time per GiB moved, when it took part. */
  cpuMillisPerGiB?: number;
}

/** What `loadgen stream` and `loadgen socketpair` print. */
interface LoadgenTransfer {
  bytes: number;
  seconds: number;
  bytesPerSecond: number;
}

const keyPrefix = `bench-client-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}-`;
let keySequence = 0;

/** CPU time of this process so far in µs (getrusage). */
function ownCpuMicros(): number {
  const { user, system } = process.cpuUsage();
  return user + system;
}

async function libraryPairings(socket: string, count: number): Promise<Float64Array> {
  const latencies = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    const key = keyPrefix + keySequence++;
    const start = performance.now();
    const [server, client] = await Promise.all([
      getPair(key, { socket, mode: "server" }),
      getPair(key, { socket, mode: "client" }),
    ]);
    latencies[i] = (performance.now() - start) * 1000;
    server.close();
    client.close();
  }
  return latencies;
}

async function libraryRoundTrip(broker: BrokerHandle, options: Options): Promise<RoundTrip> {
  await libraryPairings(broker.socket, options.warmup);
  const before = ownCpuMicros();
  const latencies = await libraryPairings(broker.socket, options.pairs);
  const cpu = ownCpuMicros() - before;
  latencies.sort();
  return {
    p50Micros: percentile(latencies, 0.5),
    p99Micros: percentile(latencies, 0.99),
    clientCpuMicrosPerPair: cpu / options.pairs,
  };
}

async function cRoundTrip(broker: BrokerHandle, options: Options): Promise<RoundTrip> {
  const run = await loadgen<{
    p50Micros: number;
    p99Micros: number;
    userMicrosPerPair: number;
    systemMicrosPerPair: number;
  }>([
    "pair",
    broker.socket,
    "--concurrency=1",
    `--pairs=${options.pairs}`,
    `--warmup=${options.warmup}`,
  ]);
  return {
    p50Micros: run.p50Micros,
    p99Micros: run.p99Micros,
    clientCpuMicrosPerPair: run.userMicrosPerPair + run.systemMicrosPerPair,
  };
}

/** The same chunk over and over until `bytes` are out; the socket copies it on every write. */
function source(bytes: number, chunk: number): ReadableStream<Uint8Array> {
  const data = new Uint8Array(chunk);
  let left = bytes;
  return new ReadableStream({
    pull(controller) {
      if (left === 0) return controller.close();
      const size = Math.min(left, chunk);
      controller.enqueue(size === chunk ? data : data.subarray(0, size));
      left -= size;
    },
  });
}

/** Our writable into a C reader; the rate is the reader's. */
async function libraryWrites(socket: string, options: Options): Promise<Transfer> {
  const key = keyPrefix + keySequence++;
  const reader = loadgen<LoadgenTransfer>([
    "stream",
    socket,
    key,
    "read",
    `--chunk=${options.chunk}`,
  ]);
  const paired = await getPair(key, { socket, mode: "client" });
  const before = ownCpuMicros();
  await source(options.bytes, options.chunk).pipeTo(paired.writable);
  const cpu = ownCpuMicros() - before;
  paired.close();
  const { bytesPerSecond } = await reader;
  return { bytesPerSecond, cpuMillisPerGiB: cpu / 1000 / (options.bytes / 2 ** 30) };
}

/** A C writer into our readable; the rate is ours, from the first chunk to end of stream. */
async function libraryReads(socket: string, options: Options): Promise<Transfer> {
  const key = keyPrefix + keySequence++;
  const writer = loadgen<{ bytes: number }>([
    "stream",
    socket,
    key,
    "write",
    `--bytes=${options.bytes}`,
    `--chunk=${options.chunk}`,
  ]);
  const paired: PairedSocket = await getPair(key, { socket, mode: "server" });
  let bytes = 0;
  let start = 0;
  let cpuBefore = 0;
  for await (const chunk of paired.readable) {
    if (bytes === 0) {
      start = performance.now();
      cpuBefore = ownCpuMicros();
    }
    bytes += chunk.length;
  }
  const seconds = (performance.now() - start) / 1000;
  const cpu = ownCpuMicros() - cpuBefore;
  paired.close();
  await writer;
  if (bytes !== options.bytes) throw new Error(`read ${bytes} bytes of ${options.bytes}`);
  return { bytesPerSecond: bytes / seconds, cpuMillisPerGiB: cpu / 1000 / (bytes / 2 ** 30) };
}

async function cSocketpair(options: Options): Promise<Transfer> {
  const { bytesPerSecond } = await loadgen<LoadgenTransfer>([
    "socketpair",
    `--bytes=${options.bytes}`,
    `--chunk=${options.chunk}`,
  ]);
  return { bytesPerSecond };
}

const ROUND_TRIP_COLUMNS: [string, number][] = [
  ["broker", -6],
  ["client", -7],
  ["p50 µs", 7],
  ["p99 µs", 7],
  ["client CPU µs/pair", 18],
];

const TRANSFER_COLUMNS: [string, number][] = [
  ["path", -34],
  ["MiB/s", 7],
  ["vs C", 5],
  ["our CPU ms/GiB", 14],
];

async function main(args: string[]): Promise<number> {
  const start = await startScript("bench:client", USAGE, parseOptions, args);
  if (typeof start === "number") return start;
  const { options, machine, command } = start;
  const say = options.json ? () => {} : console.log;
  for (const line of machineLines(machine, command)) say(line);
  try {
    await using directory = await temporaryDirectory();
    let started = 0;
    const broker = (kind: BrokerKind) => {
      const socket = `${directory.path}/${kind}-${++started}.socket`;
      return startBroker(brokerCommand(kind, socket), socket);
    };

    const clients = { library: libraryRoundTrip, C: cRoundTrip };
    const roundTrips: { broker: BrokerKind; client: string; median: RoundTrip }[] = [];
    for (const kind of ["ours", "floor"] as const) {
      const runs: Record<string, RoundTrip[]> = { library: [], C: [] };
      // Taking turns, as the pairing benchmark does: drift hits both clients alike.
      for (let i = 0; i < options.runs; i++) {
        for (const [name, measure] of Object.entries(clients)) {
          await using handle = await broker(kind);
          runs[name].push(await measure(handle, options));
        }
      }
      for (const [client, results] of Object.entries(runs)) {
        roundTrips.push({
          broker: kind,
          client,
          median: {
            p50Micros: median(results.map((r) => r.p50Micros)),
            p99Micros: median(results.map((r) => r.p99Micros)),
            clientCpuMicrosPerPair: median(results.map((r) => r.clientCpuMicrosPerPair)),
          },
        });
      }
    }
    say(`\npairing round trip on an idle broker (concurrency 1), medians of ${options.runs} runs`);
    say(tableLine(ROUND_TRIP_COLUMNS.map(([h]) => h), ROUND_TRIP_COLUMNS.map(([, w]) => w)));
    for (const { broker, client, median: m } of roundTrips) {
      say(tableLine(
        [
          broker,
          client,
          integer(m.p50Micros),
          integer(m.p99Micros),
          m.clientCpuMicrosPerPair.toFixed(1),
        ],
        ROUND_TRIP_COLUMNS.map(([, w]) => w),
      ));
    }

    // The broker is out of the path once the pair is made: the floor starts fastest.
    await using handle = await broker("floor");
    const paths: [string, () => Promise<Transfer>][] = [
      ["C write loop → C read loop", () => cSocketpair(options)],
      ["library writable → C read loop", () => libraryWrites(handle.socket, options)],
      ["C write loop → library readable", () => libraryReads(handle.socket, options)],
    ];
    const transfers = [];
    for (const [path, measure] of paths) {
      const results: Transfer[] = [];
      for (let i = 0; i < options.runs; i++) results.push(await measure());
      const cpu = results.map((r) => r.cpuMillisPerGiB);
      transfers.push({
        path,
        bytesPerSecond: median(results.map((r) => r.bytesPerSecond)),
        cpuMillisPerGiB: cpu.includes(undefined) ? undefined : median(cpu as number[]),
      });
    }
    const baseline = transfers[0].bytesPerSecond;
    say(
      `\nbytes through a paired socket, ${integer(options.bytes)} per run in ` +
        `${integer(options.chunk)}-byte chunks, medians of ${options.runs} runs`,
    );
    say(tableLine(TRANSFER_COLUMNS.map(([h]) => h), TRANSFER_COLUMNS.map(([, w]) => w)));
    for (const t of transfers) {
      say(tableLine(
        [
          t.path,
          integer(t.bytesPerSecond / 2 ** 20),
          (t.bytesPerSecond / baseline).toFixed(2),
          t.cpuMillisPerGiB === undefined ? "-" : integer(t.cpuMillisPerGiB),
        ],
        TRANSFER_COLUMNS.map(([, w]) => w),
      ));
    }
    if (options.json) {
      console.log(JSON.stringify({ machine, command, options, roundTrips, transfers }, null, 2));
    }
  } catch (error) {
    console.error(`bench:client: ${error instanceof Error ? error.message : error}`);
    return 1;
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
