/**
 * {@link ByteGlob}: a `*`/`?` glob matched against key bytes in time linear in
 * the key, with no backtracking.
 *
 * A RegExp made from a glob backtracks: `svc-*-*-*-*-api` against `svc-`
 * followed by a thousand dashes tries every way to place four stars, which
 * took the broker's event loop about 46 s for one 1024-byte key. Here the glob
 * is cut at its stars into segments (runs of literal bytes and `?`). The first
 * segment must sit at the start of the key and the last at its end; each
 * segment in between is searched for, left to right, starting where the
 * previous one ended. Taking the leftmost occurrence every time is never
 * wrong: it leaves the most room for the segments after it, so no choice is
 * ever revisited.
 *
 * The search is Shift-And (bit-parallel): each key byte updates one 32-bit
 * word per 32 bytes of the segment, and each key byte is read by at most one
 * segment's search. Deciding a key of `n` bytes therefore costs at most
 * `n × ⌈s / 32⌉` word steps plus the lengths of the first and last segments,
 * where `s` is the longest segment between two stars; with segments of up to
 * 32 bytes, the usual case, that is one step per key byte. The tables cost
 * 1 KiB per 32 bytes of each inner segment, built once when the policy is
 * loaded; matching allocates nothing.
 *
 * @module
 */

const STAR = 0x2a;
const QUESTION = 0x3f;
/** Stands for `?` in a segment: it matches any byte. */
const ANY = -1;
const WORD_BITS = 32;
const BYTE_VALUES = 256;

/** A segment between stars compiled for Shift-And search. */
class InnerSegment {
  readonly #words: number;
  /** For each byte value, `#words` masks: bit i set when position i accepts the byte. */
  readonly #masks: Uint32Array;
  /** Where the search keeps its state; reset on every search, so nothing is allocated per key. */
  readonly #state: Uint32Array;
  readonly #lastWord: number;
  readonly #lastBit: number;

  constructor(segment: readonly number[]) {
    this.#words = Math.ceil(segment.length / WORD_BITS);
    this.#masks = new Uint32Array(BYTE_VALUES * this.#words);
    this.#state = new Uint32Array(this.#words);
    segment.forEach((byte, position) => {
      const word = position >>> 5;
      const bit = 1 << (position & 31);
      if (byte === ANY) {
        for (let value = 0; value < BYTE_VALUES; value++) {
          this.#masks[value * this.#words + word] |= bit;
        }
      } else {
        this.#masks[byte * this.#words + word] |= bit;
      }
    });
    this.#lastWord = (segment.length - 1) >>> 5;
    this.#lastBit = 1 << ((segment.length - 1) & 31);
  }

  /**
   * The end of the leftmost occurrence in `key[from, to)`, or -1 when there
   * is none.
   */
  findEnd(key: Uint8Array, from: number, to: number): number {
    return this.#words === 1 ? this.#findEndInOneWord(key, from, to) : this.#findEnd(key, from, to);
  }

  // The usual segment (up to 32 bytes) keeps its state in a local: several times faster.
  #findEndInOneWord(key: Uint8Array, from: number, to: number): number {
    const masks = this.#masks;
    const lastBit = this.#lastBit;
    let state = 0;
    for (let index = from; index < to; index++) {
      // Shift in a 1 (a match may start here), keep the positions that accept this byte.
      state = ((state << 1) | 1) & masks[key[index]];
      if ((state & lastBit) !== 0) return index + 1;
    }
    return -1;
  }

  #findEnd(key: Uint8Array, from: number, to: number): number {
    const words = this.#words;
    const state = this.#state;
    const masks = this.#masks;
    const lastWord = this.#lastWord;
    const lastBit = this.#lastBit;
    state.fill(0);
    for (let index = from; index < to; index++) {
      const row = key[index] * words;
      // The same as above, the shift carried from word to word.
      let carry = 1;
      for (let word = 0; word < words; word++) {
        const previous = state[word];
        state[word] = ((previous << 1) | carry) & masks[row + word];
        carry = previous >>> 31;
      }
      if ((state[lastWord] & lastBit) !== 0) return index + 1;
    }
    return -1;
  }
}

function matchesAt(key: Uint8Array, at: number, segment: readonly number[]): boolean {
  for (let position = 0; position < segment.length; position++) {
    const byte = segment[position];
    if (byte !== ANY && key[at + position] !== byte) return false;
  }
  return true;
}

/**
 * A glob over bytes: `*` matches any run of bytes (also none), `?` exactly
 * one byte, every other byte itself. The pattern is text, compared as its
 * UTF-8 bytes, so `?` stands for one byte, not one character.
 *
 * @example
 * ```ts
 * import { ByteGlob } from "./glob.ts";
 * import assert from "node:assert/strict";
 *
 * const glob = new ByteGlob("svc-*-api");
 * assert.equal(glob.matches(new TextEncoder().encode("svc-users-api")), true);
 * assert.equal(glob.matches(new TextEncoder().encode("svc-users-ui")), false);
 * ```
 */
export class ByteGlob {
  /** The pattern as given. */
  readonly pattern: string;
  /** Without a star: the whole key. With stars: what the key must start with. */
  readonly #first: readonly number[];
  /** With stars: what the key must end with; undefined without a star. */
  readonly #last?: readonly number[];
  readonly #inner: readonly InnerSegment[];
  /** The fewest bytes a matching key has: every segment's length. */
  readonly #minimumLength: number;

  /**
   * Compiles `pattern`.
   *
   * @param pattern the glob, as text
   */
  constructor(pattern: string) {
    this.pattern = pattern;
    const segments: number[][] = [[]];
    for (const byte of new TextEncoder().encode(pattern)) {
      if (byte === STAR) segments.push([]);
      else segments.at(-1)!.push(byte === QUESTION ? ANY : byte);
    }
    this.#first = segments[0];
    if (segments.length > 1) this.#last = segments.at(-1);
    // An empty segment between stars (from `**`) matches anywhere: it needs no search.
    this.#inner = segments.slice(1, -1).filter((segment) => segment.length > 0).map((segment) =>
      new InnerSegment(segment)
    );
    this.#minimumLength = segments.reduce((sum, segment) => sum + segment.length, 0);
  }

  /**
   * Whether `key` matches, in at most `key.length × ⌈s / 32⌉` steps (`s`: the
   * longest segment between two stars) plus the pattern's length.
   *
   * @param key the key's bytes
   * @returns true when the whole key matches the glob
   */
  matches(key: Uint8Array): boolean {
    const first = this.#first;
    const last = this.#last;
    if (last === undefined) return key.length === first.length && matchesAt(key, 0, first);
    if (key.length < this.#minimumLength) return false;
    // The anchored ends first: they are cheap and rule out most keys.
    const end = key.length - last.length;
    if (!matchesAt(key, 0, first) || !matchesAt(key, end, last)) return false;
    let from = first.length;
    for (const segment of this.#inner) {
      from = segment.findEnd(key, from, end);
      if (from < 0) return false;
    }
    return true;
  }
}
