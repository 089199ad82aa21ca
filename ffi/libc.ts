/**
 * The one `Deno.dlopen` of the project: every libc symbol we call, with its C
 * prototype. Nothing outside `ffi/` imports this file.
 *
 * `ssize_t` results are declared `i32`: every size we pass fits, and 32-bit
 * results come back as plain numbers instead of BigInts.
 *
 * @module
 */

/** Fails on anything but Linux x86_64 or aarch64, before dlopen can. */
function assertSupportedPlatform(): void {
  const { os, arch } = Deno.build;
  if (os !== "linux" || (arch !== "x86_64" && arch !== "aarch64")) {
    throw new Error(
      `one-socket runs on Linux x86_64 and aarch64 only (this is ${os} ${arch}): ` +
        "it binds Linux libc and its struct layouts directly",
    );
  }
}

const symbols = {
  // int socket(int domain, int type, int protocol)
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int socketpair(int domain, int type, int protocol, int sv[2])
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  // int bind(int fd, const struct sockaddr *addr, socklen_t len)
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // int listen(int fd, int backlog)
  listen: { parameters: ["i32", "i32"], result: "i32" },
  // int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
  accept4: { parameters: ["i32", "buffer", "buffer", "i32"], result: "i32" },
  // int connect(int fd, const struct sockaddr *addr, socklen_t len)
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  // ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  // ssize_t recv(int fd, void *buf, size_t len, int flags)
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  // ssize_t send(int fd, const void *buf, size_t len, int flags)
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  // ssize_t sendto(int fd, const void *buf, size_t len, int flags,
  //                const struct sockaddr *addr, socklen_t addrlen)
  sendto: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "u32"], result: "i32" },
  // int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  // ssize_t read(int fd, void *buf, size_t len)
  read: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  // ssize_t write(int fd, const void *buf, size_t len)
  write: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  // int shutdown(int fd, int how)
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  // int close(int fd)
  close: { parameters: ["i32"], result: "i32" },
  // int fcntl(int fd, int cmd, int arg)
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int fcntl(int fd, int cmd, struct flock *lock): the F_OFD_* record locks
  fcntl_lock: { name: "fcntl", parameters: ["i32", "i32", "buffer"], result: "i32" },
  // int getsockopt(int fd, int level, int name, void *value, socklen_t *len)
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  // int open(const char *path, int flags): the variadic mode is never needed (no O_CREAT)
  open: { parameters: ["buffer", "i32"], result: "i32" },
  // int unlink(const char *path)
  unlink: { parameters: ["buffer"], result: "i32" },
  // int open(const char *path, int flags, mode_t mode): with O_CREAT, the mode of a new file
  open_with_mode: { name: "open", parameters: ["buffer", "i32", "u32"], result: "i32" },
  // int fstat(int fd, struct stat *st)
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  // int flock(int fd, int operation)
  flock: { parameters: ["i32", "i32"], result: "i32" },
  // int ftruncate(int fd, off_t length)
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  // ssize_t pread(int fd, void *buf, size_t count, off_t offset)
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "i32" },
  // ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "i32" },
  // int memfd_create(const char *name, unsigned int flags): glibc 2.27, Linux 3.17
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
  // int lchown(const char *path, uid_t owner, gid_t group)
  lchown: { parameters: ["buffer", "u32", "u32"], result: "i32" },
  // int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
  fchmodat: { parameters: ["i32", "buffer", "u32", "i32"], result: "i32" },
  // uid_t geteuid(void)
  geteuid: { parameters: [], result: "u32" },
  // mode_t umask(mode_t mask)
  umask: { parameters: ["u32"], result: "u32" },
  // int ioctl(int fd, unsigned long request, int *value): only FIONREAD, whose argument is an int
  ioctl_int: { name: "ioctl", parameters: ["i32", "u64", "buffer"], result: "i32" },
  // int fchmod(int fd, mode_t mode)
  fchmod: { parameters: ["i32", "u32"], result: "i32" },
  // int epoll_create1(int flags)
  epoll_create1: { parameters: ["i32"], result: "i32" },
  // int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event)
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  // int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout): polls only
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  // The same call on a helper thread: the reactor's single blocking wait.
  epoll_wait_blocking: {
    name: "epoll_wait",
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  // int eventfd(unsigned int initval, int flags)
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  // int getrlimit(int resource, struct rlimit *rlim)
  getrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  // int setrlimit(int resource, const struct rlimit *rlim)
  setrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  // uid_t getuid(void)
  getuid: { parameters: [], result: "u32" },
  // DIR *opendir(const char *name)
  opendir: { parameters: ["buffer"], result: "pointer" },
  // struct dirent *readdir(DIR *dir): only ever compared with NULL, never dereferenced
  readdir: { parameters: ["pointer"], result: "pointer" },
  // int closedir(DIR *dir)
  closedir: { parameters: ["pointer"], result: "i32" },
  // int *__errno_location(void): the calling thread's errno
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

type Symbols = Deno.DynamicLibrary<typeof symbols>["symbols"];

// JavaScript only ever runs on this thread, so its errno lives at one fixed address.
let errnoView: Deno.UnsafePointerView;

/** Runs an FFI operation; a missing `--allow-ffi` becomes one line that names the flag. */
export function withFfiPermission<T>(operation: () => T): T {
  try {
    return operation();
  } catch (error) {
    if (!(error instanceof Deno.errors.NotCapable)) throw error;
    throw new Deno.errors.NotCapable(
      "one-socket calls libc through FFI: run Deno with --allow-ffi",
      { cause: error },
    );
  }
}

/**
 * Opens libc: the first use of {@link libc}, so that importing the library
 * needs no permission, and a missing one is named where it is needed.
 */
function openLibc(): Symbols {
  assertSupportedPlatform();
  const library = withFfiPermission(() => Deno.dlopen("libc.so.6", symbols));
  errnoView = new Deno.UnsafePointerView(library.symbols.__errno_location()!);
  libc = library.symbols;
  return libc;
}

/**
 * The bound libc symbols. Until the first call this is a stand-in that opens
 * the library and then steps aside: the binding is live, so every later call
 * goes straight to the symbols.
 */
export let libc: Symbols = new Proxy({} as Symbols, {
  get: (_target, name) => openLibc()[name as keyof Symbols],
});

// BigInts for the sizes passed recently: a JS number for a 64-bit parameter takes the FFI
// slow path (about 200 ns a call), a fresh BigInt costs an allocation; a cached one neither.
const sizes = new Map<number, bigint>();
const MAX_CACHED_SIZES = 256;

/** A `size_t` argument, as a BigInt cached per value. */
export function sizeArgument(length: number): bigint {
  let size = sizes.get(length);
  if (size === undefined) {
    if (sizes.size >= MAX_CACHED_SIZES) sizes.clear();
    size = BigInt(length);
    sizes.set(length, size);
  }
  return size;
}

/** errno of the last failed call on the JavaScript thread; read it right after the call. */
export function errno(): number {
  return errnoView.getInt32();
}

/** Numbers from the Linux headers; x86_64 and aarch64 agree on all of them. */
export const AF_UNIX = 1;
/** `SOCK_STREAM` */
export const SOCK_STREAM = 1;
/** `SOCK_DGRAM` */
export const SOCK_DGRAM = 2;
/** `SOCK_SEQPACKET` */
export const SOCK_SEQPACKET = 5;
/** `SOCK_NONBLOCK` (as a flag to socket/accept4/socketpair) */
export const SOCK_NONBLOCK = 0o4000;
/** `SOCK_CLOEXEC` */
export const SOCK_CLOEXEC = 0o2000000;
/** `SOL_SOCKET` */
export const SOL_SOCKET = 1;
/** `SO_PEERCRED` */
export const SO_PEERCRED = 17;
/** `SO_PEERPIDFD` (Linux 6.5): a pidfd of the peer as of its `connect`. */
export const SO_PEERPIDFD = 77;
/** `SO_TYPE` */
export const SO_TYPE = 3;
/** `SO_ACCEPTCONN`: whether `listen` was called on the socket. */
export const SO_ACCEPTCONN = 30;
/** `SO_DOMAIN` */
export const SO_DOMAIN = 39;
/** `SCM_RIGHTS` */
export const SCM_RIGHTS = 1;
/** `MSG_NOSIGNAL`: a write to a closed peer fails with EPIPE instead of raising SIGPIPE. */
export const MSG_NOSIGNAL = 0x4000;
/** `MSG_CMSG_CLOEXEC`: received descriptors are close-on-exec from birth. */
export const MSG_CMSG_CLOEXEC = 0x40000000;
/** `MSG_PEEK`: look at the next message without taking it. */
export const MSG_PEEK = 0x2;
/** `MSG_TRUNC` (as a recv flag): return a datagram's or packet's real length, however short the buffer. */
export const MSG_TRUNC = 0x20;
/** `MSG_DONTWAIT`: nonblocking for this call only. */
export const MSG_DONTWAIT = 0x40;
/** `MSG_CTRUNC` (in msg_flags): descriptors did not fit and the kernel dropped them. */
export const MSG_CTRUNC = 0x8;
/** `SHUT_WR` */
export const SHUT_WR = 1;
/** `F_GETFD` */
export const F_GETFD = 1;
/** `F_SETFD` */
export const F_SETFD = 2;
/** `FD_CLOEXEC` (descriptor flag, for F_GETFD/F_SETFD) */
export const FD_CLOEXEC = 1;
/** `F_GETFL` */
export const F_GETFL = 3;
/** `O_RDONLY | O_CLOEXEC` */
export const O_RDONLY_CLOEXEC = 0o2000000;
/** `F_SETFL` */
export const F_SETFL = 4;
/** `O_NONBLOCK` */
export const O_NONBLOCK = 0o4000;
/** `EPOLL_CLOEXEC` */
export const EPOLL_CLOEXEC = 0o2000000;
/** `EPOLL_CTL_ADD` */
export const EPOLL_CTL_ADD = 1;
/** `EPOLL_CTL_DEL` */
export const EPOLL_CTL_DEL = 2;
/** `EPOLL_CTL_MOD` */
export const EPOLL_CTL_MOD = 3;
/** `EPOLLIN` */
export const EPOLLIN = 0x001;
/** `EPOLLOUT` */
export const EPOLLOUT = 0x004;
/** `EPOLLERR` */
export const EPOLLERR = 0x008;
/** `EPOLLHUP` */
export const EPOLLHUP = 0x010;
/** `EPOLLRDHUP` */
export const EPOLLRDHUP = 0x2000;
/** `EPOLLET` */
export const EPOLLET = 0x80000000;
/** `EFD_NONBLOCK` */
export const EFD_NONBLOCK = 0o4000;
/** `EFD_CLOEXEC` */
export const EFD_CLOEXEC = 0o2000000;
/** `RLIMIT_NOFILE` */
export const RLIMIT_NOFILE = 7;
/** `FIONREAD`: bytes waiting to be read on a socket. */
export const FIONREAD = 0x541b;
/** `O_WRONLY` */
export const O_WRONLY = 0o1;
/** `O_RDWR` */
export const O_RDWR = 0o2;
/** `O_CREAT` */
export const O_CREAT = 0o100;
/** `O_EXCL` */
export const O_EXCL = 0o200;
/** `O_APPEND` */
export const O_APPEND = 0o2000;
/** `O_CLOEXEC` */
export const O_CLOEXEC = 0o2000000;
/** `O_PATH`: a handle to the file itself, to fstat it without opening its content. */
export const O_PATH = 0o10000000;
/** `O_NOFOLLOW`: the one flag here whose value differs, aarch64 taking the generic one. */
export const O_NOFOLLOW: number = Deno.build.arch === "x86_64" ? 0o400000 : 0o100000;
/** `MFD_CLOEXEC` (memfd_create): the memory file is close-on-exec from birth. */
export const MFD_CLOEXEC = 0x1;
/** `LOCK_EX` (flock) */
export const LOCK_EX = 2;
/** `LOCK_NB` (flock): fail with EWOULDBLOCK instead of waiting. */
export const LOCK_NB = 4;
/** `F_OFD_GETLK`: the lock that would conflict with a `struct flock`, if any (asm-generic). */
export const F_OFD_GETLK = 36;
/** `F_OFD_SETLK`: an open-file-description record lock, without waiting (asm-generic). */
export const F_OFD_SETLK = 37;
/** `F_RDLCK` (struct flock l_type) */
export const F_RDLCK = 0;
/** `F_WRLCK` (struct flock l_type): needs a descriptor open for writing. */
export const F_WRLCK = 1;
/** `F_UNLCK` (struct flock l_type; what F_OFD_GETLK reports when nothing conflicts) */
export const F_UNLCK = 2;
/** `SEEK_SET` (struct flock l_whence) */
export const SEEK_SET = 0;
/** `AT_FDCWD`: a path relative to the working directory, for the `*at` calls. */
export const AT_FDCWD = -100;
/** `AT_SYMLINK_NOFOLLOW` */
export const AT_SYMLINK_NOFOLLOW = 0x100;
