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
  type LogRecord,
  parseLogLevel,
} from "npm:@logtape/logtape@^2.4.2";
import {
  exitCodeOf,
  failureMessage,
  type FailureReporter,
  parseCommandLine,
  runCommand,
  seconds,
  stderrReporter,
  UsageError,
  wholeNumber,
} from "../client/command_line.ts";
import { guardFallbackDirectory, resolveSocketPath } from "../client/socket_path.ts";
import { countOpenDescriptors, raiseDescriptorLimit } from "../ffi/process.ts";
import { Reactor } from "../ffi/reactor.ts";
import { Broker, type UidLimits } from "./broker.ts";
import { DEFAULT_CONTROL_CONNECTIONS, serveControl } from "./control.ts";
import { daemonize, DEFAULT_READY_TIMEOUT_MS } from "./daemon.ts";
import { getFileSink } from "./log_file.ts";
import { ServiceNotifier } from "./notify.ts";
import { ReloadingPolicy } from "./policy.ts";
import { PidFile } from "./pidfile.ts";
import { handleBrokerSignals } from "./signals.ts";
import { checkSocketAccess, parseSocketMode, resolveGroup } from "./socket_access.ts";
import { takeListener } from "./systemd.ts";

/** Usage of `one-socket broker`. */
export const BROKER_USAGE =
  `Usage: one-socket broker [--socket PATH] [--control PATH] [--log-level LEVEL] [--log-format text|json]

Serves SocketPair requests on a Unix socket until SIGINT, SIGTERM or SIGQUIT
(also SIGXCPU, SIGPWR); SIGUSR1 logs its status. Under systemd it serves the
socket passed by socket activation (LISTEN_FDS) and reports to NOTIFY_SOCKET
(ready, status, watchdog, stopping).

Options:
  --socket PATH        socket to listen on; default $ONE_SOCKET_PATH, else
                       /run/one.socket for root, $XDG_RUNTIME_DIR/one.socket,
                       or /tmp/one-socket-UID/one.socket. "@name" is an abstract socket.
  --control PATH       also serve the control API (HTTP: status, clients, kick,
                       metrics) on this Unix socket; by convention the socket
                       path plus ".control", where one-socket ctl looks for it
  --control-max-connections N  most control connections open at once (default
                       16, or half the descriptor reserve if less); past it, a
                       newcomer closes the oldest one silent for 0.25 s (or
                       answered for 2 s), else waits
  --control-timeout SECONDS  close a control connection whose one request
                       and its answer are not done within SECONDS (default 10)
  --log-level LEVEL    trace, debug, info (default), warning, error, fatal
  --log-format FORMAT  text (default) or json (one object per line)
  --log-file PATH      append the log to PATH instead of stderr; SIGHUP reopens it.
                       Refused unless a regular file of ours (or root's) that
                       nobody else may write; created with mode 0640
  --pidfile PATH       write the broker's pid to PATH and lock it, removed on
                       exit; refused while another process holds the lock
  --takeover           take the socket and every waiting client over from the
                       broker serving it (an upgrade, a change of flags): it
                       hands over and exits 0; no connect is refused, no client
                       notices. Without such a broker, just start
  --daemon             run in the background: exit 0 once the broker serves, or
                       1 with its error (for hosts without a service manager)
  --ready-timeout SECONDS  with --daemon: give up (exit 1, the broker killed) if
                       it does not serve within SECONDS (default ${DEFAULT_READY_TIMEOUT_MS / 1000})
  --socket-mode MODE   permission bits of the socket file, e.g. 0660
  --socket-group GROUP group (name or gid) of the socket file; neither applies
                       to a socket passed by systemd (its unit sets them)
  --handshake-timeout SECONDS  close a connection that has not sent its whole
                       request within SECONDS (default 5)
  --pair-timeout SECONDS  close a request still unpaired after SECONDS
                       (default: wait forever)
  --max-waiting-per-uid N  most clients of one uid waiting at once (default: no limit)
  --max-incomplete-per-uid N  most connections of one uid still sending their
                       request (default 64); more are closed as they come
  --max-listeners-per-uid N  most protocol v2 listeners of one uid (default 16)
  --uid-limit UID:WAITING[:INCOMPLETE]  the two limits above for one uid
                       (WAITING may be "unlimited"); repeat for more uids.
                       When full, whoever else comes closes the oldest
                       connection of the uid holding the most
  --isolate-uids       pair only clients of the same uid
  --policy FILE        access policy (JSON, or TOML if FILE ends in .toml): which
                       uids/gids may use which keys; deny by default; SIGHUP reloads
  -h, --help           show this help`;

const ALL_LEVELS_TO_STDERR = {
  trace: "error",
  debug: "error",
  info: "error",
  warning: "error",
  error: "error",
  fatal: "error",
} as const;

async function configureLogging(level: LogLevel, format: string, file?: string): Promise<void> {
  const formatter = format === "json" ? jsonLinesFormatter : getTextFormatter({
    timestamp: "date-time-timezone",
    value: "bare",
  });
  await configure({
    sinks: {
      log: file === undefined
        // The console sink would print info and debug with console.info/debug, i.e. to stdout.
        ? getConsoleSink({ formatter, levelMap: ALL_LEVELS_TO_STDERR })
        : getFileSink(file, formatter),
    },
    loggers: [
      { category: ["one-socket"], lowestLevel: level, sinks: ["log"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["log"] },
    ],
  });
}

const logger = getLogger(["one-socket", "broker"]);

/**
 * A failure as a log record. A usage error's record points to --help instead
 * of carrying the usage: thirty lines of text are not one JSON log line.
 */
function fatalRecord(message: string, usage?: string): Omit<LogRecord, "category"> {
  const text = usage === undefined ? message : `${message} (see one-socket broker --help)`;
  return {
    level: "fatal",
    message: [text],
    rawMessage: text,
    timestamp: Date.now(),
    properties: {},
  };
}

/**
 * Under --log-format json, a failure before the log is open (a usage error,
 * a log file that cannot be opened, the wait of --daemon) is a JSON line on
 * stderr; once the log is open, runBroker logs it there instead.
 */
const reportJson: FailureReporter = (message, usage) => {
  const line = jsonLinesFormatter({ category: logger.category, ...fatalRecord(message, usage) });
  console.error(line.trimEnd());
};

/** How long the broker's loop waits on its own thread after activity (see Reactor.setLinger). */
const DAEMON_LINGER_MS = 2;

/**
 * Descriptors kept free when the broker is full: for its logs, the control
 * API, a policy reload and the runtime itself, which must not meet EMFILE.
 */
function descriptorReserve(limit: number): number {
  return Math.min(64, Math.floor(limit / 4));
}

/** `--uid-limit UID:WAITING[:INCOMPLETE]`. */
function parseUidLimit(text: string): [number, UidLimits] {
  const [uid, waiting, incomplete, ...rest] = text.split(":");
  const flag = `--uid-limit ${text}`;
  if (
    !/^\d+$/.test(uid ?? "") || Number(uid) > 0xffffffff || waiting === undefined || rest.length
  ) {
    throw new UsageError(`${flag}: expected UID:WAITING[:INCOMPLETE], e.g. 107:5000:128`);
  }
  return [Number(uid), {
    maxWaiting: waiting === "unlimited" ? Infinity : wholeNumber(flag, waiting),
    maxIncomplete: incomplete === undefined ? undefined : wholeNumber(flag, incomplete),
  }];
}

/**
 * Most control connections: each holds a descriptor, taken from the reserve,
 * and half of it stays for the logs, a policy reload and the runtime.
 */
function controlConnectionLimit(descriptors: number, flag?: string): number {
  const most = Math.floor(descriptorReserve(descriptors) / 2);
  if (flag === undefined) return Math.max(1, Math.min(DEFAULT_CONTROL_CONNECTIONS, most));
  const wanted = wholeNumber("--control-max-connections", flag);
  if (wanted > most) {
    throw new UsageError(
      `--control-max-connections ${wanted} is more than half the ${
        descriptorReserve(descriptors)
      } descriptors kept in reserve under a limit of ${descriptors}; at most ${most}`,
    );
  }
  return wanted;
}

/** The line `systemctl status` shows. */
function serviceStatus(broker: Broker): string {
  const { waiting, paired } = broker.stats;
  return `serving ${broker.path}: ${waiting} waiting, ${paired} paired since start`;
}

/** Runs `one-socket broker` with `args`; resolves to the exit code once shut down. */
export function runBroker(args: string[]): Promise<number> {
  // Text until --log-format json has been read.
  let report = stderrReporter("broker");
  return runCommand("broker", BROKER_USAGE, async () => {
    const { values, positionals } = parseCommandLine(args, {
      socket: { type: "string" },
      control: { type: "string" },
      "control-max-connections": { type: "string" },
      "control-timeout": { type: "string", default: "10" },
      "log-level": { type: "string", default: "info" },
      "log-format": { type: "string", default: "text" },
      "handshake-timeout": { type: "string", default: "5" },
      "pair-timeout": { type: "string" },
      "max-waiting-per-uid": { type: "string" },
      "max-listeners-per-uid": { type: "string" },
      "max-incomplete-per-uid": { type: "string" },
      "uid-limit": { type: "string", multiple: true },
      "isolate-uids": { type: "boolean", default: false },
      policy: { type: "string" },
      "log-file": { type: "string" },
      pidfile: { type: "string" },
      daemon: { type: "boolean", default: false },
      takeover: { type: "boolean", default: false },
      "ready-timeout": { type: "string", default: String(DEFAULT_READY_TIMEOUT_MS / 1000) },
      "socket-mode": { type: "string" },
      "socket-group": { type: "string" },
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
    if (format === "json") report = reportJson;
    const controlTimeoutMs = seconds("--control-timeout", values["control-timeout"]) * 1000;
    const controlConnections = values["control-max-connections"];
    const handshakeTimeoutMs = seconds("--handshake-timeout", values["handshake-timeout"]) * 1000;
    const pairTimeout = values["pair-timeout"];
    const pairTimeoutMs = pairTimeout === undefined
      ? undefined
      : seconds("--pair-timeout", pairTimeout) * 1000;
    const perUid = values["max-waiting-per-uid"];
    const maxWaitingPerUid = perUid === undefined
      ? undefined
      : wholeNumber("--max-waiting-per-uid", perUid);
    const incomplete = values["max-incomplete-per-uid"];
    const maxIncompletePerUid = incomplete === undefined
      ? undefined
      : wholeNumber("--max-incomplete-per-uid", incomplete);
    const listeners = values["max-listeners-per-uid"];
    const maxListenersPerUid = listeners === undefined
      ? undefined
      : wholeNumber("--max-listeners-per-uid", listeners);
    const uidLimits = values["uid-limit"] === undefined
      ? undefined
      : new Map(values["uid-limit"].map(parseUidLimit));
    const mode = values["socket-mode"];
    const group = values["socket-group"];
    const access = {
      mode: mode === undefined ? undefined : parseSocketMode(mode),
      gid: group === undefined ? undefined : resolveGroup(group),
    };
    const readyTimeoutMs = seconds("--ready-timeout", values["ready-timeout"]) * 1000;
    if (values.daemon) {
      await daemonize(values["log-file"], readyTimeoutMs);
      return 0;
    }
    using notifier = ServiceNotifier.fromEnvironment(Deno.env.toObject(), Deno.pid);
    let logOpen = false;
    try {
      await configureLogging(level, format, values["log-file"]);
      logOpen = true;
      const limit = raiseDescriptorLimit();
      const controlMaxConnections = controlConnectionLimit(limit.soft, controlConnections);
      // Listening for signals from the start: a stop while starting, or right after
      // READY=1, still ends in a graceful shutdown.
      let status = () => "starting";
      using signals = handleBrokerSignals(() => status());
      const takeover = values.takeover;
      // Taking over, the old broker holds the pidfile until it exits.
      using _pidfile = values.pidfile === undefined || takeover
        ? undefined
        : await PidFile.create(values.pidfile);
      using policy = values.policy === undefined
        ? undefined
        : await ReloadingPolicy.load(values.policy);
      const inherited = takeListener();
      if (inherited !== undefined && takeover) {
        throw new UsageError(
          "--takeover with a socket passed by the service manager: under systemd, restart the " +
            "service instead (its descriptor store keeps the waiting clients)",
        );
      }
      // A daemon's JavaScript thread has nothing better to do than wait for its sockets.
      Reactor.instance().setLinger(DAEMON_LINGER_MS);
      // What is open now, plus the listener, is the process's own; clients get the rest but a reserve.
      const maxConnections = limit.soft - (countOpenDescriptors() + 1) -
        descriptorReserve(limit.soft);
      const path = inherited?.path ?? resolveSocketPath(values.socket);
      if (inherited === undefined) {
        guardFallbackDirectory(path, true);
        checkSocketAccess(path, access);
      }
      const options = {
        maxConnections,
        socket: path,
        listenFd: inherited?.fd,
        handshakeTimeoutMs,
        pairTimeoutMs,
        maxWaitingPerUid,
        maxIncompletePerUid,
        maxListenersPerUid,
        uidLimits,
        isolateUids: values["isolate-uids"],
        authorize: policy?.authorize,
        socketAccess: inherited === undefined ? access : undefined,
      };
      const broker = takeover ? await Broker.takeOver(options) : await Broker.listen(options);
      logger.info("descriptor limit {soft} (hard {hard}): room for {clients} clients", {
        ...limit,
        clients: maxConnections,
      });
      try {
        // The old broker's control socket and pidfile are free once it has exited.
        await broker.previousGone;
        using _takenPidfile = values.pidfile === undefined || !takeover
          ? undefined
          : await PidFile.create(values.pidfile);
        const control = values.control === undefined ? undefined : await serveControl(broker, {
          socket: values.control,
          maxConnections: controlMaxConnections,
          timeoutMs: controlTimeoutMs,
        });
        status = () => serviceStatus(broker);
        notifier.ready(status);
        const handedTo = await Promise.race([
          signals.stop.then(() => undefined),
          broker.handedOver,
        ]);
        if (handedTo !== undefined) {
          logger.info("handed over to pid {pid}; exiting", { pid: handedTo });
        }
        notifier.stopping();
        await control?.close();
      } finally {
        await broker.close();
      }
      return 0;
    } catch (error) {
      notifier.failed(error);
      if (format === "text" || !logOpen) throw error;
      // Into the log file, when there is one, while it is open: dispose() closes it.
      const usage = error instanceof UsageError ? BROKER_USAGE : undefined;
      logger.emit(fatalRecord(failureMessage(error), usage));
      return exitCodeOf(error);
    } finally {
      await dispose();
    }
  }, (message, usage) => report(message, usage));
}
