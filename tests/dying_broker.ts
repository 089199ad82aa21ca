/**
 * An old broker that dies in the middle of a hand-over, for the new broker's
 * side of that story: it takes protocol v1 requests on SOCKET like a broker,
 * and when asked to hand over sends its listening socket and the first SENT
 * of its waiting clients in one batch, waits for the `ACK`, then kills
 * itself with SIGKILL before `END`, as a crash would.
 *
 * usage: deno run -A tests/dying_broker.ts SOCKET SENT (at most 64: one batch)
 * prints `holding N` each time another 100 clients have sent their request.
 */

import { decodeGetPair, MESSAGE_SIZE } from "../client/protocol.ts";
import { acceptConnection, listenUnix, receiveMessage, UnixSocket } from "../ffi/socket.ts";
import { MessageHeader } from "../ffi/structs.ts";
import { HandoverLink } from "../broker/handover.ts";
import {
  decodeAck,
  encodeBatch,
  encodeOffer,
  handoverMessageLength,
  type HandoverRecord,
  REQUEST_TAKEOVER,
} from "../broker/handover_wire.ts";
import { u32 } from "../client/bytes.ts";

const [path, sentText] = Deno.args;
const sent = Number(sentText);
const listener = listenUnix(path, 4096);
const clients: { fd: number; key: Uint8Array }[] = [];
const inbound = new MessageHeader(new Uint8Array(MESSAGE_SIZE), 1);

/** Reads exactly `length` bytes of a blocking-enough client (it sent them with its connect). */
async function readExactly(socket: UnixSocket, length: number): Promise<Uint8Array> {
  const frame = new Uint8Array(length);
  let received = 0;
  while (received < length) {
    inbound.prepareReceive(length - received);
    const count = receiveMessage(socket.fd, inbound);
    if (count === 0) throw new Error("end of stream");
    if (count < 0) {
      await socket.readiness.readable();
      continue;
    }
    frame.set(inbound.data.subarray(0, count), received);
    received += count;
  }
  return frame;
}

for (;;) {
  let fd = acceptConnection(listener.fd);
  while (fd < 0) {
    await listener.readiness.readable();
    fd = acceptConnection(listener.fd);
  }
  const socket = new UnixSocket(fd);
  const head = await readExactly(socket, 12);
  if (u32(head, 0) === REQUEST_TAKEOVER) {
    const length = handoverMessageLength(head);
    if (typeof length !== "number") throw length;
    await readExactly(socket, length - 12);
    const link = new HandoverLink(socket);
    await link.send(
      encodeOffer({
        pid: Deno.pid,
        records: clients.length,
        nextId: clients.length + 1,
        startedMs: Date.now(),
        ownsSocketFile: true,
      }),
      [listener.fd],
    );
    const records: HandoverRecord[] = clients.slice(0, sent).map((client, index) => ({
      kind: "waiting",
      version: 1,
      type: 0,
      mode: "server",
      wantsPidfd: false,
      hearsReasons: false,
      id: index + 1,
      ageMs: 0,
      key: client.key,
      partial: new Uint8Array(0),
    }));
    await link.send(encodeBatch(records), clients.slice(0, sent).map((client) => client.fd));
    const ack = await link.receive(handoverMessageLength);
    if (ack === undefined || decodeAck(ack.frame) !== sent) throw new Error("no ACK");
    Deno.kill(Deno.pid, "SIGKILL");
  }
  const rest = await readExactly(socket, MESSAGE_SIZE - 12);
  const request = new Uint8Array(MESSAGE_SIZE);
  request.set(head);
  request.set(rest, 12);
  clients.push({ fd: socket.fd, key: decodeGetPair(request).key });
  if (clients.length % 100 === 0) console.log(`holding ${clients.length}`);
}
