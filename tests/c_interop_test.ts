import assert from "node:assert/strict";
import { getPair } from "../client/pair.ts";
import { buildCProgram, eventually, withBroker } from "./helpers.ts";

const cClient = await buildCProgram("sp_client");
const ignore = cClient === undefined;
if (ignore) console.warn("c_interop_test: no C compiler (cc); the C client tests are ignored");

function runCClient(path: string, key: string, mode: "server" | "client") {
  return new Deno.Command(cClient!, { args: [path, key, mode], stdout: "piped", stderr: "piped" })
    .output();
}

function assertSucceeded(result: Deno.CommandOutput, mode: string): void {
  const stderr = new TextDecoder().decode(result.stderr);
  assert.equal(result.code, 0, `C ${mode} failed: ${stderr}`);
  assert.equal(new TextDecoder().decode(result.stdout), `${mode} ok\n`);
}

Deno.test({
  name: "two C clients that behave like libspbroker pair through our broker",
  ignore,
  fn: () =>
    withBroker(async (broker, path) => {
      const server = runCClient(path, "vhost-user-1", "server");
      await eventually(() => broker.stats.waiting === 1, "the C server to wait");
      const client = runCClient(path, "vhost-user-1", "client");
      assertSucceeded(await server, "server");
      assertSucceeded(await client, "client");
      assert.equal(broker.stats.paired, 1);
    }),
});

Deno.test({
  name: "a C server and our Deno client pair and talk",
  ignore,
  fn: () =>
    withBroker(async (_broker, path) => {
      const server = runCClient(path, "mixed", "server");
      const socket = await getPair("mixed", { socket: path, mode: "client" });
      try {
        await socket.write(new TextEncoder().encode("ping"));
        const buffer = new Uint8Array(4);
        assert.equal(await socket.read(buffer), 4);
        assert.equal(new TextDecoder().decode(buffer), "Ping");
      } finally {
        socket.close();
      }
      assertSucceeded(await server, "server");
    }),
});
