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

/**
 * Times `batch` decisions of `key` against `rules` for keys of 16, 32, … up to
 * 1024 bytes, and fails as soon as the fastest of three batches takes
 * `limitMs` or more (the fastest, so that a busy machine does not fail it; a
 * matcher that backtracks is slow every time). A backtracking matcher blows up
 * already at 32 or 64 bytes, so the test fails in seconds instead of hanging
 * for the minutes the full key would take.
 */
function assertFast(
  rules: unknown[],
  key: (length: number) => string,
  { batch, limitMs }: { batch: number; limitMs: number },
) {
  const policy = AccessPolicy.parse(JSON.stringify({ rules }), "json", "timing");
  for (let length = 16; length <= 1024; length *= 2) {
    const bytes = encoder.encode(key(length));
    assert.equal(bytes.length, length);
    const times = [0, 1, 2].map(() => {
      const start = performance.now();
      for (let round = 0; round < batch; round++) {
        assert.equal(ask(policy, bytes, "server", 1000).allowed, false);
      }
      return performance.now() - start;
    });
    const fastest = Math.min(...times);
    assert.ok(
      fastest < limitMs,
      `${rules.length} rules, key of ${length} bytes: ${batch} decisions took ${
        fastest.toFixed(1)
      } ms at best (limit ${limitMs} ms)`,
    );
  }
}

Deno.test("glob matching does not backtrack: hostile keys of 1024 bytes take microseconds", () => {
  const hostile: [string, (length: number) => string][] = [
    // The reproduction from issue 8: the old RegExp took about 46 s for the 1024-byte key.
    ["svc-*-*-*-*-api", (length) => `svc-${"-".repeat(length - 5)}x`],
    ["*a*a*a*a*a*b", (length) => "a".repeat(length)],
    ["*?*?*?*?*?*x", (length) => "a".repeat(length)],
    // The ends match, so the inner segments are searched over the whole key.
    ["a*a*a*a*a*b*a", (length) => "a".repeat(length)],
  ];
  for (const [glob, key] of hostile) {
    assertFast([{ action: "allow", glob }], key, { batch: 100, limitMs: 5 });
  }
  // The most a single rule can cost: a segment of 1001 bytes (32 words of state) searched across
  // the whole key, 32 768 word steps.
  const longest = `*${"a?".repeat(500)}b*`;
  assertFast([{ action: "allow", glob: longest }], (length) => "a".repeat(length), {
    batch: 10,
    limitMs: 5,
  });
});

Deno.test("1000 glob rules that each scan the whole key: a 1024-byte key is decided in milliseconds", () => {
  // No rule matches, and none is ruled out by its ends: each one scans the whole key.
  const rules = Array.from({ length: 1000 }, (_, index) => ({
    action: "allow",
    glob: `*-*-*-*-${index}*`,
  }));
  assertFast(rules, (length) => `svc-${"-".repeat(length - 5)}x`, { batch: 5, limitMs: 250 });
});
