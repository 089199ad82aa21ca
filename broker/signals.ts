/**
 * What the broker does on each Linux signal whose default action would end
 * it: stop cleanly (socket file removed, clients closed, exit 0), log its
 * status, or carry on. No signal may end it halfway, with its socket file
 * left behind and its waiting clients cut without a word.
 *
 * Signals left as they are, and why:
 *
 * - SIGILL, SIGFPE, SIGSEGV: Deno refuses listeners for them (TypeError
 *   "Binding to signal ... is not allowed"). They report a fault in the
 *   process itself, where no JavaScript can run a shutdown.
 * - SIGBUS: a memory fault like those three. Deno accepts a listener, but
 *   V8's WebAssembly trap handler owns the signal and puts the default action
 *   back, so a second `kill -BUS` ends the process whatever we listen for; and
 *   a real bus error re-runs the faulting instruction after any handler.
 * - SIGTRAP, SIGSYS: raised by the kernel at a breakpoint (V8's fatal
 *   `brk` on aarch64) or a seccomp refusal; returning from a handler re-runs
 *   the breakpoint or skips the system call, so catching them turns a crash
 *   into a spin or into wrong results. A core dump is the useful outcome.
 * - SIGABRT: the request for a core dump (systemd's watchdog sends it to a
 *   hung service); a listener would keep a hung broker alive and dumpless.
 * - SIGPIPE: the runtime ignores it from the start (our sends use
 *   MSG_NOSIGNAL anyway), so a `kill -PIPE` already does nothing.
 *
 * Listeners, unlike SIG_IGN, are not inherited: a program the broker starts
 * gets every default back.
 *
 * @module
 */

import { getLogger } from "npm:@logtape/logtape@^2.4.2";

const logger = getLogger(["one-socket", "broker"]);

/**
 * A request to stop: the usual ones (SIGINT, SIGTERM, SIGQUIT as from a
 * terminal's Ctrl-\), SIGXCPU (the CPU-time limit is reached; SIGKILL follows
 * at the hard limit, so better stop now) and SIGPWR (the power is failing).
 */
export const STOP_SIGNALS: readonly Deno.Signal[] = [
  "SIGINT",
  "SIGTERM",
  "SIGQUIT",
  "SIGXCPU",
  "SIGPWR",
];

/** Logs the broker's status line, as `systemctl status` shows it. */
export const STATUS_SIGNAL: Deno.Signal = "SIGUSR1";

/**
 * Signals that say nothing to a broker and are logged and ignored: SIGHUP
 * (what reloads on it, --policy and --log-file, adds listeners of its own),
 * SIGUSR2, the timer signals SIGALRM, SIGVTALRM and SIGPROF (the broker sets
 * no timers, so one is a stray `kill`), SIGSTKFLT (unused on Linux) and SIGIO
 * (the broker sets no O_ASYNC).
 */
export const LOGGED_SIGNALS: readonly Deno.Signal[] = [
  "SIGHUP",
  "SIGUSR2",
  "SIGALRM",
  "SIGVTALRM",
  "SIGPROF",
  "SIGSTKFLT",
  "SIGIO",
];

/**
 * Ignored without a log line. SIGXFSZ comes with each write past the file
 * size limit, the log file's included: logging it would raise it again.
 */
export const QUIET_SIGNALS: readonly Deno.Signal[] = ["SIGXFSZ"];

/** The broker's signal listeners; disposing removes them all. */
export interface BrokerSignals extends Disposable {
  /** Resolves with the first stop signal ({@link STOP_SIGNALS}). */
  readonly stop: Promise<Deno.Signal>;
}

/**
 * Listens for every signal above until disposed. Listen from the very start,
 * and keep listening until the process ends: a signal that arrives while
 * starting or while shutting down must meet a listener too (with none left,
 * Deno restores the default action).
 *
 * @param status the status line to log on {@link STATUS_SIGNAL}
 *
 * @example
 * ```ts
 * import { handleBrokerSignals } from "./signals.ts";
 * using signals = handleBrokerSignals(() => "serving /run/one.socket");
 * const signal = await signals.stop;
 * console.log(`stopping on ${signal}`);
 * ```
 */
export function handleBrokerSignals(status: () => string): BrokerSignals {
  let stopped: Deno.Signal | undefined;
  const { promise: stop, resolve: resolveStop } = Promise.withResolvers<Deno.Signal>();
  const listeners = new Map<Deno.Signal, () => void>();
  for (const signal of STOP_SIGNALS) {
    listeners.set(signal, () => {
      if (stopped === undefined) {
        stopped = signal;
        logger.info("{signal} received; stopping", { signal });
        resolveStop(signal);
      } else {
        logger.info("{signal} received; already stopping on {stopped}", { signal, stopped });
      }
    });
  }
  listeners.set(
    STATUS_SIGNAL,
    () => logger.info("{signal}: {status}", { signal: STATUS_SIGNAL, status: status() }),
  );
  for (const signal of LOGGED_SIGNALS) {
    listeners.set(signal, () => logger.info("{signal} received", { signal }));
  }
  for (const signal of QUIET_SIGNALS) listeners.set(signal, () => {});
  for (const [signal, listener] of listeners) Deno.addSignalListener(signal, listener);
  return {
    stop,
    [Symbol.dispose]() {
      for (const [signal, listener] of listeners) Deno.removeSignalListener(signal, listener);
    },
  };
}
