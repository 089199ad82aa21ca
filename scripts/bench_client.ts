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
 * - Against Deno's own Unix sockets: a child process writes through one API
 *   and another reads through the same API, {@link PairedSocket}
 *   streams against `Deno.connect({ transport: "unix" })` streams, and
 *   `PairedSocket.read`/`write` against `Deno.UnixConn.read`/`write` (into a
 *   reused buffer), taking turns run by run.
 *
 * Then the ratios against issue 9's targets: our getPair's client CPU at most
 * 1.5 times the C client's, our streams at least 0.9 of Deno's, our
 * read/write at least 0.95 of Deno's.
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
idle broker (ours and the C floor), bytes per second through a paired socket
with the library's streams against a plain C loop on a socketpair, and the
library's streams and read/write against Deno's own Unix sockets; then the
ratios against issue 9's targets.
Needs \`deno task build:c\` (the task runs it).

Options:
  --pairs N    measured pairings per round-trip run (default 5000)
  --warmup N   unmeasured pairings before each round-trip run (default 500)
  --bytes N    bytes per throughput run (default 1073741824, 1 GiB)
  --chunk N    bytes per read or write (default 65536, the library's stream chunk)
  --runs N     runs of each measurement; medians are reported (default 3)
  --json       print one JSON object instead of the tables
  -h, --help   show this help`;

/** What a child (`--peer`) writes or reads through. */
type PeerKind = "deno-streams" | "deno-calls" | "library-streams" | "library-calls";
const PEER_KINDS: PeerKind[] = ["deno-streams", "deno-calls", "library-streams", "library-calls"];

interface Options {
  /** Set in a child only: the API it goes through, its side, and where it meets the other. */
  peer?: { kind: PeerKind; role: "read" | "write"; path: string; key: string };
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
      // Internal: this script as a child of the comparison with Deno's sockets.
      peer: { type: "string" },
      role: { type: "string", default: "write" },
      path: { type: "string" },
      key: { type: "string", default: "" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${positionals[0]}`);
  const kind = values.peer as PeerKind | undefined;
  const role = values.role;
  if (
    kind !== undefined &&
    (!PEER_KINDS.includes(kind) || values.path === undefined ||
      (role !== "read" && role !== "write"))
  ) {
    throw new UsageError(`--peer wants one of ${PEER_KINDS.join(", ")}, --role and --path`);
  }
  return {
    peer: kind === undefined
      ? undefined
      : { kind, role: role as "read" | "write", path: values.path!, key: values.key },
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

/** Something to write to and read from: a Deno.UnixConn or a PairedSocket. */
type Duplex = {
  readable: ReadableStream<Uint8Array>;
  writable: WritableStream<Uint8Array>;
  read(buffer: Uint8Array): Promise<number | null>;
  write(data: Uint8Array): Promise<number>;
  close(): void;
};

/** Connects to the reader child's listener, which may not be up yet. */
async function connectDeno(path: string): Promise<Deno.UnixConn> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return await Deno.connect({ transport: "unix", path });
    } catch (error) {
      const early = error instanceof Deno.errors.NotFound ||
        error instanceof Deno.errors.ConnectionRefused;
      if (!early || Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }
}

/** The writer child: `bytes` through its API of choice, then close. */
async function writePeer(options: Options): Promise<void> {
  const { kind, path, key } = options.peer!;
  const socket: Duplex = kind.startsWith("deno")
    ? await connectDeno(path)
    : await getPair(key, { socket: path, mode: "client" });
  if (kind.endsWith("streams")) {
    await source(options.bytes, options.chunk).pipeTo(socket.writable);
  } else {
    const data = new Uint8Array(options.chunk);
    for (let left = options.bytes; left > 0;) {
      // Deno.UnixConn.write may take part of a chunk (PairedSocket.write takes it all).
      left -= await socket.write(left >= options.chunk ? data : data.subarray(0, left));
    }
  }
  try {
    socket.close();
  } catch {
    // The stream's close already closed a Deno.UnixConn.
  }
}

/** Reads `socket` to end of stream through the API `kind` names; rate from the first byte. */
async function readAll(socket: Duplex, kind: PeerKind, options: Options): Promise<Transfer> {
  let bytes = 0;
  let start = 0;
  let cpuBefore = 0;
  const first = () => {
    start = performance.now();
    cpuBefore = ownCpuMicros();
  };
  if (kind.endsWith("streams")) {
    for await (const chunk of socket.readable) {
      if (bytes === 0) first();
      bytes += chunk.length;
    }
  } else {
    const buffer = new Uint8Array(options.chunk);
    for (let count; (count = await socket.read(buffer)) !== null;) {
      if (bytes === 0) first();
      bytes += count;
    }
  }
  const seconds = (performance.now() - start) / 1000;
  const cpu = ownCpuMicros() - cpuBefore;
  if (bytes !== options.bytes) throw new Error(`${kind}: read ${bytes} bytes of ${options.bytes}`);
  return { bytesPerSecond: bytes / seconds, cpuMillisPerGiB: cpu / 1000 / (bytes / 2 ** 30) };
}

/** The reader child: reads to end of stream through its API, prints the {@link Transfer}. */
async function readPeer(options: Options): Promise<void> {
  const { kind, path, key } = options.peer!;
  let socket: Duplex;
  if (kind.startsWith("deno")) {
    using listener = Deno.listen({ transport: "unix", path });
    socket = await listener.accept();
  } else {
    socket = await getPair(key, { socket: path, mode: "server" });
  }
  let result: Transfer;
  try {
    result = await readAll(socket, kind, options);
  } finally {
    try {
      socket.close();
    } catch {
      // The readable's end already closed a Deno.UnixConn.
    }
  }
  console.log(JSON.stringify(result));
}

/**
 * A child of this script on `role`'s side for `kind`, meeting the other at
 * `path` (with `key` through the broker). Children, not this process: Deno's
 * Unix sockets need --allow-net, which the benchmark itself goes without.
 */
function spawnPeer(
  kind: PeerKind,
  role: "read" | "write",
  path: string,
  key: string,
  options: Options,
) {
  return new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-ffi",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      "--allow-net",
      new URL(import.meta.url).pathname,
      `--peer=${kind}`,
      `--role=${role}`,
      `--path=${path}`,
      `--key=${key}`,
      `--bytes=${options.bytes}`,
      `--chunk=${options.chunk}`,
    ],
    stdin: "null",
    stdout: role === "read" ? "piped" : "null",
    stderr: "inherit",
  }).spawn();
}

/** One run of `kind`: a writer child and a reader child through that API; the reader's rate. */
async function againstDeno(
  kind: PeerKind,
  directory: string,
  brokerSocket: string,
  options: Options,
): Promise<Transfer> {
  const deno = kind.startsWith("deno");
  const path = deno ? `${directory}/deno-${++keySequence}.socket` : brokerSocket;
  const key = deno ? "" : keyPrefix + keySequence++;
  const reader = spawnPeer(kind, "read", path, key, options);
  const writer = spawnPeer(kind, "write", path, key, options);
  const [read, written] = await Promise.all([reader.output(), writer.status]);
  if (!read.success) throw new Error(`the ${kind} reader exited with code ${read.code}`);
  if (!written.success) throw new Error(`the ${kind} writer exited with code ${written.code}`);
  return JSON.parse(new TextDecoder().decode(read.stdout));
}

/** A ratio issue 9 bounds. */
interface Verdict {
  measure: string;
  ratio: number;
  limit: string;
  met: boolean;
}

function verdict(measure: string, ratio: number, limit: number, atMost: boolean): Verdict {
  return {
    measure,
    ratio,
    limit: `${atMost ? "≤" : "≥"} ${limit}`,
    met: atMost ? ratio <= limit : ratio >= limit,
  };
}

const DENO_COLUMNS: [string, number][] = [
  ["API (writer child → reader child)", -40],
  ["MiB/s", 7],
  ["reader CPU ms/GiB", 17],
];

const TARGET_COLUMNS: [string, number][] = [
  ["measure", -44],
  ["ratio", 5],
  ["target", 6],
  ["verdict", -7],
];

const DENO_LABELS: Record<PeerKind, string> = {
  "deno-streams": "Deno.UnixConn readable/writable",
  "library-streams": "PairedSocket readable/writable",
  "deno-calls": "Deno.UnixConn read/write",
  "library-calls": "PairedSocket read/write",
};

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
  if (options.peer !== undefined) {
    await (options.peer.role === "read" ? readPeer(options) : writePeer(options));
    return 0;
  }
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
    // Taking turns again, so that drift on a shared machine hits every API alike.
    const denoRuns = new Map<PeerKind, Transfer[]>(PEER_KINDS.map((kind) => [kind, []]));
    for (let i = 0; i < options.runs; i++) {
      for (const kind of PEER_KINDS) {
        denoRuns.get(kind)!.push(await againstDeno(kind, directory.path, handle.socket, options));
      }
    }
    const denoTransfers = PEER_KINDS.map((kind) => {
      const results = denoRuns.get(kind)!;
      return {
        api: kind,
        bytesPerSecond: median(results.map((r) => r.bytesPerSecond)),
        cpuMillisPerGiB: median(results.map((r) => r.cpuMillisPerGiB!)),
      };
    });
    say(
      `\nagainst Deno's Unix sockets, ${integer(options.bytes)} per run in ` +
        `${integer(options.chunk)}-byte chunks, medians of ${options.runs} interleaved runs`,
    );
    say(tableLine(DENO_COLUMNS.map(([h]) => h), DENO_COLUMNS.map(([, w]) => w)));
    for (const t of denoTransfers) {
      say(tableLine(
        [DENO_LABELS[t.api], integer(t.bytesPerSecond / 2 ** 20), integer(t.cpuMillisPerGiB)],
        DENO_COLUMNS.map(([, w]) => w),
      ));
    }

    const rate = (api: PeerKind) => denoTransfers.find((t) => t.api === api)!.bytesPerSecond;
    const cpu = (broker: BrokerKind, client: string) =>
      roundTrips.find((r) => r.broker === broker && r.client === client)!.median
        .clientCpuMicrosPerPair;
    const targets = [
      ...(["floor", "ours"] as const).map((broker) =>
        verdict(
          `getPair client CPU / C client's (${broker} broker)`,
          cpu(broker, "library") / cpu(broker, "C"),
          1.5,
          true,
        )
      ),
      verdict(
        "PairedSocket streams / Deno.UnixConn streams",
        rate("library-streams") / rate("deno-streams"),
        0.9,
        false,
      ),
      verdict(
        "PairedSocket read/write / Deno.UnixConn's",
        rate("library-calls") / rate("deno-calls"),
        0.95,
        false,
      ),
    ];
    say(`\ntargets (issue 9): ratios of the medians above`);
    say(tableLine(TARGET_COLUMNS.map(([h]) => h), TARGET_COLUMNS.map(([, w]) => w)));
    for (const v of targets) {
      say(tableLine(
        [v.measure, v.ratio.toFixed(2), v.limit, v.met ? "met" : "missed"],
        TARGET_COLUMNS.map(([, w]) => w),
      ));
    }
    if (options.json) {
      console.log(JSON.stringify(
        { machine, command, options, roundTrips, transfers, denoTransfers, targets },
        null,
        2,
      ));
    }
  } catch (error) {
    console.error(`bench:client: ${error instanceof Error ? error.message : error}`);
    return 1;
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
