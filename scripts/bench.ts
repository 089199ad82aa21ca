/**
 * Pairing benchmark: our broker against the floor, a minimal C broker
 * (`scripts/floor.c`) making the same system calls, on the same machine in
 * the same run.
 *
 * The load comes from the C generator (`scripts/loadgen.c`): a pairing is a
 * `server` and a `client` request on a fresh key, timed from the first
 * `socket()` until both replies are in; a load keeps C pairings in flight,
 * optionally beside N idle waiters (connections waiting on keys nobody else
 * sends). For each load the brokers take turns, A B A B, each run on a fresh
 * broker process after a warm-up, so that peak RSS belongs to that load. A
 * run measures the broker's CPU time per pairing (user and system, all
 * threads, from `/proc/PID/stat`), pairs per second, p50/p99 latency, peak
 * RSS (`VmHWM`) and the generator's own CPU time per pairing. The report
 * gives the medians per broker and load, and the ratios ours/floor of those
 * medians against the targets (issue 9's for CPU and pairs/s, issue 5's for
 * latency and collapse).
 *
 * With `--socket` it measures only the broker already listening there (any
 * protocol v1 broker, the C one too; its pid comes from `SO_PEERCRED`).
 *
 * Usage:
 * ```sh
 * deno task bench [--socket PATH] [--loads 1,16,128,1024,16+10000] [--pairs N]
 *                 [--runs N] [--warmup N] [--deno-flags FLAGS] [--json]
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  brokerCommand,
  type BrokerHandle,
  type BrokerKind,
  existingBroker,
  integer,
  integerOption,
  loadgen,
  machineLines,
  median,
  shellQuote,
  startBroker,
  startScript,
  tableLine,
  temporaryDirectory,
  UsageError,
} from "./bench_support.ts";

const USAGE = `Usage: deno task bench [OPTIONS]

Sends the same pairing load to our broker and to the C floor (scripts/floor.c),
taking turns, a fresh broker process per run, and prints for each the broker's
CPU time per pairing, pairs per second, p50/p99 pairing latency and peak RSS,
then the ratios ours/floor against the targets. Needs \`deno task build:c\`
(the bench task runs it).

Options:
  --socket PATH        measure only the broker listening there (any protocol v1 broker)
  --loads LIST         comma-separated: C keeps C pairings in flight; C+N adds N idle
                       waiters (default 1,16,128,1024,16+10000)
  --pairs N            measured pairings per run (default 30000)
  --runs N             runs per broker and load; medians are reported (default 5)
  --warmup N           unmeasured pairings before each run (default 20000: V8 compiles the
                       hot path on background threads, which count as the broker's CPU,
                       during the first ten thousand or so)
  --deno-flags FLAGS   more flags for our broker's \`deno run\`, space-separated
                       (e.g. --deno-flags="--cpu-prof --cpu-prof-dir=prof")
  --json               print one JSON object instead of the tables
  -h, --help           show this help`;

interface Load {
  label: string;
  concurrency: number;
  idle: number;
}

/** What `loadgen pair` prints for one run. */
interface Run {
  pairs: number;
  seconds: number;
  pairsPerSecond: number;
  p50Micros: number;
  p99Micros: number;
  maxMicros: number;
  /** The generator's own CPU time per pairing. */
  userMicrosPerPair: number;
  systemMicrosPerPair: number;
  /** Absent when the broker's /proc entry is out of reach (another pid namespace, say). */
  brokerUserMicrosPerPair?: number;
  brokerSystemMicrosPerPair?: number;
  brokerPeakRssKiB?: number;
}

/** Medians over one broker's runs of one load; each metric's median on its own. */
interface Summary {
  brokerCpuMicrosPerPair?: number;
  brokerUserMicrosPerPair?: number;
  brokerSystemMicrosPerPair?: number;
  pairsPerSecond: number;
  p50Micros: number;
  p99Micros: number;
  peakRssMiB?: number;
  generatorCpuMicrosPerPair: number;
}

type Metric = "brokerCpuMicrosPerPair" | "p99Micros" | "pairsPerSecond";

/** A ratio ours/floor that an issue bounds, at the loads it names. */
interface Target {
  metric: Metric;
  name: string;
  /** The ratio must be at most this (`atMost`) or at least this. */
  limit: number;
  atMost: boolean;
  appliesTo(load: Load): boolean;
}

const BOUNDED = (load: Load) => load.concurrency === 16 || load.concurrency === 128;
const TARGETS: Target[] = [
  {
    metric: "brokerCpuMicrosPerPair",
    name: "CPU per pairing",
    limit: 1.25,
    atMost: true,
    appliesTo: BOUNDED,
  },
  { metric: "p99Micros", name: "p99 latency", limit: 2, atMost: true, appliesTo: BOUNDED },
  { metric: "pairsPerSecond", name: "pairs/s", limit: 0.95, atMost: false, appliesTo: BOUNDED },
  // "No collapse": at this concurrency pairs/s may fall, but not to a fraction of the floor's.
  {
    metric: "pairsPerSecond",
    name: "pairs/s (no collapse)",
    limit: 0.5,
    atMost: false,
    appliesTo: (load) => load.concurrency >= 1024,
  },
];

interface Verdict {
  load: string;
  target: string;
  ratio: number;
  limit: string;
  met: boolean;
}

interface Options {
  socket?: string;
  loads: Load[];
  pairs: number;
  runs: number;
  warmup: number;
  denoFlags: string[];
  json: boolean;
}

function parseLoad(text: string): Load {
  const match = /^(\d+)(?:\+(\d+))?$/.exec(text);
  if (!match) throw new UsageError(`--loads: ${text} is not C or C+N`);
  const concurrency = integerOption("loads", match[1]);
  const idle = match[2] === undefined ? 0 : integerOption("loads", match[2], true);
  return { label: text, concurrency, idle };
}

function parseOptions(args: string[]): Options | undefined {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    strict: true,
    options: {
      socket: { type: "string" },
      loads: { type: "string", default: "1,16,128,1024,16+10000" },
      pairs: { type: "string", default: "30000" },
      runs: { type: "string", default: "5" },
      warmup: { type: "string", default: "20000" },
      "deno-flags": { type: "string", default: "" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${positionals[0]}`);
  return {
    socket: values.socket,
    loads: values.loads.split(",").map(parseLoad),
    pairs: integerOption("pairs", values.pairs),
    runs: integerOption("runs", values.runs),
    warmup: integerOption("warmup", values.warmup, true),
    denoFlags: values["deno-flags"].split(" ").filter((flag) => flag),
    json: values.json,
  };
}

/** The broker's CPU time per pairing, user + system. */
function brokerCpu(run: Run): number | undefined {
  return run.brokerUserMicrosPerPair === undefined
    ? undefined
    : run.brokerUserMicrosPerPair + run.brokerSystemMicrosPerPair!;
}

function generatorCpu(run: Run): number {
  return run.userMicrosPerPair + run.systemMicrosPerPair;
}

function summarize(runs: Run[]): Summary {
  const of = (pick: (run: Run) => number | undefined) => {
    const values = runs.map(pick);
    return values.includes(undefined) ? undefined : median(values as number[]);
  };
  const peakRssKiB = of((run) => run.brokerPeakRssKiB);
  return {
    brokerCpuMicrosPerPair: of(brokerCpu),
    brokerUserMicrosPerPair: of((run) => run.brokerUserMicrosPerPair),
    brokerSystemMicrosPerPair: of((run) => run.brokerSystemMicrosPerPair),
    pairsPerSecond: of((run) => run.pairsPerSecond)!,
    p50Micros: of((run) => run.p50Micros)!,
    p99Micros: of((run) => run.p99Micros)!,
    peakRssMiB: peakRssKiB === undefined ? undefined : peakRssKiB / 1024,
    generatorCpuMicrosPerPair: of(generatorCpu)!,
  };
}

function verdicts(loads: Load[], summaries: Map<string, Record<string, Summary>>): Verdict[] {
  const result: Verdict[] = [];
  for (const load of loads) {
    const { ours, floor } = summaries.get(load.label)!;
    for (const target of TARGETS.filter((t) => t.appliesTo(load))) {
      const a = ours[target.metric];
      const b = floor[target.metric];
      if (a === undefined || b === undefined) continue;
      const ratio = a / b;
      result.push({
        load: load.label,
        target: target.name,
        ratio,
        limit: `${target.atMost ? "≤" : "≥"} ${target.limit}`,
        met: target.atMost ? ratio <= target.limit : ratio >= target.limit,
      });
    }
  }
  return result;
}

const RESULT_COLUMNS: [string, number][] = [
  ["load", -8],
  ["broker", -6],
  ["CPU µs/pair", 11],
  ["user", 5],
  ["system", 6],
  ["pairs/s", 7],
  ["p50 µs", 7],
  ["p99 µs", 7],
  ["peak RSS MiB", 12],
  ["generator CPU µs/pair", 21],
];

const TARGET_COLUMNS: [string, number][] = [
  ["load", -8],
  ["measure", -21],
  ["ours/floor", 10],
  ["target", 6],
  ["verdict", -7],
];

function resultLine(load: string, broker: string, s: Summary): string {
  const fixed = (n: number | undefined, digits = 1) => n === undefined ? "-" : n.toFixed(digits);
  return tableLine(
    [
      load,
      broker,
      fixed(s.brokerCpuMicrosPerPair),
      fixed(s.brokerUserMicrosPerPair),
      fixed(s.brokerSystemMicrosPerPair),
      integer(s.pairsPerSecond),
      integer(s.p50Micros),
      integer(s.p99Micros),
      fixed(s.peakRssMiB),
      fixed(s.generatorCpuMicrosPerPair),
    ],
    RESULT_COLUMNS.map(([, width]) => width),
  );
}

function runLine(load: Load, broker: string, index: number, run: Run): string {
  return `  ${load.label} ${broker} run ${index}: ${integer(run.pairsPerSecond)} pairs/s, ` +
    `p50 ${integer(run.p50Micros)} µs, p99 ${integer(run.p99Micros)} µs, ` +
    `broker CPU ${brokerCpu(run)?.toFixed(1) ?? "-"} µs/pair, ` +
    `generator CPU ${generatorCpu(run).toFixed(1)} µs/pair`;
}

async function main(args: string[]): Promise<number> {
  const start = await startScript("bench", USAGE, parseOptions, args);
  if (typeof start === "number") return start;
  const { options, machine, command } = start;
  const say = options.json ? () => {} : console.log;
  const brokers: string[] = options.socket === undefined ? ["ours", "floor"] : ["socket"];
  try {
    await using directory = await temporaryDirectory();
    let started = 0;
    const commands: Record<string, string[]> = {};
    // A fresh broker per run, so that its peak RSS is this load's; --socket measures the one there.
    const broker = (name: string): Promise<BrokerHandle> => {
      if (options.socket !== undefined) return existingBroker(options.socket);
      const socket = `${directory.path}/${name}-${++started}.socket`;
      commands[name] = brokerCommand(name as BrokerKind, socket, options.denoFlags);
      return startBroker(commands[name], socket);
    };

    for (const line of machineLines(machine, command)) say(line);
    say(
      `runs:    ${options.runs} per broker and load, taking turns; each ${options.pairs} ` +
        `pairings after ${options.warmup} unmeasured ones; medians reported`,
    );
    const runs = new Map<string, Record<string, Run[]>>();
    for (const load of options.loads) {
      const byBroker: Record<string, Run[]> = Object.fromEntries(brokers.map((b) => [b, []]));
      runs.set(load.label, byBroker);
      for (let index = 1; index <= options.runs; index++) {
        for (const name of brokers) {
          await using handle = await broker(name);
          const run = await loadgen<Run>([
            "pair",
            handle.socket,
            `--concurrency=${load.concurrency}`,
            `--idle=${load.idle}`,
            `--pairs=${options.pairs}`,
            `--warmup=${options.warmup}`,
            `--broker-pid=${handle.pid}`,
          ]);
          byBroker[name].push(run);
          say(runLine(load, name, index, run));
        }
      }
    }
    for (const [name, argv] of Object.entries(commands)) {
      say(`${name}: ${argv.map(shellQuote).join(" ")}`);
    }

    const summaries = new Map(
      [...runs].map(([label, byBroker]) => [
        label,
        Object.fromEntries(Object.entries(byBroker).map(([name, r]) => [name, summarize(r)])),
      ]),
    );
    say(`\nmedians of ${options.runs} runs (CPU: the broker's, all threads, user + system)`);
    if (options.socket !== undefined) say("peak RSS: since that broker started, not per load");
    say(tableLine(RESULT_COLUMNS.map(([h]) => h), RESULT_COLUMNS.map(([, w]) => w)));
    for (const [label, byBroker] of summaries) {
      for (const [name, summary] of Object.entries(byBroker)) say(resultLine(label, name, summary));
    }

    const targets = options.socket === undefined ? verdicts(options.loads, summaries) : [];
    if (targets.length > 0) {
      say(`\ntargets: ratios ours/floor of the medians above`);
      say(tableLine(TARGET_COLUMNS.map(([h]) => h), TARGET_COLUMNS.map(([, w]) => w)));
      for (const v of targets) {
        say(tableLine(
          [v.load, v.target, v.ratio.toFixed(2), v.limit, v.met ? "met" : "missed"],
          TARGET_COLUMNS.map(([, w]) => w),
        ));
      }
    }
    if (options.json) {
      console.log(JSON.stringify(
        {
          machine,
          command,
          brokers: options.socket === undefined ? commands : { socket: options.socket },
          pairs: options.pairs,
          warmup: options.warmup,
          loads: options.loads.map((load) => ({
            ...load,
            runs: runs.get(load.label),
            medians: summaries.get(load.label),
          })),
          targets,
        },
        null,
        2,
      ));
    }
  } catch (error) {
    console.error(`bench: ${error instanceof Error ? error.message : error}`);
    return 1;
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
