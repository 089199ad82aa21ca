/**
 * `ffi/files.ts` on real files: what `fstat` reads, what {@link openOwnFile}
 * refuses (symlinks, FIFOs, other users' and shared-writable files, second
 * names), and the write lock a pidfile relies on.
 */

import assert from "node:assert/strict";
import { openOwnFile } from "../ffi/files.ts";
import {
  errno,
  F_OFD_SETLK,
  F_RDLCK,
  F_WRLCK,
  libc,
  LOCK_EX,
  LOCK_NB,
  O_CLOEXEC,
  SEEK_SET,
} from "../ffi/libc.ts";
import { cString, wholeFileLock } from "../ffi/structs.ts";
import { countOpenDescriptors } from "./helpers.ts";

async function withDirectory(body: (dir: string) => Promise<void> | void): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "one-socket-files-" });
  const before = countOpenDescriptors();
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  assert.equal(countOpenDescriptors(), before, "descriptors left open");
}

Deno.test("files: fstat reads what stat does (the struct stat layout of this machine)", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/file`;
    Deno.writeTextFileSync(path, "twelve bytes");
    Deno.chmodSync(path, 0o640);
    using file = openOwnFile(path, { access: "read-write" });
    const status = file.status();
    const expected = Deno.statSync(path);
    assert.equal(status.ino, BigInt(expected.ino!));
    assert.equal(status.dev, BigInt(expected.dev));
    assert.equal(status.mode, expected.mode);
    assert.equal(status.nlink, expected.nlink);
    assert.equal(status.uid, expected.uid);
    assert.equal(status.gid, expected.gid);
    assert.equal(status.size, 12);
  });
});

Deno.test("files: a missing file is created with the mode asked; an existing one is kept", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/log`;
    const encoder = new TextEncoder();
    {
      using file = openOwnFile(path, { access: "append", createMode: 0o640 });
      file.write(encoder.encode("one\n"));
    }
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o640 & ~Deno.umask());
    {
      using file = openOwnFile(path, { access: "append", createMode: 0o640 });
      file.write(encoder.encode("two\n"));
    }
    assert.equal(Deno.readTextFileSync(path), "one\ntwo\n");
    assert.throws(
      () => openOwnFile(`${dir}/absent`, { access: "append" }),
      { message: `open ${dir}/absent: ENOENT (no such file or directory)` },
    );
  });
});

Deno.test("files: symlinks, dangling or not, are never followed", async () => {
  await withDirectory((dir) => {
    const target = `${dir}/target`;
    Deno.writeTextFileSync(target, "keep\n");
    Deno.symlinkSync(target, `${dir}/link`);
    Deno.symlinkSync(`${dir}/nothing`, `${dir}/dangling`);
    for (const name of ["link", "dangling"]) {
      for (const access of ["append", "read-write"] as const) {
        assert.throws(
          () => openOwnFile(`${dir}/${name}`, { access, createMode: 0o600 }),
          { message: `open ${dir}/${name}: ELOOP (a symlink; refusing to follow it)` },
        );
      }
    }
    assert.equal(Deno.readTextFileSync(target), "keep\n");
    assert.ok(!Deno.lstatSync(`${dir}/dangling`).isFile, "nothing created through the link");
  });
});

Deno.test("files: a FIFO is refused without waiting for its other end", async () => {
  await withDirectory(async (dir) => {
    const fifo = `${dir}/fifo`;
    assert.ok((await new Deno.Command("mkfifo", { args: [fifo] }).output()).success);
    // Nobody reads it: opening to write cannot even start.
    assert.throws(
      () => openOwnFile(fifo, { access: "append", createMode: 0o600 }),
      { message: `open ${fifo}: ENXIO (a FIFO or device, not a regular file; refusing it)` },
    );
    // Read-write opens at once on Linux; fstat then tells what it is.
    assert.throws(
      () => openOwnFile(fifo, { access: "read-write" }),
      { message: `${fifo} is a FIFO, not a regular file; refusing it` },
    );
  });
});

Deno.test("files: files others may write, other users' files and second names are refused", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/file`;
    Deno.writeTextFileSync(path, "");
    for (const mode of [0o620, 0o602, 0o666]) {
      Deno.chmodSync(path, mode);
      assert.throws(
        () => openOwnFile(path, { access: "append" }),
        {
          message: `${path} may be written by its group or others (mode 0${
            mode.toString(8)
          }); refusing it`,
        },
      );
    }
    Deno.chmodSync(path, 0o644);
    openOwnFile(path, { access: "append" }).close();
    Deno.linkSync(path, `${dir}/second-name`);
    assert.throws(
      () => openOwnFile(path, { access: "append" }),
      { message: `${path} has 2 hard links, so it may be another file's second name; refusing it` },
    );
    Deno.removeSync(`${dir}/second-name`);
    if (Deno.uid() === 0) {
      Deno.chownSync(path, 65534, 65534);
      assert.throws(
        () => openOwnFile(path, { access: "read-write" }),
        {
          message: `${path} belongs to uid 65534, not to uid 0 (this process) or root; refusing it`,
        },
      );
    }
  });
});

Deno.test("files: an exclusive lock is one open's at a time, and follows the file, not the name", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/locked`;
    using first = openOwnFile(path, { access: "read-write", createMode: 0o644 });
    using second = openOwnFile(path, { access: "read-write" });
    assert.ok(first.tryLock());
    assert.ok(!second.tryLock());
    assert.ok(first.isAt(path));
    Deno.renameSync(path, `${dir}/moved`);
    assert.ok(!first.isAt(path));
    assert.ok(first.isAt(`${dir}/moved`));
    first.close();
    assert.ok(second.tryLock(), "closing releases the lock");
  });
});

/** A read-only descriptor of `path`, as anyone who may read the file can have. */
function openForReading(path: string): number {
  const fd = libc.open(cString(path), O_CLOEXEC);
  assert.ok(fd >= 0, `open ${path}: errno ${errno()}`);
  return fd;
}

Deno.test("files: the lock is a write lock: a flock or a reader cannot take it, a read lock blocks it", async () => {
  await withDirectory((dir) => {
    const path = `${dir}/locked`;
    using file = openOwnFile(path, { access: "read-write", createMode: 0o644 });
    let reader = openForReading(path);
    try {
      // What a reader may hold: a flock, the old way of saying "held", does not conflict.
      assert.equal(libc.flock(reader, LOCK_EX | LOCK_NB), 0);
      assert.ok(file.tryLock(), "another open's flock does not keep the write lock from us");
      file.close();
      // A write lock needs a descriptor open for writing: a reader cannot hold one.
      assert.equal(libc.fcntl_lock(reader, F_OFD_SETLK, wholeFileLock(F_WRLCK, SEEK_SET)), -1);
      assert.equal(errno(), 9, "EBADF");
      // A read lock it can hold, and that does keep a write lock from being taken; but it is
      // not a write lock, which is what says a broker holds the file.
      assert.equal(libc.fcntl_lock(reader, F_OFD_SETLK, wholeFileLock(F_RDLCK, SEEK_SET)), 0);
      using second = openOwnFile(path, { access: "read-write" });
      assert.ok(!second.tryLock());
      assert.ok(!second.writeLockedElsewhere());
      libc.close(reader);
      reader = -1;
      assert.ok(second.tryLock(), "the reader's close released its read lock");
      using third = openOwnFile(path, { access: "read-write" });
      assert.ok(!third.tryLock());
      assert.ok(third.writeLockedElsewhere());
    } finally {
      if (reader >= 0) libc.close(reader);
    }
  });
});
