/**
 * A broker with no capacity of its own, for tests of the kernel's EMFILE
 * fallback: run it under a low `ulimit -n`. It prints `listening`, then a
 * line for each episode of running out of descriptors, until SIGTERM.
 *
 * usage: deno run -A tests/emfile_broker.ts SOCKET_PATH
 */

import { Broker } from "../broker/broker.ts";
import { raiseDescriptorLimit } from "../ffi/process.ts";

raiseDescriptorLimit();
const broker = await Broker.listen({ socket: Deno.args[0] });
console.log("listening");
let episodes = 0;
const watcher = setInterval(() => {
  const { descriptorExhaustions } = broker.metrics;
  if (descriptorExhaustions > episodes) {
    episodes = descriptorExhaustions;
    console.log(`exhausted ${episodes} (${broker.stats.open} open)`);
  }
}, 20);
Deno.addSignalListener("SIGTERM", async () => {
  clearInterval(watcher);
  await broker.close();
  Deno.exit(0);
});
