/**
 * systemd integration: socket activation (`LISTEN_*`) and `sd_notify`
 * (`NOTIFY_SOCKET`), with the parsing tested on its own and the whole
 * protocol with real broker processes. The tests play the service manager:
 * they create the listening socket and pass it on fd 3, and read the
 * notifications on a datagram socket of their own.
 */

import assert from "node:assert/strict";
import { parseListenFds } from "../broker/systemd.ts";
import { parseNotification, watchdogIntervalMs } from "../broker/notify.ts";
import { getPair } from "../client/pair.ts";
import {
  bindDatagram,
  connectUnix,
  listenUnix,
  receiveDatagram,
  setCloseOnExec,
  type UnixSocket,
} from "../ffi/socket.ts";
import {
  type Cli,
  exists,
  isSocket,
  MOD,
  PERMISSIONS,
  type Scope,
  startBroker,
  withScope,
} from "./processes.ts";

const decoder = new TextDecoder();

// --- parsing -----------------------------------------------------------------------------------

Deno.test("systemd: LISTEN_* for another pid, or none at all, are not ours", () => {
  assert.equal(parseListenFds({}, 42), undefined);
  assert.equal(parseListenFds({ LISTEN_PID: "41", LISTEN_FDS: "1" }, 42), undefined);
  assert.equal(parseListenFds({ LISTEN_FDS: "1" }, 42), undefined);
  assert.equal(parseListenFds({ LISTEN_PID: "42", LISTEN_FDS: "0" }, 42), undefined);
});

Deno.test("systemd: the descriptor named one-socket is ours, else the first", () => {
  assert.deepEqual(parseListenFds({ LISTEN_PID: "42", LISTEN_FDS: "1" }, 42), {
    fd: 3,
    name: "",
    count: 1,
  });
  assert.deepEqual(
    parseListenFds(
      { LISTEN_PID: "42", LISTEN_FDS: "3", LISTEN_FDNAMES: "control:one-socket:other" },
      42,
    ),
    { fd: 4, name: "one-socket", count: 3 },
  );
  assert.deepEqual(
    parseListenFds({ LISTEN_PID: "42", LISTEN_FDS: "2", LISTEN_FDNAMES: "a:b" }, 42),
    { fd: 3, name: "a", count: 2 },
  );
  // A name past LISTEN_FDS does not count.
  assert.deepEqual(
    parseListenFds({ LISTEN_PID: "42", LISTEN_FDS: "1", LISTEN_FDNAMES: "a:one-socket" }, 42),
    { fd: 3, name: "a", count: 1 },
  );
  assert.throws(
    () => parseListenFds({ LISTEN_PID: "42", LISTEN_FDS: "many" }, 42),
    /LISTEN_FDS=many is not a descriptor count/,
  );
});

Deno.test("systemd: the watchdog period is half of WATCHDOG_USEC, for our pid only", () => {
  assert.equal(watchdogIntervalMs({}, 42), undefined);
  assert.equal(watchdogIntervalMs({ WATCHDOG_USEC: "30000000" }, 42), 15_000);
  assert.equal(watchdogIntervalMs({ WATCHDOG_USEC: "30000000", WATCHDOG_PID: "42" }, 42), 15_000);
  assert.equal(watchdogIntervalMs({ WATCHDOG_USEC: "30000000", WATCHDOG_PID: "7" }, 42), undefined);
  assert.equal(watchdogIntervalMs({ WATCHDOG_USEC: "0" }, 42), undefined);
});

Deno.test("systemd: a notification parses into its fields", () => {
  const fields = parseNotification("READY=1\nMAINPID=7\nSTATUS=serving /a=b: 0 waiting");
  assert.deepEqual(Object.fromEntries(fields), {
    READY: "1",
    MAINPID: "7",
    STATUS: "serving /a=b: 0 waiting",
  });
});

// --- real processes ----------------------------------------------------------------------------

/** The test's side of `NOTIFY_SOCKET`: every notification received, in order. */
class NotifyListener {
  readonly path: string;
  readonly messages: Map<string, string>[] = [];
  readonly #socket: UnixSocket;
  readonly #done: Promise<void>;

  constructor(path: string) {
    this.path = path;
    const socket = this.#socket = bindDatagram(path);
    const buffer = new Uint8Array(4096);
    this.#done = (async () => {
      for (;;) {
        const datagram = await receiveDatagram(socket, buffer);
        this.messages.push(parseNotification(decoder.decode(datagram)));
      }
    })().catch(() => {}); // closing the socket ends the loop
  }

  /** The first message with `key` (and `value`, if given). */
  find(key: string, value?: string): Map<string, string> | undefined {
    return this.messages.find((m) => m.has(key) && (value === undefined || m.get(key) === value));
  }

  /** Waits (bounded, failing if `broker` exits) for `READY=1` and returns that message. */
  async ready(broker: Cli): Promise<Map<string, string>> {
    await broker.waitUntil("READY=1", () => this.find("READY", "1") !== undefined);
    return this.find("READY", "1")!;
  }

  async close(): Promise<void> {
    this.#socket.close();
    await this.#done;
  }
}

/** Runs `body` with a {@link NotifyListener} in the scope's directory, closed at the end. */
async function withNotify(
  scope: Scope,
  body: (notify: NotifyListener) => Promise<void>,
): Promise<void> {
  const notify = new NotifyListener(`${scope.dir}/notify`);
  try {
    await body(notify);
  } finally {
    await notify.close();
  }
}

/**
 * Starts a broker the way a service manager does: `listener` on fd 3 and
 * `LISTEN_PID` set to the broker's own pid, which only the process itself
 * knows, hence the `bash -c '… exec'` (as systemd-socket-activate does).
 */
function startActivated(
  scope: Scope,
  listener: UnixSocket,
  env: Record<string, string>,
  args: string[] = [],
): Cli {
  const fd = listener.fd;
  assert.ok(fd > 3, "the listener must not already sit on fd 3");
  setCloseOnExec(fd, false);
  try {
    return scope.spawn(["broker", ...args], {
      env: { LISTEN_FDS: "1", LISTEN_FDNAMES: "one-socket", ...env },
      command: [
        // bash, not sh: dash redirects only descriptors 0 to 9.
        "bash",
        "-c",
        `export LISTEN_PID=$$; exec "$@" 3<&${fd} ${fd}<&-`,
        "bash",
        Deno.execPath(),
        "run",
        ...PERMISSIONS,
        MOD,
      ],
    });
  } finally {
    setCloseOnExec(fd, true);
  }
}

/** Pairs a server and a client on `key` through `path` and checks the bytes arrive. */
async function pairThrough(path: string, key: string): Promise<void> {
  const signal = AbortSignal.timeout(5000);
  const [server, client] = await Promise.all([
    getPair(key, { socket: path, mode: "server", signal }),
    getPair(key, { socket: path, mode: "client", signal }),
  ]);
  try {
    await client.write(new TextEncoder().encode("hi"));
    const buffer = new Uint8Array(2);
    assert.equal(await server.read(buffer), 2);
    assert.equal(decoder.decode(buffer), "hi");
  } finally {
    server.close();
    client.close();
  }
}

Deno.test("systemd: serves an inherited listener and leaves its socket file on SIGTERM", async () => {
  await withScope((scope) =>
    withNotify(scope, async (notify) => {
      using listener = listenUnix(scope.socket, 16);
      // --socket names another path: the inherited socket wins, and nothing is bound there.
      const elsewhere = `${scope.dir}/not-this.socket`;
      const broker = startActivated(scope, listener, { NOTIFY_SOCKET: notify.path }, [
        "--socket",
        elsewhere,
      ]);
      await notify.ready(broker);
      assert.match(broker.output, /serving inherited socket .*broker\.socket \(fd 3\)/);
      await pairThrough(scope.socket, "activated");
      broker.kill("SIGTERM");
      const done = await broker.finish();
      assert.equal(done.code, 0, `exit code; stderr:\n${done.stderr}`);
      assert.ok(isSocket(scope.socket), "the service manager's socket file must stay");
      assert.ok(!exists(elsewhere));
      // The listener is still open, so connections queue up for the next activation.
      (await connectUnix(scope.socket)).close();
    })
  );
});

Deno.test("systemd: an inherited descriptor that is not a listening stream socket is refused", async () => {
  await withScope(async (scope) => {
    using datagram = bindDatagram(`${scope.dir}/datagram.socket`);
    const broker = startActivated(scope, datagram, {});
    const done = await broker.finish();
    assert.equal(done.code, 1, `exit code; stderr:\n${done.stderr}`);
    assert.match(
      done.stderr,
      /inherited fd 3 \(one-socket\) is not a listening AF_UNIX stream socket: it is AF_UNIX SOCK_DGRAM, not listening/,
    );
  });
});

Deno.test("systemd: READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 reach NOTIFY_SOCKET", async () => {
  await withScope((scope) =>
    withNotify(scope, async (notify) => {
      const broker = await startBroker(scope, ["--socket", scope.socket], {
        env: { NOTIFY_SOCKET: notify.path, WATCHDOG_USEC: "100000" },
      });
      const ready = await notify.ready(broker);
      assert.equal(ready.get("MAINPID"), String(broker.pid));
      assert.equal(ready.get("STATUS"), `serving ${scope.socket}: 0 waiting, 0 paired since start`);
      await broker.waitUntil("WATCHDOG=1", () => notify.find("WATCHDOG", "1") !== undefined);

      // A waiting client shows in the status line within one refresh.
      const signal = AbortSignal.timeout(5000);
      const server = getPair("status", { socket: scope.socket, mode: "server", signal });
      const waitingStatus = `serving ${scope.socket}: 1 waiting, 0 paired since start`;
      await broker.waitUntil("STATUS with 1 waiting", () => !!notify.find("STATUS", waitingStatus));
      const client = await getPair("status", { socket: scope.socket, mode: "client", signal });
      (await server).close();
      client.close();

      broker.kill("SIGTERM");
      const done = await broker.finish();
      assert.equal(done.code, 0, `exit code; stderr:\n${done.stderr}`);
      assert.ok(notify.find("STOPPING", "1"), "STOPPING=1 on shutdown");
      assert.ok(!exists(scope.socket));
    })
  );
});

const socketActivate = "/usr/bin/systemd-socket-activate";

Deno.test({
  name: "systemd: works under systemd-socket-activate",
  ignore: !exists(socketActivate),
  fn: async () => {
    await withScope((scope) =>
      withNotify(scope, async (notify) => {
        // It execs the broker on the first connection, with LISTEN_PID its own pid.
        const broker = scope.spawn(["broker"], {
          command: [
            socketActivate,
            "--listen",
            scope.socket,
            "--fdname=one-socket",
            `--setenv=NOTIFY_SOCKET=${notify.path}`,
            Deno.execPath(),
            "run",
            ...PERMISSIONS,
            MOD,
          ],
        });
        await broker.waitUntil("the socket file", () => isSocket(scope.socket));
        const paired = pairThrough(scope.socket, "socket-activate");
        assert.equal((await notify.ready(broker)).get("MAINPID"), String(broker.pid));
        await paired;
        assert.match(broker.output, /serving inherited socket .*broker\.socket \(fd 3\)/);
        broker.kill("SIGTERM");
        const done = await broker.finish();
        assert.equal(done.code, 0, `exit code; stderr:\n${done.stderr}`);
        assert.ok(isSocket(scope.socket), "systemd-socket-activate's socket file must stay");
      })
    );
  },
});

const systemdAnalyze = "/usr/bin/systemd-analyze";
const systemUnits = "/lib/systemd/system";
const UNIT_FILES = new URL("../scripts/systemd/", import.meta.url);

Deno.test({
  name: "systemd: the shipped unit files pass systemd-analyze verify",
  ignore: !exists(systemdAnalyze) || !exists(systemUnits),
  fn: async () => {
    // A root of its own holds the binary the service names, which this machine need not have.
    const root = await Deno.makeTempDir({ prefix: "one-socket-units-" });
    try {
      await Deno.mkdir(`${root}/usr/local/bin`, { recursive: true });
      await Deno.mkdir(`${root}/etc/systemd/system`, { recursive: true });
      await Deno.mkdir(`${root}/usr/lib/systemd`, { recursive: true });
      await new Deno.Command("cp", { args: ["-r", systemUnits, `${root}/usr/lib/systemd/`] })
        .output();
      Deno.writeTextFileSync(`${root}/usr/local/bin/one-socket`, "#!/bin/sh\n", { mode: 0o755 });
      for (const unit of ["one-socket.service", "one-socket.socket"]) {
        Deno.copyFileSync(new URL(unit, UNIT_FILES), `${root}/etc/systemd/system/${unit}`);
      }
      const verify = await new Deno.Command(systemdAnalyze, {
        args: [`--root=${root}`, "verify", "one-socket.service", "one-socket.socket"],
      }).output();
      const stderr = decoder.decode(verify.stderr);
      assert.equal(verify.code, 0, `systemd-analyze verify:\n${stderr}`);
      assert.equal(stderr, "", "no warnings");
    } finally {
      await Deno.remove(root, { recursive: true });
    }
  },
});
