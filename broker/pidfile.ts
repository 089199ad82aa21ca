/**
 * {@link PidFile}: the broker's pid in a file, for init scripts and
 * `kill $(cat …)`, and a lock against a second broker with the same pidfile.
 *
 * The lock, not the pid in the file, says whether a broker runs: the file
 * stays open and `flock`ed for the broker's life, and the kernel releases the
 * lock however the process ends, `kill -9` included. A pid alone cannot say
 * it: a killed broker answers `kill(pid, 0)` until its parent reaps it, and
 * its pid may later belong to anything.
 *
 * The pid is written in place (truncate, then write) rather than through a
 * temporary file renamed over it: a temporary name is one more file another
 * user could plant a symlink at, and the lock already says whether the
 * content is current. A reader may see the file empty for the instant
 * between the two calls of a starting broker.
 *
 * @module
 */

import { getLogger } from "@logtape/logtape";
import { openOwnFile, type OwnFile } from "../ffi/files.ts";
import { unlinkPath } from "../ffi/socket.ts";

const logger = getLogger(["one-socket", "broker"]);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Readable by all, as pidfiles are: init scripts read them as other users. */
const PIDFILE_MODE = 0o644;
/**
 * How long a held lock is retried. A broker killed with SIGKILL holds it
 * until the kernel has torn the process down, a matter of milliseconds.
 */
const LOCK_WAIT_MS = 1000;
const LOCK_RETRY_MS = 20;
/** More than any pid takes ("4194304\n"), so that a longer file is not a pidfile. */
const PID_TEXT_LIMIT = 16;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The pid `file` names: undefined when it is empty (a broker was stopped
 * between emptying and writing it). Throws for anything else: whatever
 * else is at the path was not written by us and must not be replaced.
 */
function readPid(file: OwnFile): number | undefined {
  const content = decoder.decode(file.readStart(PID_TEXT_LIMIT + 1));
  if (content === "") return undefined;
  if (content.length > PID_TEXT_LIMIT || !/^[1-9]\d*\n?$/.test(content)) {
    throw new Error(`${file.path} exists and does not hold a pid; refusing to replace it`);
  }
  return Number(content);
}

/**
 * The pidfile at `path`, open and locked by us; undefined while another
 * process holds the lock. `holder` learns the pid in a held file.
 */
function lockPidfile(path: string, holder: { pid?: number }): OwnFile | undefined {
  const file = openOwnFile(path, { access: "read-write", createMode: PIDFILE_MODE });
  try {
    if (!file.tryLock()) {
      holder.pid = readPid(file);
      file.close();
      return undefined;
    }
    // Its broker may have removed the file between our open and our lock:
    // a lock on a file no longer at the path locks nothing. Start again.
    if (!file.isAt(path)) {
      file.close();
      return lockPidfile(path, holder);
    }
    return file;
  } catch (error) {
    file.close();
    throw error;
  }
}

/** A pidfile this process holds, removed by {@link remove} or `using`. */
export class PidFile implements Disposable {
  /** Where it is. */
  readonly path: string;
  /** The pid it holds. */
  readonly pid: number;
  readonly #file: OwnFile;

  private constructor(path: string, pid: number, file: OwnFile) {
    this.path = path;
    this.pid = pid;
    this.#file = file;
  }

  /**
   * Locks the pidfile at `path`, creating it (mode 0644) if missing, and
   * writes `pid` to it. Refused: a symlink, anything but a regular file, a
   * file of another user or one they may write, a file that holds something
   * other than a pid, and a pidfile whose lock another process holds for
   * longer than a second (a broker killed a moment ago releases it).
   */
  static async create(path: string, pid: number = Deno.pid): Promise<PidFile> {
    const deadline = performance.now() + LOCK_WAIT_MS;
    const holder: { pid?: number } = {};
    let file: OwnFile | undefined;
    while ((file = lockPidfile(path, holder)) === undefined) {
      if (performance.now() >= deadline) {
        throw new Error(
          `pidfile ${path} is held by running process ${holder.pid ?? "(pid not written yet)"}`,
        );
      }
      await sleep(LOCK_RETRY_MS);
    }
    try {
      const previous = readPid(file);
      if (previous !== undefined) {
        logger.info("replacing stale pidfile {path} (process {previous} holds no lock on it)", {
          path,
          previous,
        });
      }
      file.replaceContent(encoder.encode(`${pid}\n`));
      return new PidFile(path, pid, file);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /**
   * Removes the pidfile unless the path now names another file, then
   * releases the lock. Removing first: a successor waiting for the lock then
   * finds the file gone and creates its own.
   */
  remove(): void {
    if (this.#file.fd < 0) return;
    try {
      if (this.#file.isAt(this.path)) unlinkPath(this.path);
      else {
        logger.warn("{path} is no longer the pidfile this broker created; leaving it", {
          path: this.path,
        });
      }
    } catch (error) {
      logger.warn("could not remove pidfile {path}: {error}", {
        path: this.path,
        error: error instanceof Error ? error.message : String(error),
      });
    } finally {
      this.#file.close();
    }
  }

  /** Same as {@link remove}. */
  [Symbol.dispose](): void {
    this.remove();
  }
}
