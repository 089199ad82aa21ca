/**
 * Another local user for attack tests: a real second uid (through setpriv,
 * which needs root) acting in a directory shared like `/tmp`.
 *
 * @module
 */

import assert from "node:assert/strict";

/** The user `nobody`: the attacker. */
export const NOBODY = 65534;

/** Why the attack tests cannot run here, or undefined if they can. */
export const otherUsersMissing: string | undefined = Deno.uid() !== 0
  ? "needs root, to act as a second uid through setpriv"
  : new Deno.Command("sh", { args: ["-c", "command -v setpriv && command -v perl"] })
      .outputSync().success
  ? undefined
  : "needs setpriv and perl";

/** The command line that runs `program` as `uid` (its group too, no others). */
export function asUser(uid: number, program: string, ...args: string[]): string[] {
  return ["setpriv", `--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", program, ...args];
}

/** Runs `program` as `uid` to completion; fails the test unless it exits 0. Returns stdout. */
export async function runAs(uid: number, program: string, ...args: string[]): Promise<string> {
  const [command, ...rest] = asUser(uid, program, ...args);
  const done = await new Deno.Command(command, { args: rest, stdin: "null" }).output();
  const decoder = new TextDecoder();
  assert.ok(done.success, `${program} as uid ${uid} failed: ${decoder.decode(done.stderr)}`);
  return decoder.decode(done.stdout);
}

/**
 * A directory in `dir` that everyone may create names in, sticky like
 * `/tmp` (nobody may remove or rename another's entries), `dir` opened for
 * traversal so that other users reach it.
 */
export function sharedDirectory(dir: string): string {
  Deno.chmodSync(dir, 0o755);
  const shared = `${dir}/shared`;
  Deno.mkdirSync(shared);
  Deno.chmodSync(shared, 0o1777);
  return shared;
}

/** A file only root may read or write, holding `content`: what an attacker wants changed. */
export function rootOnlyFile(path: string, content: string): string {
  Deno.writeTextFileSync(path, content, { mode: 0o600 });
  Deno.chmodSync(path, 0o600);
  return path;
}

/** Asserts that `path` still holds `content` with mode 0600. */
export function assertUntouched(path: string, content: string): void {
  assert.equal(Deno.readTextFileSync(path), content, `${path} was written to`);
  assert.equal(Deno.statSync(path).mode! & 0o7777, 0o600, `${path} had its mode changed`);
}
