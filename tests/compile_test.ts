/**
 * The single executable of `deno task compile`, built once for this file into
 * a temporary directory: a broker and `pair` processes of that binary pair up.
 *
 * Building needs denort, which `deno compile` downloads unless DENORT_BIN
 * names a copy. Without one, no binary exists and that test is reported as
 * ignored, with the reason on stderr; the compile script's own message for
 * that case is tested either way.
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import denoConfig from "../deno.json" with { type: "json" };
import { EXIT_NO_RUNTIME } from "../scripts/compile.ts";
import { startBroker, withScope } from "./processes.ts";

const COMPILE_SCRIPT = fileURLToPath(new URL("../scripts/compile.ts", import.meta.url));
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function runCompile(output: string, env?: Record<string, string>): Promise<Deno.CommandOutput> {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", COMPILE_SCRIPT, "--output", output],
    env,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
}

const directory = await Deno.makeTempDir({ prefix: "one-socket-compile-" });
globalThis.addEventListener("unload", () => Deno.removeSync(directory, { recursive: true }));
const binary = `${directory}/one-socket`;
const build = await runCompile(binary);
const buildMessage = decoder.decode(build.stderr).trim();
const cannotBuild = build.code === EXIT_NO_RUNTIME;
if (cannotBuild) {
  console.warn(
    `compile_test: skipped, no compiled binary was built or tested here: ${buildMessage}`,
  );
}

Deno.test({
  name: "compile: a broker and pair processes of the compiled binary pair up, --exec included",
  ignore: cannotBuild,
  fn: async () => {
    assert.equal(build.code, 0, `deno task compile failed:\n${buildMessage}`);
    await withScope(async (scope) => {
      const command = [binary];
      const version = await scope.spawn(["--version"], { command }).finish();
      assert.equal(decoder.decode(version.stdout), `one-socket ${denoConfig.version}\n`);

      const broker = await startBroker(scope, ["--socket", scope.socket], { command });
      const server = scope.spawn(
        ["pair", "compiled", "--mode", "server", "--socket", scope.socket],
        {
          command,
          stdin: true,
        },
      );
      const client = scope.spawn(
        ["pair", "compiled", "--mode", "client", "--socket", scope.socket],
        {
          command,
          stdin: true,
        },
      );
      await Promise.all([
        server.feed(encoder.encode("from the server\n")),
        client.feed(encoder.encode("from the client\n")),
      ]);
      const [served, used] = await Promise.all([server.finish(), client.finish()]);
      assert.equal(served.code, 0, served.stderr);
      assert.equal(used.code, 0, used.stderr);
      assert.equal(decoder.decode(served.stdout), "from the client\n");
      assert.equal(decoder.decode(used.stdout), "from the server\n");

      // --exec needs the run permission baked into the binary.
      const service = scope.spawn(
        [
          "pair",
          "exec",
          "--socket",
          scope.socket,
          "--exec",
          "--",
          "sh",
          "-c",
          'echo "fds=$LISTEN_FDS" >&3',
        ],
        { command },
      );
      const user = scope.spawn(["pair", "exec", "--socket", scope.socket], {
        command,
        stdin: true,
      });
      await user.feed(new Uint8Array());
      const [execDone, userDone] = await Promise.all([service.finish(), user.finish()]);
      assert.equal(execDone.code, 0, execDone.stderr);
      assert.equal(decoder.decode(userDone.stdout), "fds=1\n");

      broker.kill("SIGTERM");
      assert.equal((await broker.finish()).code, 0);
    });
  },
});

Deno.test("compile: without a usable denort it says so in one line and exits 3", async () => {
  const missing = `${directory}/no-such-denort`;
  const result = await runCompile(`${directory}/not-built`, { DENORT_BIN: missing });
  const stderr = decoder.decode(result.stderr);
  assert.equal(result.code, EXIT_NO_RUNTIME, stderr);
  const lines = stderr.split("\n").filter((line) => line.trim() !== "");
  assert.equal(lines.length, 1, stderr);
  assert.ok(lines[0].startsWith(`compile: DENORT_BIN=${missing} could not be used`), lines[0]);
  assert.ok(lines[0].endsWith(`set DENORT_BIN to a denort ${Deno.version.deno} binary`), lines[0]);
});
