/**
 * The process's one epoll loop.
 *
 * A blocking `epoll_wait` must run on a helper thread (`nonblocking: true`),
 * and every hand-off to that thread costs tens of microseconds. So the loop
 * keeps exactly one blocking wait in flight and only issues it when a
 * synchronous `epoll_wait(…, 0)` finds nothing: under load, events are drained
 * on the JavaScript thread without any thread hop. An `eventfd` in the set
 * wakes the blocking wait when the loop has nothing left to wait for, so an
 * idle process can exit.
 *
 * @module
 */

import { getLogger } from "npm:@logtape/logtape@^2.4.2";
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  EPOLL_CLOEXEC,
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLL_CTL_MOD,
  EPOLLERR,
  EPOLLET,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  EPOLLRDHUP,
  errno,
  libc,
  sizeArgument,
} from "./libc.ts";
import { Errno, OsError } from "./errors.ts";
import { EPOLL_DATA_OFFSET, EPOLL_EVENT_SIZE, writeEpollEvent } from "./structs.ts";

const logger = getLogger(["one-socket", "reactor"]);

/** Called synchronously on the JavaScript thread with the ready `EPOLL*` bits. */
export type ReadyHandler = (events: number) => void;

const MAX_EVENTS = 512;
// How long an expected event (Readiness.readable(true)) may keep the loop on its own thread.
const EXPECT_MS = 1;
// The longest a busy loop keeps timers, signals and other I/O waiting for a turn.
const TURN_INTERVAL_MS = 1;

// setImmediate costs ~2 µs; a chain of setTimeout(0) is clamped to milliseconds.
const macrotask = () => new Promise<void>((resolve) => setImmediate(resolve));

/** What Deno's own `Deno.Conn.unref()` uses to let the process exit while an operation is pending. */
interface OpPromiseReferences {
  refOpPromise(promise: Promise<unknown>): void;
  unrefOpPromise(promise: Promise<unknown>): void;
}

// Not public API (there is none for a pending FFI call): on a Deno without it, a wait that
// should not keep the process alive keeps it alive like any other.
const denoInternal = (Deno as unknown as { internal?: symbol }).internal;
const denoCore: Partial<OpPromiseReferences> | undefined = denoInternal === undefined
  ? undefined
  : (Deno as unknown as Record<symbol, { core?: Partial<OpPromiseReferences> }>)[denoInternal]
    ?.core;

/**
 * Something registered for a descriptor's events. The reactor sets `tag`: it
 * tells this registration from an earlier one of a reused descriptor number
 * whose events are still in the batch being dispatched. Hot paths (the
 * broker's connections) implement this directly, to avoid an object and a
 * closure per descriptor.
 */
export interface Registrant {
  /** The descriptor. */
  readonly fd: number;
  /** Set by {@link Reactor.register}. */
  tag: number;
  /** Called synchronously with the ready `EPOLL*` bits. */
  onReady(events: number): void;
}

/** A registration that calls a handler, with its own reference on the loop. */
export class Watch implements Registrant {
  readonly fd: number;
  tag = 0;
  handler: ReadyHandler;
  #reactor: Reactor;
  #referenced = false;
  #keepsAlive = true;
  #active = true;

  /** Use {@link Reactor.watch}. */
  constructor(reactor: Reactor, fd: number, handler: ReadyHandler) {
    this.#reactor = reactor;
    this.fd = fd;
    this.handler = handler;
  }

  /** Calls the handler. */
  onReady(events: number): void {
    this.handler(events);
  }

  /** While referenced, the loop keeps running (and, if {@link keepsAlive}, the process alive). */
  set referenced(value: boolean) {
    if (!this.#active || value === this.#referenced) return;
    this.#referenced = value;
    this.#reactor.adjustReferences(value ? 1 : -1, this.#keepsAlive);
  }

  /**
   * Whether this watch, while referenced, keeps the process alive (the
   * default). When not, the loop still serves it for as long as something
   * else keeps the process running, as Node's `unref()` does.
   */
  set keepsAlive(value: boolean) {
    if (value === this.#keepsAlive) return;
    this.#keepsAlive = value;
    if (this.#active && this.#referenced) {
      // The new reference first: between the two, the loop must not see nothing to wait for.
      this.#reactor.adjustReferences(1, value);
      this.#reactor.adjustReferences(-1, !value);
    }
  }

  /** Changes the `EPOLL*` interest. */
  modify(events: number): void {
    this.#reactor.control(EPOLL_CTL_MOD, this.fd, events, this.tag);
  }

  /**
   * Stops delivering events. Pass `closing` when the descriptor is about to be
   * closed and was never duplicated: closing removes it from epoll anyway.
   */
  cancel(closing: boolean): void {
    if (!this.#active) return;
    this.referenced = false;
    this.#active = false;
    this.#reactor.unregister(this, closing);
  }
}

/** The epoll loop; get the process's instance with {@link Reactor.instance}. */
export class Reactor {
  static #instance?: Reactor;

  /** The process-wide reactor, created on first use. */
  static instance(): Reactor {
    return Reactor.#instance ??= new Reactor();
  }

  readonly #epfd: number;
  readonly #wakeFd: number;
  readonly #wakeBuffer = new BigUint64Array(1);
  readonly #eventScratch = new Uint8Array(16);
  readonly #eventScratchView = new DataView(this.#eventScratch.buffer);
  // One buffer for synchronous polls, one owned by the in-flight blocking wait.
  readonly #polled = new Uint8Array(MAX_EVENTS * EPOLL_EVENT_SIZE);
  readonly #polledView = new DataView(this.#polled.buffer);
  readonly #waited = new Uint8Array(MAX_EVENTS * EPOLL_EVENT_SIZE);
  readonly #waitedView = new DataView(this.#waited.buffer);
  readonly #registrants: (Registrant | undefined)[] = [];
  #nextTag = 1;
  // Referenced watches that keep the process alive, and those that only keep the loop running.
  #references = 0;
  #weakReferences = 0;
  #running = false;
  // The wait in flight on the helper thread, and whether it keeps the process alive.
  #blockingWait?: Promise<number>;
  #blockingWaitKeepsAlive = true;
  #lingerSlices = 0;
  // Until when an event is expected (performance.now()), and whether that was said after the
  // loop's last full turn: the waiter's partner may be in this process, yet to run.
  #expectedUntil = 0;
  #expectedFresh = false;
  #stopped: Promise<void> = Promise.resolve();

  private constructor() {
    this.#epfd = libc.epoll_create1(EPOLL_CLOEXEC);
    if (this.#epfd < 0) throw new OsError("epoll_create1", errno());
    this.#wakeFd = libc.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (this.#wakeFd < 0) throw new OsError("eventfd", errno());
    this.control(EPOLL_CTL_ADD, this.#wakeFd, EPOLLIN, 0);
  }

  /**
   * Registers `fd` for `events` (level-triggered unless `EPOLLET` is among
   * them); `keepsAlive` as in {@link Watch.keepsAlive}.
   */
  watch(fd: number, events: number, handler: ReadyHandler, keepsAlive = true): Watch {
    const watch = new Watch(this, fd, handler);
    this.register(watch, events);
    watch.keepsAlive = keepsAlive;
    watch.referenced = true;
    return watch;
  }

  /**
   * Registers `target` for `events` without a reference of its own: something
   * else (a listener's watch) keeps the loop running.
   */
  register(target: Registrant, events: number): void {
    target.tag = this.#nextTag = (this.#nextTag + 1) >>> 0 || 1;
    this.control(EPOLL_CTL_ADD, target.fd, events, target.tag);
    this.#registrants[target.fd] = target;
  }

  /**
   * Stops delivering events to `target`. Pass `closing` when its descriptor is
   * about to be closed and was never duplicated: closing removes it from epoll anyway.
   */
  unregister(target: Registrant, closing: boolean): void {
    if (this.#registrants[target.fd] === target) this.#registrants[target.fd] = undefined;
    if (!closing) libc.epoll_ctl(this.#epfd, EPOLL_CTL_DEL, target.fd, this.#eventScratch);
  }

  /** Resolves once the loop has stopped (nothing referenced, no wait in flight). */
  get stopped(): Promise<void> {
    return this.#stopped;
  }

  /** @internal epoll_ctl with our (fd, tag) data word. */
  control(op: number, fd: number, events: number, tag: number): void {
    writeEpollEvent(this.#eventScratchView, events, fd, tag);
    if (libc.epoll_ctl(this.#epfd, op, fd, this.#eventScratch) < 0) {
      throw new OsError("epoll_ctl", errno());
    }
  }

  /** @internal `delta` references that keep the process alive or, if not `keepsAlive`, only the loop. */
  adjustReferences(delta: number, keepsAlive: boolean): void {
    if (keepsAlive) this.#references += delta;
    else this.#weakReferences += delta;
    const wanted = this.#references + this.#weakReferences;
    if (wanted > 0 && !this.#running) {
      this.#running = true;
      this.#stopped = this.#run().catch((error) => {
        // Without its loop, nothing in the process hears its sockets again: say why, then fail.
        logger.fatal("the event loop stopped: {error}", { error });
        throw error;
      });
    } else if (this.#blockingWait !== undefined) {
      if (wanted === 0) this.#wake();
      else this.#keepAliveWhileBlocked(this.#references > 0);
    }
  }

  #keepAliveWhileBlocked(keepsAlive: boolean): void {
    if (keepsAlive === this.#blockingWaitKeepsAlive) return;
    this.#blockingWaitKeepsAlive = keepsAlive;
    if (keepsAlive) denoCore?.refOpPromise?.(this.#blockingWait!);
    else denoCore?.unrefOpPromise?.(this.#blockingWait!);
  }

  #wake(): void {
    this.#wakeBuffer[0] = 1n;
    libc.write(this.#wakeFd, this.#wakeBuffer, sizeArgument(8));
  }

  #dispatch(view: DataView, count: number): void {
    for (let i = 0; i < count; i++) {
      const at = i * EPOLL_EVENT_SIZE;
      const fd = view.getInt32(at + EPOLL_DATA_OFFSET, true);
      const tag = view.getUint32(at + EPOLL_DATA_OFFSET + 4, true);
      if (tag === 0) {
        libc.read(this.#wakeFd, this.#wakeBuffer, sizeArgument(8));
        continue;
      }
      const target = this.#registrants[fd];
      if (target === undefined || target.tag !== tag) continue;
      try {
        target.onReady(view.getUint32(at, true));
      } catch (error) {
        logger.error("event handler for fd {fd} failed: {error}", { fd, error });
      }
    }
  }

  /**
   * Lets the loop wait up to `ms` milliseconds on the JavaScript thread
   * itself, one millisecond at a time, after its last event and before it
   * hands the wait to a helper thread. A busy daemon then wakes straight from
   * the kernel instead of through a thread hand-off; the cost is that other
   * work in the process (timers, other I/O) may wait up to a millisecond for
   * its turn while events are flowing. Default 0: libraries leave it alone.
   */
  setLinger(ms: number): void {
    this.#lingerSlices = Math.max(0, Math.round(ms));
  }

  /**
   * @internal An event is due within about a millisecond (see
   * {@link Readiness.readable}): until then, the loop waits for events on
   * the JavaScript thread, once everything else has had a turn, instead of
   * handing the wait to a helper thread. An expectation that does not come
   * true costs that millisecond once and never again.
   */
  expectSoon(): void {
    this.#expectedUntil = performance.now() + EXPECT_MS;
    this.#expectedFresh = true;
  }

  async #run(): Promise<void> {
    try {
      let lingerLeft = 0;
      let failedWaits = 0;
      let dispatched = false;
      let lastTurn = performance.now();
      while (this.#references + this.#weakReferences > 0) {
        // A fresh expectation waits for the turn below anyway, and the wait after the turn
        // sees whatever is ready now: no poll before it.
        if (this.#expectedFresh && !dispatched) {
          await macrotask();
          this.#expectedFresh = false;
          lastTurn = performance.now();
          continue;
        }
        // An event is due and everything else has had its turn: wait for it here, one slice.
        let expected = false;
        if (this.#expectedUntil !== 0 && !this.#expectedFresh) {
          expected = this.#expectedUntil > performance.now();
          if (!expected) this.#expectedUntil = 0;
        }
        const waitMs = lingerLeft > 0 || expected ? 1 : 0;
        const ready = libc.epoll_wait(this.#epfd, this.#polled, MAX_EVENTS, waitMs);
        if (ready > 0) {
          this.#dispatch(this.#polledView, ready);
          lingerLeft = this.#lingerSlices;
          dispatched = true;
          // Continuations of what was just resolved run now; timers and other I/O get a
          // full turn at least every millisecond however busy the sockets are.
          if (performance.now() - lastTurn < TURN_INTERVAL_MS) {
            await null;
            continue;
          }
        } else if (ready < 0) {
          if (errno() !== Errno.EINTR) throw new OsError("epoll_wait", errno());
          continue;
        } else {
          if (lingerLeft > 0) lingerLeft--;
          // An unanswered slice ends the expectation: a late answer comes through the helper.
          if (expected) this.#expectedUntil = 0;
          // A fresh expectation gets its slice after a turn.
          if (!dispatched && waitMs === 0 && !this.#expectedFresh) {
            // Quiet, and nothing left to run: hand the wait to a helper thread.
            this.#blockingWait = libc.epoll_wait_blocking(this.#epfd, this.#waited, MAX_EVENTS, -1);
            this.#blockingWaitKeepsAlive = true;
            this.#keepAliveWhileBlocked(this.#references > 0);
            // A failed blocking wait set errno on the helper thread, out of our reach: retry,
            // and poll synchronously (where errno is ours) if it keeps failing.
            const waited = await this.#blockingWait;
            this.#blockingWait = undefined;
            if (waited >= 0) failedWaits = 0;
            else if (++failedWaits >= 3) {
              failedWaits = 0;
              if (libc.epoll_wait(this.#epfd, this.#polled, 1, 0) < 0 && errno() !== Errno.EINTR) {
                throw new OsError("epoll_wait", errno());
              }
            }
            if (waited > 0) this.#dispatch(this.#waitedView, waited);
            dispatched = waited > 0;
            lingerLeft = waited > 0 ? this.#lingerSlices : 0;
            continue;
          }
        }
        // Resolved promise chains, timers and other I/O get a full turn.
        dispatched = false;
        await macrotask();
        this.#expectedFresh = false;
        lastTurn = performance.now();
      }
    } finally {
      this.#running = false;
      this.#blockingWait = undefined;
    }
  }
}

/** Bits that mean "a read will not block" (data, EOF or an error to report). */
export const READABLE_EVENTS: number = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR;
/** Bits that mean "a write will not block". */
export const WRITABLE_EVENTS: number = EPOLLOUT | EPOLLHUP | EPOLLERR;

const READ_INTEREST = EPOLLIN | EPOLLRDHUP | EPOLLET;
const WRITE_INTEREST = EPOLLOUT | EPOLLET;

/**
 * Edge-triggered readiness for one descriptor, as promises: an operation tries
 * its system call first and awaits only after `EAGAIN`.
 */
export class Readiness {
  readonly #fd: number;
  #watch?: Watch;
  #interest = 0;
  #keepsAlive = true;
  #readWaiters: (() => void)[] = [];
  #writeWaiters: (() => void)[] = [];

  /** @param fd a nonblocking descriptor, registered lazily on the first wait */
  constructor(fd: number) {
    this.#fd = fd;
  }

  /**
   * Resolves when the descriptor may have become readable. With `soon`, the
   * caller expects that within about a millisecond (a local peer's answer to
   * a request just sent, the next bytes of a stream in full flow): the
   * reactor then waits up to that long on the JavaScript thread before
   * handing the wait to a helper thread, whose hand-off costs more CPU than
   * such an answer takes to arrive. The price: timers and other I/O may wait
   * up to that millisecond, once per such call.
   */
  readable(soon = false): Promise<void> {
    if (soon) Reactor.instance().expectSoon();
    return this.#wait(this.#readWaiters, READ_INTEREST);
  }

  /** Resolves when the descriptor may have become writable; `soon` as for {@link readable}. */
  writable(soon = false): Promise<void> {
    if (soon) Reactor.instance().expectSoon();
    return this.#wait(this.#writeWaiters, WRITE_INTEREST);
  }

  /**
   * Whether a pending wait keeps the process alive (the default). When not,
   * waits are still answered for as long as something else keeps the
   * process running, as with Node's `unref()`.
   */
  get keepsAlive(): boolean {
    return this.#keepsAlive;
  }

  set keepsAlive(value: boolean) {
    this.#keepsAlive = value;
    if (this.#watch !== undefined) this.#watch.keepsAlive = value;
  }

  /** Wakes every waiter (they retry and see the descriptor's state) and unregisters. */
  cancel(closing: boolean): void {
    this.#watch?.cancel(closing);
    this.#watch = undefined;
    this.#onReady(READABLE_EVENTS | WRITABLE_EVENTS);
  }

  #wait(waiters: (() => void)[], interest: number): Promise<void> {
    const promise = new Promise<void>((resolve) => waiters.push(resolve));
    // Only the directions waited for: a socket that is only read (a broker connection) then
    // gets no EPOLLOUT event for being writable. Adding or changing an edge-triggered watch
    // reports the current state, so no edge is missed.
    if (this.#watch === undefined) {
      this.#interest = interest;
      this.#watch = Reactor.instance().watch(
        this.#fd,
        interest,
        (events) => this.#onReady(events),
        this.#keepsAlive,
      );
    } else if ((this.#interest & interest) !== interest) {
      this.#interest |= interest;
      this.#watch.modify(this.#interest);
    }
    this.#watch.referenced = true;
    return promise;
  }

  #onReady(events: number): void {
    if (events & READABLE_EVENTS) this.#readWaiters = settle(this.#readWaiters);
    if (events & WRITABLE_EVENTS) this.#writeWaiters = settle(this.#writeWaiters);
    if (this.#watch && this.#readWaiters.length === 0 && this.#writeWaiters.length === 0) {
      this.#watch.referenced = false;
    }
  }
}

function settle(waiters: (() => void)[]): (() => void)[] {
  for (const resolve of waiters) resolve();
  return waiters.length === 0 ? waiters : [];
}
