import assert from "node:assert/strict";
import { guardFallbackDirectory } from "../client/socket_path.ts";

const uid = Deno.uid()!;
const directory = `/tmp/one-socket-${uid}`;
const path = `${directory}/one.socket`;

async function withoutFallbackDirectory(body: () => Promise<void>): Promise<void> {
  await Deno.remove(directory, { recursive: true }).catch(() => {});
  try {
    await body();
  } finally {
    await Deno.remove(directory, { recursive: true }).catch(() => {});
  }
}

Deno.test("the /tmp fallback directory is created private, and refused once others may use it", () =>
  withoutFallbackDirectory(async () => {
    guardFallbackDirectory(path, false); // missing: connecting will report ENOENT
    guardFallbackDirectory(path, true);
    const info = await Deno.lstat(directory);
    assert.ok(info.isDirectory);
    assert.equal(info.uid, uid);
    assert.equal(info.mode! & 0o777, 0o700);
    guardFallbackDirectory(path, false);

    await Deno.chmod(directory, 0o733);
    for (const create of [true, false]) {
      assert.throws(
        () => guardFallbackDirectory(path, create),
        new RegExp(
          `${directory} must be a directory of uid ${uid} that nobody else may use.*mode 733`,
        ),
      );
    }
  }));

Deno.test("a symlink in place of the /tmp fallback directory is refused", () =>
  withoutFallbackDirectory(async () => {
    const elsewhere = await Deno.makeTempDir();
    try {
      await Deno.chmod(elsewhere, 0o700);
      await Deno.symlink(elsewhere, directory);
      assert.throws(() => guardFallbackDirectory(path, true), /not a directory/);
    } finally {
      await Deno.remove(elsewhere, { recursive: true });
    }
  }));

Deno.test("paths outside the /tmp fallback are left alone: nothing is created or checked", () =>
  withoutFallbackDirectory(async () => {
    for (const other of ["/run/one.socket", `/tmp/one-socket-${uid}.socket`, "@abstract"]) {
      guardFallbackDirectory(other, true);
    }
    await assert.rejects(Deno.lstat(directory), Deno.errors.NotFound);
  }));
