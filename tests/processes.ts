/**
 * Child processes of the `one-socket` command for tests: output collected
 * from the start, bounded waits, and a scope that kills and awaits every
 * process and removes its directory whatever the outcome.
 *
 * @module
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";

export const MOD = fileURLToPath(new URL("../mod.ts", import.meta.url));
// The `start` task's set: --allow-net is for the control socket (Deno counts a Unix socket as net).
export const PERMISSIONS = [
  "--allow-ffi",
  "--allow-read",
  "--allow-write",
  "--allow-env",
  "--allow-net",
];
/** Bound on any wait for a child process: readiness, a log line, an exit. */
export const WAIT_MS = 10_000;
const POLL_MS = 20;

const decoder = new TextDecoder();

export const sleep = (ms: number): Promise<void> =>
  new Promise<void>((resolve) => setTimeout(resolve, ms));

/** How a child process ended, with everything it wrote. */
export interface Finished {
  code: number;
  signal: Deno.Signal | null;
  stdout: Uint8Array;
  stderr: string;
}

export interface SpawnOptions {
  /** Extra environment variables (merged into the inherited environment). */
  env?: Record<string, string>;
  /** Pipe standard input (written with {@link Cli.feed}); otherwise it is null. */
  stdin?: boolean;
  /** Run under this descriptor limit (soft and hard), through `sh -c 'ulimit -n N; exec …'`. */
  descriptorLimit?: number;
  /** The program and first arguments that run `one-socket`; default: `deno run` {@link MOD}. */
  command?: string[];
}

/** One `one-socket` process: its output is collected from the start. */
export class Cli {
  readonly args: string[];
  readonly #child: Deno.ChildProcess;
  readonly #status: Promise<Deno.CommandStatus>;
  readonly #stdoutChunks: Uint8Array[] = [];
  readonly #stdoutDone: Promise<void>;
  readonly #stderrDone: Promise<void>;
  #stderr = "";
  #exited = false;
  #stdinOpen: boolean;
  #feeding?: Promise<void>;
  /** The error writing standard input met, if any (the process may have exited early). */
  feedError?: unknown;

  constructor(args: string[], options: SpawnOptions = {}) {
    this.args = args;
    const command = [...options.command ?? [Deno.execPath(), "run", ...PERMISSIONS, MOD], ...args];
    const limited = options.descriptorLimit !== undefined;
    this.#child = new Deno.Command(limited ? "sh" : command[0], {
      args: limited
        ? ["-c", `ulimit -n ${options.descriptorLimit} && exec "$@"`, "sh", ...command]
        : command.slice(1),
      env: options.env,
      stdin: options.stdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdinOpen = options.stdin === true;
    this.#status = this.#child.status.then((status) => {
      this.#exited = true;
      return status;
    });
    const [stdout, stderr] = [this.#child.stdout, this.#child.stderr];
    this.#stdoutDone = (async () => {
      for await (const chunk of stdout) this.#stdoutChunks.push(chunk);
    })();
    this.#stderrDone = (async () => {
      for await (const text of stderr.pipeThrough(new TextDecoderStream())) {
        this.#stderr += text;
      }
    })();
  }

  get pid(): number {
    return this.#child.pid;
  }

  /** Standard error so far. */
  get stderr(): string {
    return this.#stderr;
  }

  /** Standard output so far. */
  get stdout(): Uint8Array {
    if (this.#stdoutChunks.length !== 1) {
      const all = new Uint8Array(this.#stdoutChunks.reduce((sum, c) => sum + c.length, 0));
      let offset = 0;
      for (const chunk of this.#stdoutChunks) {
        all.set(chunk, offset);
        offset += chunk.length;
      }
      this.#stdoutChunks.splice(0, this.#stdoutChunks.length, all);
    }
    return this.#stdoutChunks[0];
  }

  /**
   * Everything written so far, stdout then stderr, as text: where to wait for
   * a log line without depending on which stream the logger uses (that is
   * asserted on its own).
   */
  get output(): string {
    return decoder.decode(this.stdout) + this.#stderr;
  }

  get exited(): boolean {
    return this.#exited;
  }

  #describe(): string {
    return `one-socket ${this.args.join(" ")}`;
  }

  /** Polls until `ready()` holds; fails if the process exits first or after {@link WAIT_MS}. */
  async waitUntil(what: string, ready: () => boolean): Promise<void> {
    const deadline = Date.now() + WAIT_MS;
    while (!ready()) {
      if (this.#exited) {
        await this.#stderrDone;
        await this.#stdoutDone;
        assert.fail(`${this.#describe()} exited before ${what}; output:\n${this.output}`);
      }
      if (Date.now() > deadline) {
        assert.fail(
          `${this.#describe()}: no ${what} after ${WAIT_MS} ms; stderr:\n${this.#stderr}`,
        );
      }
      await sleep(POLL_MS);
    }
  }

  /** Waits for `text` in {@link output}. */
  waitForOutput(text: string): Promise<void> {
    return this.waitUntil(`"${text}" in its output`, () => this.output.includes(text));
  }

  /**
   * Writes `data` to standard input, then closes it. A write error (the
   * process went away) is kept in {@link feedError} rather than thrown, so that
   * the test reports the exit status and stderr, which say more.
   */
  feed(data: Uint8Array): Promise<void> {
    assert.ok(this.#stdinOpen && this.#feeding === undefined, "stdin is not available");
    this.#stdinOpen = false;
    return this.#feeding = (async () => {
      const writer = this.#child.stdin.getWriter();
      try {
        if (data.length > 0) await writer.write(data);
        await writer.close();
      } catch (error) {
        this.feedError = error;
        await writer.abort().catch(() => {});
      } finally {
        writer.releaseLock();
      }
    })();
  }

  kill(signal: Deno.Signal): void {
    this.#child.kill(signal);
  }

  /** Waits for the exit (SIGKILL and failure after `ms`) and returns all it wrote. */
  async finish(ms = WAIT_MS): Promise<Finished> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), ms);
    });
    const outcome = await Promise.race([this.#status, timeout]);
    clearTimeout(timer);
    if (outcome === "timeout") {
      this.kill("SIGKILL");
      await this.#settle();
      assert.fail(`${this.#describe()} still running after ${ms} ms; stderr:\n${this.#stderr}`);
    }
    await this.#settle();
    return {
      code: outcome.code,
      signal: outcome.signal,
      stdout: this.stdout,
      stderr: this.#stderr,
    };
  }

  async #settle(): Promise<void> {
    if (this.#stdinOpen) {
      this.#stdinOpen = false;
      await this.#child.stdin.close().catch(() => {});
    }
    await Promise.all([this.#status, this.#stdoutDone, this.#stderrDone, this.#feeding]);
  }

  /** Kills the process if it still runs and waits until everything about it is closed. */
  async dispose(): Promise<void> {
    if (!this.#exited) {
      try {
        this.kill("SIGKILL");
      } catch {
        // it exited in the meantime
      }
    }
    await this.#settle().catch(() => {});
  }
}

export interface Scope {
  /** A fresh temporary directory, removed at the end. */
  dir: string;
  /** `${dir}/broker.socket` */
  socket: string;
  /** Starts `one-socket ...args`; the scope kills and awaits it at the end. */
  spawn(args: string[], options?: SpawnOptions): Cli;
}

export async function withScope(body: (scope: Scope) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "one-socket-cli-" });
  const processes: Cli[] = [];
  try {
    await body({
      dir,
      socket: `${dir}/broker.socket`,
      spawn(args, options) {
        const cli = new Cli(args, options);
        processes.push(cli);
        return cli;
      },
    });
  } finally {
    await Promise.all(processes.map((cli) => cli.dispose()));
    await Deno.remove(dir, { recursive: true });
  }
}

export function isSocket(path: string): boolean {
  try {
    return Deno.lstatSync(path).isSocket === true;
  } catch {
    return false;
  }
}

export function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** Starts the floor broker built by `buildFloor` on `path`, once its socket is there. */
export async function startFloor(scope: Scope, floor: string, path = scope.socket): Promise<Cli> {
  const broker = scope.spawn([path], { command: [floor] });
  await broker.waitUntil(`socket file ${path}`, () => isSocket(path));
  return broker;
}

/** Starts a broker and waits (bounded) for its socket file to appear. */
export async function startBroker(
  scope: Scope,
  args: string[] = ["--socket", scope.socket],
  options: SpawnOptions & { path?: string } = {},
): Promise<Cli> {
  const path = options.path ?? scope.socket;
  const broker = scope.spawn(["broker", ...args], options);
  await broker.waitUntil(`socket file ${path}`, () => isSocket(path));
  return broker;
}
