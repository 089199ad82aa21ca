/** `--socket-mode` and `--socket-group` parsing, and their application to a socket file. */

import assert from "node:assert/strict";
import {
  applySocketAccess,
  findGroupId,
  parseSocketMode,
  resolveGroup,
} from "../broker/socket_access.ts";
import { UsageError } from "../client/command_line.ts";
import { listenUnix } from "../ffi/socket.ts";

Deno.test("socket access: modes are octal permission bits", () => {
  assert.equal(parseSocketMode("0660"), 0o660);
  assert.equal(parseSocketMode("660"), 0o660);
  assert.equal(parseSocketMode("0600"), 0o600);
  for (const bad of ["", "66", "0690", "rw-rw----", "06600", "u+rw"]) {
    assert.throws(() => parseSocketMode(bad), UsageError, bad);
  }
});

Deno.test("socket access: group names come from /etc/group, numbers are gids", () => {
  const groupFile = "root:x:0:\nwheel:x:10:alice,bob\none-socket:x:998:carol\n\nbroken-line\n";
  assert.equal(findGroupId(groupFile, "root"), 0);
  assert.equal(findGroupId(groupFile, "one-socket"), 998);
  assert.equal(findGroupId(groupFile, "one"), undefined);
  assert.equal(findGroupId(groupFile, "broken-line"), undefined);
  assert.equal(resolveGroup("4242"), 4242);
  assert.equal(resolveGroup("root"), 0);
  assert.throws(
    () => resolveGroup("no-such-group-here"),
    /--socket-group no-such-group-here: no such group in \/etc\/group/,
  );
});

Deno.test("socket access: applied to a socket file; an abstract socket has none", async () => {
  const dir = await Deno.makeTempDir({ prefix: "one-socket-access-" });
  try {
    const path = `${dir}/broker.socket`;
    using _listener = listenUnix(path, 1);
    applySocketAccess(path, { mode: 0o600, gid: Deno.gid() ?? 0 });
    const info = Deno.statSync(path);
    assert.equal(info.mode! & 0o777, 0o600);
    assert.equal(info.gid, Deno.gid());
    applySocketAccess("@abstract", {});
    assert.throws(
      () => applySocketAccess("@abstract", { mode: 0o660 }),
      /need a socket file; @abstract is abstract/,
    );
    assert.throws(
      () => applySocketAccess(`${dir}/gone.socket`, { mode: 0o660 }),
      { message: `chmod ${dir}/gone.socket: ENOENT (no such file or directory)` },
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
