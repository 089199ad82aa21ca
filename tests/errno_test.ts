/**
 * errno values the kernel really returns on the broker's paths carry their
 * names, so that a log line says `ETOOMANYREFS`, not `E109`.
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";

const CONFIG = fileURLToPath(new URL("../deno.json", import.meta.url));

/**
 * Sends one descriptor after another without receiving any, until sendmsg
 * fails, and prints the failure as the broker would log it.
 */
const INFLIGHT = `
import { OsError } from ${JSON.stringify(import.meta.resolve("../ffi/errors.ts"))};
import { createSocketPair, sendMessage, setNonblocking } from ${
  JSON.stringify(import.meta.resolve("../ffi/socket.ts"))
};
import { MessageHeader } from ${JSON.stringify(import.meta.resolve("../ffi/structs.ts"))};
const pair = new Int32Array(2);
createSocketPair(pair);
setNonblocking(pair[0]); // a full queue says EAGAIN instead of blocking
const header = new MessageHeader(new Uint8Array(1), 1);
for (let sent = 0; ; sent++) {
  header.prepareSend(1, pair[1]);
  const result = sendMessage(pair[0], header);
  if (result < 0) {
    console.log(new OsError("sendmsg", -result, \`after \${sent} descriptors\`).message);
    break;
  }
}
`;

const hasSetpriv = Deno.uid() === 0 &&
  new Deno.Command("sh", { args: ["-c", "command -v setpriv"] }).outputSync().success;

Deno.test({
  name: "ETOOMANYREFS, from a real sendmsg past the in-flight descriptor limit, has its name",
  ignore: !hasSetpriv,
  fn: async () => {
    // The kernel refuses SCM_RIGHTS once a user has more descriptors in flight than
    // its RLIMIT_NOFILE, unless it holds CAP_SYS_RESOURCE or CAP_SYS_ADMIN: drop those.
    const done = await new Deno.Command("setpriv", {
      args: [
        "--bounding-set=-sys_resource,-sys_admin",
        "--inh-caps=-sys_resource,-sys_admin",
        "sh",
        "-c",
        'ulimit -n 64 && exec "$@"',
        "sh",
        Deno.execPath(),
        "eval",
        "--config",
        CONFIG,
        INFLIGHT,
      ],
      stdin: "null",
    }).output();
    const [stdout, stderr] = [done.stdout, done.stderr].map((bytes) =>
      new TextDecoder().decode(bytes)
    );
    assert.ok(done.success, stderr);
    assert.match(
      stdout,
      /^sendmsg after \d+ descriptors: ETOOMANYREFS \(too many references: cannot splice\)\n$/,
    );
  },
});
