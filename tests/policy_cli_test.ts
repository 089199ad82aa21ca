import assert from "node:assert/strict";
import { BrokerClosedError, getPair } from "../client/pair.ts";
import { startBroker, withScope } from "./processes.ts";

const allow = (...prefixes: string[]) =>
  JSON.stringify({ rules: prefixes.map((prefix) => ({ action: "allow", prefix })) });

async function pairs(socket: string, key: string): Promise<boolean> {
  try {
    const signal = AbortSignal.timeout(5000);
    const [a, b] = await Promise.all([
      getPair(key, { socket, signal }),
      getPair(key, { socket, signal }),
    ]);
    a.close();
    b.close();
    return true;
  } catch (error) {
    if (error instanceof BrokerClosedError) return false;
    throw error;
  }
}

Deno.test("broker --policy: denies by default, names the rule, reloads on SIGHUP, survives a bad reload", () =>
  withScope(async (scope) => {
    const policy = `${scope.dir}/policy.json`;
    await Deno.writeTextFile(policy, allow("a-"));
    const broker = await startBroker(scope, ["--socket", scope.socket, "--policy", policy]);
    assert.equal(await pairs(scope.socket, "a-1"), true);
    assert.equal(await pairs(scope.socket, "b-1"), false);
    await broker.waitForOutput(`denied by ${policy} default (no rule matched)`);

    await Deno.writeTextFile(policy, allow("a-", "b-"));
    broker.kill("SIGHUP");
    await broker.waitForOutput("reloaded access policy");
    assert.equal(await pairs(scope.socket, "b-2"), true);

    await Deno.writeTextFile(policy, "{ not json");
    broker.kill("SIGHUP");
    await broker.waitForOutput("kept the previous access policy");
    assert.equal(await pairs(scope.socket, "b-3"), true, "the previous policy still applies");
    assert.equal(await pairs(scope.socket, "c-1"), false);
  }));

Deno.test("broker --policy with an unusable file exits 1 with one line naming it", () =>
  withScope(async (scope) => {
    const policy = `${scope.dir}/policy.toml`;
    await Deno.writeTextFile(policy, '[[rules]]\naction = "allow"\nprefix = "x"\nuser = 3\n');
    const broker = scope.spawn(["broker", "--socket", scope.socket, "--policy", policy]);
    const finished = await broker.finish();
    assert.equal(finished.code, 1);
    const lines = finished.stderr.trim().split("\n");
    assert.equal(lines.length, 1, finished.stderr);
    assert.match(lines[0], new RegExp(`${policy} rule 1: unknown field "user"`));
  }));
