import assert from "node:assert/strict";
import { type Connection, ConnectionTable } from "../broker/connections.ts";
import { Matcher } from "../broker/matcher.ts";
import { closeDescriptor, createSocketPair } from "../ffi/socket.ts";
import { Reactor } from "../ffi/reactor.ts";
import { countOpenDescriptors } from "./helpers.ts";

/** A connection on one end of a real socketpair (its SO_PEERCRED is this process's). */
function openConnection(table: ConnectionTable, peers: number[]): Connection {
  const pair = new Int32Array(2);
  assert.equal(createSocketPair(pair), 0);
  peers.push(pair[1]);
  return table.open(pair[0], performance.now());
}

/**
 * Runs `test` on a fresh table; `peers` collects the other ends of its
 * connections, closed afterwards. No descriptor may be left open.
 */
function withTable(
  countWaitingFrom: number,
  test: (table: ConnectionTable, peers: number[]) => void,
): void {
  Reactor.instance(); // its epoll and eventfd descriptors are the process's, not the test's
  const before = countOpenDescriptors();
  const peers: number[] = [];
  test(new ConnectionTable(() => {}, countWaitingFrom), peers);
  peers.forEach(closeDescriptor);
  assert.equal(countOpenDescriptors(), before);
}

Deno.test("connection table: waiting clients count for their uid from the threshold on, and stop below half of it", () =>
  withTable(4, (table, peers) => {
    const uid = Deno.uid()!;
    const connections = [1, 2, 3].map(() => openConnection(table, peers));
    connections.forEach((connection) => table.startWaiting(connection, 0));
    assert.equal(table.heaviest(), undefined, "below the threshold nobody is counted");
    const incomplete = openConnection(table, peers);
    table.startHandshake(incomplete);
    assert.equal(table.account(uid)?.waiting, 3, "reaching it counts those already waiting");
    assert.equal(table.account(uid)?.incomplete, 1);
    assert.equal(table.heaviest()?.held, 4);
    assert.equal(table.heaviest()?.oldest, connections[0]);
    table.endHandshake(incomplete);
    table.startWaiting(incomplete, 0);
    assert.equal(table.account(uid)?.waiting, 4);
    // Back under half the threshold: the counts are dropped, consistently.
    for (const connection of [...connections, incomplete].slice(0, 3)) table.close(connection);
    assert.equal(table.size, 1);
    assert.equal(table.account(uid)?.held ?? 0, 0);
    assert.equal(table.heaviest(), undefined);
    table.close(incomplete);
    table.forgetIdleAccounts();
    assert.equal(table.account(uid), undefined);
  }));

Deno.test("connection table: a closed connection's object serves the next client on its descriptor, as new", () =>
  withTable(0, (table, peers) => {
    const matcher = new Matcher<Connection>();
    const first = openConnection(table, peers);
    const key = new Uint8Array([1, 2, 3]);
    assert.equal(matcher.take(first, key, 0, 3, "server"), undefined);
    table.startWaiting(first, 0);
    assert.equal(first.uid, Deno.uid());
    const { id, fd } = first;
    assert.equal(table.close(first), true);
    assert.equal(table.close(first), false, "closing twice is a no-op");
    assert.equal(matcher.size, 0, "closing cancels the wait");
    assert.equal(table.waiting.oldest, undefined);
    closeDescriptor(peers.pop()!);
    // The kernel hands out the lowest free descriptor: the one just closed.
    const second = openConnection(table, peers);
    assert.equal(second.fd, fd);
    assert.equal(second, first, "the object is reused");
    assert.ok(second.id > id, "with a fresh id");
    assert.equal(second.isOpen, true);
    assert.equal(second.isWaiting, false);
    assert.equal(second.received, 0);
    assert.equal(table.get(id), undefined, "the old id is gone");
    assert.equal(table.get(second.id), second);
    table.close(second);
  }));

Deno.test("connection table: open connections are listed in accept order, and may be closed while listed", () =>
  withTable(0, (table, peers) => {
    const opened = Array.from({ length: 6 }, () => openConnection(table, peers));
    table.close(opened[2]);
    const ids: number[] = [];
    for (const connection of table.values()) {
      ids.push(connection.id);
      table.close(connection); // closing the one yielded must not break the walk
    }
    assert.deepEqual(ids, [0, 1, 3, 4, 5].map((i) => opened[i].id));
    assert.equal(table.size, 0);
    assert.deepEqual([...table.values()], []);
  }));

Deno.test("connection table: spares above the descriptors in use are let go", () =>
  withTable(0, (table, peers) => {
    const burst = Array.from({ length: 200 }, () => openConnection(table, peers));
    const highest = Math.max(...burst.map((connection) => connection.fd));
    burst.forEach((connection) => table.close(connection));
    peers.forEach(closeDescriptor);
    peers.length = 0;
    table.trimSpares();
    // Above the slack, a descriptor's old object is gone: a new one is made for it.
    const kept = openConnection(table, peers);
    const again = Array.from({ length: 200 }, () => openConnection(table, peers));
    const top = again.find((connection) => connection.fd === highest)!;
    assert.ok(top !== undefined, "the burst's highest descriptor is handed out again");
    assert.ok(!burst.includes(top), "its spare was let go");
    assert.ok(burst.includes(kept), "a low descriptor's spare is kept");
    [kept, ...again].forEach((connection) => table.close(connection));
  }));
