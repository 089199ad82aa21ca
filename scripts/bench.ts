/**
 * Pairing benchmark: pairs per second and pairing latency of a broker at
 * several concurrency levels.
 *
 * A pairing is two {@link getPair} calls on a fresh key, one `server` and one
 * `client`, started together; its latency runs from that start until both
 * have their socket. Concurrency c keeps c pairings in flight. Each level
 * first warms up, then measures `--runs` runs of `--pairs` pairings and
 * reports every run and the median run (by pairs per second), together with
 * the CPU time the broker and this generator spent per pairing.
 *
 * Without `--socket` it starts the broker as a separate Deno process, so the
 * generator and the broker do not share a JavaScript thread, and stops it
 * with SIGTERM at the end. With `--socket` it measures whatever broker listens
 * there (any protocol v1 broker, the C one too); its pid, for its CPU time,
 * comes from `SO_PEERCRED`.
 *
 * Usage:
 * ```sh
 * deno task bench [--socket PATH] [--pairs N] [--concurrency 1,16,128]
 *                 [--runs N] [--warmup N] [--json]
 * ```
 *
 * @module
 */

import process from "node:process";
import { parseArgs } from "node:util";
import { getPair } from "../mod.ts";
import { OsError } from "../ffi/errors.ts";
import { connectUnix, peerCredentials } from "../ffi/socket.ts";

const USAGE = `Usage: deno task bench [OPTIONS]

Pairs clients through a broker at several concurrency levels and prints pairs
per second, p50/p99 pairing latency and CPU time per pairing.

Options:
  --socket PATH          broker to measure; default: start one in a separate
                         process on a temporary socket
  --pairs N              measured pairings per run (default 20000)
  --concurrency LIST     pairings in flight, comma-separated (default 1,16,128)
  --runs N               runs per concurrency level; the median run is reported (default 3)
  --warmup N             pairings before each level's runs, not measured (default 500)
  --json                 print one JSON object instead of the table
  -h, --help             show this help`;

const EXIT_USAGE = 2;
/** A run fails when no pairing completes for this long: a lost pairing would otherwise hang. */
const STALL_MS = 10_000;
const BROKER_START_TIMEOUT_MS = 30_000;
const BROKER_STOP_TIMEOUT_MS = 5_000;
/** /proc reports CPU times in USER_HZ ticks, which Linux fixes at 100 per second. */
const MICROS_PER_TICK = 10_000;
/**
 * Above this share of one CPU, the generator (one JavaScript thread) is
 * what limits pairs/s. Not 1: its helper threads count too, and a busy
 * thread still waits on the scheduler now and then.
 */
const GENERATOR_BOUND_SHARE = 0.8;

interface Options {
  socket?: string;
  pairs: number;
  concurrency: number[];
  runs: number;
  warmup: number;
  json: boolean;
}

interface Run {
  /** 1-based, in the order the runs were made. */
  run: number;
  pairs: number;
  seconds: number;
  pairsPerSecond: number;
  /** Pairing latencies: from starting both requests until both sockets arrived. */
  p50Micros: number;
  p99Micros: number;
  maxMicros: number;
  /**
   * Broker CPU time (all threads, user + system) over the run, per pairing, at
   * 10 ms resolution. Absent when its /proc entry is out of reach (another pid namespace, say).
   */
  brokerCpuMicrosPerPair?: number;
  /** The same for this generator, which plays both clients of every pairing. */
  benchCpuMicrosPerPair: number;
}

interface Level {
  concurrency: number;
  runs: Run[];
  /** The run with the median pairs per second; for an even count, the slower middle one. */
  median: Run;
  /** The median run's generator was CPU-bound, so its pairs/s understates the broker's. */
  generatorBound: boolean;
}

class UsageError extends Error {}

function positiveInteger(name: string, text: string, allowZero = false): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value) || (value === 0 && !allowZero)) {
    throw new UsageError(`--${name} wants a ${allowZero ? "non-negative" : "positive"} integer`);
  }
  return value;
}

function parseOptions(args: string[]): Options | undefined {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    strict: true,
    options: {
      socket: { type: "string" },
      pairs: { type: "string", default: "20000" },
      concurrency: { type: "string", default: "1,16,128" },
      runs: { type: "string", default: "3" },
      warmup: { type: "string", default: "500" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${positionals[0]}`);
  return {
    socket: values.socket,
    pairs: positiveInteger("pairs", values.pairs),
    concurrency: values.concurrency.split(",").map((c) => positiveInteger("concurrency", c)),
    runs: positiveInteger("runs", values.runs),
    warmup: positiveInteger("warmup", values.warmup, true),
    json: values.json,
  };
}

/**
 * A /proc file's text, or undefined if unreadable. Read by `cat`: Deno
 * refuses /proc to anything short of --allow-all, and `deno task bench` grants less.
 */
async function readProc(path: string): Promise<string | undefined> {
  try {
    const { success, stdout } = await new Deno.Command("cat", {
      args: [path],
      stdin: "null",
      stdout: "piped",
      stderr: "null",
    }).output();
    return success ? new TextDecoder().decode(stdout) : undefined;
  } catch {
    return undefined;
  }
}

/** CPU time (user + system, all threads) of a process so far, or undefined if unreadable. */
async function cpuMicros(pid: number): Promise<number | undefined> {
  const stat = pid > 0 ? await readProc(`/proc/${pid}/stat`) : undefined;
  if (stat === undefined) return undefined;
  // The command name in parentheses may hold spaces; utime and stime are the
  // 12th and 13th fields after it.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * MICROS_PER_TICK;
}

/** CPU time of this process so far, to the microsecond (getrusage). */
function ownCpuMicros(): number {
  const { user, system } = process.cpuUsage();
  return user + system;
}

async function describeMachine() {
  const cpuinfo = await readProc("/proc/cpuinfo") ?? "";
  // x86 names the model; arm64 kernels often give only the implementer and part numbers.
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ??
    /^CPU part\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? "unknown";
  return {
    cpus: navigator.hardwareConcurrency,
    cpuModel: model.trim(),
    kernel: (await readProc("/proc/sys/kernel/osrelease"))?.trim() ?? "unknown",
    deno: Deno.version.deno,
    // Other work on the machine skews every number; the load before starting shows it.
    loadAverage: (await readProc("/proc/loadavg"))?.split(" ").slice(0, 3).join(" ") ?? "unknown",
  };
}

function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", `'\\''`)}'`;
}

/** This process's argv as the kernel has it: the Deno flags too, which Deno.args leaves out. */
async function commandLine(): Promise<string> {
  const argv = (await readProc(`/proc/${Deno.pid}/cmdline`))?.split("\0").filter((arg) => arg);
  return argv?.length ? argv.map(shellQuote).join(" ") : `deno ... ${Deno.args.join(" ")}`;
}

/** The broker's pid (0 if it lives in another pid namespace), once it accepts connections. */
async function brokerPid(path: string, started?: Promise<Deno.CommandStatus>): Promise<number> {
  const deadline = Date.now() + BROKER_START_TIMEOUT_MS;
  let exited = false;
  started?.then(() => {
    exited = true;
  });
  for (;;) {
    try {
      using probe = await connectUnix(path);
      return peerCredentials(probe.fd).pid;
    } catch (error) {
      const notYet = error instanceof OsError &&
        (error.code === "ENOENT" || error.code === "ECONNREFUSED");
      if (!started || !notYet) throw error;
      if (exited) throw new Error("the broker exited before it listened (see its output above)");
      if (Date.now() > deadline) {
        throw new Error(`the broker did not listen within ${BROKER_START_TIMEOUT_MS} ms`);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

const keyPrefix = `bench-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}-`;
let keySequence = 0;

/** Runs `count` pairings, `concurrency` at a time; resolves to their latencies in ms. */
async function pairings(socket: string, count: number, concurrency: number): Promise<Float64Array> {
  const latencies = new Float64Array(count);
  let started = 0;
  let completed = 0;
  const worker = async () => {
    while (started < count) {
      const index = started++;
      const key = keyPrefix + keySequence++;
      const start = performance.now();
      const [server, client] = await Promise.all([
        getPair(key, { socket, mode: "server" }),
        getPair(key, { socket, mode: "client" }),
      ]);
      latencies[index] = performance.now() - start;
      completed++;
      server.close();
      client.close();
    }
  };
  let watchdog: ReturnType<typeof setInterval> | undefined;
  // On any failure the whole benchmark is void and the process exits, so
  // pairings still in flight are left behind rather than cancelled.
  const stalled = new Promise<never>((_, reject) => {
    let seen = -1;
    watchdog = setInterval(() => {
      if (completed === seen) {
        reject(new Error(`no pairing completed for ${STALL_MS} ms (${completed} of ${count})`));
      }
      seen = completed;
    }, STALL_MS);
  });
  try {
    await Promise.race([Promise.all(Array.from({ length: concurrency }, worker)), stalled]);
  } finally {
    clearInterval(watchdog);
  }
  return latencies;
}

/** Nearest-rank percentile of sorted values. */
function percentile(sorted: Float64Array, p: number): number {
  return sorted[Math.max(0, Math.ceil(p * sorted.length) - 1)];
}

async function measure(
  socket: string,
  pid: number,
  concurrency: number,
  pairs: number,
  run: number,
): Promise<Run> {
  const brokerBefore = await cpuMicros(pid);
  const benchBefore = ownCpuMicros();
  const start = performance.now();
  const latencies = await pairings(socket, pairs, concurrency);
  const seconds = (performance.now() - start) / 1000;
  const benchAfter = ownCpuMicros();
  const brokerAfter = await cpuMicros(pid);
  latencies.sort();
  return {
    run,
    pairs,
    seconds,
    pairsPerSecond: pairs / seconds,
    p50Micros: percentile(latencies, 0.5) * 1000,
    p99Micros: percentile(latencies, 0.99) * 1000,
    maxMicros: latencies[pairs - 1] * 1000,
    brokerCpuMicrosPerPair: brokerBefore === undefined || brokerAfter === undefined
      ? undefined
      : (brokerAfter - brokerBefore) / pairs,
    benchCpuMicrosPerPair: (benchAfter - benchBefore) / pairs,
  };
}

/** Table headings, each with the width of its column. */
const COLUMNS: [string, number][] = [
  ["concurrency", 11],
  ["run", 6],
  ["pairs/s", 8],
  ["p50 µs", 7],
  ["p99 µs", 7],
  ["max µs", 7],
  ["broker CPU µs/pair", 18],
  ["bench CPU µs/pair", 17],
];

function tableLine(cells: string[]): string {
  return cells.map((cell, i) => cell.padStart(COLUMNS[i][1])).join("  ");
}

function row(concurrency: number, label: string, run: Run): string {
  const integer = (n: number) => Math.round(n).toLocaleString("en-US");
  const cpu = (n?: number) => n === undefined ? "-" : n.toFixed(1);
  return tableLine([
    String(concurrency),
    label,
    integer(run.pairsPerSecond),
    integer(run.p50Micros),
    integer(run.p99Micros),
    integer(run.maxMicros),
    cpu(run.brokerCpuMicrosPerPair),
    cpu(run.benchCpuMicrosPerPair),
  ]);
}

function medianRun(runs: Run[]): Run {
  const sorted = runs.toSorted((a, b) => a.pairsPerSecond - b.pairsPerSecond);
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

/** Sends SIGTERM, then SIGKILL if the broker has not exited in time; returns its exit code. */
async function stopBroker(child: Deno.ChildProcess): Promise<number> {
  const send = (signal: Deno.Signal) => {
    try {
      child.kill(signal);
    } catch {
      // Already exited: its status tells how.
    }
  };
  send("SIGTERM");
  const timer = setTimeout(() => send("SIGKILL"), BROKER_STOP_TIMEOUT_MS);
  const { code } = await child.status;
  clearTimeout(timer);
  return code;
}

function cpuShare(microsPerPair: number, run: Run): number {
  return microsPerPair * run.pairsPerSecond / 1e6;
}

async function main(args: string[]): Promise<number> {
  let options;
  try {
    options = parseOptions(args);
  } catch (error) {
    console.error(`bench: ${error instanceof Error ? error.message : error}\n\n${USAGE}`);
    return EXIT_USAGE;
  }
  if (options === undefined) {
    console.log(USAGE);
    return 0;
  }
  const say = options.json ? () => {} : console.log;
  const machine = await describeMachine();
  const command = await commandLine();
  let socket = options.socket;
  let brokerCommand: string[] | undefined;
  let child: Deno.ChildProcess | undefined;
  let temporary: string | undefined;
  try {
    if (socket === undefined) {
      temporary = await Deno.makeTempDir({ prefix: "one-socket-bench-" });
      socket = `${temporary}/broker.socket`;
      const repository = new URL("..", import.meta.url);
      brokerCommand = [
        Deno.execPath(),
        "run",
        "--allow-ffi",
        "--allow-read",
        "--allow-write",
        "--allow-env",
        decodeURIComponent(new URL("mod.ts", repository).pathname),
        "broker",
        "--socket",
        socket,
        "--log-level",
        "warning",
      ];
      // The repository as working directory, so that Deno finds deno.json and its imports.
      child = new Deno.Command(brokerCommand[0], {
        args: brokerCommand.slice(1),
        cwd: repository,
        stdin: "null",
        stdout: "null",
        stderr: "inherit",
      }).spawn();
    }
    const pid = await brokerPid(socket, child?.status);

    say(`one-socket pairing benchmark`);
    say(`machine: ${machine.cpus} CPUs, ${machine.cpuModel}, Linux ${machine.kernel}`);
    say(`deno:    ${machine.deno}`);
    say(`load:    ${machine.loadAverage} (1, 5, 15 min averages before starting)`);
    say(`command: ${command}`);
    say(
      brokerCommand
        ? `broker:  ${brokerCommand.map(shellQuote).join(" ")} (pid ${pid})`
        : `broker:  listening on ${socket} (pid ${pid || "unknown"})`,
    );
    say(
      `pairings: ${options.pairs} per run, ${options.runs} run(s) per concurrency level, ` +
        `after ${options.warmup} unmeasured warm-up pairings per level`,
    );
    if (options.runs > 1) {
      say(`"median" is the run with the median pairs/s, with its own latencies`);
    }
    say(`\n${tableLine(COLUMNS.map(([heading]) => heading))}`);

    const levels: Level[] = [];
    for (const concurrency of options.concurrency) {
      if (options.warmup > 0) await pairings(socket, options.warmup, concurrency);
      const runs: Run[] = [];
      for (let run = 1; run <= options.runs; run++) {
        runs.push(await measure(socket, pid, concurrency, options.pairs, run));
        say(row(concurrency, String(run), runs[runs.length - 1]));
      }
      const median = medianRun(runs);
      if (options.runs > 1) say(row(concurrency, "median", median));
      const generatorBound = cpuShare(median.benchCpuMicrosPerPair, median) > GENERATOR_BOUND_SHARE;
      levels.push({ concurrency, runs, median, generatorBound });
    }
    const bound = levels.filter((level) => level.generatorBound);
    if (bound.length > 0) {
      say(
        `\nnote: at concurrency ${bound.map((level) => level.concurrency).join(", ")} ` +
          `this generator kept over ${GENERATOR_BOUND_SHARE * 100}% of a CPU busy ` +
          "(bench CPU µs/pair × pairs/s):\n      there pairs/s is the generator's limit, " +
          "only a lower bound for the broker's.",
      );
    }

    if (options.json) {
      console.log(JSON.stringify(
        {
          machine,
          command,
          broker: { socket, pid: pid || null, command: brokerCommand ?? null },
          pairs: options.pairs,
          warmup: options.warmup,
          levels,
        },
        null,
        2,
      ));
    }
  } catch (error) {
    console.error(`bench: ${error instanceof Error ? error.message : error}`);
    return 1;
  } finally {
    if (child) {
      const code = await stopBroker(child);
      if (code !== 0) console.error(`bench: the broker exited with code ${code}`);
    }
    if (temporary) await Deno.remove(temporary, { recursive: true });
  }
  return 0;
}

// Exit explicitly: after a failure, pairings still in flight would keep the process alive.
Deno.exit(await main(Deno.args));
