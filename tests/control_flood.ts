/**
 * A flood of `GET /clients?limit=1000` for tests, from a process of its own
 * so that the test measuring the broker does not share its event loop with
 * the flood: CONNECTIONS requests at a time, each answered before the next
 * on its connection, for MS milliseconds. Prints `flooding` once the first
 * answer is in, and `{"served": N, "failed": M}` at the end.
 *
 * usage: deno run -A tests/control_flood.ts CONTROL_PATH CONNECTIONS MS
 */

const [path, connections, ms] = Deno.args;
const until = Date.now() + Number(ms);
let served = 0;
let failed = 0;

async function flood(): Promise<void> {
  using client = Deno.createHttpClient({ proxy: { transport: "unix", path } });
  while (Date.now() < until) {
    try {
      const response = await fetch("http://localhost/clients?limit=1000", { client });
      await response.arrayBuffer();
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      if (served++ === 0) console.log("flooding");
    } catch (error) {
      failed++;
      console.error(error);
    }
  }
}

await Promise.all(Array.from({ length: Number(connections) }, flood));
console.log(JSON.stringify({ served, failed }));
