/**
 * {@link LogLimit}: a budget of log lines per cause, so that a flood of bad
 * clients cannot fill the disk or spend the broker's time on writing about
 * them. What was held back is counted and said in one line per cause.
 *
 * @module
 */

interface Budget {
  /** `performance.now()` when the current window opened. */
  windowStart: number;
  /** Lines written in the current window. */
  written: number;
  /** Lines held back since the last summary. */
  dropped: number;
}

/** Says how many lines of one cause were held back, once the window has ended. */
export type DroppedReport = (cause: string, dropped: number, seconds: number) => void;

/**
 * At most `burst` lines per cause in any window of `windowMs`; the rest are
 * counted, and {@link LogLimit.report} says how many once the window ends.
 * Causes are a small fixed vocabulary (a reason, a protocol field), never a
 * client's id or key, so the table stays small whatever clients do.
 *
 * @example
 * ```ts
 * import { LogLimit } from "./log_limit.ts";
 * import assert from "node:assert/strict";
 *
 * const limit = new LogLimit(2, 1000);
 * assert.deepEqual([0, 1, 2, 3].map(() => limit.allow("protocol:magic", 0)), [true, true, false, false]);
 * const said: string[] = [];
 * limit.report(1500, (cause, dropped) => said.push(`${cause}: ${dropped}`));
 * assert.deepEqual(said, ["protocol:magic: 2"]);
 * ```
 */
export class LogLimit {
  readonly #burst: number;
  readonly #windowMs: number;
  readonly #budgets = new Map<string, Budget>();

  /**
   * @param burst lines per cause allowed in one window
   * @param windowMs the window's length in milliseconds
   */
  constructor(burst = 20, windowMs = 10_000) {
    this.#burst = burst;
    this.#windowMs = windowMs;
  }

  /** Whether a line of `cause` may be written at `now` (`performance.now()`); counts it if not. */
  allow(cause: string, now: number): boolean {
    let budget = this.#budgets.get(cause);
    if (budget === undefined) {
      budget = { windowStart: now, written: 0, dropped: 0 };
      this.#budgets.set(cause, budget);
    } else if (now - budget.windowStart >= this.#windowMs) {
      budget.windowStart = now;
      budget.written = 0;
    }
    if (budget.written < this.#burst) {
      budget.written++;
      return true;
    }
    budget.dropped++;
    return false;
  }

  /**
   * Calls `say` for every cause whose window has ended with lines held back,
   * and forgets them; with `all` (at shutdown), for every cause, its window
   * ended or not.
   */
  report(now: number, say: DroppedReport, all = false): void {
    for (const [cause, budget] of this.#budgets) {
      if (!all && now - budget.windowStart < this.#windowMs) continue;
      if (budget.dropped > 0) {
        say(cause, budget.dropped, Math.round((now - budget.windowStart) / 1000));
      }
      this.#budgets.delete(cause);
    }
  }
}
