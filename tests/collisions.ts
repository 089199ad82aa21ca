/**
 * Keys crafted against the unkeyed FNV-1a hash the matcher once bucketed by:
 * what an attacker computes in a second to fill one bucket.
 *
 * @module
 */

/** The unkeyed 32-bit FNV-1a state the matcher used to bucket keys by (its low 30 bits). */
export function fnv1a(key: Uint8Array): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) hash = Math.imul(hash ^ key[i], 0x01000193);
  return hash >>> 0;
}

/**
 * The attack on an unkeyed hash: 2^rounds distinct keys with one FNV-1a state.
 * Each round finds two 8-byte blocks that take the state reached so far to
 * the same state (a birthday search); any choice of block per round then
 * gives the same hash (Joux's multicollisions).
 */
export function fnvMulticollision(rounds: number): Uint8Array[] {
  let state = 0x811c9dc5;
  const blocks: [Uint8Array, Uint8Array][] = [];
  const step = (from: number, block: Uint8Array) => {
    let hash = from;
    for (const byte of block) hash = Math.imul(hash ^ byte, 0x01000193);
    return hash >>> 0;
  };
  let counter = 0;
  for (let round = 0; round < rounds; round++) {
    const seen = new Map<number, Uint8Array>();
    for (;;) {
      const block = new Uint8Array(new Uint32Array([counter, ~counter++]).buffer);
      const next = step(state, block);
      const earlier = seen.get(next);
      if (earlier !== undefined) {
        blocks.push([earlier, block]);
        state = next;
        break;
      }
      seen.set(next, block);
    }
  }
  const keys: Uint8Array[] = [];
  for (let choice = 0; choice < 2 ** rounds; choice++) {
    const key = new Uint8Array(8 * rounds);
    blocks.forEach((pair, round) => key.set(pair[(choice >> round) & 1], 8 * round));
    keys.push(key);
  }
  return keys;
}
