import assert from "node:assert/strict";
import { Connection, ConnectionTable } from "../broker/connections.ts";
import type { Waiter } from "../broker/matcher.ts";
import { closeDescriptor, createSocketPair } from "../ffi/socket.ts";
import { Reactor } from "../ffi/reactor.ts";
import { countOpenDescriptors } from "./helpers.ts";

/** A connection on one end of a real socketpair (its SO_PEERCRED is this process's). */
function openConnection(table: ConnectionTable, id: number, peers: number[]): Connection {
  const pair = new Int32Array(2);
  assert.equal(createSocketPair(pair), 0);
  peers.push(pair[1]);
  const connection = new Connection(id, pair[0], performance.now(), () => {});
  table.add(connection);
  return connection;
}

const waiter = { cancel: () => true } as unknown as Waiter<Connection>;

Deno.test("connection table: waiting clients count for their uid from the threshold on, and stop below half of it", () => {
  Reactor.instance(); // its epoll and eventfd descriptors are the process's, not the test's
  const before = countOpenDescriptors();
  const table = new ConnectionTable(4);
  const peers: number[] = [];
  const uid = Deno.uid()!;
  const connections = [1, 2, 3].map((id) => openConnection(table, id, peers));
  connections.forEach((connection) => table.startWaiting(connection, waiter, 0));
  assert.equal(table.heaviest(), undefined, "below the threshold nobody is counted");
  const incomplete = openConnection(table, 4, peers);
  table.startHandshake(incomplete);
  assert.equal(table.account(uid)?.waiting, 3, "reaching it counts those already waiting");
  assert.equal(table.account(uid)?.incomplete, 1);
  assert.equal(table.heaviest()?.held, 4);
  assert.equal(table.heaviest()?.oldest, connections[0]);
  table.endHandshake(incomplete);
  table.startWaiting(incomplete, waiter, 0);
  assert.equal(table.account(uid)?.waiting, 4);
  // Back under half the threshold: the counts are dropped, consistently.
  for (const connection of [...connections, incomplete].slice(0, 3)) table.close(connection);
  assert.equal(table.size, 1);
  assert.equal(table.account(uid)?.held ?? 0, 0);
  assert.equal(table.heaviest(), undefined);
  table.close(incomplete);
  table.forgetIdleAccounts();
  assert.equal(table.account(uid), undefined);
  peers.forEach(closeDescriptor);
  assert.equal(countOpenDescriptors(), before);
});
