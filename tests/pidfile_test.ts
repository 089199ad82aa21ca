/**
 * {@link PidFile} in this process: created whole, refused while a live
 * process holds it, a stale one replaced, and never anything but a pidfile
 * overwritten or removed.
 */

import assert from "node:assert/strict";
import { PidFile } from "../broker/pidfile.ts";

async function withDirectory(body: (dir: string) => Promise<void> | void): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "one-socket-pidfile-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The pid of a process that has exited (and been reaped). */
async function deadPid(): Promise<number> {
  const child = new Deno.Command("true").spawn();
  await child.status;
  return child.pid;
}

Deno.test("pidfile: holds our pid, leaves no temporary file, and is removed", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/broker.pid`;
    {
      using pidfile = PidFile.create(path);
      assert.equal(Deno.readTextFileSync(path), `${Deno.pid}\n`);
      assert.equal(pidfile.pid, Deno.pid);
      assert.deepEqual([...Deno.readDirSync(dir)].map((entry) => entry.name), ["broker.pid"]);
    }
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
  });
});

Deno.test("pidfile: a live holder is refused with the path and its pid", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/broker.pid`;
    // Our parent (the test runner's parent) is alive for as long as we run.
    const holder = Deno.ppid;
    Deno.writeTextFileSync(path, `${holder}\n`);
    assert.throws(
      () => PidFile.create(path),
      { message: `pidfile ${path} is held by process ${holder}, which is running` },
    );
    assert.equal(Deno.readTextFileSync(path), `${holder}\n`);
    assert.deepEqual([...Deno.readDirSync(dir)].map((entry) => entry.name), ["broker.pid"]);
  });
});

Deno.test("pidfile: a stale one (its process is gone) is replaced", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/broker.pid`;
    Deno.writeTextFileSync(path, `${await deadPid()}\n`);
    using _pidfile = PidFile.create(path);
    assert.equal(Deno.readTextFileSync(path), `${Deno.pid}\n`);
  });
});

Deno.test("pidfile: a file that holds no pid is never replaced", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/important.conf`;
    Deno.writeTextFileSync(path, "keep me\n");
    assert.throws(() => PidFile.create(path), /does not hold a pid; refusing to replace it/);
    assert.equal(Deno.readTextFileSync(path), "keep me\n");
  });
});

Deno.test("pidfile: removal spares a pidfile another process has taken over", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/broker.pid`;
    const pidfile = PidFile.create(path);
    const successor = await deadPid();
    Deno.writeTextFileSync(path, `${successor}\n`);
    pidfile.remove();
    assert.equal(Deno.readTextFileSync(path), `${successor}\n`);
  });
});

Deno.test("pidfile: a directory that does not exist fails with the errno name and path", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/missing/broker.pid`;
    assert.throws(
      () => PidFile.create(path),
      (error: Error) =>
        error.message.startsWith(`open ${dir}/missing/.broker.pid.`) &&
        error.message.includes(": ENOENT"),
    );
  });
});
