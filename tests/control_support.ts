/**
 * Clients of the control socket for tests: a polite one (fetch) and a raw
 * one that sends exactly the bytes it is given, as an attacker would.
 *
 * @module
 */

import assert from "node:assert/strict";
import { type Cli, isSocket, type Scope, type SpawnOptions, startBroker } from "./processes.ts";

/** One answer from the control socket, body read. */
export interface Answer {
  status: number;
  headers: Headers;
  text: string;
}

/** An HTTP client bound to one control socket (one keep-alive connection, reused). */
export class ControlHttp implements Disposable {
  readonly #client: Deno.HttpClient;

  constructor(path: string) {
    this.#client = Deno.createHttpClient({ proxy: { transport: "unix", path } });
  }

  async send(method: string, resource: string): Promise<Answer> {
    const response = await fetch(`http://localhost${resource}`, { method, client: this.#client });
    return { status: response.status, headers: response.headers, text: await response.text() };
  }

  /** GET `resource`, which must answer 200; its body parsed as JSON. */
  async json<T>(resource: string): Promise<T> {
    const answer = await this.send("GET", resource);
    assert.equal(answer.status, 200, `GET ${resource}: ${answer.text}`);
    assert.match(answer.headers.get("content-type") ?? "", /^application\/json/);
    return JSON.parse(answer.text);
  }

  [Symbol.dispose](): void {
    this.#client.close();
  }
}

/** Starts `one-socket broker --socket … --control control …extra` and waits for both sockets. */
export async function startWithControl(
  scope: Scope,
  control: string,
  extra: string[] = [],
  options: SpawnOptions = {},
): Promise<Cli> {
  const broker = await startBroker(
    scope,
    ["--socket", scope.socket, "--control", control, ...extra],
    options,
  );
  await broker.waitUntil(`control socket ${control}`, () => isSocket(control));
  return broker;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A raw connection to the control socket: bytes in, bytes out, no HTTP library between. */
export class RawHttp implements Disposable {
  readonly #conn: Deno.UnixConn;
  #received = "";
  #ended = false;

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
  }

  /** Connects, retrying while the listen backlog is full (EAGAIN) for up to `ms`. */
  static async connect(path: string, ms = 5000): Promise<RawHttp> {
    const deadline = Date.now() + ms;
    for (;;) {
      try {
        return new RawHttp(await Deno.connect({ transport: "unix", path }));
      } catch (error) {
        if (!(error instanceof Deno.errors.WouldBlock) || Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    }
  }

  /** Writes all of `text`; false if the server has closed the connection meanwhile. */
  async send(text: string): Promise<boolean> {
    try {
      const bytes = encoder.encode(text);
      for (let sent = 0; sent < bytes.length;) sent += await this.#conn.write(bytes.subarray(sent));
      return true;
    } catch (error) {
      if (error instanceof Deno.errors.BrokenPipe || error instanceof Deno.errors.ConnectionReset) {
        return false;
      }
      throw error;
    }
  }

  /** Reads until `done(received)` holds or the server closes; fails after `ms`. */
  async #readUntil(done: (text: string) => boolean, ms: number): Promise<string> {
    const buffer = new Uint8Array(65536);
    const deadline = Date.now() + ms;
    while (!this.#ended && !done(this.#received)) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`nothing more within ${ms} ms: ${this.#received}`);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const count = await Promise.race([
        this.#conn.read(buffer).catch((error) => {
          if (error instanceof Deno.errors.ConnectionReset) return null;
          throw error;
        }),
        new Promise<"timeout">((resolve) =>
          timer = setTimeout(() => resolve("timeout"), remaining)
        ),
      ]);
      clearTimeout(timer);
      if (count === "timeout") continue;
      if (count === null) this.#ended = true;
      else this.#received += decoder.decode(buffer.subarray(0, count), { stream: true });
    }
    return this.#received;
  }

  /** What has been received and not yet taken by {@link answer}. */
  get received(): string {
    return this.#received;
  }

  /** Reads until the server closes the connection; resolves to the milliseconds it took. */
  async closedWithin(ms: number): Promise<number> {
    const start = performance.now();
    await this.#readUntil(() => false, ms);
    return performance.now() - start;
  }

  /** Reads one whole answer (head and `content-length` body) and takes it off what was received. */
  async answer(ms = 5000): Promise<{ status: number; head: string; body: string }> {
    const complete = (text: string) => {
      const end = text.indexOf("\r\n\r\n");
      if (end < 0) return false;
      const length = Number(/^content-length: *(\d+)/im.exec(text.slice(0, end))?.[1] ?? 0);
      return encoder.encode(text.slice(end + 4)).length >= length;
    };
    const text = await this.#readUntil(complete, ms);
    assert.ok(
      complete(text),
      `the connection closed before a whole answer: ${JSON.stringify(text)}`,
    );
    const end = text.indexOf("\r\n\r\n");
    const head = text.slice(0, end);
    const length = Number(/^content-length: *(\d+)/im.exec(head)?.[1] ?? 0);
    const rest = encoder.encode(text.slice(end + 4));
    this.#received = decoder.decode(rest.subarray(length));
    return {
      status: Number(/^HTTP\/1\.1 (\d{3}) /.exec(head)?.[1]),
      head,
      body: decoder.decode(rest.subarray(0, length)),
    };
  }

  [Symbol.dispose](): void {
    try {
      this.#conn.close();
    } catch {
      // closed already
    }
  }
}
