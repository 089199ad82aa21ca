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

import { getLogger } from "@logtape/logtape";
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
// Event batches dispatched before giving timers, signals and other I/O a turn.
const BATCHES_PER_MACROTASK = 32;

// setImmediate costs ~2 µs; a chain of setTimeout(0) is clamped to milliseconds.
const macrotask = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * One descriptor's registration. The tag distinguishes it from an earlier
 * registration of a reused descriptor number whose events are still in the
 * batch being dispatched.
 */
export class Watch {
  readonly fd: number;
  readonly tag: number;
  handler: ReadyHandler;
  #reactor: Reactor;
  #referenced = false;
  #active = true;

  /** Use {@link Reactor.watch}. */
  constructor(reactor: Reactor, fd: number, tag: number, handler: ReadyHandler) {
    this.#reactor = reactor;
    this.fd = fd;
    this.tag = tag;
    this.handler = handler;
  }

  /** While referenced, the loop keeps running (and the process alive) for this watch. */
  set referenced(value: boolean) {
    if (!this.#active || value === this.#referenced) return;
    this.#referenced = value;
    this.#reactor.adjustReferences(value ? 1 : -1);
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
    this.#reactor.forget(this, closing);
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
  readonly #watches: (Watch | undefined)[] = [];
  #nextTag = 1;
  #references = 0;
  #running = false;
  #blocking = false;
  #stopped: Promise<void> = Promise.resolve();

  private constructor() {
    this.#epfd = libc.epoll_create1(EPOLL_CLOEXEC);
    if (this.#epfd < 0) throw new OsError("epoll_create1", errno());
    this.#wakeFd = libc.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (this.#wakeFd < 0) throw new OsError("eventfd", errno());
    this.control(EPOLL_CTL_ADD, this.#wakeFd, EPOLLIN, 0);
  }

  /** Registers `fd` for `events` (level-triggered unless `EPOLLET` is among them). */
  watch(fd: number, events: number, handler: ReadyHandler): Watch {
    const tag = this.#nextTag = (this.#nextTag + 1) >>> 0 || 1;
    const watch = new Watch(this, fd, tag, handler);
    this.control(EPOLL_CTL_ADD, fd, events, tag);
    this.#watches[fd] = watch;
    watch.referenced = true;
    return watch;
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

  /** @internal */
  forget(watch: Watch, closing: boolean): void {
    if (this.#watches[watch.fd] === watch) this.#watches[watch.fd] = undefined;
    if (!closing) libc.epoll_ctl(this.#epfd, EPOLL_CTL_DEL, watch.fd, this.#eventScratch);
  }

  /** @internal */
  adjustReferences(delta: number): void {
    this.#references += delta;
    if (this.#references > 0 && !this.#running) {
      this.#running = true;
      this.#stopped = this.#run();
    } else if (this.#references === 0 && this.#blocking) {
      this.#wake();
    }
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
      const watch = this.#watches[fd];
      if (watch === undefined || watch.tag !== tag) continue;
      try {
        watch.handler(view.getUint32(at, true));
      } catch (error) {
        logger.error("event handler for fd {fd} failed: {error}", { fd, error });
      }
    }
  }

  async #run(): Promise<void> {
    try {
      let batches = 0;
      while (this.#references > 0) {
        const ready = libc.epoll_wait(this.#epfd, this.#polled, MAX_EVENTS, 0);
        if (ready > 0) {
          this.#dispatch(this.#polledView, ready);
          // Let the continuations of what was just resolved run before polling again.
          if (++batches % BATCHES_PER_MACROTASK === 0) await macrotask();
          else await null;
          continue;
        }
        if (ready < 0 && errno() !== Errno.EINTR) throw new OsError("epoll_wait", errno());
        if (ready < 0) continue;
        // Promise chains resolved by the last batch may still hold work; give them a full turn.
        if (batches > 0) {
          batches = 0;
          await macrotask();
          continue;
        }
        this.#blocking = true;
        // A failed blocking wait set errno on the helper thread, out of our reach: retry it.
        const waited = await libc.epoll_wait_blocking(this.#epfd, this.#waited, MAX_EVENTS, -1);
        this.#blocking = false;
        if (waited > 0) this.#dispatch(this.#waitedView, waited);
      }
    } finally {
      this.#running = false;
      this.#blocking = false;
    }
  }
}

/** Bits that mean "a read will not block" (data, EOF or an error to report). */
export const READABLE_EVENTS: number = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR;
/** Bits that mean "a write will not block". */
export const WRITABLE_EVENTS: number = EPOLLOUT | EPOLLHUP | EPOLLERR;

/**
 * Edge-triggered readiness for one descriptor, as promises: an operation tries
 * its system call first and awaits only after `EAGAIN`.
 */
export class Readiness {
  readonly #fd: number;
  #watch?: Watch;
  #readWaiters: (() => void)[] = [];
  #writeWaiters: (() => void)[] = [];

  /** @param fd a nonblocking descriptor, registered lazily on the first wait */
  constructor(fd: number) {
    this.#fd = fd;
  }

  /** Resolves when the descriptor may have become readable. */
  readable(): Promise<void> {
    return this.#wait(this.#readWaiters);
  }

  /** Resolves when the descriptor may have become writable. */
  writable(): Promise<void> {
    return this.#wait(this.#writeWaiters);
  }

  /** Wakes every waiter (they retry and see the descriptor's state) and unregisters. */
  cancel(closing: boolean): void {
    this.#watch?.cancel(closing);
    this.#watch = undefined;
    this.#onReady(READABLE_EVENTS | WRITABLE_EVENTS);
  }

  #wait(waiters: (() => void)[]): Promise<void> {
    const promise = new Promise<void>((resolve) => waiters.push(resolve));
    // Adding an edge-triggered watch reports the current state, so no edge is missed.
    this.#watch ??= Reactor.instance().watch(
      this.#fd,
      EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
      (events) => this.#onReady(events),
    );
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
