import assert from "node:assert/strict";
import { getPair } from "../client/pair.ts";
import { encodeGetPair, MAX_KEY_LENGTH } from "../client/protocol.ts";
import { RawClient } from "./helpers.ts";
import { sleep, startBroker, withScope } from "./processes.ts";

const HONEST_PAIRING_MS = 200;

Deno.test("broker --policy: hostile keys against a glob do not stall anyone else's pairing", () =>
  withScope(async (scope) => {
    const policy = `${scope.dir}/policy.json`;
    await Deno.writeTextFile(
      policy,
      JSON.stringify({
        rules: [
          { action: "allow", glob: "svc-*-*-*-*-api" },
          { action: "allow", prefix: "honest-" },
        ],
      }),
    );
    const broker = await startBroker(scope, ["--socket", scope.socket, "--policy", policy]);

    // The key from issue 8: a backtracking matcher spent about 46 s on each one.
    const hostileKey = `svc-${"-".repeat(MAX_KEY_LENGTH - 5)}x`;
    assert.equal(hostileKey.length, MAX_KEY_LENGTH);
    const attackers = await Promise.all(
      Array.from({ length: 10 }, () => RawClient.connect(scope.socket)),
    );
    try {
      for (const attacker of attackers) attacker.send(encodeGetPair(hostileKey, "server"));
      // Give the broker time to take the hostile requests before the honest ones arrive.
      await sleep(50);

      const start = performance.now();
      const signal = AbortSignal.timeout(5 * HONEST_PAIRING_MS);
      const pair = await Promise.all([
        getPair("honest-1", { socket: scope.socket, signal }),
        getPair("honest-1", { socket: scope.socket, signal }),
      ]).catch((error) => {
        const after = (performance.now() - start).toFixed(1);
        throw new Error(`no honest pairing: ${error} after ${after} ms\n${broker.output}`, {
          cause: error,
        });
      });
      const elapsed = performance.now() - start;
      pair.forEach((socket) => socket.close());
      assert.ok(
        elapsed < HONEST_PAIRING_MS,
        `the honest pairing took ${elapsed.toFixed(1)} ms (limit ${HONEST_PAIRING_MS} ms)`,
      );

      // The hostile keys were decided, not skipped: each is denied (no rule matches) and closed.
      for (const attacker of attackers) {
        const reply = await attacker.readToEnd(1000);
        assert.deepEqual([reply.bytes.length, reply.descriptors.length], [0, 0]);
      }
      await broker.waitForOutput(`as server denied by ${policy} default (no rule matched)`);
    } finally {
      attackers.forEach((attacker) => attacker[Symbol.dispose]());
    }
  }));
