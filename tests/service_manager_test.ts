/**
 * The stand-in for systemd's file descriptor store (tests/c/service_manager.c),
 * run with a probe service (tests/c/fdstore_probe.c) whose stored sockets are
 * connections to this test, as a broker's waiting clients would be: the
 * store comes back across restarts and crashes, named and in order, and
 * loses what systemd would lose.
 */

import assert from "node:assert/strict";
import { buildCProgram, countOpenDescriptors } from "./helpers.ts";
import { exists } from "./processes.ts";

const manager = await buildCProgram("service_manager");
const probe = await buildCProgram("fdstore_probe");
const ignore = manager === undefined || probe === undefined;
if (ignore) console.warn("service_manager_test: no C compiler (cc); the tests are ignored");

const WAIT_MS = 3000;
const decoder = new TextDecoder();

/** `promise`, or a failure naming `what` after {@link WAIT_MS}. */
async function within<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${WAIT_MS} ms`)), WAIT_MS);
  });
  return await Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** What one read of `conn` brings, or null at end of stream: the manager closed its copy. */
async function readFrom(conn: Deno.UnixConn): Promise<string | null> {
  const buffer = new Uint8Array(256);
  const count = await within(conn.read(buffer), "data or end of stream");
  return count === null ? null : decoder.decode(buffer.subarray(0, count));
}

/** Every line of `stream`, as it comes, into each of `lists`. */
async function collect(stream: ReadableStream<Uint8Array>, ...lists: string[][]): Promise<void> {
  let partial = "";
  for await (const text of stream.pipeThrough(new TextDecoderStream())) {
    const lines = (partial + text).split("\n");
    partial = lines.pop()!;
    for (const list of lists) list.push(...lines);
  }
}

/** A service_manager running the probe, with the probe's peer listener and all output. */
class Manager implements AsyncDisposable {
  readonly dir = Deno.makeTempDirSync({ prefix: "one-socket-sm-" });
  readonly notify = `${this.dir}/notify`;
  readonly fdstore: string;
  readonly process: Deno.ChildProcess;
  readonly lines: string[] = [];
  readonly #unread: string[] = [];
  readonly #stderr: string[] = [];
  readonly #peers = Deno.listen({ transport: "unix", path: `${this.dir}/peer` });
  readonly #conns = new Set<Deno.UnixConn>();
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;
  readonly #output: Promise<unknown>;

  constructor(options: string[] = []) {
    const max = options.indexOf("--fdstore-max");
    this.fdstore = max >= 0 ? options[max + 1] : "1024";
    const args = ["--notify", this.notify, ...options, "--", probe!, `${this.dir}/peer`];
    const process = this.process = new Deno.Command(manager!, {
      args,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdin = process.stdin.getWriter();
    this.#output = Promise.all([
      collect(process.stdout, this.lines, this.#unread),
      collect(process.stderr, this.#stderr),
    ]);
  }

  /** The first line not yet taken that matches `pattern` (lines of other patterns stay). */
  async take(pattern: string): Promise<RegExpMatchArray> {
    const regexp = new RegExp(`^${pattern}$`);
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const index = this.#unread.findIndex((line) => regexp.test(line));
      if (index >= 0) return this.#unread.splice(index, 1)[0].match(regexp)!;
      const output = [...this.lines, "stderr:", ...this.#stderr].join("\n");
      if (Date.now() > deadline) assert.fail(`no line ${regexp}; stdout:\n${output}`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /** Sends a probe command. */
  send(command: string): Promise<void> {
    return this.#stdin.write(new TextEncoder().encode(`${command}\n`));
  }

  /** Has the probe run `store NAME COUNT ...` and returns its COUNT connections, in order. */
  async store(name: string, count = 1, flags = ""): Promise<Deno.UnixConn[]> {
    await this.send(`store ${name} ${count} ${flags}`);
    return this.accept(name, count);
  }

  /** The next `count` connections from the probe, each tagged `name`. */
  async accept(name: string, count = 1): Promise<Deno.UnixConn[]> {
    for (let i = 0; i < count; i++) {
      const conn = await within(this.#peers.accept(), "connection from the probe");
      this.#conns.add(conn);
      assert.equal(await readFrom(conn), `${name}\n`);
    }
    return [...this.#conns].slice(-count);
  }

  /**
   * Waits for the next start and its probe's report: LISTEN_PID its own pid,
   * the sockets `names` on 3, 4, … and nothing else; returns the pid.
   */
  async started(names: string[]): Promise<number> {
    const pid = Number((await this.take("started (\\d+)"))[1]);
    const listen = names.length === 0 ? "- - -" : `${pid} ${names.length} ${names.join(":")}`;
    await this.take(`probe start ${pid} ${this.fdstore} ${listen} ${names.length}`);
    for (const [i, name] of names.entries()) await this.take(`probe fd ${3 + i} socket ${name}`);
    return pid;
  }

  /** Closes the test's end of `conn`, as a waiting client that gives up. */
  hangUp(conn: Deno.UnixConn): void {
    this.#conns.delete(conn);
    conn.close();
  }

  /** Open descriptors of the manager. */
  descriptors(): number {
    return countOpenDescriptors(this.process.pid);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.#stdin.close().catch(() => {});
    try {
      this.process.kill("SIGKILL");
    } catch {
      // it has exited
    }
    await this.process.status;
    await this.#output; // the probe dies with the manager (PR_SET_PDEATHSIG)
    this.#conns.forEach((conn) => conn.close());
    this.#peers.close();
    await Deno.remove(this.dir, { recursive: true });
  }
}

/** A test of the pair of C programs, ignored without a C compiler. */
function test(name: string, fn: () => Promise<void>): void {
  Deno.test({ name, ignore, fn });
}

/** Each connection reads back which descriptor it became in the new probe. */
async function handedBackAs(conns: Deno.UnixConn[], fds: number[]): Promise<void> {
  for (const [i, conn] of conns.entries()) assert.equal(await readFrom(conn), `fd ${fds[i]}\n`);
}

test("service_manager: restarts, kill -9 and exits keep the store", async () => {
  await using m = new Manager(["--restart-delay", "10"]);
  const first = await m.started([]);
  const base = m.descriptors();
  const conns = [...await m.store("a"), ...await m.store("b")];
  await m.take("stored a 1");
  await m.take("stored b 2");
  assert.equal(m.descriptors(), base + 2);

  m.process.kill("SIGHUP"); // systemctl restart
  await m.take(`killed ${first} 15`);
  const second = await m.started(["a", "b"]);
  await handedBackAs(conns, [3, 4]);
  Deno.kill(second, "SIGKILL");
  await m.take(`killed ${second} 9`);
  const third = await m.started(["a", "b"]);
  await handedBackAs(conns, [3, 4]);
  await m.send("exit 3");
  await m.take(`exited ${third} 3`);
  const fourth = await m.started(["a", "b"]);
  await handedBackAs(conns, [3, 4]);
  assert.equal(m.descriptors(), base + 2);

  m.process.kill("SIGTERM"); // systemctl stop: the service ends, then the manager
  await m.take(`killed ${fourth} 15`);
  assert.equal((await within(m.process.status, "exit")).code, 0);
  assert.ok(!exists(m.notify), "the notify socket is removed");
  assert.ok(!exists(`/proc/${fourth}`));
  for (const conn of conns) assert.equal(await readFrom(conn), null);
});

test("service_manager: FDSTOREREMOVE and hang-ups drop, FDPOLL=0 keeps", async () => {
  await using m = new Manager(["--restart-delay", "10"]);
  const first = await m.started([]);
  const base = m.descriptors();
  const [a] = await m.store("a");
  const [b] = await m.store("b");
  const [c] = await m.store("c", 1, "nopoll");
  await m.take("stored c 3");
  await m.send("remove a");
  await m.take("removed a 2");
  assert.equal(await readFrom(a), null);

  m.hangUp(b); // the waiting client goes away: systemd drops its connection
  await m.take("hangup b");
  m.hangUp(c);
  await m.send("ready"); // a hang-up of c would come before this answer
  await m.take(`ready ${first}`);
  assert.ok(!m.lines.includes("hangup c"), m.lines.join("\n"));
  assert.equal(m.descriptors(), base + 1);

  // A socket whose peer lives in the service is lost with it.
  await m.send("pair p");
  await m.take("stored p 2");
  await m.send("abort");
  await m.take(`killed ${first} 6`);
  await m.take("hangup p");
  const second = await m.started(["c"]);
  assert.equal(m.descriptors(), base + 1);
  await m.send("stopping");
  await m.take(`stopping ${second}`);
});

test("service_manager: limit, duplicates, stray descriptors, order", async () => {
  await using m = new Manager(["--fdstore-max", "3", "--newest-first"]);
  const first = await m.started([]);
  const base = m.descriptors();
  const [d] = await m.store("d", 1, "twice"); // one socket sent twice is stored once
  await m.take("stored d 1");
  await m.take("duplicate d");
  const x = await m.store("x", 3);
  await m.take("stored x 2");
  await m.take("stored x 3");
  await m.take("full x");
  assert.equal(await readFrom(x[2]), null);
  await m.send("junk"); // descriptors without FDSTORE=1 are closed
  const [junk] = await m.accept("junk");
  assert.equal(await readFrom(junk), null);
  assert.equal(m.descriptors(), base + 3);

  // As systemd does, --newest-first hands the last stored back first.
  m.process.kill("SIGHUP");
  await m.take(`killed ${first} 15`);
  await m.started(["x", "x", "d"]);
  await handedBackAs([x[1], x[0], d], [3, 4, 5]);
});

test("service_manager: 253 descriptors in one message", async () => {
  await using m = new Manager();
  await m.started([]);
  const base = m.descriptors();
  await m.send("pair many 253");
  await m.take("stored many 253");
  assert.equal(m.descriptors(), base + 253);
  await m.send("remove many");
  await m.take("removed many 0");
  assert.equal(m.descriptors(), base);
});

test("service_manager: usage errors exit 2, failed calls name the call", async () => {
  const run = (args: string[]) => new Deno.Command(manager!, { args, stderr: "piped" }).output();
  const usage = [
    "",
    "--notify /tmp/x",
    "--notify /tmp/x --bogus 1 true",
    "--fdstore-max x -- true",
  ];
  for (const line of usage) {
    const { code, stderr } = await run(line ? line.split(" ") : []);
    assert.equal(code, 2, line);
    assert.match(decoder.decode(stderr), /^service_manager: .*\nusage: /);
  }
  const { code, stderr } = await run(["--notify", "/nonexistent/notify", "--", "true"]);
  assert.equal(code, 1);
  assert.equal(decoder.decode(stderr), "service_manager: bind: No such file or directory\n");
});
