/**
 * The broker as a daemon, with real `deno run mod.ts broker` processes:
 * `--pidfile`, `--daemon`, `--log-file` with SIGHUP, `--socket-mode` and
 * `--socket-group`, and a graceful shutdown that leaves nothing behind.
 * Then the same files under attack by another local user (`nobody`, through
 * setpriv) in a directory shared like `/tmp`.
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
import {
  assertUntouched,
  asUser,
  NOBODY,
  otherUsersMissing,
  rootOnlyFile,
  runAs,
  sharedDirectory,
} from "./other_users.ts";

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
      new RegExp(
        `pidfile ${pidfile} is locked by a running process: it names process ${first.pid}, ` +
          "but the lock, not the pid, says a broker runs, and its holder may be another process",
      ),
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

/** The attacks below need a second uid; without root they cannot run. */
const attack = { ignore: otherUsersMissing !== undefined };
if (attack.ignore) console.warn(`daemon_test: attack tests ignored (${otherUsersMissing})`);

/** The next pid the kernel will hand out (in this pid namespace). */
function nextPid(): number {
  return Number(Deno.readTextFileSync("/proc/sys/kernel/ns_last_pid")) + 1;
}

Deno.test({
  name: "attack: symlinks planted where a pidfile's temporary file could go are never followed",
  ...attack,
  fn: () =>
    withScope(async (scope) => {
      const shared = sharedDirectory(scope.dir);
      const victim = rootOnlyFile(`${scope.dir}/victim`, "root's secret\n");
      const pidfile = `${shared}/broker.pid`;
      // A pidfile written through `.broker.pid.<pid>.tmp` beside it: pids come in order, so
      // the attacker plants that name for every pid the broker may get.
      const first = nextPid();
      const last = first + 500;
      await runAs(
        NOBODY,
        "perl",
        "-e",
        'symlink($ARGV[0], "$ARGV[1]/.broker.pid.$_.tmp") or die $! for $ARGV[2] .. $ARGV[3]',
        victim,
        shared,
        String(first),
        String(last),
      );
      const broker = await startBroker(scope, ["--socket", scope.socket, "--pidfile", pidfile]);
      assert.ok(broker.pid >= first && broker.pid <= last, `pid ${broker.pid} was not foreseen`);
      assert.equal(Deno.readTextFileSync(pidfile), `${broker.pid}\n`);
      assertUntouched(victim, "root's secret\n");
      await stopGracefully(broker, pidfile, scope.socket);
      assertUntouched(victim, "root's secret\n");
    }),
});

/** Whether a `flock -x` on `path` would have to wait (exit 1 of `flock -n`): someone holds one. */
async function flockHeld(path: string): Promise<boolean> {
  const done = await new Deno.Command("flock", { args: ["-n", "-x", path, "true"] }).output();
  return done.code === 1;
}

Deno.test({
  name: "attack: another user's flock on a stale pidfile does not keep the broker from starting",
  ...attack,
  fn: () =>
    withScope(async (scope) => {
      // Root's 0644 pidfile, left by a broker killed with SIGKILL, in a directory (0755) that
      // nobody may enter but not write in, as /run.
      Deno.chmodSync(scope.dir, 0o755);
      const pidfile = `${scope.dir}/broker.pid`;
      const gone = new Deno.Command("true").spawn();
      await gone.status;
      Deno.writeTextFileSync(pidfile, `${gone.pid}\n`, { mode: 0o644 });
      Deno.chmodSync(pidfile, 0o644);
      // nobody may read the file, so open it for reading and flock it; never open it to write.
      // flock(1) takes the lock before it starts sleep, as its child.
      const [program, ...args] = asUser(NOBODY, "flock", "-x", pidfile, "sleep", "30");
      const attacker = new Deno.Command(program, { args, stdin: "null", stdout: "null" }).spawn();
      try {
        await waitFor("nobody's flock on the pidfile", () => childOf(attacker.pid) !== undefined);
        assert.ok(await flockHeld(pidfile), "nobody's flock is not held");
        const broker = await startBroker(scope, ["--socket", scope.socket, "--pidfile", pidfile]);
        assert.equal(Deno.readTextFileSync(pidfile), `${broker.pid}\n`);
        // The log line may reach us after the socket file appears: wait for it.
        await broker.waitForOutput("replacing stale pidfile");
        assert.match(broker.output, new RegExp(`replacing stale pidfile .*process ${gone.pid}`));
        assert.ok(await flockHeld(pidfile), "the attacker's flock was still held");
        // The broker's own lock still refuses a second broker, the attacker's flock aside.
        const other = `${scope.dir}/other.socket`;
        const second = await scope.spawn(["broker", "--socket", other, "--pidfile", pidfile])
          .finish();
        assert.equal(second.code, 1, `second broker exit code; stderr:\n${second.stderr}`);
        assert.match(second.stderr, new RegExp(`names process ${broker.pid}`));
        assert.ok(!exists(other), "a refused broker must not bind its socket");
        await stopGracefully(broker, pidfile, scope.socket);
      } finally {
        // flock(1) runs sleep as its child, which holds the lock too: end both.
        const sleeper = childOf(attacker.pid);
        if (sleeper !== undefined) Deno.kill(sleeper, "SIGKILL");
        try {
          attacker.kill("SIGKILL");
        } catch {
          // it exited with its child
        }
        await attacker.status;
      }
    }),
});

Deno.test({
  name:
    "attack: another user's read lock on a stale pidfile does not keep the broker from starting",
  ...attack,
  fn: () =>
    withScope(async (scope) => {
      Deno.chmodSync(scope.dir, 0o755);
      const pidfile = `${scope.dir}/broker.pid`;
      const gone = new Deno.Command("true").spawn();
      await gone.status;
      Deno.writeTextFileSync(pidfile, `${gone.pid}\n`, { mode: 0o644 });
      Deno.chmodSync(pidfile, 0o644);
      // F_OFD_SETLK (37) with a struct flock for F_RDLCK over the whole file: a reader's lock.
      const script = 'open(my $f, "<", $ARGV[0]) or die "open: $!"; ' +
        'my $lock = pack("s s x4 q q i x4", 0, 0, 0, 0, 0); ' +
        'fcntl($f, 37, $lock) or die "fcntl: $!"; ' +
        '$| = 1; print "locked\\n"; sleep 30';
      const [program, ...args] = asUser(NOBODY, "perl", "-e", script, pidfile);
      const attacker = new Deno.Command(program, { args, stdin: "null", stdout: "piped" }).spawn();
      const output = attacker.stdout.getReader();
      try {
        const { value } = await output.read();
        assert.equal(new TextDecoder().decode(value), "locked\n");
        const broker = await startBroker(scope, ["--socket", scope.socket, "--pidfile", pidfile]);
        assert.equal(Deno.readTextFileSync(pidfile), `${broker.pid}\n`);
        await broker.waitForOutput("is stale but read-locked by another process");
        assert.equal(Deno.statSync(pidfile).mode! & 0o777, 0o644 & ~Deno.umask());
        const other = `${scope.dir}/other.socket`;
        const second = await scope.spawn(["broker", "--socket", other, "--pidfile", pidfile])
          .finish();
        assert.equal(second.code, 1, `second broker exit code; stderr:\n${second.stderr}`);
        assert.match(second.stderr, new RegExp(`names process ${broker.pid}`));
        await stopGracefully(broker, pidfile, scope.socket);
      } finally {
        try {
          attacker.kill("SIGKILL");
        } catch {
          // it failed, and said why
        }
        await output.cancel();
        await attacker.status;
      }
    }),
});

Deno.test({
  name: "attack: a FIFO planted at the pidfile path is refused at once, --daemon says why",
  ...attack,
  fn: () =>
    withScope(async (scope) => {
      const shared = sharedDirectory(scope.dir);
      const pidfile = `${shared}/broker.pid`;
      await runAs(NOBODY, "mkfifo", pidfile);
      const parent = scope.spawn(
        ["broker", "--daemon", "--socket", scope.socket, "--pidfile", pidfile],
        { command: DAEMON_COMMAND },
      );
      const done = await parent.finish();
      assert.equal(done.code, 1, `--daemon exit code; stderr:\n${done.stderr}`);
      assert.equal(
        done.stderr,
        `one-socket broker: ${pidfile} is a FIFO, not a regular file; refusing it\n`,
      );
      assert.ok(!exists(scope.socket), "a refused broker must not bind its socket");
    }),
});

Deno.test({
  name: "attack: --log-file refuses a symlink planted at its path, and a file another user made",
  ...attack,
  fn: () =>
    withScope(async (scope) => {
      const shared = sharedDirectory(scope.dir);
      const victim = rootOnlyFile(`${scope.dir}/victim`, "root's secret\n");
      const linked = `${shared}/linked.log`;
      await runAs(NOBODY, "ln", "-s", victim, linked);
      const followed = await scope.spawn(["broker", "--socket", scope.socket, "--log-file", linked])
        .finish();
      assert.equal(followed.code, 1, `exit code; stderr:\n${followed.stderr}`);
      assert.equal(
        followed.stderr,
        `one-socket broker: open ${linked}: ELOOP (a symlink; refusing to follow it)\n`,
      );
      assertUntouched(victim, "root's secret\n");
      // Made by the attacker, readable by the attacker: the log would tell them every key.
      const theirs = `${shared}/theirs.log`;
      await runAs(NOBODY, "sh", "-c", 'umask 022 && : > "$1"', "sh", theirs);
      const adopted = await scope.spawn(["broker", "--socket", scope.socket, "--log-file", theirs])
        .finish();
      assert.equal(adopted.code, 1, `exit code; stderr:\n${adopted.stderr}`);
      assert.equal(
        adopted.stderr,
        `one-socket broker: ${theirs} belongs to uid ${NOBODY}, not to uid 0 (this process) ` +
          "or root; refusing it\n",
      );
      assert.equal(Deno.readTextFileSync(theirs), "", "the log went to the attacker's file");
      assert.ok(!exists(scope.socket), "a refused broker must not bind its socket");
    }),
});

Deno.test({
  name: "attack: SIGHUP refuses a symlink planted after rotation and keeps the old log file",
  ...attack,
  fn: () =>
    withScope(async (scope) => {
      const shared = sharedDirectory(scope.dir);
      const victim = rootOnlyFile(`${scope.dir}/victim`, "root's secret\n");
      const log = `${shared}/broker.log`;
      const broker = await startBroker(scope, ["--socket", scope.socket, "--log-file", log]);
      const read = (path: string) => exists(path) ? Deno.readTextFileSync(path) : "";
      await broker.waitUntil("the first lines in the log file", () =>
        read(log).includes("listening on"));
      assert.equal(Deno.statSync(log).mode! & 0o777, 0o640, "mode of the new log file");
      Deno.renameSync(log, `${log}.1`);
      await runAs(NOBODY, "ln", "-s", victim, log);
      broker.kill("SIGHUP");
      await broker.waitUntil(
        "the refused reopen in the old log file",
        () =>
          read(`${log}.1`).includes("could not reopen"),
      );
      assert.match(
        read(`${log}.1`),
        /open .*broker\.log: ELOOP \(a symlink; refusing to follow it\)/,
      );
      await stopGracefully(broker, scope.socket);
      assert.match(read(`${log}.1`), /stopped listening on/);
      assertUntouched(victim, "root's secret\n");
    }),
});

/**
 * Connects to `path` again and again, from before it exists until 20000
 * attempts after it appeared, and prints `connected refused denied`. A
 * socket whose connect failed may try again: one system call per attempt,
 * the fastest a user can probe.
 */
const CONNECT_LOOP = `
use Socket;
my ($path) = @ARGV; my $address = pack_sockaddr_un($path);
my ($connected, $refused, $denied, $after) = (0, 0, 0, 0);
alarm 60;
socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
while ($after < 20000) {
  if (connect($s, $address)) {
    $connected++; close $s; socket($s, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
  }
  elsif ($!{ECONNREFUSED}) { $refused++; }
  elsif ($!{EACCES}) { $denied++; }
  elsif (!$!{ENOENT}) { die "connect: $!"; }
  $after++ if $connected + $refused + $denied;
}
print "$connected $refused $denied\n";
`;

/**
 * Starts a broker with `flags` (and umask 000, so that bind would create the
 * file 0777 and only the broker's own care protects it) while `nobody`
 * tries to connect from before the socket exists to well after; asserts
 * that it never could, and that the file ends with `mode` and `gid`.
 */
async function assertNobodyConnects(flags: string[], mode: number, gid: number): Promise<void> {
  await withScope(async (scope) => {
    const shared = sharedDirectory(scope.dir);
    const socket = `${shared}/broker.socket`;
    const [program, ...args] = asUser(NOBODY, "perl", "-e", CONNECT_LOOP, socket);
    const attacker = new Deno.Command(program, { args, stdout: "piped" }).spawn();
    try {
      const umaskZero = ["sh", "-c", 'umask 000 && exec "$@"', "sh", ...DAEMON_COMMAND];
      const broker = await startBroker(scope, ["--socket", socket, ...flags], {
        path: socket,
        command: umaskZero,
      });
      const [connected, refused, denied] = new TextDecoder()
        .decode((await attacker.output()).stdout).trim().split(" ").map(Number);
      assert.ok(refused + denied > 0, "the attacker never met the socket");
      assert.equal(
        connected,
        0,
        `connected ${connected} times (${refused} refused, ${denied} denied)`,
      );
      const info = Deno.statSync(socket);
      assert.equal(info.mode! & 0o777, mode);
      assert.equal(info.gid, gid);
      await pairThrough(socket, "still serves");
      await stopGracefully(broker, socket);
    } finally {
      try {
        attacker.kill("SIGKILL");
      } catch {
        // it has finished
      }
      await attacker.status;
    }
  });
}

Deno.test({
  name: "attack: --socket-mode holds from the socket's first instant, even under umask 000",
  ...attack,
  fn: () => assertNobodyConnects(["--socket-mode", "0600"], 0o600, 0),
});

Deno.test({
  name: "attack: with --socket-group, nobody outside the group connects while it is set",
  ...attack,
  fn: () => assertNobodyConnects(["--socket-mode", "0660", "--socket-group", "4242"], 0o660, 4242),
});

Deno.test("daemon: a restart straight after kill -9 takes over, though the killed pid lingers", async () => {
  await withScope(async (scope) => {
    const pidfile = `${scope.dir}/broker.pid`;
    const args = ["--socket", scope.socket, "--pidfile", pidfile];
    // A parent that never reaps: the killed broker stays a zombie, which kill(pid, 0) finds.
    const neverReaps = ["sh", "-c", '"$@" & exec sleep 60', "sh", ...DAEMON_COMMAND];
    const first = scope.spawn(["broker", ...args], { command: neverReaps });
    await first.waitForOutput("listening on");
    const killed = Number(Deno.readTextFileSync(pidfile));
    Deno.kill(killed, "SIGKILL");
    await waitFor("the killed broker to be a zombie", () => processStat(killed)?.[0] === "Z");
    const second = scope.spawn(["broker", ...args]);
    await second.waitForOutput("listening on");
    assert.equal(Deno.readTextFileSync(pidfile), `${second.pid}\n`);
    assert.match(second.output, new RegExp(`replacing stale pidfile .*process ${killed}`));
    await pairThrough(scope.socket, "after kill -9");
    await stopGracefully(second, pidfile, scope.socket);
  });
});

/** The pid of a child of `parent`, once it has one; undefined until then. */
function childOf(parent: number): number | undefined {
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name) || processStat(Number(entry.name))?.[1] !== String(parent)) {
      continue;
    }
    // The broker --daemon started, not anything else of the parent's (it runs without --daemon).
    if (!commandLineOf(Number(entry.name)).includes("--daemon")) return Number(entry.name);
  }
  return undefined;
}

function commandLineOf(pid: number): string[] {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0");
  } catch {
    return ["--daemon"]; // gone: not the one
  }
}

Deno.test("daemon: --daemon gives up after --ready-timeout on a broker that never serves", async () => {
  await withScope(async (scope) => {
    const parent = scope.spawn(
      ["broker", "--daemon", "--ready-timeout", "1", "--socket", scope.socket],
      { command: DAEMON_COMMAND },
    );
    // Stopped long before it could serve (it has a runtime to start), it never will.
    let child: number | undefined;
    await parent.waitUntil("the broker process", () => (child = childOf(parent.pid)) !== undefined);
    Deno.kill(child!, "SIGSTOP");
    const started = performance.now();
    const done = await parent.finish();
    assert.ok(performance.now() - started < 5000, "gave up in about a second");
    assert.equal(done.code, 1, `--daemon exit code; stderr:\n${done.stderr}`);
    assert.equal(
      done.stderr,
      `one-socket broker: the broker (pid ${child}) did not report ready (READY=1) within 1 s; ` +
        "stopped it with SIGKILL\n",
    );
    await waitFor("the end of the stuck broker", () => processGone(child!));
    assert.ok(!exists(scope.socket), "the stuck broker must not have bound its socket");
  });
});
