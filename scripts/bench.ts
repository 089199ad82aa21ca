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
 * A listener load (`listenerC`, issue 11) sends C one-shot v1 clients at a
 * time through one protocol v2 listener (`loadgen listen`: a `LISTEN` with
 * `--backlog`, credit given back in halves of it), on our broker only, since
 * the floor speaks v1 alone. Its runs take their turn right after those of
 * the pairing load C (added if missing), each on a fresh broker, and it is
 * reported against that load's runs on our broker: connections per second
 * through the listener over pairs per second, and broker CPU per connection
 * over broker CPU per pairing, as the median of each run's ratio.
 *
 * With `--socket` it measures only the broker already listening there (any
 * protocol v1 broker, the C one too; its pid comes from `SO_PEERCRED`); a
 * listener load is left out, with a note, if that broker does not speak v2.
 *
 * Usage:
 * ```sh
 * deno task bench [--socket PATH] [--loads 1,16,128,1024,16+10000,listener16] [--pairs N]
 *                 [--runs N] [--warmup N] [--backlog N] [--deno-flags FLAGS] [--json]
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
  LOADGEN_NO_V2,
  LoadgenError,
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
then the ratios ours/floor against the targets. A listener load sends one-shot
v1 clients through one protocol v2 listener on our broker only (the floor speaks
v1 alone) and is compared with the pairing load at its concurrency. Needs
\`deno task build:c\` (the bench task runs it).

Options:
  --socket PATH        measure only the broker listening there (any protocol v1 broker;
                       listener loads are left out if it does not speak v2)
  --loads LIST         comma-separated: C keeps C pairings in flight; C+N adds N idle
                       waiters; listenerC keeps C clients of one listener in flight, its
                       runs right after those of C, which it adds if missing
                       (default 1,16,128,1024,16+10000,listener16)
  --pairs N            measured pairings (connections, for a listener load) per run
                       (default 30000)
  --runs N             runs per broker and load; medians are reported (default 5)
  --warmup N           unmeasured pairings before each run (default 20000: V8 compiles the
                       hot path on background threads, which count as the broker's CPU,
                       during the first ten thousand or so)
  --backlog N          backlog a listener load asks for; it gives credit back in halves
                       of what the broker grants (default 16, the broker's default)
  --deno-flags FLAGS   more flags for our broker's \`deno run\`, space-separated
                       (e.g. --deno-flags="--cpu-prof --cpu-prof-dir=prof")
  --json               print one JSON object instead of the tables
  -h, --help           show this help`;

interface Load {
  label: string;
  concurrency: number;
  idle: number;
}

/** C one-shot v1 clients at a time through one v2 listener, against the pairing load `against`. */
interface ListenerLoad {
  label: string;
  concurrency: number;
  /** The label of the pairing load (concurrency C, no waiters) it is compared with. */
  against: string;
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

/** What `loadgen listen` prints for one run. */
interface ListenerRun {
  concurrency: number;
  /** Granted by the broker's `HELLO`. */
  backlog: number;
  /** SET_PAIRs per `CREDIT`. */
  creditBatch: number;
  connections: number;
  /** `CREDIT` messages sent during the measured connections. */
  credits: number;
  seconds: number;
  connectionsPerSecond: number;
  p50Micros: number;
  p99Micros: number;
  maxMicros: number;
  userMicrosPerConnection: number;
  systemMicrosPerConnection: number;
  brokerUserMicrosPerConnection?: number;
  brokerSystemMicrosPerConnection?: number;
  brokerPeakRssKiB?: number;
}

/** A listener run and the ratios to the pairing run of the same index on the same broker kind. */
interface ListenerComparison {
  run: ListenerRun;
  /** Connections/s through the listener over pairs/s one-shot. */
  throughputRatio: number;
  /** Broker CPU per connection over broker CPU per pairing; absent without the broker's /proc. */
  cpuRatio?: number;
}

/** Medians of a listener load's runs and of their ratios; each its own median. */
interface ListenerSummary {
  connectionsPerSecond: number;
  pairsPerSecond: number;
  throughputRatio: number;
  brokerCpuMicrosPerConnection?: number;
  brokerCpuMicrosPerPair?: number;
  cpuRatio?: number;
  p50Micros: number;
  p99Micros: number;
  peakRssMiB?: number;
  generatorCpuMicrosPerConnection: number;
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
  listenerLoads: ListenerLoad[];
  pairs: number;
  runs: number;
  warmup: number;
  backlog: number;
  denoFlags: string[];
  json: boolean;
}

function parseLoad(text: string): Load {
  const match = /^(\d+)(?:\+(\d+))?$/.exec(text);
  if (!match) throw new UsageError(`--loads: ${text} is not C, C+N or listenerC`);
  const concurrency = integerOption("loads", match[1]);
  const idle = match[2] === undefined ? 0 : integerOption("loads", match[2], true);
  return { label: text, concurrency, idle };
}

/** The pairing loads and the listener loads of `--loads`; a listener load adds its pairing load. */
function parseLoads(text: string): { loads: Load[]; listenerLoads: ListenerLoad[] } {
  const loads: Load[] = [];
  const listenerLoads: ListenerLoad[] = [];
  for (const item of text.split(",")) {
    const listener = /^listener(\d+)$/.exec(item);
    if (!listener) {
      loads.push(parseLoad(item));
      continue;
    }
    const concurrency = integerOption("loads", listener[1]);
    const label = `listener${concurrency}`;
    if (listenerLoads.some((load) => load.label === label)) continue;
    listenerLoads.push({ label, concurrency, against: "" });
  }
  for (const load of listenerLoads) {
    let against = loads.find((l) => l.concurrency === load.concurrency && l.idle === 0);
    if (against === undefined) {
      against = { label: `${load.concurrency}`, concurrency: load.concurrency, idle: 0 };
      loads.push(against);
    }
    load.against = against.label;
  }
  return { loads, listenerLoads };
}

function parseOptions(args: string[]): Options | undefined {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    strict: true,
    options: {
      socket: { type: "string" },
      loads: { type: "string", default: "1,16,128,1024,16+10000,listener16" },
      pairs: { type: "string", default: "30000" },
      runs: { type: "string", default: "5" },
      warmup: { type: "string", default: "20000" },
      backlog: { type: "string", default: "16" },
      "deno-flags": { type: "string", default: "" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${positionals[0]}`);
  return {
    socket: values.socket,
    ...parseLoads(values.loads),
    pairs: integerOption("pairs", values.pairs),
    runs: integerOption("runs", values.runs),
    warmup: integerOption("warmup", values.warmup, true),
    backlog: backlogOption(values.backlog),
    denoFlags: values["deno-flags"].split(" ").filter((flag) => flag),
    json: values.json,
  };
}

function backlogOption(text: string): number {
  const backlog = integerOption("backlog", text);
  if (backlog > 65535) throw new UsageError("--backlog must be at most 65535 (a 16-bit field)");
  return backlog;
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

/** The broker's CPU time per connection through the listener, user + system. */
function listenerCpu(run: ListenerRun): number | undefined {
  return run.brokerUserMicrosPerConnection === undefined
    ? undefined
    : run.brokerUserMicrosPerConnection + run.brokerSystemMicrosPerConnection!;
}

function compareListener(run: ListenerRun, pairing: Run): ListenerComparison {
  const cpu = listenerCpu(run);
  const pairCpu = brokerCpu(pairing);
  return {
    run,
    throughputRatio: run.connectionsPerSecond / pairing.pairsPerSecond,
    cpuRatio: cpu === undefined || pairCpu === undefined ? undefined : cpu / pairCpu,
  };
}

function summarizeListener(comparisons: ListenerComparison[], pairings: Run[]): ListenerSummary {
  const of = <T>(items: T[], pick: (item: T) => number | undefined) => {
    const values = items.map(pick);
    return values.includes(undefined) ? undefined : median(values as number[]);
  };
  const runs = comparisons.map((c) => c.run);
  const peakRssKiB = of(runs, (run) => run.brokerPeakRssKiB);
  return {
    connectionsPerSecond: of(runs, (run) => run.connectionsPerSecond)!,
    pairsPerSecond: of(pairings, (run) => run.pairsPerSecond)!,
    throughputRatio: of(comparisons, (c) => c.throughputRatio)!,
    brokerCpuMicrosPerConnection: of(runs, listenerCpu),
    brokerCpuMicrosPerPair: of(pairings, brokerCpu),
    cpuRatio: of(comparisons, (c) => c.cpuRatio),
    p50Micros: of(runs, (run) => run.p50Micros)!,
    p99Micros: of(runs, (run) => run.p99Micros)!,
    peakRssMiB: peakRssKiB === undefined ? undefined : peakRssKiB / 1024,
    generatorCpuMicrosPerConnection: of(
      runs,
      (run) => run.userMicrosPerConnection + run.systemMicrosPerConnection,
    )!,
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

const LISTENER_COLUMNS: [string, number][] = [
  ["load", -12],
  ["broker", -6],
  ["conn/s", 7],
  ["pairs/s", 7],
  ["ratio", 5],
  ["CPU µs/conn", 11],
  ["CPU µs/pair", 11],
  ["ratio", 5],
  ["p50 µs", 7],
  ["p99 µs", 7],
  ["peak RSS MiB", 12],
  ["generator CPU µs/conn", 21],
];

function listenerLine(load: ListenerLoad, broker: string, s: ListenerSummary): string {
  const fixed = (n: number | undefined, digits = 1) => n === undefined ? "-" : n.toFixed(digits);
  return tableLine(
    [
      load.label,
      broker,
      integer(s.connectionsPerSecond),
      integer(s.pairsPerSecond),
      fixed(s.throughputRatio, 2),
      fixed(s.brokerCpuMicrosPerConnection),
      fixed(s.brokerCpuMicrosPerPair),
      fixed(s.cpuRatio, 2),
      integer(s.p50Micros),
      integer(s.p99Micros),
      fixed(s.peakRssMiB),
      fixed(s.generatorCpuMicrosPerConnection),
    ],
    LISTENER_COLUMNS.map(([, width]) => width),
  );
}

function listenerRunLine(
  load: ListenerLoad,
  broker: string,
  index: number,
  c: ListenerComparison,
): string {
  const { run } = c;
  return `  ${load.label} ${broker} run ${index}: ${
    integer(run.connectionsPerSecond)
  } connections/s, ` +
    `p50 ${integer(run.p50Micros)} µs, p99 ${integer(run.p99Micros)} µs, ` +
    `broker CPU ${listenerCpu(run)?.toFixed(1) ?? "-"} µs/connection, generator CPU ` +
    `${(run.userMicrosPerConnection + run.systemMicrosPerConnection).toFixed(1)} µs/connection; ` +
    `over ${load.against} ${broker} run ${index}: ${c.throughputRatio.toFixed(2)} × pairs/s, ` +
    `${c.cpuRatio?.toFixed(2) ?? "-"} × CPU per pairing`;
}

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
    // Listener loads run on our broker (or the one at --socket): the floor does not speak v2.
    const listenerBroker = brokers[0];
    const listenerWhere = options.socket === undefined
      ? "our broker only (the floor does not speak protocol v2)"
      : "the broker at --socket";
    for (const load of options.listenerLoads) {
      say(
        `${load.label}: ${options.pairs} connections after ${options.warmup} unmeasured ones ` +
          `through one v2 listener (backlog ${options.backlog} asked), on ${listenerWhere}, ` +
          `each run right after run i of ${load.against} and compared with it`,
      );
    }
    const runs = new Map<string, Record<string, Run[]>>();
    const listenerRuns = new Map<string, ListenerComparison[]>();
    let listenerSkipped: string | undefined;
    for (const load of options.loads) {
      const byBroker: Record<string, Run[]> = Object.fromEntries(brokers.map((b) => [b, []]));
      runs.set(load.label, byBroker);
      const companions = options.listenerLoads.filter((l) => l.against === load.label);
      for (const companion of companions) listenerRuns.set(companion.label, []);
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
        for (const companion of companions) {
          if (listenerSkipped !== undefined) break;
          await using handle = await broker(listenerBroker);
          let run: ListenerRun;
          try {
            run = await loadgen<ListenerRun>([
              "listen",
              handle.socket,
              `--concurrency=${companion.concurrency}`,
              `--connections=${options.pairs}`,
              `--warmup=${options.warmup}`,
              `--backlog=${options.backlog}`,
              `--broker-pid=${handle.pid}`,
            ]);
          } catch (error) {
            // Any v1 broker may sit at --socket: then the listener loads are left out.
            const noV2 = error instanceof LoadgenError && error.code === LOADGEN_NO_V2;
            if (options.socket === undefined || !noV2) throw error;
            listenerSkipped = "the broker at --socket does not speak protocol v2";
            say(`  listener loads left out: ${listenerSkipped}`);
            break;
          }
          const comparison = compareListener(run, byBroker[listenerBroker][index - 1]);
          listenerRuns.get(companion.label)!.push(comparison);
          say(listenerRunLine(companion, listenerBroker, index, comparison));
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
    const listenerSummaries = new Map(
      options.listenerLoads.filter((load) => listenerRuns.get(load.label)?.length).map((load) => [
        load.label,
        summarizeListener(
          listenerRuns.get(load.label)!,
          runs.get(load.against)![listenerBroker].slice(0, listenerRuns.get(load.label)!.length),
        ),
      ]),
    );
    if (listenerSummaries.size > 0) {
      const first = listenerRuns.get([...listenerSummaries.keys()][0])![0].run;
      say(
        `\nlistener loads: connections through one v2 listener (backlog ${first.backlog} granted, ` +
          `a CREDIT every ${first.creditBatch}) against one-shot v1 pairings at the same ` +
          `concurrency, on ${listenerWhere}; medians of ${options.runs} runs; each ratio is the ` +
          `median of the runs' listener/one-shot ratios, both runs of the same round`,
      );
      say(tableLine(LISTENER_COLUMNS.map(([h]) => h), LISTENER_COLUMNS.map(([, w]) => w)));
      for (const load of options.listenerLoads) {
        const summary = listenerSummaries.get(load.label);
        if (summary) say(listenerLine(load, listenerBroker, summary));
      }
    } else if (listenerSkipped !== undefined) {
      say(`\nlistener loads left out: ${listenerSkipped}`);
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
          listeners: options.listenerLoads.map((load) => ({
            ...load,
            broker: listenerBroker,
            backlog: options.backlog,
            runs: listenerRuns.get(load.label)?.map(({ run, ...ratios }) => ({
              ...run,
              ...ratios,
            })),
            medians: listenerSummaries.get(load.label),
          })),
          ...(listenerSkipped === undefined ? {} : { listenerSkipped }),
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
