/**
 * What the benchmark scripts share: the machine's description, broker
 * processes to measure (ours and the C floor), the C load generator, and
 * small statistics.
 *
 * @module
 */

import { commandLine as processCommandLine } from "../ffi/process.ts";
import { OsError } from "../ffi/errors.ts";
import { connectUnix, peerCredentials } from "../ffi/socket.ts";

/** Exit code for a bad command line. */
export const EXIT_USAGE = 2;

const REPOSITORY = new URL("..", import.meta.url);
const BROKER_START_TIMEOUT_MS = 30_000;
const BROKER_STOP_TIMEOUT_MS = 5_000;

/** A bad command line; its message goes before the usage text. */
export class UsageError extends Error {}

/** Parses a command-line integer, throwing {@link UsageError} with the option's name. */
export function integerOption(name: string, text: string, allowZero = false): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value) || (value === 0 && !allowZero)) {
    throw new UsageError(`--${name} wants a ${allowZero ? "non-negative" : "positive"} integer`);
  }
  return value;
}

/** The median; for an even count, the mean of the middle two. */
export function median(values: number[]): number {
  const sorted = values.toSorted((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** Nearest-rank percentile of ascending values. */
export function percentile(sorted: Float64Array, p: number): number {
  return sorted[Math.max(0, Math.ceil(p * sorted.length) - 1)];
}

/**
 * A /proc file's text, or undefined if unreadable. Read by `cat`: Deno
 * refuses /proc to anything short of --allow-all, and the bench tasks grant less.
 */
export async function readProc(path: string): Promise<string | undefined> {
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

/** The facts a result is meaningless without. */
export interface Machine {
  cpus: number;
  cpuModel: string;
  kernel: string;
  deno: string;
  /** 1, 5 and 15 minute load averages before starting: other work skews every number. */
  loadAverage: string;
}

/** Describes this machine. */
export async function describeMachine(): Promise<Machine> {
  const cpuinfo = await readProc("/proc/cpuinfo") ?? "";
  // x86 names the model; arm64 kernels often give only the implementer and part numbers.
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ??
    /^CPU part\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? "unknown";
  return {
    cpus: navigator.hardwareConcurrency,
    cpuModel: model.trim(),
    kernel: (await readProc("/proc/sys/kernel/osrelease"))?.trim() ?? "unknown",
    deno: Deno.version.deno,
    loadAverage: (await readProc("/proc/loadavg"))?.split(" ").slice(0, 3).join(" ") ?? "unknown",
  };
}

/** The machine, as the header lines of a report. */
export function machineLines(machine: Machine, command: string): string[] {
  return [
    `machine: ${machine.cpus} CPUs, ${machine.cpuModel}, Linux ${machine.kernel}`,
    `deno:    ${machine.deno}`,
    `load:    ${machine.loadAverage} (1, 5, 15 min averages before starting)`,
    `command: ${command}`,
  ];
}

/** `arg` quoted for a POSIX shell when it needs to be. */
export function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", `'\\''`)}'`;
}

/** This process's command line, quoted for a shell (read through libc: /proc/self is off limits). */
export function commandLine(): string {
  return processCommandLine().map(shellQuote).join(" ");
}

/** A C tool built by `deno task build:c`; throws if it is missing. */
export function cTool(name: "floor" | "loadgen"): string {
  const path = decodeURIComponent(new URL(`dist/${name}`, REPOSITORY).pathname);
  try {
    Deno.statSync(path);
  } catch {
    throw new Error(`${path} is missing: build it with \`deno task build:c\` (needs cc)`);
  }
  return path;
}

/** The brokers the scripts can start: ours (a Deno process) and the C floor. */
export type BrokerKind = "ours" | "floor";

/** How a broker of `kind` is started on `socket`; `denoFlags` go to our broker's `deno run`. */
export function brokerCommand(
  kind: BrokerKind,
  socket: string,
  denoFlags: string[] = [],
): string[] {
  if (kind === "floor") return [cTool("floor"), socket];
  return [
    Deno.execPath(),
    "run",
    "--allow-ffi",
    "--allow-read",
    "--allow-write",
    "--allow-env",
    ...denoFlags,
    decodeURIComponent(new URL("mod.ts", REPOSITORY).pathname),
    "broker",
    "--socket",
    socket,
    "--log-level",
    "warning",
  ];
}

/** A broker to send load to: one this process started, or one found listening. */
export interface BrokerHandle extends AsyncDisposable {
  socket: string;
  /** 0 when it lives in another pid namespace: its CPU time and memory are then out of reach. */
  pid: number;
  /** How it was started, when this process started it. */
  command?: string[];
}

/** Waits until `socket` accepts connections; returns the listener's pid (SO_PEERCRED). */
async function listeningPid(socket: string, exited?: () => boolean): Promise<number> {
  const deadline = Date.now() + BROKER_START_TIMEOUT_MS;
  for (;;) {
    try {
      using probe = await connectUnix(socket);
      return peerCredentials(probe.fd).pid;
    } catch (error) {
      const notYet = error instanceof OsError &&
        (error.code === "ENOENT" || error.code === "ECONNREFUSED");
      if (!exited || !notYet) throw error;
      if (exited()) throw new Error("the broker exited before it listened (see its output above)");
      if (Date.now() > deadline) {
        throw new Error(`the broker did not listen within ${BROKER_START_TIMEOUT_MS} ms`);
      }
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
}

/** The broker listening on `socket`, left running when disposed. */
export async function existingBroker(socket: string): Promise<BrokerHandle> {
  return { socket, pid: await listeningPid(socket), [Symbol.asyncDispose]: async () => {} };
}

/**
 * Starts `command` (a broker taking its socket path from it) and waits until
 * it listens on `socket`. Disposing sends SIGTERM (SIGKILL after 5 s) and
 * throws unless it exited 0.
 */
export async function startBroker(command: string[], socket: string): Promise<BrokerHandle> {
  // The repository as working directory, so that Deno finds deno.json and its imports.
  const child = new Deno.Command(command[0], {
    args: command.slice(1),
    cwd: REPOSITORY,
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  let exited = false;
  const status = child.status.finally(() => exited = true);
  const stop = async () => {
    const send = (signal: Deno.Signal) => {
      try {
        child.kill(signal);
      } catch {
        // Already exited: its status tells how.
      }
    };
    send("SIGTERM");
    const timer = setTimeout(() => send("SIGKILL"), BROKER_STOP_TIMEOUT_MS);
    const { code } = await status;
    clearTimeout(timer);
    if (code !== 0) throw new Error(`the broker (${command[0]}) exited with code ${code}`);
  };
  try {
    await listeningPid(socket, () => exited);
  } catch (error) {
    await stop().catch(() => {});
    throw error;
  }
  return { socket, pid: child.pid, command, [Symbol.asyncDispose]: stop };
}

/** A fresh directory for broker sockets, removed when disposed. */
export async function temporaryDirectory(): Promise<AsyncDisposable & { path: string }> {
  const path = await Deno.makeTempDir({ prefix: "one-socket-bench-" });
  return { path, [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }) };
}

/** The C load generator failed; `code` is its exit code (3: the broker does not speak v2). */
export class LoadgenError extends Error {
  /** The generator's exit code. */
  readonly code: number;

  constructor(message: string, code: number) {
    super(message);
    this.code = code;
  }
}

/** Exit code of `loadgen listen` when the broker answers its `LISTEN` with no `HELLO`. */
export const LOADGEN_NO_V2 = 3;

/** Runs the C load generator with `args`; resolves to the JSON object it prints. */
export async function loadgen<T>(args: string[]): Promise<T> {
  const { success, code, stdout } = await new Deno.Command(cTool("loadgen"), {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).output();
  if (!success) {
    throw new LoadgenError(`loadgen ${args.join(" ")} failed (exit ${code}; see above)`, code);
  }
  return JSON.parse(new TextDecoder().decode(stdout));
}

/** Integers with thousands separators. */
export function integer(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

/** Cells padded to their column widths, two spaces apart; a negative width aligns left. */
export function tableLine(cells: string[], widths: number[]): string {
  return cells.map((cell, i) => widths[i] < 0 ? cell.padEnd(-widths[i]) : cell.padStart(widths[i]))
    .join("  ").trimEnd();
}

/**
 * The common start of a benchmark script: parses `args` with `parse` (an
 * error is printed with `usage`, exit 2; `undefined` means --help, exit 0),
 * then describes the machine and the command line. Returns the exit code
 * when the script should stop here.
 */
export async function startScript<T>(
  name: string,
  usage: string,
  parse: (args: string[]) => T | undefined,
  args: string[],
): Promise<{ options: T; machine: Machine; command: string } | number> {
  let options;
  try {
    options = parse(args);
  } catch (error) {
    console.error(`${name}: ${error instanceof Error ? error.message : error}\n\n${usage}`);
    return EXIT_USAGE;
  }
  if (options === undefined) {
    console.log(usage);
    return 0;
  }
  return { options, machine: await describeMachine(), command: commandLine() };
}

/** What `/proc` tells of a process; see {@link processUsage}. */
export interface ProcessUsage {
  /** Open descriptors. */
  fds: number;
  /** Resident memory (`VmRSS`), bytes. */
  rssBytes: number;
  /** Its hard descriptor limit. */
  hardLimit: number;
  /** CPU time so far, user + system, all threads. */
  cpuSeconds: number;
}

/** Reads {@link ProcessUsage} of `pid` (needs `--allow-all`: Deno guards `/proc`). */
export function processUsage(pid: number): ProcessUsage {
  const read = (file: string) => Deno.readTextFileSync(`/proc/${pid}/${file}`);
  const stat = read("stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return {
    fds: [...Deno.readDirSync(`/proc/${pid}/fd`)].length,
    rssBytes: Number(/VmRSS:\s+(\d+)/.exec(read("status"))![1]) * 1024,
    hardLimit: Number(/Max open files\s+\d+\s+(\d+)/.exec(read("limits"))![1]),
    cpuSeconds: (Number(fields[11]) + Number(fields[12])) / 100, // utime + stime, in ticks
  };
}
