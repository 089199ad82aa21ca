/** `--socket-mode` and `--socket-group` parsing, and the socket file they make. */

import assert from "node:assert/strict";
import {
  checkSocketAccess,
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

Deno.test("socket access: the socket file gets exactly the mode and group asked, whatever the umask", async () => {
  const dir = await Deno.makeTempDir({ prefix: "one-socket-access-" });
  // Narrower than any mode asked below: the broker must widen what bind made, before listening.
  const umask = Deno.umask(0o077);
  try {
    const gid = Deno.uid() === 0 ? 4242 : Deno.gid()!;
    const cases = [
      { access: { mode: 0o660 }, mode: 0o660, gid: Deno.gid() },
      { access: { mode: 0o660, gid }, mode: 0o660, gid },
      { access: { gid }, mode: 0o700, gid },
      { access: {}, mode: 0o700, gid: Deno.gid() },
    ];
    for (const [index, expected] of cases.entries()) {
      const path = `${dir}/${index}.socket`;
      using _listener = listenUnix(path, 1, expected.access);
      const info = Deno.statSync(path);
      const what = JSON.stringify(expected.access);
      assert.equal((info.mode! & 0o777).toString(8), expected.mode.toString(8), `mode for ${what}`);
      assert.equal(info.gid, expected.gid, `group for ${what}`);
    }
  } finally {
    Deno.umask(umask);
    await Deno.remove(dir, { recursive: true });
  }
  assert.equal(Deno.umask(), umask, "the umask is restored");
});

Deno.test("socket access: an abstract socket has no file to apply it to", () => {
  checkSocketAccess("@abstract", {});
  checkSocketAccess("/run/one.socket", { mode: 0o660 });
  assert.throws(
    () => checkSocketAccess("@abstract", { mode: 0o660 }),
    /need a socket file; @abstract is abstract/,
  );
});
