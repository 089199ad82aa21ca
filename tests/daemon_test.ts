/**
 * The broker as a daemon, with real `deno run mod.ts broker` processes:
 * `--pidfile`, `--daemon`, `--log-file` with SIGHUP, `--socket-mode` and
 * `--socket-group`, and a graceful shutdown that leaves nothing behind.
 */

import assert from "node:assert/strict";
import { getPair } from "../client/pair.ts";
import {
  type Cli,
  exists,
  isSocket,
  MOD,
  PERMISSIONS,
  sleep,
  startBroker,
  WAIT_MS,
  withScope,
} from "./processes.ts";

/** `--daemon` starts the command again, which needs --allow-run. */
const DAEMON_COMMAND = [Deno.execPath(), "run", ...PERMISSIONS, "--allow-run", MOD];

/** Stops `broker` with SIGTERM: exit 0, and neither `files` nor anything else left behind. */
async function stopGracefully(broker: Cli, ...files: string[]): Promise<void> {
  broker.kill("SIGTERM");
  const done = await broker.finish();
  assert.equal(done.code, 0, `exit code after SIGTERM; stderr:\n${done.stderr}`);
  for (const file of files) assert.ok(!exists(file), `${file} left behind`);
}

/** Pairs two clients on `key` through the broker at `path`. */
async function pairThrough(path: string, key: string): Promise<void> {
  const signal = AbortSignal.timeout(5000);
  const sockets = await Promise.all([
    getPair(key, { socket: path, mode: "server", signal }),
    getPair(key, { socket: path, mode: "client", signal }),
  ]);
  for (const socket of sockets) socket.close();
}

/** `/proc/PID/stat` from the state on (state, ppid, pgrp, session…); undefined once gone. */
function processStat(pid: number): string[] | undefined {
  try {
    // The command name before it is in parentheses and may hold spaces.
    return Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1].split(" ");
  } catch {
    return undefined;
  }
}

/** Whether process `pid` is gone (or a zombie nobody reaped yet: it runs no more code). */
function processGone(pid: number): boolean {
  const state = processStat(pid)?.[0];
  return state === undefined || state === "Z";
}

async function waitFor(what: string, condition: () => boolean): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`no ${what} after ${WAIT_MS} ms`);
    await sleep(20);
  }
}

Deno.test("daemon: a live broker's pidfile is refused to a second broker", async () => {
  await withScope(async (scope) => {
    const pidfile = `${scope.dir}/broker.pid`;
    const first = await startBroker(scope, ["--socket", scope.socket, "--pidfile", pidfile]);
    assert.equal(Deno.readTextFileSync(pidfile), `${first.pid}\n`);
    const other = `${scope.dir}/other.socket`;
    const second = await scope.spawn(["broker", "--socket", other, "--pidfile", pidfile]).finish();
    assert.equal(second.code, 1, `second broker exit code; stderr:\n${second.stderr}`);
    assert.match(
      second.stderr,
      new RegExp(`pidfile ${pidfile} is held by process ${first.pid}, which is running`),
    );
    assert.ok(!exists(other), "a refused broker must not bind its socket");
    assert.equal(Deno.readTextFileSync(pidfile), `${first.pid}\n`);
    await stopGracefully(first, pidfile, scope.socket);
  });
});

Deno.test("daemon: a stale pidfile is replaced; SIGTERM leaves no socket and no pidfile", async () => {
  await withScope(async (scope) => {
    const pidfile = `${scope.dir}/broker.pid`;
    const gone = new Deno.Command("true").spawn();
    await gone.status;
    Deno.writeTextFileSync(pidfile, `${gone.pid}\n`);
    const broker = await startBroker(scope, ["--socket", scope.socket, "--pidfile", pidfile]);
    assert.equal(Deno.readTextFileSync(pidfile), `${broker.pid}\n`);
    assert.match(broker.output, /replacing stale pidfile/);
    await pairThrough(scope.socket, "stale");
    await stopGracefully(broker, pidfile, scope.socket);
  });
});

Deno.test("daemon: --socket-mode and --socket-group (a gid) apply to the socket file", async () => {
  await withScope(async (scope) => {
    // Root may give the file any group; anyone else, one of their own.
    const gid = Deno.uid() === 0 ? 4242 : Deno.gid()!;
    const broker = await startBroker(scope, [
      "--socket",
      scope.socket,
      "--socket-mode",
      "0660",
      "--socket-group",
      String(gid),
    ]);
    const applied = () => {
      const info = Deno.statSync(scope.socket);
      return (info.mode! & 0o777) === 0o660 && info.gid === gid;
    };
    await broker.waitUntil("mode 0660 and the group on the socket file", applied);
    await stopGracefully(broker, scope.socket);
  });
});

Deno.test("daemon: --daemon returns once the broker serves; the broker runs on, detached", async () => {
  await withScope(async (scope) => {
    const pidfile = `${scope.dir}/broker.pid`;
    const log = `${scope.dir}/broker.log`;
    const args = ["--socket", scope.socket, "--pidfile", pidfile, "--log-file", log];
    const parent = scope.spawn(["broker", "--daemon", ...args], { command: DAEMON_COMMAND });
    const started = await parent.finish();
    assert.equal(started.code, 0, `--daemon exit code; stderr:\n${started.stderr}`);
    assert.equal(started.stderr, "");
    assert.equal(started.stdout.length, 0);
    const pid = Number(Deno.readTextFileSync(pidfile));
    try {
      assert.notEqual(pid, parent.pid);
      assert.ok(!processGone(pid), "the daemon runs");
      // Its own session: no terminal's hangup or job control reaches it.
      assert.equal(processStat(pid)?.[3], String(pid), "session id");
      assert.ok(isSocket(scope.socket));
      await pairThrough(scope.socket, "daemon");
      Deno.kill(pid, "SIGTERM");
      await waitFor("exit of the daemon", () => processGone(pid));
      assert.ok(!exists(pidfile), "pidfile left behind");
      assert.ok(!exists(scope.socket), "socket file left behind");
      const written = Deno.readTextFileSync(log);
      assert.match(written, /listening on .*broker\.socket/);
      assert.match(written, /stopped listening on/);
    } finally {
      if (!processGone(pid)) Deno.kill(pid, "SIGKILL");
    }
  });
});

Deno.test("daemon: --daemon exits 1 with the broker's own reason when it cannot start", async () => {
  await withScope(async (scope) => {
    const file = `${scope.dir}/not-a-socket`;
    Deno.writeTextFileSync(file, "");
    const parent = scope.spawn(["broker", "--daemon", "--socket", file], {
      command: DAEMON_COMMAND,
    });
    const done = await parent.finish();
    assert.equal(done.code, 1, `--daemon exit code; stderr:\n${done.stderr}`);
    assert.equal(
      done.stderr,
      `one-socket broker: ${file} exists and is not a socket; refusing to replace it\n`,
    );
  });
});

Deno.test("daemon: SIGHUP reopens --log-file, so rotation starts a new file", async () => {
  await withScope(async (scope) => {
    const log = `${scope.dir}/broker.log`;
    const broker = await startBroker(scope, ["--socket", scope.socket, "--log-file", log]);
    const read = (path: string) => exists(path) ? Deno.readTextFileSync(path) : "";
    await broker.waitUntil(
      "the first lines in the log file",
      () => read(log).includes("listening on"),
    );
    Deno.renameSync(log, `${log}.1`);
    broker.kill("SIGHUP");
    await broker.waitUntil("a new log file", () => read(log).includes("reopened log file"));
    await stopGracefully(broker, scope.socket);
    assert.match(read(log), /stopped listening on/);
    assert.doesNotMatch(read(`${log}.1`), /reopened|stopped listening/);
    assert.equal(broker.stderr, "", "with --log-file nothing goes to stderr");
  });
});
