import assert from "node:assert/strict";
import type { Mode } from "../client/protocol.ts";
import { AccessPolicy, PolicyError } from "../broker/policy.ts";

const encoder = new TextEncoder();

function ask(policy: AccessPolicy, key: string | Uint8Array, mode: Mode, uid: number, gid = uid) {
  const bytes = typeof key === "string" ? encoder.encode(key) : key;
  return policy.decide({ key: bytes, mode, peer: { pid: 1, uid, gid } });
}

const toml = `
[[rules]]
action = "deny"
prefix = "vhost-"
uids = [666]

[[rules]]
action = "allow"
prefix = "vhost-"
modes = ["server"]
uids = [0]

[[rules]]
action = "allow"
glob = "vhost-*"
modes = ["client"]
gids = [107]
cross_uid = true

[[rules]]
action = "allow"
key = "ключ"
`;

const json = JSON.stringify({
  rules: [
    { action: "deny", prefix: "vhost-", uids: [666] },
    { action: "allow", prefix: "vhost-", modes: ["server"], uids: [0] },
    { action: "allow", glob: "vhost-*", modes: ["client"], gids: [107], cross_uid: true },
    { action: "allow", key: "ключ" },
  ],
});

for (const [format, text] of [["toml", toml], ["json", json]] as const) {
  const policy = AccessPolicy.parse(text, format, `policy.${format}`);

  Deno.test(`${format} policy: first matching rule decides, default deny`, () => {
    assert.equal(policy.size, 4);
    assert.deepEqual(ask(policy, "vhost-1", "server", 0), {
      allowed: true,
      rule: `policy.${format} rule 2 (allow prefix "vhost-")`,
      crossUid: false,
    });
    assert.equal(ask(policy, "vhost-1", "client", 0).allowed, false, "root is not in gid 107");
    assert.deepEqual(ask(policy, "vhost-1", "client", 1000, 107), {
      allowed: true,
      rule: `policy.${format} rule 3 (allow glob "vhost-*")`,
      crossUid: true,
    });
    const denied = ask(policy, "vhost-1", "server", 666);
    assert.equal(denied.allowed, false);
    assert.match(denied.rule, /rule 1 \(deny prefix "vhost-"\)/);
    assert.deepEqual(ask(policy, "other", "none", 0), {
      allowed: false,
      rule: `policy.${format} default (no rule matched)`,
    });
  });

  Deno.test(`${format} policy: keys are bytes, patterns are UTF-8, exact means exact`, () => {
    assert.equal(ask(policy, "ключ", "none", 42).allowed, true, "rule without principals: anyone");
    assert.equal(ask(policy, "ключ!", "none", 42).allowed, false);
    assert.equal(ask(policy, encoder.encode("ключ").subarray(0, 3), "none", 42).allowed, false);
    assert.equal(
      ask(policy, new Uint8Array([0x76, 0x68, 0x6f, 0x73, 0x74, 0x2d, 0, 0xff]), "server", 0)
        .allowed,
      true,
    );
  });
}

Deno.test("glob: * spans any bytes, ? exactly one, the rest is literal", () => {
  const policy = AccessPolicy.parse(
    JSON.stringify({ rules: [{ action: "allow", glob: "a?c.*[x]" }] }),
    "json",
    "glob",
  );
  assert.equal(ask(policy, "abc.anything/at all[x]", "none", 1).allowed, true);
  assert.equal(ask(policy, "abc.\n[x]", "none", 1).allowed, true);
  assert.equal(ask(policy, "ac.[x]", "none", 1).allowed, false);
  assert.equal(ask(policy, "abcd[x]", "none", 1).allowed, false, "the dot is literal");
});

Deno.test("a broken policy names the file and the rule", () => {
  const cases: [string, RegExp][] = [
    [
      '{"rules": [{"action": "allow", "key": "a", "prefix": "b"}]}',
      /p rule 1: give exactly one of key, prefix or glob/,
    ],
    ['{"rules": [{"action": "permit", "key": "a"}]}', /p rule 1: action must be "allow" or "deny"/],
    [
      '{"rules": [{"action": "allow", "key": "a"}, {"action": "allow", "key": "b", "user": 1}]}',
      /p rule 2: unknown field "user"/,
    ],
    ['{"rules": [{"action": "allow", "key": "a", "modes": ["both"]}]}', /p rule 1: modes must be/],
    [
      '{"rules": [{"action": "allow", "key": "a", "uids": ["root"]}]}',
      /p rule 1: uids must be a list of numeric ids/,
    ],
    // Values JSON would coerce to root (0) or 1 are refused, not converted.
    ['{"rules": [{"action": "allow", "key": "a", "uids": [null]}]}', /p rule 1: uids must be/],
    ['{"rules": [{"action": "allow", "key": "a", "uids": [""]}]}', /p rule 1: uids must be/],
    ['{"rules": [{"action": "allow", "key": "a", "gids": [true]}]}', /p rule 1: gids must be/],
    ['{"rules": [{"action": "allow", "key": "a", "uids": [-1]}]}', /p rule 1: uids must be/],
    [
      '{"rules": [{"action": "allow", "key": "a", "cross_uid": "yes"}]}',
      /p rule 1: cross_uid must be true or false/,
    ],
    ['{"rule": []}', /p: expected a list named "rules"/],
    ["{not json", /p: not valid JSON/],
  ];
  for (const [text, message] of cases) {
    assert.throws(() => AccessPolicy.parse(text, "json", "p"), (error: unknown) => {
      assert.ok(error instanceof PolicyError);
      assert.match(error.message, message);
      return true;
    });
  }
  assert.throws(
    () => AccessPolicy.parse("[[rules]\naction=", "toml", "p.toml"),
    /p.toml: not valid TOML/,
  );
});

Deno.test("load picks TOML or JSON by the file name and reports a missing file", async () => {
  const directory = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${directory}/p.toml`, toml);
    await Deno.writeTextFile(`${directory}/p.json`, json);
    assert.equal((await AccessPolicy.load(`${directory}/p.toml`)).size, 4);
    assert.equal((await AccessPolicy.load(`${directory}/p.json`)).size, 4);
    await assert.rejects(AccessPolicy.load(`${directory}/missing.json`), /policy .*missing.json: /);
  } finally {
    await Deno.remove(directory, { recursive: true });
  }
});
