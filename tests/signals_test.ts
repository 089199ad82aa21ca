/**
 * Every signal whose default action would end the broker, sent to a real
 * `one-socket broker` process: it either stops cleanly (exit 0, socket file
 * removed, waiting clients told) or carries on and still pairs.
 */

import assert from "node:assert/strict";
import { LOGGED_SIGNALS, QUIET_SIGNALS, STATUS_SIGNAL, STOP_SIGNALS } from "../broker/signals.ts";
import { getPair } from "../client/pair.ts";
import { exists, startBroker, WAIT_MS, withScope } from "./processes.ts";

/** Ignored by the runtime from the start (see broker/signals.ts): it must stay so. */
const ALREADY_IGNORED: Deno.Signal = "SIGPIPE";

function lines(text: string): string[] {
  return text.split("\n").filter((line) => line.trim() !== "");
}

/** Pairs two clients through the broker at `path` and passes one byte. */
async function pairsOnce(path: string, key: string): Promise<void> {
  const signal = AbortSignal.timeout(WAIT_MS);
  const [a, b] = await Promise.all([
    getPair(key, { socket: path, signal }),
    getPair(key, { socket: path, signal }),
  ]);
  try {
    await a.write(new Uint8Array([7]));
    const buffer = new Uint8Array(1);
    assert.equal(await b.read(buffer), 1);
    assert.equal(buffer[0], 7);
  } finally {
    a.close();
    b.close();
  }
}

for (const signal of STOP_SIGNALS) {
  Deno.test(`signals: ${signal} stops the broker cleanly`, () =>
    withScope(async (scope) => {
      const broker = await startBroker(scope, ["--socket", scope.socket, "--log-level", "debug"]);
      // A client left waiting is told, not left hanging: the broker closes it.
      const waiting = scope.spawn(["pair", "lonely", "--socket", scope.socket], { stdin: true });
      await broker.waitForOutput("waits on key");
      broker.kill(signal);
      const done = await broker.finish();
      assert.equal(done.signal, null, `the broker died of ${done.signal}`);
      assert.equal(done.code, 0, `broker exit code; stderr:\n${done.stderr}`);
      assert.ok(!exists(scope.socket), `socket file left behind after ${signal}`);
      assert.ok(done.stderr.includes(`${signal} received; stopping`), done.stderr);
      assert.match(done.stderr, /stopped listening on .*; closed 1 client connection/);
      const left = await waiting.finish();
      assert.notEqual(left.code, 0);
      assert.equal(lines(left.stderr).length, 1, `one line expected:\n${left.stderr}`);
      assert.match(left.stderr, /closed the connection/);
    }));
}

Deno.test("signals: the others leave the broker serving; SIGUSR1 logs its status", () =>
  withScope(async (scope) => {
    const broker = await startBroker(scope);
    for (const signal of [...LOGGED_SIGNALS, ...QUIET_SIGNALS, ALREADY_IGNORED]) {
      broker.kill(signal);
    }
    for (const signal of LOGGED_SIGNALS) await broker.waitForOutput(`${signal} received`);
    await pairsOnce(scope.socket, "after-signals");
    broker.kill(STATUS_SIGNAL);
    await broker.waitForOutput(
      `${STATUS_SIGNAL}: serving ${scope.socket}: 0 waiting, 1 paired since start`,
    );
    assert.ok(!broker.exited);
    broker.kill("SIGTERM");
    const done = await broker.finish();
    assert.equal(done.code, 0, `broker exit code; stderr:\n${done.stderr}`);
    assert.ok(!exists(scope.socket));
  }));
