/**
 * {@link PidFile} in this process: written in place, locked for as long as
 * it is held, a file nobody holds replaced, and never anything but a
 * pidfile overwritten or removed.
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

const names = (dir: string) => [...Deno.readDirSync(dir)].map((entry) => entry.name).sort();

Deno.test("pidfile: holds our pid, mode 0644, no other file beside it, and is removed", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/broker.pid`;
    {
      using pidfile = await PidFile.create(path);
      assert.equal(Deno.readTextFileSync(path), `${Deno.pid}\n`);
      assert.equal(pidfile.pid, Deno.pid);
      assert.equal(Deno.statSync(path).mode! & 0o777, 0o644 & ~Deno.umask());
      assert.deepEqual(names(dir), ["broker.pid"]);
    }
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
  });
});

Deno.test("pidfile: a held lock is refused with the path and the holder's pid", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/broker.pid`;
    // flock conflicts between two opens of the file, in one process as in two.
    using _holder = await PidFile.create(path);
    const started = performance.now();
    await assert.rejects(
      () => PidFile.create(path, 4242),
      { message: `pidfile ${path} is held by running process ${Deno.pid}` },
    );
    assert.ok(performance.now() - started >= 900, "gives a dying holder a second first");
    assert.equal(Deno.readTextFileSync(path), `${Deno.pid}\n`);
  });
});

Deno.test("pidfile: a pid nobody holds the lock for is stale, even one that runs", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/broker.pid`;
    // Our parent runs, but does not hold the lock: its pid in the file is a leftover (pid reuse).
    Deno.writeTextFileSync(path, `${Deno.ppid}\n`);
    using _pidfile = await PidFile.create(path);
    assert.equal(Deno.readTextFileSync(path), `${Deno.pid}\n`);
  });
});

Deno.test("pidfile: a file that holds no pid is never replaced", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/important.conf`;
    for (const content of ["keep me\n", "123 but more\n", "1".repeat(40)]) {
      Deno.writeTextFileSync(path, content);
      await assert.rejects(
        () => PidFile.create(path),
        /does not hold a pid; refusing to replace it/,
      );
      assert.equal(Deno.readTextFileSync(path), content);
    }
  });
});

Deno.test("pidfile: a symlink at the path is refused, its target untouched", async () => {
  await withDirectory(async (dir) => {
    const target = `${dir}/target`;
    Deno.writeTextFileSync(target, "1\n");
    const path = `${dir}/broker.pid`;
    Deno.symlinkSync(target, path);
    await assert.rejects(
      () => PidFile.create(path),
      { message: `open ${path}: ELOOP (a symlink; refusing to follow it)` },
    );
    assert.equal(Deno.readTextFileSync(target), "1\n");
  });
});

Deno.test("pidfile: removal spares a file that has replaced ours", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/broker.pid`;
    const pidfile = await PidFile.create(path);
    Deno.writeTextFileSync(`${dir}/successor`, "4242\n");
    Deno.renameSync(`${dir}/successor`, path);
    pidfile.remove();
    assert.equal(Deno.readTextFileSync(path), "4242\n");
    // Our lock went with our descriptor: the successor's file can be taken.
    using _next = await PidFile.create(path);
  });
});

Deno.test("pidfile: a directory that does not exist fails with the errno name and path", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/missing/broker.pid`;
    await assert.rejects(
      () => PidFile.create(path),
      { message: `open ${path}: ENOENT (no such file or directory)` },
    );
  });
});
