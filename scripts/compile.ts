/**
 * `deno task compile`: builds `dist/one-socket`, one executable with the
 * permissions the command needs baked in, and checks that it runs.
 *
 * `deno compile` joins the program to `denort`, the Deno runtime without its
 * tooling, of the same version as the Deno that compiles. It downloads denort
 * unless `DENORT_BIN` names a local copy. When it has none, this says so in
 * one line and exits {@link EXIT_NO_RUNTIME}, so that callers (the tests) can
 * tell a machine that cannot build from a build that is broken.
 *
 * usage: deno run -A scripts/compile.ts [--output PATH]
 *
 * @module
 */

import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import denoConfig from "../deno.json" with { type: "json" };

/** Exit code when there is no usable denort to compile with. */
export const EXIT_NO_RUNTIME = 3;

/** What the compiled `one-socket` may do, and why. */
export const COMPILED_PERMISSIONS: readonly string[] = [
  "--allow-ffi", // libc through Deno.dlopen: sockets, descriptor passing, epoll
  "--allow-read", // socket paths, /proc, policy files, PROGRAM lookup on PATH
  "--allow-write", // creating, replacing and removing socket files
  "--allow-env", // ONE_SOCKET_PATH and friends; the environment handed to --exec programs
  "--allow-run", // pair --exec; a broker that re-spawns itself as a daemon needs it too
  "--allow-net", // one-socket ctl: fetch over the control socket asks for it on 2.9.6
];

const ROOT = fileURLToPath(new URL("..", import.meta.url));
/** Where `deno task compile` puts the executable. */
export const DEFAULT_OUTPUT: string = `${ROOT}dist/one-socket`;

const decoder = new TextDecoder();

/** A build that did not produce a working executable; the message is one line. */
class CompileError extends Error {
  readonly exitCode: number;

  constructor(message: string, exitCode = 1) {
    super(message);
    this.exitCode = exitCode;
  }
}

/** The innermost cause in `deno compile`'s error chain ("1: No such file…"). */
function innermostCause(stderr: string): string {
  const chain = stderr.split("Stack backtrace")[0];
  const causes = [...chain.matchAll(/^\s*\d+: (.+)$/gm)].map((match) => match[1]);
  return causes.at(-1) ?? stderr.trim().split("\n")[0];
}

async function compile(output: string): Promise<void> {
  await Deno.mkdir(dirname(output), { recursive: true });
  const { code, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["compile", ...COMPILED_PERMISSIONS, "--output", output, "mod.ts"],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  if (code === 0) return;
  const text = decoder.decode(stderr);
  // Fetching or reading denort is the only step of deno compile that names it.
  if (text.includes("denort")) {
    const denort = Deno.env.get("DENORT_BIN");
    const wanted = `set DENORT_BIN to a denort ${Deno.version.deno} binary`;
    throw new CompileError(
      denort === undefined
        ? `the Deno runtime for compiling (denort) could not be downloaded; ${wanted}`
        : `DENORT_BIN=${denort} could not be used (${innermostCause(text)}); ${wanted}`,
      EXIT_NO_RUNTIME,
    );
  }
  throw new CompileError(`deno compile failed (exit ${code}):\n${text.trim()}`);
}

/** A base binary that is not denort (the full deno, say) still compiles, into a plain deno. */
async function checkRuns(output: string): Promise<void> {
  const expected = `one-socket ${denoConfig.version}`;
  let printed: string;
  try {
    const { stdout } = await new Deno.Command(output, {
      args: ["--version"],
      stdin: "null",
      stdout: "piped",
      stderr: "null",
      signal: AbortSignal.timeout(10_000),
    }).output();
    printed = decoder.decode(stdout).trim();
  } catch (error) {
    printed = `nothing: ${(error as Error).message}`;
  }
  if (printed === expected) return;
  await Deno.remove(output);
  const denort = Deno.env.get("DENORT_BIN");
  const reason = `${output} --version printed ${JSON.stringify(printed.split("\n")[0])}, ` +
    `not "${expected}"`;
  if (denort === undefined) throw new CompileError(`the built program does not run: ${reason}`);
  throw new CompileError(
    `DENORT_BIN=${denort} is not a denort ${Deno.version.deno} binary: ${reason}`,
    EXIT_NO_RUNTIME,
  );
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: { output: { type: "string", default: DEFAULT_OUTPUT } },
    strict: true,
  });
  try {
    await compile(values.output);
    await checkRuns(values.output);
    console.log(`compile: built ${values.output}`);
  } catch (error) {
    if (!(error instanceof CompileError)) throw error;
    console.error(`compile: ${error.message}`);
    Deno.exit(error.exitCode);
  }
}
