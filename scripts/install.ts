/**
 * `deno task install`: installs the `one-socket` command from this clone, to
 * run with no network, no `deno` on PATH and nothing from this clone or from
 * npx's cache, which npm may clean.
 *
 * usage: deno task install [--prefix DIR] [--uninstall]
 *
 * It puts into `PREFIX/lib/one-socket/VERSION/` the Deno runtime running it
 * (hard-linked when it can be, else copied), the sources the command loads,
 * and their npm packages in a `node_modules/` beside them; then writes
 * `PREFIX/bin/one-socket`, a sh script that `exec`s that runtime, so that the
 * broker's pid is the script's and SIGTERM and SIGHUP reach the broker itself.
 * PREFIX defaults to `/usr/local` for root, `~/.local` for anyone else.
 *
 * `deno install -g` is no substitute: its shim runs whatever `deno` is on
 * PATH. `deno task compile` makes one self-contained file, but needs `denort`.
 *
 * Installing again replaces the installed version, and removes any other;
 * `--uninstall` removes both the script and `PREFIX/lib/one-socket`. Neither
 * touches a `PREFIX/bin/one-socket` this did not write.
 *
 * @module
 */

import { cp } from "node:fs/promises";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import denoConfig from "../deno.json" with { type: "json" };
import { COMPILED_PERMISSIONS } from "./compile.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const VERSION = denoConfig.version;
/** What the command loads at run time: tests, scripts and docs stay behind. */
const RUNTIME_SOURCES = ["mod.ts", "deno.json", "deno.lock", "broker", "client", "ffi"];
/** The launcher's second line: how this tells its own script from someone else's program. */
const LAUNCHER_MARKER = "# one-socket launcher, written by one-socket's scripts/install.ts";
/** Enough of a file to find {@link LAUNCHER_MARKER} in, without reading a whole binary. */
const LAUNCHER_HEAD_BYTES = 512;
const USAGE = `usage: deno task install [--prefix DIR] [--uninstall]
  installs one-socket into DIR/bin and DIR/lib/one-socket (default DIR: /usr/local for root,
  ~/.local for anyone else); --uninstall removes both`;

const decoder = new TextDecoder();

/** A refusal or failure that one message explains. */
class InstallError extends Error {}

/** Where an installation under `prefix` lives. */
interface Layout {
  prefix: string;
  /** `PREFIX/bin/one-socket` */
  launcher: string;
  /** `PREFIX/lib/one-socket`: every installed version, and nothing else. */
  library: string;
  /** `PREFIX/lib/one-socket/VERSION` */
  installed: string;
}

function layout(prefix: string): Layout {
  const library = join(prefix, "lib", "one-socket");
  return {
    prefix,
    launcher: join(prefix, "bin", "one-socket"),
    library,
    installed: join(library, VERSION),
  };
}

function defaultPrefix(): string {
  if (Deno.uid() === 0) return "/usr/local";
  const home = Deno.env.get("HOME");
  if (home === undefined) throw new InstallError("HOME is not set; say where with --prefix DIR");
  return join(home, ".local");
}

/** A single-quoted sh word: nothing in it is expanded. */
function shellWord(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/**
 * The command line that runs the command installed in `directory`:
 * `--cached-only` so that nothing is ever downloaded (what is missing fails
 * at once rather than hanging offline); `--frozen` so that the installed lock
 * is never rewritten; `--node-modules-dir=manual` so that npm packages come
 * from the installed `node_modules/` alone, whatever DENO_DIR, HOME and
 * `.npmrc` say; `--config` so that a deno.json in the working directory is
 * not taken instead. The permissions are those of the compiled binary.
 */
function runtimeCommand(directory: string): string[] {
  return [
    join(directory, "deno"),
    "run",
    "--cached-only",
    "--frozen",
    "--node-modules-dir=manual",
    ...COMPILED_PERMISSIONS,
    "--config",
    join(directory, "deno.json"),
    join(directory, "mod.ts"),
  ];
}

function launcherScript(installed: string): string {
  return [
    "#!/bin/sh",
    LAUNCHER_MARKER,
    "# exec: the runtime takes this process over, so signals sent to it reach the broker.",
    `exec ${runtimeCommand(installed).map(shellWord).join(" ")} "$@"`,
    "",
  ].join("\n");
}

/** Awaits a file system call, naming `path` in its error where Deno leaves it out (open, makeTemp*). */
async function naming<T>(path: string, call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (error) {
    if (error instanceof Error && !error.message.includes(path)) error.message += `: ${path}`;
    throw error;
  }
}

/** Whether `path` is absent, a launcher this wrote, or anything else. */
async function launcherState(path: string): Promise<"absent" | "ours" | "foreign"> {
  let file: Deno.FsFile;
  try {
    file = await naming(path, Deno.open(path));
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "absent";
    throw error;
  }
  using _file = file;
  if (!(await file.stat()).isFile) return "foreign";
  const head = new Uint8Array(LAUNCHER_HEAD_BYTES);
  const length = await file.read(head) ?? 0;
  const lines = decoder.decode(head.subarray(0, length)).split("\n");
  return lines[1] === LAUNCHER_MARKER ? "ours" : "foreign";
}

async function refuseForeignLauncher(path: string): Promise<void> {
  if (await launcherState(path) === "foreign") {
    throw new InstallError(
      `${path} exists and was not written by this installer; ` +
        "remove it yourself or choose another --prefix",
    );
  }
}

async function removeIfPresent(path: string): Promise<boolean> {
  try {
    await Deno.remove(path, { recursive: true });
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

async function renameIfPresent(from: string, to: string): Promise<boolean> {
  try {
    await Deno.rename(from, to);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** Places this runtime at `destination`; says how, for the report. */
async function placeRuntime(destination: string): Promise<string> {
  const runtime = Deno.execPath();
  try {
    await Deno.link(runtime, destination);
    return `hard-linked from ${runtime}`;
  } catch {
    // A link survives npm cleaning its cache, which only removes npm's name for the file.
    // It is only an economy: another filesystem (EXDEV) or protected_hardlinks (EPERM) rule it out.
    await Deno.copyFile(runtime, destination);
    return `copied from ${runtime}`;
  }
}

/**
 * Fills `directory/node_modules` with the locked npm packages: from the
 * Deno cache this installer uses when they are there, else from the registry.
 */
async function vendorPackages(directory: string): Promise<void> {
  const { code, stderr } = await new Deno.Command(Deno.execPath(), {
    args: [
      "install",
      "--frozen",
      "--node-modules-dir=auto",
      "--config",
      join(directory, "deno.json"),
      "--entrypoint",
      join(directory, "mod.ts"),
    ],
    cwd: directory,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  if (code !== 0) {
    throw new InstallError(
      `caching the npm packages into ${directory}/node_modules failed ` +
        `(deno install exit ${code}):\n${decoder.decode(stderr).trim()}`,
    );
  }
}

/**
 * Runs `one-socket --version` from `directory` with an empty DENO_DIR, which
 * proves that it needs no Deno cache, before anything installed is replaced.
 */
async function checkRuns(directory: string): Promise<void> {
  const denoDir = await Deno.makeTempDir({ prefix: "one-socket-install-check-" });
  try {
    const [program, ...args] = runtimeCommand(directory);
    const { code, stdout, stderr } = await new Deno.Command(program, {
      args: [...args, "--version"],
      env: { DENO_DIR: denoDir, NO_COLOR: "1" },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const expected = `one-socket ${VERSION}`;
    const printed = decoder.decode(stdout).trim();
    if (code !== 0 || printed !== expected) {
      throw new InstallError(
        `the command staged in ${directory} does not run: --version exited ${code} ` +
          `printing ${JSON.stringify(printed)}, not "${expected}":\n${
            decoder.decode(stderr).trim()
          }`,
      );
    }
  } finally {
    await Deno.remove(denoDir, { recursive: true });
  }
}

/** Writes the launcher beside its final name and renames it there, so that it is never half-written. */
async function writeLauncher(target: Layout): Promise<void> {
  const directory = join(target.prefix, "bin");
  await Deno.mkdir(directory, { recursive: true });
  const temporary = await naming(
    directory,
    Deno.makeTempFile({ dir: directory, prefix: ".one-socket-" }),
  );
  try {
    await Deno.writeTextFile(temporary, launcherScript(target.installed));
    // makeTempFile creates 0600; everyone may run the command.
    await Deno.chmod(temporary, 0o755);
    await Deno.rename(temporary, target.launcher);
  } catch (error) {
    await removeIfPresent(temporary);
    throw error;
  }
}

async function install(target: Layout): Promise<void> {
  await refuseForeignLauncher(target.launcher);
  await Deno.mkdir(target.library, { recursive: true });
  // Built beside its final place, so that the renames below stay on one filesystem.
  const staging = await naming(
    target.library,
    Deno.makeTempDir({ dir: target.library, prefix: `.${VERSION}-staging-` }),
  );
  let runtime: string;
  try {
    // makeTempDir creates 0700; a root install is for every user.
    await Deno.chmod(staging, 0o755);
    runtime = await placeRuntime(join(staging, "deno"));
    for (const source of RUNTIME_SOURCES) {
      await cp(join(ROOT, source), join(staging, source), { recursive: true });
    }
    await vendorPackages(staging);
    await checkRuns(staging);
    // A running broker keeps the files it has open; only new starts see the new version.
    // rename(2) does not replace a directory that has files, so the old one steps aside first.
    const retired = `${staging}-retired`;
    const replacing = await renameIfPresent(target.installed, retired);
    await Deno.rename(staging, target.installed);
    if (replacing) await Deno.remove(retired, { recursive: true });
  } catch (error) {
    await removeIfPresent(staging);
    throw error;
  }
  await writeLauncher(target);
  // Older versions, and what an interrupted install left: the launcher no longer points there.
  for await (const entry of Deno.readDir(target.library)) {
    if (entry.name !== VERSION) await removeIfPresent(join(target.library, entry.name));
  }
  console.log(`installed one-socket ${VERSION}: ${target.launcher}`);
  console.log(`  runs ${target.installed}/deno (${runtime}); needs no network`);
  const bin = join(target.prefix, "bin");
  if ((Deno.env.get("PATH") ?? "").split(":").includes(bin)) {
    console.log(`  ${bin} is on PATH: run "one-socket --help"`);
  } else {
    console.log(`  ${bin} is not on PATH; add it, e.g. in ~/.profile: export PATH="${bin}:$PATH"`);
  }
  console.log(`  uninstall: deno task install --prefix ${target.prefix} --uninstall`);
}

async function uninstall(target: Layout): Promise<void> {
  await refuseForeignLauncher(target.launcher);
  const removed = [];
  if (await removeIfPresent(target.launcher)) removed.push(target.launcher);
  if (await removeIfPresent(target.library)) removed.push(target.library);
  console.log(
    removed.length === 0
      ? `nothing of one-socket to remove under ${target.prefix}`
      : `removed ${removed.join(" and ")}`,
  );
}

/** A failure's message, with the errno name when the system gave one (paths are in it already). */
function describe(error: unknown): string | undefined {
  if (error instanceof InstallError) return error.message;
  if (error instanceof Error && "code" in error && typeof error.code === "string") {
    return `${error.code}: ${error.message}`;
  }
  return undefined;
}

/** The command line's options; a mistake in it is an {@link InstallError} that shows the usage. */
function parseOptions(args: string[]): { prefix?: string; uninstall: boolean; help: boolean } {
  try {
    return parseArgs({
      args,
      options: {
        prefix: { type: "string" },
        uninstall: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
    }).values;
  } catch (error) {
    throw new InstallError(`${(error as Error).message}\n${USAGE}`);
  }
}

if (import.meta.main) {
  try {
    const options = parseOptions(Deno.args);
    if (options.help) {
      console.log(USAGE);
      Deno.exit(0);
    }
    // deno task runs this in the clone; a relative --prefix means one from where it was typed.
    const typedIn = Deno.env.get("INIT_CWD") ?? Deno.cwd();
    const target = layout(resolve(typedIn, options.prefix ?? defaultPrefix()));
    await (options.uninstall ? uninstall(target) : install(target));
  } catch (error) {
    const message = describe(error);
    if (message === undefined) throw error;
    console.error(`install: ${message}`);
    Deno.exit(1);
  }
}
