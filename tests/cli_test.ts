/**
 * End-to-end tests of the `one-socket` command: real `deno run mod.ts`
 * processes, real sockets in a fresh temporary directory.
 *
 * Every test runs inside {@link withScope}, which kills and awaits every
 * process it spawned and removes its directory, whether the test passes or not.
 */

import assert from "node:assert/strict";
import denoConfig from "../deno.json" with { type: "json" };
import { getPair } from "../client/pair.ts";
import { connectUnix, listenUnix } from "../ffi/socket.ts";
import {
  type Cli,
  exists,
  type Finished,
  isSocket,
  MOD,
  PERMISSIONS,
  type Scope,
  type SpawnOptions,
  startBroker,
  WAIT_MS,
  withScope,
} from "./processes.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function randomBytes(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let offset = 0; offset < length; offset += 65536) {
    crypto.getRandomValues(bytes.subarray(offset, offset + 65536));
  }
  return bytes;
}

/** Byte equality with a short message (no megabyte dumps). */
function assertBytes(actual: Uint8Array, expected: Uint8Array, label: string): void {
  assert.equal(actual.length, expected.length, `${label}: length`);
  const at = actual.findIndex((byte, i) => byte !== expected[i]);
  assert.equal(at, -1, `${label}: first difference at byte ${at}`);
}

/** The lines of a process's stderr, without the empty ones. */
function lines(text: string): string[] {
  return text.split("\n").filter((line) => line.trim() !== "");
}

/** Every line of `text` as a JSON log record; fails on a line that is not one. */
function jsonRecords(text: string): Record<string, unknown>[] {
  return lines(text).map((line) => {
    try {
      return JSON.parse(line) as Record<string, unknown>;
    } catch {
      return assert.fail(`not a JSON line: ${line}`);
    }
  });
}

interface Peer {
  /** Arguments after `pair`. */
  args: string[];
  /** What it writes to its standard input. */
  data: Uint8Array;
}

/**
 * Runs two `pair` processes at once and checks the bridge: each one's stdout
 * is what the other wrote to its stdin, both exit 0, quietly.
 */
async function exchange(
  scope: Scope,
  a: Peer,
  b: Peer,
  env?: Record<string, string>,
): Promise<void> {
  const [first, second] = [a, b].map((peer) =>
    scope.spawn(["pair", ...peer.args], { stdin: true, env })
  );
  const [, , doneA, doneB] = await Promise.all([
    first.feed(a.data),
    second.feed(b.data),
    first.finish(),
    second.finish(),
  ]);
  for (const [cli, done] of [[first, doneA], [second, doneB]] as const) {
    const name = `pair ${cli.args.join(" ")}`;
    assert.equal(done.code, 0, `${name} exit code; stderr:\n${done.stderr}`);
    assert.equal(done.stderr, "", `${name} stderr`);
    assert.equal(cli.feedError, undefined, `${name} stdin`);
  }
  assertBytes(doneB.stdout, a.data, `what pair ${b.args.join(" ")} printed`);
  assertBytes(doneA.stdout, b.data, `what pair ${a.args.join(" ")} printed`);
}

/** A short exchange proving the broker at `socket` serves. */
function smallExchange(scope: Scope, socket: string, key: string): Promise<void> {
  return exchange(
    scope,
    { args: [key, "--mode", "server", "--socket", socket], data: encoder.encode("ping\n") },
    { args: [key, "--mode", "client", "--socket", socket], data: encoder.encode("pong\n") },
  );
}

/** Stops a broker with `signal`; it must exit 0 and leave no socket file. */
async function stopBroker(broker: Cli, path: string, signal: Deno.Signal): Promise<Finished> {
  broker.kill(signal);
  const done = await broker.finish();
  assert.equal(done.code, 0, `broker exit code after ${signal}; stderr:\n${done.stderr}`);
  assert.equal(done.signal, null);
  assert.ok(!exists(path), `socket file ${path} left behind after ${signal}`);
  return done;
}

// --- 1. pair bridges bytes both ways -----------------------------------------------------------

Deno.test("cli: pair server+client bridges stdin/stdout both ways", async () => {
  await withScope(async (scope) => {
    const broker = await startBroker(scope);
    await exchange(
      scope,
      {
        args: ["vhost-user-1", "--mode", "server", "--socket", scope.socket],
        data: encoder.encode("hello from the server\n"),
      },
      {
        args: ["vhost-user-1", "--mode", "client", "--socket", scope.socket],
        data: encoder.encode("hello from the client\nand a second line\n"),
      },
    );
    await stopBroker(broker, scope.socket, "SIGTERM");
  });
});

Deno.test("cli: pair none+none carries 1 MiB one way and nothing the other", async () => {
  await withScope(async (scope) => {
    const broker = await startBroker(scope);
    await exchange(
      scope,
      { args: ["bulk", "--socket", scope.socket], data: randomBytes(1024 * 1024) },
      { args: ["bulk", "--mode", "none", "--socket", scope.socket], data: new Uint8Array() },
    );
    await stopBroker(broker, scope.socket, "SIGTERM");
  });
});

Deno.test("cli: pair carries 1 MiB and 300 KiB in opposite directions at once", async () => {
  await withScope(async (scope) => {
    const broker = await startBroker(scope);
    await exchange(
      scope,
      { args: ["both", "--mode", "client", "--socket", scope.socket], data: randomBytes(1 << 20) },
      { args: ["both", "--mode", "server", "--socket", scope.socket], data: randomBytes(300_000) },
    );
    await stopBroker(broker, scope.socket, "SIGTERM");
  });
});

Deno.test("cli: pair takes the key as --key, also one that starts with a dash", () =>
  withScope(async (scope) => {
    const broker = await startBroker(scope);
    await exchange(
      scope,
      { args: ["--key=-k", "--socket", scope.socket], data: encoder.encode("dash A\n") },
      { args: ["--key=-k", "--socket", scope.socket], data: encoder.encode("dash B\n") },
    );
    // The same key, however it is given.
    await exchange(
      scope,
      { args: ["--key", "plain", "--socket", scope.socket], data: encoder.encode("flag\n") },
      { args: ["plain", "--socket", scope.socket], data: encoder.encode("positional\n") },
    );
    await stopBroker(broker, scope.socket, "SIGTERM");
  }));

// --- 2. ONE_SOCKET_PATH ------------------------------------------------------------------------

Deno.test("cli: broker and pair use ONE_SOCKET_PATH when --socket is absent", async () => {
  await withScope(async (scope) => {
    const path = `${scope.dir}/from-env.socket`;
    const env = { ONE_SOCKET_PATH: path };
    const broker = await startBroker(scope, [], { env, path });
    assert.ok(!exists(scope.socket));
    await exchange(
      scope,
      { args: ["env-key"], data: encoder.encode("via env A") },
      { args: ["env-key"], data: encoder.encode("via env B") },
      env,
    );
    // --socket wins over the environment.
    await smallExchange(scope, path, "explicit");
    await stopBroker(broker, path, "SIGTERM");
  });
});

// --- 3. a second broker on the same path ---------------------------------------------------------

Deno.test("cli: a second broker on a live socket exits 1; the first keeps serving", async () => {
  await withScope(async (scope) => {
    const first = await startBroker(scope);
    const inode = Deno.lstatSync(scope.socket).ino;
    const second = scope.spawn(["broker", "--socket", scope.socket]);
    const refused = await second.finish();
    assert.equal(refused.code, 1, `second broker exit code; stderr:\n${refused.stderr}`);
    const errorLines = lines(refused.stderr);
    assert.equal(errorLines.length, 1, `one line expected:\n${refused.stderr}`);
    assert.ok(errorLines[0].includes(scope.socket), errorLines[0]);
    assert.match(errorLines[0], /already listening/);
    assert.ok(!first.exited);
    assert.equal(Deno.lstatSync(scope.socket).ino, inode, "the live socket file was replaced");
    await smallExchange(scope, scope.socket, "still-serving");
    await stopBroker(first, scope.socket, "SIGTERM");
  });
});

// --- 4. a stale socket file --------------------------------------------------------------------

Deno.test("cli: a stale socket file (broker SIGKILLed) is replaced", async () => {
  await withScope(async (scope) => {
    // Deno unlinks the file when its own listener closes, so a killed broker makes the stale file.
    const crashed = await startBroker(scope);
    crashed.kill("SIGKILL");
    assert.equal((await crashed.finish()).signal, "SIGKILL");
    assert.ok(isSocket(scope.socket), "SIGKILL should leave the socket file behind");

    // Nobody listens: a client says so in one line.
    const refused = await scope.spawn(["pair", "k", "--socket", scope.socket]).finish();
    assert.notEqual(refused.code, 0);
    assert.equal(lines(refused.stderr).length, 1, `one line expected:\n${refused.stderr}`);
    assert.match(refused.stderr, /ECONNREFUSED/);
    assert.ok(refused.stderr.includes(scope.socket), refused.stderr);

    const broker = scope.spawn(["broker", "--socket", scope.socket]);
    await broker.waitForOutput("listening on");
    assert.match(broker.output, /replacing stale socket file/);
    assert.ok(isSocket(scope.socket));
    // (No inode comparison: tmpfs hands the freed inode number straight back.)
    await smallExchange(scope, scope.socket, "after-stale");
    await stopBroker(broker, scope.socket, "SIGINT");
  });
});

// --- 5. a path that is not a socket ------------------------------------------------------------

Deno.test("cli: broker refuses a regular file or a directory at its path", async () => {
  await withScope(async (scope) => {
    const file = `${scope.dir}/not-a-socket`;
    const content = encoder.encode("precious data\n");
    await Deno.writeFile(file, content);
    const directory = `${scope.dir}/a-directory`;
    await Deno.mkdir(directory);

    const [onFile, onDirectory] = await Promise.all(
      [file, directory].map((path) => scope.spawn(["broker", "--socket", path]).finish()),
    );
    for (const [done, path] of [[onFile, file], [onDirectory, directory]] as const) {
      assert.equal(done.code, 1, `broker on ${path}: exit code; stderr:\n${done.stderr}`);
      const errorLines = lines(done.stderr);
      assert.equal(errorLines.length, 1, `one line expected:\n${done.stderr}`);
      assert.ok(errorLines[0].includes(path), errorLines[0]);
      assert.match(errorLines[0], /not a socket/);
    }
    assertBytes(await Deno.readFile(file), content, "the regular file");
    assert.ok(Deno.lstatSync(file).isFile);
    assert.ok(Deno.lstatSync(directory).isDirectory);
  });
});

Deno.test("cli: pair pointed at a regular file or a directory says what is there", () =>
  withScope(async (scope) => {
    const file = `${scope.dir}/not-a-socket`;
    await Deno.writeTextFile(file, "precious data\n");
    const cases = [[file, "a regular file"], [scope.dir, "a directory"]];
    const results = await Promise.all(
      cases.map(([path]) => scope.spawn(["pair", "k", "--socket", path]).finish()),
    );
    cases.forEach(([path, kind], i) => {
      assert.equal(results[i].code, 1, `pair on ${path}; stderr:\n${results[i].stderr}`);
      assert.equal(
        results[i].stderr,
        `one-socket pair: connect ${path}: ECONNREFUSED (${path} is ${kind}, not a socket)\n`,
      );
    });
  }));

// --- 6. no broker ------------------------------------------------------------------------------

Deno.test("cli: pair without a broker fails with one line naming ENOENT and the path", async () => {
  await withScope(async (scope) => {
    const path = `${scope.dir}/missing.socket`;
    const viaFlag = scope.spawn(["pair", "k", "--socket", path], { stdin: true });
    const viaEnv = scope.spawn(["pair", "k"], { stdin: true, env: { ONE_SOCKET_PATH: path } });
    for (const done of await Promise.all([viaFlag.finish(), viaEnv.finish()])) {
      assert.notEqual(done.code, 0);
      assert.equal(done.stdout.length, 0);
      const errorLines = lines(done.stderr);
      assert.equal(errorLines.length, 1, `one line expected:\n${done.stderr}`);
      assert.equal(done.stderr, `${errorLines[0]}\n`);
      assert.match(errorLines[0], /ENOENT/);
      assert.ok(errorLines[0].includes(path), errorLines[0]);
    }
    assert.ok(!exists(path));
  });
});

// --- 7. usage, help, version -------------------------------------------------------------------

Deno.test("cli: usage errors exit 2 with a usage message", async () => {
  await withScope(async (scope) => {
    const socket = scope.socket;
    const cases: [args: string[], usage: string, reason?: RegExp][] = [
      [[], "Usage: one-socket COMMAND"],
      [["frobnicate"], "Usage: one-socket COMMAND", /unknown command frobnicate/],
      [["broker", "--bogus", "--socket", socket], "Usage: one-socket broker", /bogus/],
      [["broker", "extra", "--socket", socket], "Usage: one-socket broker", /extra/],
      [["broker", "--log-format", "xml", "--socket", socket], "Usage: one-socket broker", /xml/],
      [["broker", "--log-level", "loud", "--socket", socket], "Usage: one-socket broker", /loud/],
      [["broker", "--socket"], "Usage: one-socket broker", /socket/],
      [["pair", "k", "--bogus", "--socket", socket], "Usage: one-socket pair", /bogus/],
      [["pair", "--socket", socket], "Usage: one-socket pair", /missing KEY/],
      [["pair"], "Usage: one-socket pair", /missing KEY/],
      [["pair", "a", "b", "--socket", socket], "Usage: one-socket pair"],
      [
        ["pair", "k", "--mode", "sideways", "--socket", socket],
        "Usage: one-socket pair",
        /sideways/,
      ],
      [["pair", "k", "--mode"], "Usage: one-socket pair", /mode/],
      // Our "--" introduces PROGRAM: parseArgs' advice (-- "-k") would be wrong.
      [
        ["pair", "-k", "--socket", socket],
        "Usage: one-socket pair",
        /^one-socket pair: unknown option -k \(a KEY that starts with "-" goes as --key=-k\)$/m,
      ],
      [
        ["pair", "--key", "-k", "--socket", socket],
        "Usage: one-socket pair",
        /^one-socket pair: --key -k is ambiguous; write --key=-k$/m,
      ],
      [["pair", "a", "--key", "b", "--socket", socket], "Usage: one-socket pair", /one KEY/],
      [
        ["pair", "k", "--type", "raw", "--socket", socket],
        "Usage: one-socket pair",
        /^one-socket pair: invalid socket type "raw" \(expected stream, seqpacket or dgram\)$/m,
      ],
    ];
    const results = await Promise.all(cases.map(([args]) => scope.spawn(args).finish()));
    cases.forEach(([args, usage, reason], i) => {
      const done = results[i];
      const name = `one-socket ${args.join(" ")}`;
      assert.equal(done.code, 2, `${name}: exit code; stderr:\n${done.stderr}`);
      assert.ok(done.stderr.includes(usage), `${name}: no "${usage}" in stderr:\n${done.stderr}`);
      if (reason) assert.match(done.stderr, reason, `${name}: stderr`);
      assert.ok(!done.stderr.includes('-- "'), `${name}: parseArgs' advice:\n${done.stderr}`);
      assert.equal(done.stdout.length, 0, `${name}: stdout`);
    });
    assert.ok(!exists(socket), "a usage error must not start a broker");
  });
});

Deno.test("cli: --version, help and --help exit 0 on stdout", async () => {
  await withScope(async (scope) => {
    const runs = [["--version"], ["help"], ["broker", "--help"], ["pair", "--help"]];
    const [version, help, brokerHelp, pairHelp] = await Promise.all(
      runs.map((args) => scope.spawn(args).finish()),
    );
    for (const [i, done] of [version, help, brokerHelp, pairHelp].entries()) {
      assert.equal(done.code, 0, `one-socket ${runs[i].join(" ")}; stderr:\n${done.stderr}`);
      assert.equal(done.stderr, "", `one-socket ${runs[i].join(" ")}: stderr`);
    }
    assert.equal(decoder.decode(version.stdout), `one-socket ${denoConfig.version}\n`);
    const helpText = decoder.decode(help.stdout);
    assert.match(helpText, /Usage: one-socket COMMAND/);
    for (const word of ["broker", "pair", "serve", "help", "--version", "ONE_SOCKET_PATH"]) {
      assert.ok(helpText.includes(word), `help mentions ${word}`);
    }
    assert.match(decoder.decode(brokerHelp.stdout), /Usage: one-socket broker/);
    assert.match(decoder.decode(pairHelp.stdout), /Usage: one-socket pair KEY/);
  });
});

// --- 8. JSON logs ------------------------------------------------------------------------------

Deno.test("cli: --log-format json writes one JSON object per stderr line", async () => {
  await withScope(async (scope) => {
    const broker = await startBroker(scope, ["--socket", scope.socket, "--log-format", "json"]);
    await broker.waitForOutput("listening on");
    await smallExchange(scope, scope.socket, "json");
    const done = await stopBroker(broker, scope.socket, "SIGTERM");
    assert.equal(
      decoder.decode(done.stdout),
      "",
      "the broker's stdout must stay empty: its log goes to stderr",
    );
    assert.ok(done.stderr.endsWith("\n"), `stderr ends with a newline:\n${done.stderr}`);
    const records = jsonRecords(done.stderr);
    for (const record of records) {
      assert.equal(typeof record.message, "string");
      assert.equal(typeof record.level, "string");
      assert.equal(typeof record["@timestamp"], "string");
      assert.ok(!Number.isNaN(Date.parse(record["@timestamp"] as string)));
    }
    const listening = records.find((r) => (r.message as string).startsWith("listening on"));
    assert.ok(listening, `no listening record in:\n${done.stderr}`);
    assert.equal(listening.level, "INFO");
    assert.equal(listening.logger, "one-socket.broker");
    assert.ok((listening.message as string).includes(scope.socket));
    assert.deepEqual(listening.properties, { path: scope.socket });
    assert.ok(
      records.some((r) => (r.message as string).startsWith("stopped listening")),
      `no shutdown record in:\n${done.stderr}`,
    );
  });
});

Deno.test("cli: under --log-format json, fatal start-up errors are JSON records too", () =>
  withScope(async (scope) => {
    const policy = `${scope.dir}/policy.json`;
    await Deno.writeTextFile(policy, "{");
    const logFile = `${scope.dir}/broker.log`;
    const json = ["--log-format", "json"];
    // A bad policy, with a log file: the record goes to the file, nothing to stderr.
    const badPolicy = await scope.spawn(
      ["broker", "--socket", scope.socket, ...json, "--policy", policy, "--log-file", logFile],
    ).finish();
    assert.equal(badPolicy.code, 1, badPolicy.stderr);
    assert.equal(badPolicy.stderr, "");
    const [logged, ...more] = jsonRecords(await Deno.readTextFile(logFile));
    assert.deepEqual(more, []);
    assert.equal(logged.level, "FATAL");
    assert.equal(logged.logger, "one-socket.broker");
    assert.match(logged.message as string, /policy\.json: not valid JSON/);

    // An occupied socket, without a log file: stderr holds only JSON lines.
    const first = await startBroker(scope);
    const occupied = await scope.spawn(["broker", "--socket", scope.socket, ...json]).finish();
    assert.equal(occupied.code, 1, occupied.stderr);
    const records = jsonRecords(occupied.stderr);
    assert.equal(records.at(-1)?.level, "FATAL");
    assert.match(records.at(-1)?.message as string, /already listening/);
    await stopBroker(first, scope.socket, "SIGTERM");

    // Failures before the log is open: a usage error (after the format is known) and a
    // log file that cannot be opened are one JSON line on stderr.
    const usage = await scope.spawn(
      ["broker", "--socket", scope.socket, ...json, "--handshake-timeout", "0"],
    ).finish();
    assert.equal(usage.code, 2);
    const unopened = await scope.spawn(
      ["broker", "--socket", scope.socket, ...json, "--log-file", scope.dir],
    ).finish();
    assert.equal(unopened.code, 1);
    for (
      const [done, message] of [
        [
          usage,
          "--handshake-timeout takes a positive number of seconds, not 0 (see one-socket broker --help)",
        ],
        [unopened, `open ${scope.dir}: EISDIR (is a directory)`],
      ] as const
    ) {
      const [record, ...others] = jsonRecords(done.stderr);
      assert.deepEqual(others, [], done.stderr);
      assert.equal(record.level, "FATAL");
      assert.equal(record.message, message);
    }
  }));

Deno.test("cli: a plain broker survives SIGHUP (its default action would kill it)", () =>
  withScope(async (scope) => {
    const broker = await startBroker(scope);
    broker.kill("SIGHUP");
    await broker.waitForOutput("SIGHUP received");
    await smallExchange(scope, scope.socket, "after-hangup");
    await stopBroker(broker, scope.socket, "SIGTERM");
  }));

Deno.test("cli: pair whose peer leaves while it still writes prints what came, then fails", () =>
  withScope(async (scope) => {
    await startBroker(scope);
    const talker = scope.spawn(
      ["pair", "leaver", "--mode", "server", "--socket", scope.socket],
      { stdin: true },
    );
    // The peer says one line and closes without reading anything.
    const leaver = scope.spawn(
      ["pair", "leaver", "--mode", "client", "--socket", scope.socket, "--exec", "--"].concat(
        ["sh", "-c", "echo bye >&3"],
      ),
      { command: [Deno.execPath(), "run", ...PERMISSIONS, "--allow-run", MOD] },
    );
    await talker.feed(new Uint8Array(4 << 20));
    const [talked, left] = await Promise.all([talker.finish(), leaver.finish()]);
    assert.equal(left.code, 0, left.stderr);
    assert.equal(decoder.decode(talked.stdout), "bye\n");
    // Not 0: a script must tell this from a finished transfer.
    assert.equal(talked.code, 1, `stderr: ${talked.stderr}`);
    assert.match(
      talked.stderr,
      /^one-socket pair: send to peer on key "leaver": (EPIPE|ECONNRESET) \(the peer closed before reading all of standard input\)\n$/,
    );
  }));

Deno.test("cli: a socket whose owner accepts nothing is neither replaced nor mistaken for 'no peer'", () =>
  withScope(async (scope) => {
    // A listener with a full backlog that never accepts: connects get EAGAIN.
    using stuck = listenUnix(scope.socket, 0);
    using queued = await connectUnix(scope.socket);
    assert.ok(stuck.fd >= 0 && queued.fd >= 0);

    const broker = await scope.spawn(["broker", "--socket", scope.socket]).finish();
    assert.equal(broker.code, 1);
    assert.match(
      broker.stderr,
      /accepts no connections \(connect: EAGAIN for 1 s\); refusing to replace it/,
    );
    assert.ok(isSocket(scope.socket), "the socket file was left in place");

    const pair = await scope.spawn(["pair", "k", "--socket", scope.socket, "--timeout", "0.5"])
      .finish();
    assert.equal(pair.code, 1, "not 3: no peer was ever asked for");
    assert.equal(
      pair.stderr,
      `one-socket pair: connect ${scope.socket}: EAGAIN (the broker takes no connections; gave up after 0.5 s)\n`,
    );
  }));

// --- 9. message types --------------------------------------------------------------------------

/**
 * Runs `pair` with its standard input written by `sh`: once the file $GO
 * exists, and 0.2 s more for pair to be reading, each of `chunks` 0.3 s after
 * the last, so that each is one read of pair's.
 */
function pacedPair(scope: Scope, args: string[], chunks: string[], options: SpawnOptions = {}) {
  const writes = chunks.map((chunk) => `printf ${chunk}`).join("; sleep 0.3; ");
  const script = `(while [ ! -e "$GO" ]; do sleep 0.05; done; sleep 0.2; ${writes}) | "$@"`;
  return scope.spawn(["pair", ...args], {
    ...options,
    command: [
      "sh",
      "-c",
      script,
      "sh",
      ...options.command ?? [Deno.execPath(), "run", ...PERMISSIONS, MOD],
    ],
  });
}

Deno.test("cli: pair --type seqpacket between two pair commands keeps message boundaries", () =>
  withScope(async (scope) => {
    await startBroker(scope);
    const env = { GO: `${scope.dir}/go` };
    const bridge = pacedPair(
      scope,
      ["packets", "--type", "seqpacket", "--socket", scope.socket],
      ["aaa", "bbbbb", "c"],
      { env },
    );
    // dd makes one read: on a seqpacket socket, one whole message. printf is one write.
    const script = 'touch "$GO"; while n=$(dd bs=65536 count=1 <&3 2>/dev/null | wc -c); ' +
      '[ "$n" -gt 0 ]; do echo "got $n"; done; printf 1 >&3; printf 22 >&3; printf 333 >&3';
    const program = scope.spawn(
      ["pair", "packets", "--type", "seqpacket", "--socket", scope.socket, "--exec", "--"].concat(
        ["sh", "-c", script],
      ),
      { env, command: [Deno.execPath(), "run", ...PERMISSIONS, "--allow-run", MOD] },
    );
    const [bridged, ran] = await Promise.all([bridge.finish(), program.finish()]);
    assert.equal(ran.code, 0, ran.stderr);
    assert.equal(decoder.decode(ran.stdout), "got 3\ngot 5\ngot 1\n", "messages from pair's reads");
    // The program's exit closed the socket: the end of stream that ended pair.
    assert.equal(bridged.code, 0, bridged.stderr);
    assert.equal(bridged.stderr, "");
    assert.equal(decoder.decode(bridged.stdout), "122333");
  }));

Deno.test("cli: pair --type dgram sends each read as a datagram and ends both ways with an empty one", () =>
  withScope(async (scope) => {
    await startBroker(scope);
    const go = `${scope.dir}/go`;
    const bridge = pacedPair(
      scope,
      ["datagrams", "--type", "dgram", "--socket", scope.socket],
      ["xy", "zzz"],
      { env: { GO: go } },
    );
    const socket = await getPair("datagrams", {
      socket: scope.socket,
      type: "dgram",
      signal: AbortSignal.timeout(WAIT_MS),
    });
    try {
      assert.equal(socket.type, "dgram");
      await Deno.writeTextFile(go, "");
      const received = [];
      for (let i = 0; i < 3; i++) received.push(decoder.decode((await socket.receive())!));
      assert.deepEqual(received, ["xy", "zzz", ""], "the reads of stdin, then the empty end");
      for (const text of ["one", "two22", ""]) await socket.send(encoder.encode(text));
    } finally {
      socket.close();
    }
    const done = await bridge.finish();
    assert.equal(done.code, 0, done.stderr);
    assert.equal(done.stderr, "");
    assert.equal(decoder.decode(done.stdout), "onetwo22");
  }));
