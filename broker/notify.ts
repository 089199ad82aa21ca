/**
 * Telling the service manager how the broker is doing (sd_notify(3)):
 * `READY=1` once serving, `STATUS=` with its counts, `WATCHDOG=1` keep-alives,
 * `STOPPING=1` on the way out. `--daemon` listens the same way to learn when
 * its detached child serves.
 *
 * @module
 */

import { getLogger } from "npm:@logtape/logtape@^2.4.2";
import { sendDatagram } from "../ffi/socket.ts";

const logger = getLogger(["one-socket", "broker"]);
const encoder = new TextEncoder();

/**
 * Set by `--daemon` for the process it detaches: the socket of the waiting
 * parent, told once that the broker serves or why it could not. Unlike
 * `NOTIFY_SOCKET` it is gone after that, so nothing more is sent to it.
 */
export const DAEMON_NOTIFY_VARIABLE = "ONE_SOCKET_DAEMON_NOTIFY";
/** How often the status line is checked, and sent when it changed. */
const STATUS_REFRESH_MS = 2000;

/**
 * The keep-alive period the service manager asked for: half of
 * `WATCHDOG_USEC`, in milliseconds, when `WATCHDOG_PID` is absent or `pid`.
 */
export function watchdogIntervalMs(
  env: Record<string, string | undefined>,
  pid: number,
): number | undefined {
  const { WATCHDOG_USEC, WATCHDOG_PID } = env;
  if (WATCHDOG_PID !== undefined && Number(WATCHDOG_PID) !== pid) return undefined;
  const usec = Number(WATCHDOG_USEC);
  if (WATCHDOG_USEC === undefined || !Number.isSafeInteger(usec) || usec <= 0) return undefined;
  return usec / 2000;
}

/** A notification's `KEY=VALUE` lines as a map (a later key wins). */
export function parseNotification(text: string): Map<string, string> {
  const fields = new Map<string, string>();
  for (const line of text.split("\n")) {
    const at = line.indexOf("=");
    if (at > 0) fields.set(line.slice(0, at), line.slice(at + 1));
  }
  return fields;
}

/**
 * Notifications to the service manager at `NOTIFY_SOCKET` (a path, or
 * `@name` for an abstract socket). Without one every call does nothing, so
 * the broker runs the same with or without a service manager.
 */
export class ServiceNotifier implements Disposable {
  #socket?: string;
  readonly #once: boolean;
  readonly #watchdogMs?: number;
  readonly #timers: ReturnType<typeof setInterval>[] = [];
  #status = "";

  /**
   * @param socket where to send; undefined for none
   * @param once stop after the first `READY=1` or failure (a `--daemon` parent)
   * @param watchdogMs keep-alive period once ready
   */
  constructor(socket: string | undefined, once = false, watchdogMs?: number) {
    this.#socket = socket;
    this.#once = once;
    this.#watchdogMs = watchdogMs;
  }

  /** The notifier `env` asks for: a `--daemon` parent's, else the service manager's, else none. */
  static fromEnvironment(env: Record<string, string | undefined>, pid: number): ServiceNotifier {
    const parent = env[DAEMON_NOTIFY_VARIABLE];
    if (parent) return new ServiceNotifier(parent, true);
    return new ServiceNotifier(env.NOTIFY_SOCKET || undefined, false, watchdogIntervalMs(env, pid));
  }

  /**
   * Serving: sends `READY=1` with our pid and `status()`, then keeps the
   * status current and, if asked, sends watchdog keep-alives. The timers
   * never keep the process alive.
   */
  ready(status: () => string): void {
    this.#status = status();
    this.#send(`READY=1\nMAINPID=${Deno.pid}\nSTATUS=${this.#status}`);
    if (this.#once) this.#socket = undefined;
    if (this.#socket === undefined) return;
    this.#every(STATUS_REFRESH_MS, () => {
      const next = status();
      if (next === this.#status) return;
      this.#status = next;
      this.#send(`STATUS=${next}`);
    });
    if (this.#watchdogMs !== undefined) {
      this.#every(this.#watchdogMs, () => this.#send("WATCHDOG=1"));
    }
  }

  /** Shutting down: `STOPPING=1`; nothing is sent after it. */
  stopping(): void {
    this.#stopTimers();
    this.#send("STOPPING=1\nSTATUS=stopping");
  }

  /** Could not start or serve: `STATUS=` with the reason, for `systemctl status` or `--daemon`. */
  failed(error: unknown): void {
    this.#stopTimers();
    this.#send(`STATUS=${error instanceof Error ? error.message : String(error)}`);
  }

  /** Stops the timers. */
  [Symbol.dispose](): void {
    this.#stopTimers();
  }

  #every(ms: number, tick: () => void): void {
    this.#timers.push(setInterval(tick, ms).unref());
  }

  #stopTimers(): void {
    for (const timer of this.#timers.splice(0)) clearInterval(timer);
  }

  #send(message: string): void {
    if (this.#socket === undefined) return;
    try {
      sendDatagram(this.#socket, encoder.encode(message));
    } catch (error) {
      logger.warn("sd_notify {message}: {error}", {
        message: message.split("\n")[0],
        error: error instanceof Error ? error.message : String(error),
      });
    }
  }
}
