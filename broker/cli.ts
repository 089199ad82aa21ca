/**
 * `one-socket broker`: the daemon's entry point. Flags and environment,
 * logging setup, signals.
 *
 * @module
 */

import {
  configure,
  dispose,
  getConsoleSink,
  getLogger,
  getTextFormatter,
  jsonLinesFormatter,
  type LogLevel,
  parseLogLevel,
} from "@logtape/logtape";
import { parseCommandLine, runCommand, UsageError } from "../client/command_line.ts";
import { resolveSocketPath } from "../client/socket_path.ts";
import { raiseDescriptorLimit } from "../ffi/process.ts";
import { Broker } from "./broker.ts";

/** Usage of `one-socket broker`. */
export const BROKER_USAGE =
  `Usage: one-socket broker [--socket PATH] [--log-level LEVEL] [--log-format text|json]

Serves SocketPair requests on a Unix socket until SIGINT or SIGTERM.

Options:
  --socket PATH        socket to listen on; default $ONE_SOCKET_PATH, else
                       /run/one.socket for root, $XDG_RUNTIME_DIR/one.socket,
                       or /tmp/one-socket-UID.socket. "@name" is an abstract socket.
  --log-level LEVEL    trace, debug, info (default), warning, error, fatal
  --log-format FORMAT  text (default) or json (one object per line)
  --handshake-timeout SECONDS  close a connection that has not sent its whole
                       request within SECONDS (default 5)
  --pair-timeout SECONDS  close a request still unpaired after SECONDS
                       (default: wait forever)
  --max-waiting-per-uid N  most clients of one uid waiting at once (default: no limit)
  --isolate-uids       pair only clients of the same uid
  -h, --help           show this help`;

const ALL_LEVELS_TO_STDERR = {
  trace: "error",
  debug: "error",
  info: "error",
  warning: "error",
  error: "error",
  fatal: "error",
} as const;

async function configureLogging(level: LogLevel, format: string): Promise<void> {
  const formatter = format === "json" ? jsonLinesFormatter : getTextFormatter({
    timestamp: "date-time-timezone",
    value: "bare",
  });
  await configure({
    // The console sink would print info and debug with console.info/debug, i.e. to stdout.
    sinks: { stderr: getConsoleSink({ formatter, levelMap: ALL_LEVELS_TO_STDERR }) },
    loggers: [
      { category: ["one-socket"], lowestLevel: level, sinks: ["stderr"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

const logger = getLogger(["one-socket", "broker"]);

/** Descriptors the runtime, the listener and the reactor keep for themselves. */
const RESERVED_DESCRIPTORS = 32;

function seconds(flag: string, text: string): number {
  const value = Number(text);
  if (!(value > 0) || !Number.isFinite(value)) {
    throw new UsageError(`${flag} takes a positive number of seconds, not ${text}`);
  }
  return value;
}

function count(flag: string, text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new UsageError(`${flag} takes a whole number from 1 up, not ${text}`);
  }
  return value;
}

/** Resolves on the first SIGINT or SIGTERM. */
function shutdownSignal(): Promise<Deno.Signal> {
  return new Promise((resolve) => {
    const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
    const handlers = signals.map((signal) => () => {
      signals.forEach((s, i) => Deno.removeSignalListener(s, handlers[i]));
      resolve(signal);
    });
    signals.forEach((s, i) => Deno.addSignalListener(s, handlers[i]));
  });
}

/** Runs `one-socket broker` with `args`; resolves to the exit code once shut down. */
export function runBroker(args: string[]): Promise<number> {
  return runCommand("broker", BROKER_USAGE, async () => {
    const { values, positionals } = parseCommandLine(args, {
      socket: { type: "string" },
      "log-level": { type: "string", default: "info" },
      "log-format": { type: "string", default: "text" },
      "handshake-timeout": { type: "string", default: "5" },
      "pair-timeout": { type: "string" },
      "max-waiting-per-uid": { type: "string" },
      "isolate-uids": { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    });
    if (values.help) {
      console.log(BROKER_USAGE);
      return 0;
    }
    if (positionals.length > 0) throw new UsageError(`unexpected argument ${positionals[0]}`);
    let level: LogLevel;
    try {
      level = parseLogLevel(values["log-level"]);
    } catch {
      throw new UsageError(`unknown log level ${values["log-level"]}`);
    }
    const format = values["log-format"];
    if (format !== "text" && format !== "json") {
      throw new UsageError(`unknown log format ${format} (text or json)`);
    }
    const handshakeTimeoutMs = seconds("--handshake-timeout", values["handshake-timeout"]) * 1000;
    const pairTimeout = values["pair-timeout"];
    const pairTimeoutMs = pairTimeout === undefined
      ? undefined
      : seconds("--pair-timeout", pairTimeout) * 1000;
    const perUid = values["max-waiting-per-uid"];
    const maxWaitingPerUid = perUid === undefined
      ? undefined
      : count("--max-waiting-per-uid", perUid);
    await configureLogging(level, format);
    const limit = raiseDescriptorLimit();
    try {
      const broker = await Broker.listen({
        path: resolveSocketPath(values.socket),
        handshakeTimeoutMs,
        pairTimeoutMs,
        maxWaitingPerUid,
        isolateUids: values["isolate-uids"],
      });
      logger.info("descriptor limit {soft} (hard {hard}): room for about {clients} clients", {
        ...limit,
        clients: limit.soft - RESERVED_DESCRIPTORS,
      });
      await shutdownSignal();
      await broker.close();
      return 0;
    } finally {
      await dispose();
    }
  });
}
