/**
 * `one-socket pair --exec` and `--timeout` with real processes: a C program
 * that only knows socket activation, an inetd-style shell script, signals,
 * exit statuses and usage errors. The broker runs in the test process; the
 * peer is our client or a plain `pair` process.
 */

import assert from "node:assert/strict";
import { EXIT_NO_PEER } from "../client/cli.ts";
import { EXIT_USAGE } from "../client/command_line.ts";
import { EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND } from "../client/exec.ts";
import { getPair } from "../client/pair.ts";
import type { PairedSocket } from "../client/paired_socket.ts";
import { buildCProgram, eventually, withBroker } from "./helpers.ts";
import {
  MOD,
  PERMISSIONS,
  type Scope,
  type SpawnOptions,
  WAIT_MS,
  withScope,
} from "./processes.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** `deno run` of the command with the permission `--exec` needs on top. */
const EXEC_COMMAND = [Deno.execPath(), "run", ...PERMISSIONS, "--allow-run", MOD];

const activatedEcho = await buildCProgram("activated_echo");
if (activatedEcho === undefined) {
  console.warn("exec_test: no C compiler (cc); the socket-activated C program test is skipped");
}

/** A broker in this process and a process scope, both torn down whatever happens. */
function withBrokerAndScope(body: (path: string, scope: Scope) => Promise<void>): Promise<void> {
  return withBroker((_broker, path) => withScope((scope) => body(path, scope)));
}

function pair(scope: Scope, args: string[], options: SpawnOptions = {}) {
  return scope.spawn(["pair", ...args], { command: EXEC_COMMAND, ...options });
}

/** Our side of a pairing, bounded in time; the caller closes it. */
function peer(path: string, key: string, mode: "none" | "client" = "none"): Promise<PairedSocket> {
  return getPair(key, { socket: path, mode, signal: AbortSignal.timeout(WAIT_MS) });
}

/** Sends `text`, ends our sending side and reads everything the other side sends back. */
async function converse(socket: PairedSocket, text: string): Promise<string> {
  await socket.write(encoder.encode(text));
  socket.closeWrite();
  return await new Response(socket.readable).text();
}

function lines(text: string): string[] {
  return text.split("\n").filter((line) => line.trim() !== "");
}

for (const [key, fdName] of [["echo-service", "echo-service"], ["vhost:1", "one-socket"]]) {
  Deno.test({
    name: `exec: a socket-activated C program gets a blocking stream socket on fd 3 (key ${key})`,
    ignore: activatedEcho === undefined,
    fn: () =>
      withBrokerAndScope(async (path, scope) => {
        const service = pair(scope, [
          key,
          "--mode",
          "server",
          "--socket",
          path,
          "--exec",
          "--",
          activatedEcho!,
          "7",
          fdName,
          key,
        ]);
        const socket = await peer(path, key, "client");
        try {
          const message = "hello over descriptor 3\n".repeat(1000);
          assert.equal(await converse(socket, message), message);
        } finally {
          socket.close();
        }
        const done = await service.finish();
        assert.equal(done.stderr, "", "stderr of pair and of the C program");
        assert.equal(decoder.decode(done.stdout), "activated\n");
        assert.equal(done.code, 7, "the C program's exit status");
        assert.equal(done.signal, null);
      }),
  });
}

Deno.test("exec: --stdio gives an inetd-style script the socket as stdin and stdout", async () => {
  await withBrokerAndScope(async (path, scope) => {
    const script = 'read line; echo "got $line fd=$ONE_SOCKET_FD key=$ONE_SOCKET_KEY" ' +
      '"listen=${LISTEN_FDS-unset}/${LISTEN_PID-unset}"';
    // Our own activation variables must not reach a program that is not activated.
    const env = { LISTEN_FDS: "9", LISTEN_PID: "1" };
    const service = pair(
      scope,
      ["greet", "--socket", path, "--exec", "--stdio", "--"].concat(
        ["sh", "-c", script],
      ),
      { env },
    );
    const user = pair(scope, ["greet", "--socket", path], { stdin: true });
    await user.feed(encoder.encode("hello\n"));
    const [served, used] = await Promise.all([service.finish(), user.finish()]);
    assert.equal(served.stderr, "");
    assert.equal(served.code, 0);
    assert.equal(used.stderr, "");
    assert.equal(used.code, 0);
    assert.equal(decoder.decode(used.stdout), "got hello fd=0 key=greet listen=unset/unset\n");
  });
});

Deno.test("exec: from a v2 broker, the program finds the peer's pid, uid and gid", () =>
  withBrokerAndScope(async (path, scope) => {
    const script = 'echo "$ONE_SOCKET_PEER_PID $ONE_SOCKET_PEER_UID $ONE_SOCKET_PEER_GID" >&3';
    // Variables of a pair --exec or serve that we run under must not pass for our peer's.
    const env = { ONE_SOCKET_PEER_PID: "1", ONE_SOCKET_PEER_UID: "12345" };
    const service = pair(scope, ["who", "--socket", path, "--exec", "--", "sh", "-c", script], {
      env,
    });
    const socket = await peer(path, "who");
    try {
      assert.equal(socket.protocol, 2);
      // The peer is this process: the broker saw its connect.
      assert.equal(
        await new Response(socket.readable).text(),
        `${Deno.pid} ${Deno.uid()} ${Deno.gid()}\n`,
      );
    } finally {
      socket.close();
    }
    const done = await service.finish();
    assert.equal(done.code, 0, done.stderr);
  }));

for (const [mode, flags, expected] of [["--stdio", ["--stdio"], "0 1"], ["fd 3", [], "3"]]) {
  Deno.test(`exec (${mode}): the program holds the socket at ${expected} only, so closing them ends the stream`, () =>
    withBrokerAndScope(async (path, scope) => {
      // The shell lists its descriptors that are the socket, says which, closes them
      // and keeps running: the peer must see end of stream now, not when it exits.
      const script = "s=$(readlink /proc/$$/fd/$ONE_SOCKET_FD); on=; for f in /proc/$$/fd/*; do " +
        '[ "$(readlink "$f")" = "$s" ] && on="$on ${f##*/}"; done; ' +
        'echo "socket on:$on" >&$ONE_SOCKET_FD; exec 0<&- 1>&- 3>&-; sleep 2';
      const service = pair(
        scope,
        ["fds", "--socket", path, "--exec", ...flags, "--"].concat(
          ["sh", "-c", script],
        ),
      );
      const socket = await peer(path, "fds");
      try {
        const buffer = new Uint8Array(256);
        const count = await socket.read(buffer);
        assert.equal(decoder.decode(buffer.subarray(0, count ?? 0)), `socket on: ${expected}\n`);
        const sawLine = Date.now();
        assert.equal(await socket.read(buffer), null);
        const wait = Date.now() - sawLine;
        assert.ok(wait < 1000, `end of stream ${wait} ms after the program closed the socket`);
      } finally {
        socket.close();
      }
      const done = await service.finish();
      assert.equal(done.code, 0, done.stderr);
    }));
}

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test(`exec: our copy is closed at once, and ${signal} is passed on to the program`, async () => {
    await withBrokerAndScope(async (path, scope) => {
      const script = 'trap "exit 5" INT TERM; echo ready >&3; exec 3>&-; ' +
        "while :; do sleep 0.05; done";
      const service = pair(scope, [
        "forward",
        "--socket",
        path,
        "--exec",
        "--",
        "sh",
        "-c",
        script,
      ]);
      const socket = await peer(path, "forward");
      try {
        // End of stream while pair still runs: the program held the only other copy.
        assert.equal(await new Response(socket.readable).text(), "ready\n");
      } finally {
        socket.close();
      }
      assert.ok(!service.exited, "pair exited before the program did");
      service.kill(signal);
      const done = await service.finish();
      assert.equal(done.stderr, "");
      assert.equal(done.code, 5, "the program's status after its trap ran");
      assert.equal(done.signal, null, "pair itself must not die of the signal");
    });
  });
}

Deno.test("exec: a program killed by a signal makes pair exit 128+N", async () => {
  await withBrokerAndScope(async (path, scope) => {
    const service = pair(scope, [
      "doomed",
      "--socket",
      path,
      "--exec",
      "--",
      "sh",
      "-c",
      "kill -KILL $$",
    ]);
    const socket = await peer(path, "doomed");
    socket.close();
    const done = await service.finish();
    assert.equal(done.code, 128 + 9);
    assert.equal(done.signal, null);
  });
});

Deno.test("timeout: no peer within --timeout exits 3 with one line", async () => {
  await withBroker(async (broker, path) => {
    await withScope(async (scope) => {
      const lonely = scope.spawn(["pair", "lonely", "--socket", path, "--timeout", "0.3"]);
      await eventually(() => broker.stats.waiting === 1, "pair to wait", WAIT_MS);
      const done = await lonely.finish();
      assert.equal(done.code, EXIT_NO_PEER);
      assert.deepEqual(lines(done.stderr), [
        'one-socket pair: no peer for key "lonely" within 0.3 s',
      ]);
      // Giving up closed the broker connection, so the broker forgot the request.
      await eventually(() => broker.stats.waiting === 0, "the broker to drop the request");
    });
  });
});

Deno.test("exec (pair and serve): a missing or non-executable PROGRAM fails before the broker is asked", async () => {
  await withScope(async (scope) => {
    const script = `${scope.dir}/not-executable.sh`;
    await Deno.writeTextFile(script, "#!/bin/sh\n", { mode: 0o644 });
    // Nothing listens here: reaching the broker would fail with ENOENT and exit 1.
    const socket = `${scope.dir}/no-broker.socket`;
    const cases = [
      { program: "one-socket-no-such-program", code: EXIT_NOT_FOUND, text: /ENOENT/ },
      { program: script, code: EXIT_NOT_EXECUTABLE, text: /EACCES/ },
    ];
    const runs = ["pair", "serve"].flatMap((command) => cases.map((one) => ({ command, ...one })));
    await Promise.all(runs.map(async ({ command, program, code, text }) => {
      const done = await scope.spawn(
        [command, "k", "--socket", socket, "--exec", "--", program],
        { command: EXEC_COMMAND },
      ).finish();
      assert.equal(done.code, code, `${command} ${program}: exit code; stderr:\n${done.stderr}`);
      const [line, ...more] = lines(done.stderr);
      assert.deepEqual(more, []);
      assert.match(line, text);
      assert.ok(line.includes(program), line);
    }));
  });
});

Deno.test("exec and timeout: command line mistakes exit 2 and say what is wrong", async () => {
  await withScope(async (scope) => {
    const cases: [string[], string][] = [
      [["k", "--exec"], "--exec needs a PROGRAM after --"],
      [["k", "--exec", "--"], "--exec needs a PROGRAM after --"],
      [["k", "--", "cat"], "a PROGRAM after -- needs --exec"],
      [["k", "--stdio"], "--stdio goes with --exec"],
      [["k", "--timeout", "0"], "--timeout takes a positive number of seconds, not 0"],
      [["k", "--timeout", "soon"], "--timeout takes a positive number of seconds, not soon"],
    ];
    await Promise.all(cases.map(async ([args, message]) => {
      const done = await pair(scope, args).finish();
      assert.equal(done.code, EXIT_USAGE, `pair ${args.join(" ")}; stderr:\n${done.stderr}`);
      assert.equal(lines(done.stderr)[0], `one-socket pair: ${message}`);
    }));
  });
});

Deno.test("--exec without the permissions to find or start PROGRAM says which, before asking the broker", () =>
  withScope(async (scope) => {
    // No broker at this path: a check made after connecting would report ENOENT instead.
    const missing = `${scope.dir}/nobody.socket`;
    const run = (flags: string[]) =>
      scope.spawn(["pair", "k", "--socket", missing, "--exec", "--", "sh", "-c", "true"], {
        command: [Deno.execPath(), "run", "--allow-ffi", "--allow-env", ...flags, MOD],
      }).finish();
    const noRead = await run(["--allow-run"]);
    assert.equal(noRead.code, EXIT_NOT_EXECUTABLE, noRead.stderr);
    assert.match(
      noRead.stderr,
      /exec sh: cannot look for it without read access: run Deno with --allow-read/,
    );
    const noRun = await run(["--allow-read"]);
    assert.equal(noRun.code, EXIT_NOT_EXECUTABLE, noRun.stderr);
    assert.match(
      noRun.stderr,
      /exec sh: it is started through \/bin\/sh: run Deno with --allow-run/,
    );
  }));
