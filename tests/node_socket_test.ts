/**
 * `PairedSocket.toNodeSocket`: a brokered socket carries `node:http` and
 * `node:http2`, and handing it over leaks no descriptor.
 */

import assert from "node:assert/strict";
import { once } from "node:events";
import http from "node:http";
import http2 from "node:http2";
import type { Socket } from "node:net";
import { getPair } from "../client/pair.ts";
import { PairedSocket } from "../client/paired_socket.ts";
import { Reactor } from "../ffi/reactor.ts";
import { bindDatagram } from "../ffi/socket.ts";
import { countOpenDescriptors, eventually, temporarySocketPath, withBroker } from "./helpers.ts";

/** Both ends of a brokered pair: the server's, then the client's. */
function brokeredPair(path: string, key: string): Promise<[PairedSocket, PairedSocket]> {
  return Promise.all([
    getPair(key, { socket: path, mode: "server" }),
    getPair(key, { socket: path, mode: "client" }),
  ]);
}

/** Resolves once `socket` has released its descriptor. */
async function released(socket: Socket): Promise<void> {
  if (!socket.closed) await once(socket, "close");
}

async function text(body: AsyncIterable<Uint8Array | string>): Promise<string> {
  let all = "";
  for await (const chunk of body) all += chunk;
  return all;
}

/**
 * Runs `body` against a broker, with the descriptor count taken first: once
 * `body` is done and the broker has closed its side, nothing may remain.
 */
function leakFreeWithBroker(body: (path: string) => Promise<void>): Promise<void> {
  return withBroker(async (broker, path) => {
    Reactor.instance(); // its epoll and eventfd descriptors live as long as the process
    const before = countOpenDescriptors();
    await body(path);
    await eventually(() => broker.stats.open === 0, "the broker to close its connections");
    assert.equal(countOpenDescriptors(), before);
  });
}

Deno.test("node:http serves and requests over a brokered pair: body and headers both ways", () =>
  leakFreeWithBroker(async (path) => {
    const [serverEnd, clientEnd] = await brokeredPair(path, "node-http");
    const server = http.createServer(async (request, response) => {
      const body = await text(request);
      response.writeHead(201, { "x-seen": `${request.method} ${request.url} ${body}` });
      response.end(`echo of ${request.headers["x-greeting"]}`);
    });
    const serverSocket = serverEnd.toNodeSocket();
    server.emit("connection", serverSocket);
    const clientSocket = clientEnd.toNodeSocket();
    const response = await new Promise<http.IncomingMessage>((resolve, reject) => {
      http.request({
        createConnection: () => clientSocket,
        method: "POST",
        path: "/echo?n=1",
        headers: { "x-greeting": "hello over a pair" },
      }, resolve).on("error", reject).end("request body");
    });
    assert.equal(response.statusCode, 201);
    assert.equal(response.headers["x-seen"], "POST /echo?n=1 request body");
    assert.equal(await text(response), "echo of hello over a pair");
    // The Node sockets own the descriptors now and close them when the exchange ends.
    assert.equal(serverEnd.fd, -1);
    assert.equal(clientEnd.fd, -1);
    await Promise.all([released(serverSocket), released(clientSocket)]);
  }));

Deno.test("node:http2 serves and requests over a brokered pair", () =>
  leakFreeWithBroker(async (path) => {
    const [serverEnd, clientEnd] = await brokeredPair(path, "node-http2");
    const server = http2.createServer();
    server.on("stream", async (stream, headers) => {
      const body = await text(stream);
      stream.respond({ ":status": 200, "x-seen": `${headers[":path"]} ${body}` });
      stream.end(`echo of ${headers["x-greeting"]}`);
    });
    const serverSocket = serverEnd.toNodeSocket();
    server.emit("connection", serverSocket);
    const clientSocket = clientEnd.toNodeSocket();
    const session = http2.connect("http://paired", { createConnection: () => clientSocket });
    const stream = session.request({
      ":method": "POST",
      ":path": "/echo",
      "x-greeting": "hello over h2",
    });
    stream.end("request body");
    const [headers] = await once(stream, "response");
    assert.equal(headers[":status"], 200);
    assert.equal(headers["x-seen"], "/echo request body");
    assert.equal(await text(stream), "echo of hello over h2");
    session.close();
    await Promise.all([released(serverSocket), released(clientSocket)]);
  }));

Deno.test("once handed over, a PairedSocket is detached: its calls throw BadResource", () =>
  leakFreeWithBroker(async (path) => {
    const [serverEnd, clientEnd] = await brokeredPair(path, "handed-over");
    const nodeSocket = serverEnd.toNodeSocket();
    assert.equal(serverEnd.fd, -1);
    await assert.rejects(serverEnd.read(new Uint8Array(1)), Deno.errors.BadResource);
    await assert.rejects(serverEnd.write(new Uint8Array(1)), Deno.errors.BadResource);
    assert.throws(() => serverEnd.toNodeSocket(), Deno.errors.BadResource);
    serverEnd.close(); // nothing to close: it must not close the Node socket's descriptor
    await clientEnd.write(new TextEncoder().encode("still connected"));
    const [chunk] = await once(nodeSocket, "data");
    assert.equal(String(chunk), "still connected");
    nodeSocket.destroy();
    await released(nodeSocket);
    assert.equal(await clientEnd.read(new Uint8Array(1)), null);
    clientEnd.close();
  }));

Deno.test("toNodeSocket refuses while a read or write waits, or once the streams were taken", () =>
  leakFreeWithBroker(async (path) => {
    const [serverEnd, clientEnd] = await brokeredPair(path, "busy");
    const buffer = new Uint8Array(8);
    const reading = serverEnd.read(buffer);
    assert.throws(() => serverEnd.toNodeSocket(), {
      name: "Busy",
      message: /read or write on fd \d+ awaits the peer/,
    });
    // The refusal left the read alone.
    await clientEnd.write(new Uint8Array([7]));
    assert.equal(await reading, 1);
    const writing = serverEnd.write(new Uint8Array(8 << 20));
    assert.throws(() => serverEnd.toNodeSocket(), { name: "Busy" });
    clientEnd.close();
    await assert.rejects(writing, { code: "EPIPE" });
    assert.ok(serverEnd.readable instanceof ReadableStream);
    assert.throws(() => serverEnd.toNodeSocket(), {
      name: "Busy",
      message: /web streams of fd \d+ own its bytes/,
    });
    serverEnd.close();
    assert.throws(() => serverEnd.toNodeSocket(), Deno.errors.BadResource);
  }));

Deno.test("a descriptor node:net cannot adopt stays with the PairedSocket", async () => {
  const socketFile = await temporarySocketPath();
  const before = countOpenDescriptors();
  try {
    const datagram = new PairedSocket(bindDatagram(socketFile.path).detach());
    const fd = datagram.fd;
    assert.throws(() => datagram.toNodeSocket(), { code: "ERR_INVALID_FD_TYPE" });
    assert.equal(datagram.fd, fd);
    datagram.close();
    assert.equal(countOpenDescriptors(), before);
  } finally {
    await socketFile.remove();
  }
});
