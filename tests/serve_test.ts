/**
 * `one-socket serve` end to end: a real broker process, `serve` processes
 * that run real programs for every peer, and peers that are our `pair`
 * command (protocol v2), the C client `tests/c/sp_client.c` (protocol v1, as
 * libspbroker speaks it) and our library. Against a broker that speaks only
 * v1 (`scripts/floor.c`): `serve`, and the peer variables of `pair --exec`.
 */

import assert from "node:assert/strict";
import { EXIT_USAGE } from "../client/command_line.ts";
import { getPair } from "../client/pair.ts";
import { DEFAULT_MAX } from "../client/serve.ts";
import type { PairedSocket } from "../client/paired_socket.ts";
import type { SocketType } from "../client/protocol_v2.ts";
import { buildCProgram, buildFloor } from "./helpers.ts";
import { asUser, NOBODY, otherUsersMissing } from "./other_users.ts";
import {
  type Cli,
  MOD,
  PERMISSIONS,
  type Scope,
  sleep,
  type SpawnOptions,
  startBroker,
  startFloor,
  WAIT_MS,
  withScope,
} from "./processes.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

const cClient = await buildCProgram("sp_client");
if (cClient === undefined) {
  console.warn("serve_test: no C compiler (cc); the C client tests are ignored");
} // Another uid runs it too.
else await Deno.chmod(cClient.slice(0, cClient.lastIndexOf("/")), 0o755);

/** A v1-only C broker that closes a v2 request at once, as the C broker does. */
const floor = cClient === undefined ? undefined : await buildFloor();

/** `deno run` of the command with the permission running a program needs on top. */
const EXEC_COMMAND = [Deno.execPath(), "run", ...PERMISSIONS, "--allow-run", MOD];

function serve(scope: Scope, args: string[], options: SpawnOptions = {}) {
  return scope.spawn(["serve", ...args], { command: EXEC_COMMAND, ...options });
}

function lines(text: string): string[] {
  return text.split("\n").filter((line) => line.trim() !== "");
}

Deno.test("serve: command line mistakes exit 2, say what is wrong and show the usage", () =>
  withScope(async (scope) => {
    // Nothing listens here: reaching for the broker would fail with ENOENT and exit 1.
    const socket = `${scope.dir}/no-broker.socket`;
    const program = ["--", "cat"];
    const cases: [string[], string][] = [
      [[], "missing KEY"],
      [["a", "b", "--exec", ...program], "expected one KEY"],
      [["k"], "serve needs --exec -- PROGRAM, to run for every peer"],
      [["k", "--stdio"], "--stdio goes with --exec"],
      [["k", "--exec"], "--exec needs a PROGRAM after --"],
      [["k", "--exec", "--"], "--exec needs a PROGRAM after --"],
      [["k", ...program], "a PROGRAM after -- needs --exec"],
      [["k", "--max", "0", "--exec", ...program], "--max takes a whole number from 1 up, not 0"],
      [
        ["k", "--max", "2.5", "--exec", ...program],
        "--max takes a whole number from 1 up, not 2.5",
      ],
      [
        ["k", "--backlog", "65536", "--exec", ...program],
        "--backlog takes a whole number from 1 to 65535, not 65536",
      ],
      [
        ["k", "--backlog", "", "--exec", ...program],
        "--backlog takes a whole number from 1 to 65535, not ",
      ],
      [
        ["k", "--type", "raw", "--exec", ...program],
        'invalid socket type "raw" (expected stream, seqpacket or dgram)',
      ],
      [
        ["k", "--mode", "sideways", "--exec", ...program],
        'invalid mode "sideways" (expected none, client or server)',
      ],
      [
        ["k", "--timeout", "1", "--exec", ...program],
        'unknown option --timeout (a KEY that starts with "-" goes as --key=--timeout)',
      ],
      [
        ["-k", "--exec", ...program],
        'unknown option -k (a KEY that starts with "-" goes as --key=-k)',
      ],
    ];
    const results = await Promise.all(
      cases.map(([args]) => serve(scope, ["--socket", socket, ...args]).finish()),
    );
    cases.forEach(([args, message], i) => {
      const done = results[i];
      const name = `serve ${args.join(" ")}`;
      assert.equal(done.code, EXIT_USAGE, `${name}: exit code; stderr:\n${done.stderr}`);
      assert.equal(lines(done.stderr)[0], `one-socket serve: ${message}`, name);
      assert.match(done.stderr, /^Usage: one-socket serve KEY/m, name);
      assert.equal(done.stdout.length, 0, `${name}: stdout`);
    });
  }));

/**
 * What sp_client (and a `pair` fed "ping") needs from the server side: its 4
 * bytes back with the first letter capitalised, as the demo does it.
 */
const PING_TO_PING = "head -c 4 | sed s/^p/P/";

/** A broker process on `scope.socket`, which every uid may use. */
async function openBroker(scope: Scope): Promise<Cli> {
  await Deno.chmod(scope.dir, 0o755);
  return await startBroker(scope, ["--socket", scope.socket, "--socket-mode", "0666"]);
}

/** sp_client as a v1 client of `key` (as `uid` if given), killed after {@link WAIT_MS}. */
function cClientRun(path: string, key: string, uid?: number) {
  const command = uid === undefined
    ? [cClient!, path, key, "client"]
    : asUser(uid, cClient!, path, key, "client");
  const child = new Deno.Command(command[0], {
    args: command.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(WAIT_MS), // killed if it hangs, so that the test fails instead
  }).spawn();
  // setpriv execs the client: the pid stays the same.
  return { pid: child.pid, done: child.output() };
}

/** Asserts that an sp_client run got "Ping" for its "ping". */
async function assertCClientServed(run: ReturnType<typeof cClientRun>): Promise<void> {
  const output = await run.done;
  assert.equal(output.code, 0, `sp_client failed: ${decoder.decode(output.stderr)}`);
  assert.equal(decoder.decode(output.stdout), "client ok\n");
}

/** A `pair` client process that sends "ping" and must print "Ping". */
async function pairPing(scope: Scope, key: string): Promise<void> {
  const client = scope.spawn(["pair", key, "--mode", "client", "--socket", scope.socket], {
    stdin: true,
  });
  await client.feed(encoder.encode("ping"));
  const done = await client.finish();
  assert.equal(done.code, 0, `pair: ${done.stderr}`);
  assert.equal(decoder.decode(done.stdout), "Ping");
}

/** Our library as a client of `key`, bounded in time; the caller closes it. */
function libraryClient(path: string, key: string, type: SocketType = "stream") {
  return getPair(key, { socket: path, mode: "client", type, signal: AbortSignal.timeout(WAIT_MS) });
}

/** Everything the server side sends, to its end of stream. */
async function readAll(socket: PairedSocket): Promise<string> {
  try {
    return await new Response(socket.readable).text();
  } finally {
    socket.close();
  }
}

/** Stops `server` with `signal`: it must exit 0 on its own, saying nothing. */
async function stopServe(server: Cli, signal: Deno.Signal = "SIGTERM"): Promise<void> {
  assert.ok(!server.exited, `serve exited early; stderr:\n${server.stderr}`);
  server.kill(signal);
  const done = await server.finish();
  assert.equal(done.stderr, "", `serve's stderr after ${signal}`);
  assert.equal(done.code, 0, `serve's exit code after ${signal}`);
  assert.equal(done.signal, null);
}

Deno.test({
  name: "serve --stdio: a program per peer, for v1 C clients and v2 pair clients at once",
  ignore: cClient === undefined,
  fn: () =>
    withScope(async (scope) => {
      await openBroker(scope);
      const server = serve(scope, [
        "echo",
        "--socket",
        scope.socket,
        "--max",
        "3",
        "--exec",
        "--stdio",
        "--",
        "sh",
        "-c",
        PING_TO_PING,
      ]);
      const cClients = Array.from({ length: 8 }, () => cClientRun(scope.socket, "echo"));
      await Promise.all([
        ...cClients.map(assertCClientServed),
        ...Array.from({ length: 3 }, () => pairPing(scope, "echo")),
      ]);
      await stopServe(server);
    }),
});

/** The line the environment script below writes for every peer. */
function environmentLine(pid: number, uid: number): string {
  return `peer=${pid}/${uid}/${uid} key=env fd=3 fds=1 names=env own-pid=yes stdin=/dev/null`;
}

/** Appends what the program sees to $SEEN, then plays the ping game on fd 3. */
const ENVIRONMENT_SCRIPT =
  'echo "peer=$ONE_SOCKET_PEER_PID/$ONE_SOCKET_PEER_UID/$ONE_SOCKET_PEER_GID" ' +
  '"key=$ONE_SOCKET_KEY fd=$ONE_SOCKET_FD fds=$LISTEN_FDS names=$LISTEN_FDNAMES" ' +
  '"own-pid=$([ "$LISTEN_PID" = $$ ] && echo yes)" "stdin=$(readlink /proc/$$/fd/0)" >> "$SEEN"; ' +
  `{ ${PING_TO_PING}; } <&3 >&3`;

/** A `serve env` running {@link ENVIRONMENT_SCRIPT}; what it saw goes to the returned path. */
function environmentServer(scope: Scope): { server: Cli; seen: string } {
  const seen = `${scope.dir}/seen`;
  const server = serve(
    scope,
    ["env", "--socket", scope.socket, "--exec", "--", "sh", "-c", ENVIRONMENT_SCRIPT],
    // A variable of a pair --exec we might run under must not pass for the peer's.
    { env: { SEEN: seen, ONE_SOCKET_PEER_PID: "1", LISTEN_FDS: "7" } },
  );
  return { server, seen };
}

function seenLines(path: string): string[] {
  return lines(Deno.readTextFileSync(path)).sort();
}

Deno.test({
  name: "serve: the program finds the peer's pid, uid and gid, the key and fd 3 in its environment",
  ignore: cClient === undefined,
  fn: () =>
    withScope(async (scope) => {
      await openBroker(scope);
      const { server, seen } = environmentServer(scope);
      const viaC = cClientRun(scope.socket, "env");
      const viaPair = scope.spawn(["pair", "env", "--mode", "client", "--socket", scope.socket], {
        stdin: true,
      });
      await viaPair.feed(encoder.encode("ping"));
      const [paired] = await Promise.all([viaPair.finish(), assertCClientServed(viaC)]);
      assert.equal(decoder.decode(paired.stdout), "Ping", paired.stderr);
      await stopServe(server);
      const uid = Deno.uid()!;
      assert.deepEqual(
        seenLines(seen),
        [environmentLine(viaC.pid, uid), environmentLine(viaPair.pid, uid)].sort(),
      );
    }),
});

Deno.test({
  name: "serve: a client of another uid is named by its own uid, gid and pid",
  ignore: cClient === undefined || otherUsersMissing !== undefined,
  fn: () =>
    withScope(async (scope) => {
      await openBroker(scope);
      const { server, seen } = environmentServer(scope);
      const theirs = cClientRun(scope.socket, "env", NOBODY);
      const ours = cClientRun(scope.socket, "env");
      await Promise.all([assertCClientServed(theirs), assertCClientServed(ours)]);
      await stopServe(server);
      assert.deepEqual(
        seenLines(seen),
        [environmentLine(theirs.pid, NOBODY), environmentLine(ours.pid, 0)].sort(),
      );
    }),
});

Deno.test("serve --max 2: five slow peers, never more than two programs at once", () =>
  withScope(async (scope) => {
    await openBroker(scope);
    const running = `${scope.dir}/running`;
    await Deno.mkdir(running);
    const counts = `${scope.dir}/counts`;
    // Each program counts the programs running with it, itself included.
    const script = 'touch "$RUNNING/$$"; ls "$RUNNING" | wc -l >> "$COUNTS"; sleep 0.4; ' +
      'rm "$RUNNING/$$"; echo done >&3';
    const server = serve(
      scope,
      ["slow", "--socket", scope.socket, "--max", "2", "--exec", "--", "sh", "-c", script],
      { env: { RUNNING: running, COUNTS: counts } },
    );
    const replies = await Promise.all(
      Array.from({ length: 5 }, async () => readAll(await libraryClient(scope.socket, "slow"))),
    );
    assert.deepEqual(replies, Array(5).fill("done\n"));
    const seen = lines(await Deno.readTextFile(counts)).map(Number);
    assert.equal(seen.length, 5);
    assert.equal(Math.max(...seen), 2, `programs running at once: ${seen}`);
    await stopServe(server);
  }));

Deno.test("serve --max 1 --backlog 2: a flood of peers waits at the broker, not in serve", () =>
  withScope(async (scope) => {
    await openBroker(scope);
    const server = serve(scope, [
      "flood",
      "--socket",
      scope.socket,
      "--max",
      "1",
      "--backlog",
      "2",
      "--exec",
      "--",
      "sh",
      "-c",
      "sleep 0.05; echo ok >&3",
    ]);
    const descriptors = () => [...Deno.readDirSync(`/proc/${server.pid}/fd`)].length;
    // Registered (one peer served) and settled: what serve holds while idle.
    assert.equal(await readAll(await libraryClient(scope.socket, "flood")), "ok\n");
    await sleep(200);
    const idle = descriptors();
    let peak = idle;
    const sampler = setInterval(() => peak = Math.max(peak, descriptors()), 5);
    try {
      const replies = await Promise.all(
        Array.from({ length: 16 }, async () => readAll(await libraryClient(scope.socket, "flood"))),
      );
      assert.deepEqual(replies, Array(16).fill("ok\n"));
    } finally {
      clearInterval(sampler);
    }
    // The backlog's 2 delivered sockets, the one being handed to the program, and the 5 that
    // spawning takes for a moment (copies of stdout and stderr, /dev/null, a socketpair):
    // not one per waiting peer.
    assert.ok(peak - idle <= 2 + 1 + 5, `serve held ${peak - idle} more descriptors under a flood`);
    await stopServe(server);
  }));

Deno.test("serve: a broker that stops ends serve with exit 1 and one line, after its programs", () =>
  withScope(async (scope) => {
    const broker = await openBroker(scope);
    const server = serve(scope, [
      "gone",
      "--socket",
      scope.socket,
      "--exec",
      "--",
      "sh",
      "-c",
      "echo hi >&3; exec 3>&-; sleep 0.5",
    ]);
    assert.equal(await readAll(await libraryClient(scope.socket, "gone")), "hi\n");
    broker.kill("SIGTERM");
    assert.equal((await broker.finish()).code, 0);
    const started = Date.now();
    const done = await server.finish();
    assert.equal(done.code, 1, done.stderr);
    const [line, ...more] = lines(done.stderr);
    assert.deepEqual(more, [], done.stderr);
    assert.ok(line.startsWith(`one-socket serve: broker at ${scope.socket} `), line);
    // The program still ran when the broker left: serve waited for it.
    assert.ok(Date.now() - started > 200, `serve exited ${Date.now() - started} ms after`);
  }));

Deno.test("serve: a program that fails is logged with the key, the peer and the status; serving goes on", () =>
  withScope(async (scope) => {
    await openBroker(scope);
    const server = serve(scope, [
      "fails",
      "--socket",
      scope.socket,
      "--exec",
      "--",
      "sh",
      "-c",
      "echo hi >&3; exit 3",
    ]);
    for (let i = 0; i < 2; i++) {
      assert.equal(await readAll(await libraryClient(scope.socket, "fails")), "hi\n");
      await server.waitUntil(`failure ${i + 1} logged`, () => lines(server.stderr).length > i);
    }
    server.kill("SIGTERM");
    const done = await server.finish();
    assert.equal(done.code, 0, done.stderr);
    const logged = lines(done.stderr);
    assert.equal(logged.length, 2, done.stderr);
    for (const line of logged) {
      assert.match(
        line,
        new RegExp(
          `^one-socket serve: key "fails": peer pid ${Deno.pid} uid ${Deno.uid()}: /\\S*/sh exited with status 3$`,
        ),
      );
    }
  }));

Deno.test("serve: peers that make every program fail get 20 lines in 10 s, then a count", () =>
  withScope(async (scope) => {
    await openBroker(scope);
    const server = serve(scope, ["fails", "--socket", scope.socket, "--exec", "--", "false"]);
    const peers = 25;
    await Promise.all(
      Array.from(
        { length: peers },
        async () => readAll(await libraryClient(scope.socket, "fails")),
      ),
    );
    await server.waitUntil("20 failures logged", () => lines(server.stderr).length === 20);
    // The programs of the last peers may still be ending; each one is counted.
    await sleep(500);
    server.kill("SIGTERM");
    const done = await server.finish();
    assert.equal(done.code, 0, done.stderr);
    const logged = lines(done.stderr);
    assert.equal(logged.length, 21, done.stderr);
    assert.match(logged[19], /: \S*\/false exited with status 1$/);
    assert.match(
      logged[20],
      /^one-socket serve: key "fails": held back 5 more lines about failed programs in the last \d+ s$/,
    );
  }));

Deno.test("serve --type seqpacket: the program reads the peer's messages one by one", () =>
  withScope(async (scope) => {
    await openBroker(scope);
    // dd makes one read: on a seqpacket socket, one whole message.
    const script = 'while n=$(dd bs=65536 count=1 <&3 2>/dev/null | wc -c); [ "$n" -gt 0 ]; ' +
      'do echo "$n" >&3; done';
    const server = serve(scope, [
      "packets",
      "--socket",
      scope.socket,
      "--type",
      "seqpacket",
      "--exec",
      "--",
      "sh",
      "-c",
      script,
    ]);
    const socket = await libraryClient(scope.socket, "packets", "seqpacket");
    try {
      assert.equal(socket.type, "seqpacket");
      for (const size of [3, 1000, 1]) await socket.send(new Uint8Array(size));
      socket.closeWrite();
      const sizes = [];
      for (let message; (message = await socket.receive()) !== null;) {
        sizes.push(decoder.decode(message));
      }
      assert.deepEqual(sizes, ["3\n", "1000\n", "1\n"]);
    } finally {
      socket.close();
    }
    await stopServe(server);
  }));

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test(`serve: ${signal} is passed on to the programs; serve exits 0 once they end, and frees the key`, () =>
    withScope(async (scope) => {
      await openBroker(scope);
      const pids = `${scope.dir}/pids`;
      // The program outlives its socket: only the signal ends it.
      const script = 'echo $$ >> "$PIDS"; echo first >&3; exec 3>&-; exec sleep 30';
      const first = serve(
        scope,
        ["again", "--socket", scope.socket, "--exec", "--", "sh", "-c", script],
        { env: { PIDS: pids } },
      );
      assert.equal(await readAll(await libraryClient(scope.socket, "again")), "first\n");
      const [pid] = lines(await Deno.readTextFile(pids)).map(Number);
      assert.ok(Deno.statSync(`/proc/${pid}`).isDirectory, "the program runs");
      // Killed by the signal we pass on, the program is not a failure to log.
      await stopServe(first, signal);
      assert.throws(() => Deno.statSync(`/proc/${pid}`), Deno.errors.NotFound);

      // Nobody serves the key now: a client waits, until a new serve takes it.
      const waiting = libraryClient(scope.socket, "again");
      const early = await Promise.race([
        waiting.then(() => "served"),
        sleep(300).then(() => "waits"),
      ]);
      assert.equal(early, "waits");
      const second = serve(scope, [
        "again",
        "--socket",
        scope.socket,
        "--exec",
        "--",
        "sh",
        "-c",
        "echo second >&3",
      ]);
      assert.equal(await readAll(await waiting), "second\n");
      await stopServe(second, signal);
    }));
}

Deno.test({
  name: "serve: a broker that speaks only protocol v1 gets one clear line and exit 1",
  ignore: floor === undefined,
  fn: () =>
    withScope(async (scope) => {
      await startFloor(scope, floor!);
      const done = await serve(scope, ["k", "--socket", scope.socket, "--exec", "--", "cat"])
        .finish();
      assert.equal(done.code, 1, done.stderr);
      assert.equal(
        done.stderr,
        `one-socket serve: broker at ${scope.socket} speaks only protocol v1: listeners need v2\n`,
      );
    }),
});

Deno.test({
  name:
    "pair from a broker that speaks only protocol v1: --exec without ONE_SOCKET_PEER_*, --type seqpacket refused",
  ignore: floor === undefined,
  fn: () =>
    withScope(async (scope) => {
      await startFloor(scope, floor!);
      const script = 'echo "${ONE_SOCKET_PEER_PID-unset} ${ONE_SOCKET_PEER_UID-unset}" ' +
        '"${ONE_SOCKET_PEER_GID-unset}" >&3';
      const service = scope.spawn(
        ["pair", "v1", "--socket", scope.socket, "--exec", "--", "sh", "-c", script],
        // Nor may ours pass for the peer's.
        { command: EXEC_COMMAND, env: { ONE_SOCKET_PEER_UID: "12345" } },
      );
      const socket = await getPair("v1", {
        socket: scope.socket,
        signal: AbortSignal.timeout(WAIT_MS),
      });
      assert.equal(socket.protocol, 1);
      assert.equal(await readAll(socket), "unset unset unset\n");
      const done = await service.finish();
      assert.equal(done.code, 0, done.stderr);
      assert.equal(done.stderr, "");

      const packets = await scope.spawn([
        "pair",
        "v1",
        "--type",
        "seqpacket",
        "--socket",
        scope.socket,
      ])
        .finish();
      assert.equal(packets.code, 1, packets.stderr);
      assert.equal(
        packets.stderr,
        `one-socket pair: broker at ${scope.socket} speaks only protocol v1: seqpacket pairs need v2\n`,
      );
    }),
});

Deno.test("serve --help shows the usage on stdout, with the default --max", () =>
  withScope(async (scope) => {
    const done = await serve(scope, ["--help"]).finish();
    assert.equal(done.code, 0, done.stderr);
    assert.equal(done.stderr, "");
    const usage = decoder.decode(done.stdout);
    assert.match(usage, /^Usage: one-socket serve KEY/);
    assert.ok(usage.includes(`(default ${DEFAULT_MAX})`), usage);
  }));
