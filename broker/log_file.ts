/**
 * `--log-file`: a LogTape sink appending to a file, reopened on SIGHUP so
 * that logrotate can move the file away and have new lines start a new one.
 *
 * @module
 */

import { getLogger, type LogRecord, type Sink, type TextFormatter } from "@logtape/logtape";
import { fileError } from "../ffi/errors.ts";

const logger = getLogger(["one-socket", "broker"]);
const encoder = new TextEncoder();

/** Permissions of a log file we create: the log names clients' pids, uids and keys. */
export const LOG_FILE_MODE = 0o640;

/** A sink that owns its file: LogTape's `dispose()` closes it. */
export type FileSink = Sink & Disposable;

function openAppending(path: string): Deno.FsFile {
  try {
    return Deno.openSync(path, { append: true, create: true, mode: LOG_FILE_MODE });
  } catch (error) {
    throw fileError(error, "open", path);
  }
}

/**
 * A sink appending each record to `path` as `formatter` renders it. Writes
 * are synchronous, so nothing is lost when the process exits, and a record
 * never interleaves with another. On SIGHUP it opens `path` again; if that
 * fails it keeps writing to the file it has and logs why.
 */
export function getFileSink(path: string, formatter: TextFormatter): FileSink {
  let file = openAppending(path);
  const reopen = () => {
    try {
      const next = openAppending(path);
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
    const bytes = encoder.encode(formatter(record));
    for (let written = 0; written < bytes.length;) {
      written += file.writeSync(bytes.subarray(written));
    }
  };
  return Object.assign(sink, {
    [Symbol.dispose]() {
      Deno.removeSignalListener("SIGHUP", reopen);
      file.close();
    },
  });
}
