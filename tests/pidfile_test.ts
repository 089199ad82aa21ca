/**
 * {@link PidFile} in this process: written in place, locked for as long as
 * it is held, a file nobody holds replaced, and never anything but a
 * pidfile overwritten or removed.
 */

import assert from "node:assert/strict";
import { PidFile } from "../broker/pidfile.ts";
import { F_OFD_SETLK, F_RDLCK, libc, O_CLOEXEC, SEEK_SET } from "../ffi/libc.ts";
import { cString, wholeFileLock } from "../ffi/structs.ts";

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
    // An OFD lock conflicts between two opens of the file, in one process as in two.
    using _holder = await PidFile.create(path);
    const started = performance.now();
    await assert.rejects(
      () => PidFile.create(path, 4242),
      {
        message: `pidfile ${path} is locked by a running process: it names process ${Deno.pid}, ` +
          "but the lock, not the pid, says a broker runs, and its holder may be another process",
      },
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

/** Runs `body` while a read-only open of `path` holds a read lock on it, as any reader may. */
async function whileReadLocked(path: string, body: () => Promise<void>): Promise<void> {
  const reader = libc.open(cString(path), O_CLOEXEC);
  assert.ok(reader >= 0);
  try {
    assert.equal(libc.fcntl_lock(reader, F_OFD_SETLK, wholeFileLock(F_RDLCK, SEEK_SET)), 0);
    await body();
  } finally {
    libc.close(reader);
  }
}

Deno.test("pidfile: a stale pidfile a reader keeps read-locked is replaced by a new file", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/broker.pid`;
    Deno.writeTextFileSync(path, "4242\n", { mode: 0o644 });
    const pinned = Deno.statSync(path).ino;
    await whileReadLocked(path, async () => {
      using _pidfile = await PidFile.create(path);
      assert.equal(Deno.readTextFileSync(path), `${Deno.pid}\n`);
      const status = Deno.statSync(path);
      assert.notEqual(status.ino, pinned, "a new file, not the one read-locked");
      assert.equal(status.mode! & 0o777, 0o644 & ~Deno.umask());
      assert.deepEqual(names(dir), ["broker.pid"]);
      // Ours is write-locked: a second one is refused, whatever it reads in the file.
      await assert.rejects(() => PidFile.create(path, 4242), /is locked by a running process/);
    });
  });
});

Deno.test("pidfile: a read-locked file that holds no pid is neither removed nor replaced", async () => {
  await withDirectory(async (dir) => {
    const path = `${dir}/important.conf`;
    Deno.writeTextFileSync(path, "keep me\n", { mode: 0o644 });
    await whileReadLocked(path, async () => {
      await assert.rejects(
        () => PidFile.create(path),
        /does not hold a pid; refusing to replace it/,
      );
    });
    assert.equal(Deno.readTextFileSync(path), "keep me\n");
  });
});
