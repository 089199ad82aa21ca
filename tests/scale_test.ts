import assert from "node:assert/strict";
import { getPair } from "../client/pair.ts";
import { encodeGetPair } from "../client/protocol.ts";
import { Errno } from "../ffi/errors.ts";
import { raiseDescriptorLimit } from "../ffi/process.ts";
import { connectUnix, readInto, sendFrom, type UnixSocket } from "../ffi/socket.ts";
import { countOpenDescriptors, eventually } from "./helpers.ts";
import { startBroker, withScope } from "./processes.ts";

const WAITERS = 10_000;

/** CPU seconds (user + system) a process has used, from /proc/PID/stat. */
function cpuSeconds(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks
}

/** Connects and sends a complete request; the socket then waits for its pair. */
async function waitOn(path: string, key: string, mode: "server" | "client"): Promise<UnixSocket> {
  const socket = await connectUnix(path);
  const request = encodeGetPair(key, mode) as Uint8Array<ArrayBuffer>;
  assert.equal(sendFrom(socket.fd, request), request.length);
  return socket;
}

/** True while the broker has neither replied on nor closed the connection. */
function stillWaiting(socket: UnixSocket): boolean {
  return readInto(socket.fd, new Uint8Array(1)) === -Errno.EAGAIN;
}

Deno.test(`${WAITERS} clients waiting at once are all held, and pairing goes on`, async () => {
  const limit = raiseDescriptorLimit();
  assert.ok(
    limit.soft > WAITERS + 500,
    `this test needs ${WAITERS + 500} descriptors (has ${limit.soft})`,
  );
  await withScope(async (scope) => {
    const broker = await startBroker(scope);
    const baseline = countOpenDescriptors(broker.pid);
    const waiters: UnixSocket[] = [];
    try {
      for (let i = 0; i < WAITERS; i++) {
        waiters.push(await waitOn(scope.socket, `waiter-${i}`, "server"));
      }
      await eventually(
        () => countOpenDescriptors(broker.pid) >= baseline + WAITERS,
        "the broker to hold every waiter",
        20_000,
      );
      // Pairing among newcomers works with every waiter present.
      for (let i = 0; i < 50; i++) {
        const [a, b] = await Promise.all([
          getPair(`busy-${i}`, { socket: scope.socket }),
          getPair(`busy-${i}`, { socket: scope.socket }),
        ]);
        a.close();
        b.close();
      }
      assert.equal(
        waiters.filter(stillWaiting).length,
        WAITERS,
        "a waiter was evicted or answered",
      );
      // Waiters are real: a sample of them finds its partner.
      for (let i = 0; i < WAITERS; i += 1000) {
        const partner = await getPair(`waiter-${i}`, { socket: scope.socket, mode: "client" });
        partner.close();
        await eventually(() => !stillWaiting(waiters[i]), `waiter ${i} to get its pair`);
      }
    } finally {
      waiters.forEach((socket) => socket.close());
    }
    await eventually(
      () => countOpenDescriptors(broker.pid) === baseline,
      "the broker's descriptors to return to their baseline",
    );
  });
});

Deno.test("a full broker closes newcomers of the uid holding the most, with descriptors to spare, and still pairs at once", async () => {
  await withScope(async (scope) => {
    const broker = await startBroker(scope, ["--socket", scope.socket], { descriptorLimit: 64 });
    await broker.waitForOutput("clients");
    const capacity = Number(/room for (\d+) clients/.exec(broker.output)?.[1]);
    assert.ok(capacity > 0 && capacity < 64, `capacity ${capacity} under a limit of 64`);
    // More clients of one uid than it has room for: the newest are closed, the rest kept.
    const crowd: UnixSocket[] = [];
    try {
      for (let i = 0; i < capacity + 30; i++) {
        crowd.push(await waitOn(scope.socket, `crowd-${i}`, "server"));
      }
      await eventually(
        () => crowd.filter((socket) => !stillWaiting(socket)).length === 30,
        "the 30 clients past capacity to be closed",
      );
      assert.equal(crowd.slice(0, capacity).filter(stillWaiting).length, capacity);
      // Full is exactly when a careless daemon dies: if it does, say so with its last words.
      const brokerCpu = () => {
        assert.ok(!broker.exited, `the broker exited while full:\n${broker.output}`);
        return cpuSeconds(broker.pid);
      };
      const cpuBefore = brokerCpu();
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const spent = brokerCpu() - cpuBefore;
      assert.ok(spent < 0.3, `the broker spun: ${spent} CPU seconds in 1 s while full`);
      assert.match(broker.output, /broker full/);
      assert.doesNotMatch(broker.output, /EMFILE/, "the reserve kept the process from EMFILE");
      // Full, nobody has left: a newcomer whose partner waits still gets its pair.
      const partner = await getPair("crowd-10", {
        socket: scope.socket,
        mode: "client",
        signal: AbortSignal.timeout(10_000),
      });
      partner.close();
      await eventually(() => !stillWaiting(crowd[10]), "the waiter to get its pair");
    } finally {
      crowd.forEach((socket) => socket.close());
    }
    const signal = AbortSignal.timeout(10_000);
    const [a, b] = await Promise.all([
      getPair("after", { socket: scope.socket, signal }),
      getPair("after", { socket: scope.socket, signal }),
    ]);
    a.close();
    b.close();
  });
});

Deno.test("without a capacity, the kernel's EMFILE makes the broker back off without dying or spinning", async () => {
  await withScope(async (scope) => {
    const script = new URL("./emfile_broker.ts", import.meta.url).pathname;
    const broker = scope.spawn([scope.socket], {
      command: [Deno.execPath(), "run", "-A", script],
      descriptorLimit: 64,
    });
    await broker.waitForOutput("listening");
    const crowd: UnixSocket[] = [];
    try {
      for (let i = 0; i < 80; i++) crowd.push(await waitOn(scope.socket, `emfile-${i}`, "server"));
      await broker.waitForOutput("exhausted 1");
      assert.ok(!broker.exited, `the broker died out of descriptors:\n${broker.output}`);
      const cpuBefore = cpuSeconds(broker.pid);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      assert.ok(!broker.exited, `the broker died out of descriptors:\n${broker.output}`);
      const spent = cpuSeconds(broker.pid) - cpuBefore;
      assert.ok(spent < 0.3, `the broker spun: ${spent} CPU seconds in 1 s`);
      assert.doesNotMatch(broker.output, /exhausted 2/, "one episode, however many retries");
    } finally {
      crowd.forEach((socket) => socket.close());
    }
    const signal = AbortSignal.timeout(10_000);
    const [a, b] = await Promise.all([
      getPair("after-emfile", { socket: scope.socket, signal }),
      getPair("after-emfile", { socket: scope.socket, signal }),
    ]);
    a.close();
    b.close();
    assert.ok(!broker.exited, broker.output);
  });
});
