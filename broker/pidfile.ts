/**
 * {@link PidFile}: the broker's pid in a file, for init scripts and
 * `kill $(cat …)`, and a lock against a second broker with the same pidfile.
 *
 * The lock, not the pid in the file, says whether a broker runs: the file
 * stays open with a write lock on it for the broker's life (an open file
 * description lock, `F_OFD_SETLK`), and the kernel releases the lock however
 * the process ends, `kill -9` included. A pid alone cannot say it: a killed
 * broker answers `kill(pid, 0)` until its parent reaps it, and its pid may
 * later belong to anything.
 *
 * Only a write lock counts, since the file is readable by all. Anyone who
 * may read it may `flock` it (which does not touch a record lock) or take a
 * read lock on it, and a read lock keeps a write lock from being taken; but
 * only who may write the file can hold a write lock. So a file with read
 * locks and no write lock is stale and pinned by someone else: it is removed
 * and a new one made, with mode 0600 until it is locked, so that nobody can
 * pin that one first.
 *
 * The pid is written in place (truncate, then write) rather than through a
 * temporary file renamed over it: a temporary name is one more file another
 * user could plant a symlink at, and the lock already says whether the
 * content is current. A reader may see the file empty for the instant
 * between the two calls of a starting broker.
 *
 * @module
 */

import { getLogger } from "npm:@logtape/logtape@^2.4.2";
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
 * process holds a write lock on it. `holder` learns the pid in a held file.
 */
function lockPidfile(path: string, holder: { pid?: number }): OwnFile | undefined {
  // Nobody else may open a file we create until it is locked (and then set to PIDFILE_MODE).
  const file = openOwnFile(path, { access: "read-write", createMode: 0o600 });
  try {
    if (!file.tryLock()) {
      holder.pid = readPid(file);
      if (file.writeLockedElsewhere()) {
        file.close();
        return undefined;
      }
      // Read locks only: no broker holds it, but someone keeps us from locking it. A new
      // file, then; readPid has made sure that this one holds nothing but a pid.
      logger.warn(
        "pidfile {path} (process {previous}) is stale but read-locked by another process; " +
          "replacing it with a new file",
        { path, previous: holder.pid ?? "none" },
      );
      if (file.isAt(path)) unlinkPath(path);
      file.close();
      return lockPidfile(path, holder);
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
        const named = holder.pid === undefined ? "no process yet" : `process ${holder.pid}`;
        throw new Error(
          `pidfile ${path} is locked by a running process: it names ${named}, but the lock, ` +
            "not the pid, says a broker runs, and its holder may be another process",
        );
      }
      await sleep(LOCK_RETRY_MS);
    }
    try {
      const previous = readPid(file);
      // Ours, or one another broker made and lost to us before it could lock it: empty, 0600.
      const fresh = previous === undefined && (file.status().mode & 0o777) === 0o600;
      if (file.created || fresh) file.setMode(PIDFILE_MODE);
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
