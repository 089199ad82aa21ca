/**
 * `deno task install` into a temporary prefix, then the installed
 * `one-socket` run as its users would: no `deno` on PATH, HOME and DENO_DIR
 * somewhere empty, and no network at all (`unshare --net`, where this may
 * create a network namespace; elsewhere that part is skipped, saying why).
 * It prints its version, serves as a broker, pairs two `pair` processes, and
 * stops on a SIGTERM sent to the pid the launcher was started as. Then
 * `--uninstall` leaves no file behind.
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import denoConfig from "../deno.json" with { type: "json" };
import { exists, isSocket, type Scope, startBroker, withScope } from "./processes.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
/** How soon a broker must be gone after SIGTERM: it only closes its sockets. */
const STOP_MS = 3000;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** `deno task install ARGS` from this clone. */
function runInstaller(...args: string[]): Promise<Deno.CommandOutput> {
  return new Deno.Command(Deno.execPath(), {
    args: ["task", "install", ...args],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
}

async function install(...args: string[]): Promise<void> {
  const { code, stderr } = await runInstaller(...args);
  assert.equal(code, 0, `deno task install ${args.join(" ")}:\n${decoder.decode(stderr)}`);
}

/** Why this process may not create a network namespace, or undefined when it may. */
async function networkNamespaceRefusal(): Promise<string | undefined> {
  try {
    const { code, stderr } = await new Deno.Command("unshare", {
      args: ["--net", "true"],
      stdout: "null",
      stderr: "piped",
    }).output();
    return code === 0 ? undefined : decoder.decode(stderr).trim();
  } catch (error) {
    return (error as Error).message;
  }
}

const refusal = await networkNamespaceRefusal();
if (refusal !== undefined) {
  console.warn(`install_test: the installed command runs with networking possible: ${refusal}`);
}

/** Every file (not directory) under `directory`, relative to it. */
function filesUnder(directory: string, relative = ""): string[] {
  return [...Deno.readDirSync(`${directory}/${relative}`)].flatMap((entry) => {
    const path = `${relative}${entry.name}`;
    return entry.isDirectory ? filesUnder(directory, `${path}/`) : [path];
  });
}

/**
 * Fails unless process `pid` runs `runtime` itself, having killed what it
 * started: a launcher that forked the runtime instead of exec'ing it would
 * leave the runtime holding the output pipes, and the cleanup waiting on them.
 */
function assertIsRuntime(pid: number, runtime: string): void {
  const program = Deno.readLinkSync(`/proc/${pid}/exe`);
  if (program === runtime) return;
  const children = Deno.readTextFileSync(`/proc/${pid}/task/${pid}/children`);
  for (const child of children.split(" ").filter(Boolean)) Deno.kill(Number(child), "SIGKILL");
  assert.fail(`pid ${pid} runs ${program}, not ${runtime}: the launcher did not exec`);
}

/** Runs `pair KEY` as server and as client at once; each must print what the other was fed. */
async function pairThrough(
  scope: Scope,
  socket: string,
  command: string[],
  env: Record<string, string>,
): Promise<void> {
  const peers = ["server", "client"].map((mode) => ({
    sent: `from the ${mode}\n`,
    cli: scope.spawn(["pair", "installed", "--mode", mode, "--socket", socket], {
      command,
      env,
      stdin: true,
    }),
  }));
  await Promise.all(peers.map(({ cli, sent }) => cli.feed(encoder.encode(sent))));
  const [server, client] = await Promise.all(peers.map(({ cli }) => cli.finish()));
  assert.equal(server.code, 0, server.stderr);
  assert.equal(client.code, 0, client.stderr);
  assert.equal(decoder.decode(server.stdout), peers[1].sent);
  assert.equal(decoder.decode(client.stdout), peers[0].sent);
}

Deno.test("install: the installed command runs offline from its own files; uninstall removes them", async () => {
  await withScope(async (scope) => {
    const prefix = `${scope.dir}/prefix`;
    const installed = `${prefix}/lib/one-socket/${denoConfig.version}`;
    await install("--prefix", prefix);
    // Again over the first: replaced in place, nothing left of the first.
    await install("--prefix", prefix);
    assert.deepEqual([...Deno.readDirSync(`${prefix}/lib/one-socket`)].map((entry) => entry.name), [
      denoConfig.version,
    ]);

    await Deno.mkdir(`${scope.dir}/home`);
    const env = {
      PATH: `${prefix}/bin:/usr/bin:/bin`,
      HOME: `${scope.dir}/home`,
      DENO_DIR: `${scope.dir}/deno-dir`,
    };
    // unshare execs the launcher (found on PATH), which execs the runtime: one pid throughout.
    const command = refusal === undefined ? ["unshare", "--net", "one-socket"] : ["one-socket"];

    const version = await scope.spawn(["--version"], { command, env }).finish();
    assert.equal(decoder.decode(version.stdout), `one-socket ${denoConfig.version}\n`);

    const socket = `${scope.dir}/b.socket`;
    const broker = await startBroker(scope, ["--socket", socket], { command, env, path: socket });
    assertIsRuntime(broker.pid, `${installed}/deno`);
    if (refusal === undefined) {
      const namespace = (pid: number | "self") => Deno.readLinkSync(`/proc/${pid}/ns/net`);
      assert.notEqual(namespace(broker.pid), namespace("self"), "the broker's network namespace");
    }
    await pairThrough(scope, socket, command, env);

    broker.kill("SIGTERM");
    const stopped = await broker.finish(STOP_MS);
    assert.equal(stopped.code, 0, `broker exit code after SIGTERM; stderr:\n${stopped.stderr}`);
    assert.equal(stopped.signal, null);
    assert.ok(!isSocket(socket), `${socket} left behind`);

    await install("--prefix", prefix, "--uninstall");
    assert.deepEqual(filesUnder(prefix), []);
    assert.ok(!exists(`${prefix}/lib/one-socket`), `${prefix}/lib/one-socket left behind`);
  });
});

Deno.test("install: a PREFIX/bin/one-socket it did not write is refused and left alone", async () => {
  await withScope(async (scope) => {
    const prefix = `${scope.dir}/prefix`;
    const launcher = `${prefix}/bin/one-socket`;
    const foreign = "#!/bin/sh\necho someone else's one-socket\n";
    await Deno.mkdir(`${prefix}/bin`, { recursive: true });
    await Deno.writeTextFile(launcher, foreign);
    for (const args of [["--prefix", prefix], ["--prefix", prefix, "--uninstall"]]) {
      const { code, stderr } = await runInstaller(...args);
      const message = decoder.decode(stderr);
      assert.equal(code, 1, message);
      assert.match(message, /^install: .* exists and was not written by this installer;/m);
      assert.ok(message.includes(launcher), message);
    }
    assert.equal(await Deno.readTextFile(launcher), foreign);
    assert.ok(!exists(`${prefix}/lib`), `${prefix}/lib was created`);
  });
});
