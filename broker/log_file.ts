/**
 * `--log-file`: a LogTape sink appending to a file, reopened on SIGHUP so
 * that logrotate can move the file away and have new lines start a new one.
 *
 * @module
 */

import {
  getLogger,
  type LogRecord,
  type Sink,
  type TextFormatter,
} from "npm:@logtape/logtape@^2.4.2";
import { openOwnFile, type OwnFile } from "../ffi/files.ts";

const logger = getLogger(["one-socket", "broker"]);
const encoder = new TextEncoder();

/** Permissions of a log file we create: the log names clients' pids, uids and keys. */
export const LOG_FILE_MODE = 0o640;

/** A sink that owns its file: LogTape's `dispose()` closes it. */
export type FileSink = Sink & Disposable;

/**
 * `path` open for appending, created (mode 0640) if missing. Refused, so
 * that nobody else reads the log or has us write into a file of their
 * choosing: a symlink, anything but a regular file (a FIFO would block us),
 * a file of another user, or one that others may write.
 */
export function openLogFile(path: string): OwnFile {
  return openOwnFile(path, { access: "append", createMode: LOG_FILE_MODE });
}

/**
 * A sink appending each record to `path` as `formatter` renders it. Writes
 * are synchronous, so nothing is lost when the process exits, and a record
 * never interleaves with another. On SIGHUP it opens `path` again, with the
 * same checks as {@link openLogFile}; if that fails or is refused, it keeps
 * writing to the file it has and logs why.
 */
export function getFileSink(path: string, formatter: TextFormatter): FileSink {
  let file = openLogFile(path);
  const reopen = () => {
    try {
      const next = openLogFile(path);
      file.close();
      file = next;
      logger.info("reopened log file {path}", { path });
    } catch (error) {
      logger.error("SIGHUP: could not reopen the log file: {error}", {
        error: error instanceof Error ? error.message : String(error),
      });
    }
  };
  Deno.addSignalListener("SIGHUP", reopen);
  const sink = (record: LogRecord) => {
    file.write(encoder.encode(formatter(record)));
  };
  return Object.assign(sink, {
    [Symbol.dispose]() {
      Deno.removeSignalListener("SIGHUP", reopen);
      file.close();
    },
  });
}
