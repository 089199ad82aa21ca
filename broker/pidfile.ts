/**
 * {@link PidFile}: the broker's pid in a file, for init scripts and
 * `kill $(cat …)`, and a lock against a second broker with the same pidfile.
 *
 * @module
 */

import { basename, dirname } from "node:path";
import { getLogger } from "@logtape/logtape";
import { fileError } from "../ffi/errors.ts";
import { processExists } from "../ffi/process.ts";

const logger = getLogger(["one-socket", "broker"]);

/** The pid a pidfile names; undefined when the file is gone. Refuses anything else. */
function readPid(path: string): number | undefined {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw fileError(error, "open", path);
  }
  const content = text.trim();
  // Whatever else sits at the path was not written by us: never replace it.
  if (!/^[1-9]\d*$/.test(content)) {
    throw new Error(`${path} exists and does not hold a pid; refusing to replace it`);
  }
  return Number(content);
}

/** Removes `path`; a file that is already gone is no error. */
function removeFile(path: string): void {
  try {
    Deno.removeSync(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw fileError(error, "unlink", path);
  }
}

/** A pidfile this process holds, removed by {@link remove} or `using`. */
export class PidFile implements Disposable {
  /** Where it is. */
  readonly path: string;
  /** The pid it holds. */
  readonly pid: number;

  private constructor(path: string, pid: number) {
    this.path = path;
    this.pid = pid;
  }

  /**
   * Writes `pid` to `path`, complete or not at all: the content goes to a
   * temporary file beside it, which is then linked into place (refused if
   * the path exists) or, over a stale pidfile, renamed into place. A pidfile
   * naming a live process other than `pid` is left alone, and this throws.
   */
  static create(path: string, pid: number = Deno.pid): PidFile {
    const temporary = `${dirname(path)}/.${basename(path)}.${pid}.tmp`;
    try {
      Deno.writeTextFileSync(temporary, `${pid}\n`, { mode: 0o644 });
    } catch (error) {
      throw fileError(error, "open", temporary);
    }
    try {
      try {
        Deno.linkSync(temporary, path);
        return new PidFile(path, pid);
      } catch (error) {
        if (!(error instanceof Deno.errors.AlreadyExists)) throw fileError(error, "link", path);
      }
      const holder = readPid(path);
      // Our own pid in it is a leftover too: a restarted container reuses pids.
      if (holder !== undefined && holder !== pid && processExists(holder)) {
        throw new Error(`pidfile ${path} is held by process ${holder}, which is running`);
      }
      if (holder !== undefined) {
        logger.info("replacing stale pidfile {path} (process {holder} is gone)", { path, holder });
      }
      try {
        Deno.renameSync(temporary, path);
      } catch (error) {
        throw fileError(error, "rename", path);
      }
      return new PidFile(path, pid);
    } finally {
      removeFile(temporary);
    }
  }

  /** Removes the pidfile, unless it now names another process (a successor took it over). */
  remove(): void {
    try {
      if (readPid(this.path) === this.pid) removeFile(this.path);
    } catch (error) {
      logger.warn("could not remove pidfile {path}: {error}", {
        path: this.path,
        error: error instanceof Error ? error.message : String(error),
      });
    }
  }

  /** Same as {@link remove}. */
  [Symbol.dispose](): void {
    this.remove();
  }
}
