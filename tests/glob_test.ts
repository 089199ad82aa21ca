import assert from "node:assert/strict";
import { ByteGlob } from "../broker/glob.ts";

const encoder = new TextEncoder();
const bytes = (text: string) => encoder.encode(text);

/**
 * The policy's glob semantics as they were defined before ByteGlob: a RegExp
 * over one character per byte (too slow for the broker, fine as a reference
 * on short keys).
 */
function referenceMatches(pattern: string, key: Uint8Array): boolean {
  const latin1 = (data: Uint8Array) => String.fromCharCode(...data);
  let source = "";
  for (const char of latin1(encoder.encode(pattern))) {
    if (char === "*") source += "[^]*";
    else if (char === "?") source += "[^]";
    else source += char.replace(/[\\^$.|+()[\]{}]/g, "\\$&");
  }
  return new RegExp(`^${source}$`).test(latin1(key));
}

// A small seeded generator (xorshift32): a failure names a seed that reproduces it.
function random(seed: number): () => number {
  let state = seed || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 2 ** 32;
  };
}

Deno.test("glob matches exactly as the old RegExp did, on random patterns and keys", () => {
  // Mostly "a", "b", "*" and "?", so that keys often match and segments often overlap; the rest
  // are bytes >= 0x80 ("é" is c3 a9, "ÿ" is c3 bf), NUL and RegExp metacharacters.
  const patternSymbols = [..."aaabb***??", "é", "ÿ", "\\", "[", ".", "\0"];
  const keyBytes = [...encoder.encode("aaabb*\\[."), 0xc3, 0xa9, 0xbf, 0x00, 0xff, 0x80];
  const next = random(0x9e3779b9);
  const pick = <T>(items: readonly T[]) => items[Math.floor(next() * items.length)];
  let matched = 0;
  for (let round = 0; round < 20_000; round++) {
    const pattern = Array.from({ length: Math.floor(next() * 9) }, () => pick(patternSymbols))
      .join("");
    const glob = new ByteGlob(pattern);
    // Half the keys are drawn from the pattern itself (stars and ? replaced), so that many match.
    const key = next() < 0.5
      ? new Uint8Array(Array.from({ length: Math.floor(next() * 12) }, () => pick(keyBytes)))
      : bytes(
        pattern.replace(/\*/g, () => "ab-é".slice(0, Math.floor(next() * 5))).replace(
          /\?/g,
          () => pick(["a", "\xff", "é"]),
        ),
      );
    const expected = referenceMatches(pattern, key);
    if (expected) matched++;
    assert.equal(glob.matches(key), expected, `${JSON.stringify(pattern)} vs [${key}]`);
  }
  assert.ok(matched > 4000, `only ${matched} of the random keys matched: the test is too weak`);
});

Deno.test("glob: * alone, **, ? as one byte, empty segments, literal metacharacters", () => {
  const cases: [string, string | Uint8Array, boolean][] = [
    ["*", new Uint8Array([0]), true],
    ["*", new Uint8Array(Array.from({ length: 1024 }, (_, i) => i % 256)), true],
    ["**", "x", true],
    ["a**b", "ab", true],
    ["a*", "a", true],
    ["*a", "ba", true],
    ["*a", "ab", false],
    ["a*b*a", "aba", true],
    // The first and the last segment may not overlap.
    ["a*b*a", "ab", false],
    ["?", "é", false],
    ["??", "é", true],
    ["?*?", "é", true],
    ["é*", new Uint8Array([0xc3, 0xa9, 0xff]), true],
    // U+00FF in a pattern is the bytes c3 bf, not ff.
    ["*\xff", new Uint8Array([0xc3, 0xbf]), true],
    ["*\xff", new Uint8Array([0xff]), false],
    ["a.c", "abc", false],
    ["[ab]", "a", false],
    ["[ab]", "[ab]", true],
    ["", "", true],
    ["", "x", false],
    ["*-api", "svc--api", true],
    ["x*?*?*y", "x12y", true],
    ["x*?*?*y", "x1y", false],
  ];
  for (const [pattern, key, expected] of cases) {
    const keyData = typeof key === "string" ? bytes(key) : key;
    assert.equal(new ByteGlob(pattern).matches(keyData), expected, `${pattern} vs [${keyData}]`);
    assert.equal(referenceMatches(pattern, keyData), expected, `reference: ${pattern}`);
  }
});

Deno.test("glob: segments longer than 32 bytes (several words of state) match and miss", () => {
  for (const length of [31, 32, 33, 64, 65, 100]) {
    const segment = Array.from({ length }, (_, i) => (i % 7 === 3 ? "?" : "ab"[i % 2])).join("");
    const glob = new ByteGlob(`x*${segment}*y`);
    const occurrence = segment.replace(/\?/g, "c");
    // Noise that starts the segment everywhere but never finishes it.
    const noise = "a".repeat(2 * length);
    const found = bytes(`x${noise}${occurrence}${noise}y`);
    // Position 1 is a literal "b": with a "z" there the segment occurs nowhere.
    const broken = bytes(`x${noise}az${occurrence.slice(2)}${noise}y`);
    assert.equal(glob.matches(found), true, `length ${length}`);
    assert.equal(glob.matches(broken), false, `length ${length}`);
    assert.equal(referenceMatches(glob.pattern, found), true);
    assert.equal(referenceMatches(glob.pattern, broken), false);
  }
});
