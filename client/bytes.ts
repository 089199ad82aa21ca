/**
 * Little-endian integers in and out of byte arrays, shared by the protocol
 * codecs: plain byte arithmetic rather than a DataView, so that nothing is
 * allocated per message and a frame may be any view into a larger buffer.
 *
 * @module
 */

/** The unsigned 32-bit integer at `offset`. */
export function u32(frame: Uint8Array, offset: number): number {
  return (frame[offset] | (frame[offset + 1] << 8) | (frame[offset + 2] << 16) |
    (frame[offset + 3] << 24)) >>> 0;
}

/** The unsigned 16-bit integer at `offset`. */
export function u16(frame: Uint8Array, offset: number): number {
  return frame[offset] | (frame[offset + 1] << 8);
}

/** Writes `value` as 32 bits at `offset`. */
export function putU32(frame: Uint8Array, offset: number, value: number): void {
  frame[offset] = value;
  frame[offset + 1] = value >>> 8;
  frame[offset + 2] = value >>> 16;
  frame[offset + 3] = value >>> 24;
}

/** Writes `value` as 16 bits at `offset`. */
export function putU16(frame: Uint8Array, offset: number, value: number): void {
  frame[offset] = value;
  frame[offset + 1] = value >>> 8;
}
