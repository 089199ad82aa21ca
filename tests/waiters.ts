/**
 * Clients that wait through a broker hand-over, in a process of their own
 * (the broker's restart must not be helped by sharing anything with them).
 *
 * usage: deno run -A tests/waiters.ts SOCKET COUNT PREFIX [1|mixed]
 *
 * Sends COUNT requests as server on keys PREFIX-0 … PREFIX-(COUNT-1), every
 * other one over protocol v1 and the rest over v2 (or all over v1), and prints `waiting COUNT`
 * once they are sent (whether the broker has them all, its count says). On a
 * line `pair` on standard input it sends the partners, as client, and
 * checks that every pair is one socket (a byte each way), then prints one
 * JSON line: `{"paired": N, "closed": N, "failed": N, "errors": [...]}` where
 * `closed` counts waiters that saw the broker close them instead of a pair.
 */

import { BrokerClosedError, getPair, type PairedSocket } from "../mod.ts";
import { raiseDescriptorLimit } from "../ffi/process.ts";

const [socket, countText, prefix, protocols = "mixed"] = Deno.args;
const count = Number(countText);
raiseDescriptorLimit();

const encoder = new TextEncoder();
const waiters: Promise<PairedSocket>[] = [];
for (let index = 0; index < count; index++) {
  waiters.push(
    getPair(`${prefix}-${index}`, {
      socket,
      mode: "server",
      protocol: protocols === "1" || index % 2 === 0 ? 1 : 2,
    }),
  );
  // Within the broker's listen backlog: connects beyond it would only be retried.
  if (index % 1000 === 999) await new Promise((resolve) => setTimeout(resolve, 5));
}
// Settled waiters are looked at after the partners come; until then an early failure is kept.
const outcomes = waiters.map((waiter) =>
  waiter.then(
    (paired) => ({ paired }),
    (error: unknown) => ({ error }),
  )
);
console.log(`waiting ${count}`);

const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream());
let input = "";
for await (const chunk of lines) {
  input += chunk;
  if (input.includes("pair\n")) break;
}

let paired = 0, closed = 0, failed = 0;
const errors: string[] = [];
const note = (error: unknown) => {
  if (errors.length < 5) errors.push(error instanceof Error ? error.message : String(error));
};
const BATCH = 500;
for (let start = 0; start < count; start += BATCH) {
  const indexes = Array.from({ length: Math.min(BATCH, count - start) }, (_, i) => start + i);
  await Promise.all(indexes.map(async (index) => {
    const outcome = await Promise.race([
      outcomes[index],
      Promise.resolve(undefined),
    ]);
    if (outcome !== undefined && "error" in outcome) {
      if (outcome.error instanceof BrokerClosedError) closed++;
      else failed++;
      note(outcome.error);
      return;
    }
    let client: PairedSocket;
    try {
      client = await getPair(`${prefix}-${index}`, {
        socket,
        mode: "client",
        signal: AbortSignal.timeout(10_000),
      });
    } catch (error) {
      failed++;
      note(error);
      return;
    }
    using partner = client;
    const waited = await outcomes[index];
    if ("error" in waited) {
      if (waited.error instanceof BrokerClosedError) closed++;
      else failed++;
      note(waited.error);
      return;
    }
    using server = waited.paired;
    try {
      await partner.write(encoder.encode("c"));
      await server.write(encoder.encode("s"));
      const byte = new Uint8Array(1);
      const [fromClient, fromServer] = await Promise.all([server.read(byte), partner.read(byte)]);
      if (fromClient !== 1 || fromServer !== 1) throw new Error(`pair ${index} is not one socket`);
      paired++;
    } catch (error) {
      failed++;
      note(error);
    }
  }));
}
console.log(JSON.stringify({ paired, closed, failed, errors }));
