/**
 * A broker with no capacity of its own and a control API, for tests of the
 * control server when the process is out of descriptors: run it under a
 * low `ulimit -n`. It prints `both sockets serve` once they do, and its log
 * (info and up), until SIGTERM.
 *
 * usage: deno run -A tests/control_emfile_broker.ts SOCKET_PATH CONTROL_PATH
 */

import { configure, getConsoleSink } from "npm:@logtape/logtape@^2.4.2";
import { Broker } from "../broker/broker.ts";
import { serveControl } from "../broker/control.ts";
import { raiseDescriptorLimit } from "../ffi/process.ts";

await configure({
  sinks: { console: getConsoleSink() },
  loggers: [{ category: ["one-socket"], lowestLevel: "info", sinks: ["console"] }],
});
raiseDescriptorLimit();
const [path, controlPath] = Deno.args;
const broker = await Broker.listen({ socket: path });
const control = await serveControl(broker, { socket: controlPath });
console.log("both sockets serve");
Deno.addSignalListener("SIGTERM", async () => {
  await control.close();
  await broker.close();
  Deno.exit(0);
});
