/*
 * A stand-in for systemd's service manager, as far as its file descriptor
 * store goes (sd_notify(3), sd_listen_fds(3), FileDescriptorStoreMax= in
 * systemd.service(5), $FDSTORE in systemd.exec(5)), so that the tests can
 * prove a service keeps descriptors across restarts and crashes the way it
 * would under systemd, which cannot run in a test.
 *
 * usage: service_manager --notify PATH [--fdstore-max N] [--restart-delay MS]
 *                        [--newest-first] -- PROGRAM [ARGS...]
 *
 * It binds a datagram socket at PATH, runs PROGRAM with NOTIFY_SOCKET=PATH
 * and FDSTORE=N, keeps the descriptors sent with FDSTORE=1 and hands them
 * back as LISTEN_FDS at every restart. SIGHUP restarts the service
 * (`systemctl restart`), SIGTERM or SIGINT stops it and exits 0 (`systemctl
 * stop`; a second one sends SIGKILL). One line on stdout per event:
 *
 *   started PID            ready PID        stopping PID
 *   exited PID CODE        killed PID SIGNAL
 *   stored NAME COUNT      removed NAME COUNT   (COUNT: descriptors now stored)
 *   full NAME              duplicate NAME       hangup NAME
 *
 * Where systemd differs: it hands the store back newest first, which
 * --newest-first selects; without it the order is the order of storing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NOTIFY_BUFFER_MAX 4096 /* systemd reads at most PIPE_BUF bytes per notification */
#define SCM_MAX_FD 253         /* the kernel's limit on descriptors per message */
#define FDNAME_MAX 255         /* systemd's limit on a descriptor name */
#define EXIT_EXEC 203          /* systemd's exit status when exec fails */
#ifndef F_DUPFD_QUERY
#define F_DUPFD_QUERY 1027 /* Linux 6.10: do two descriptors share one open file? */
#endif

struct stored {
  int fd;
  bool poll;
  char name[FDNAME_MAX + 1];
};

static struct stored *store;
static size_t stored_count, store_max = 1024;
static bool newest_first;
static long restart_delay_ms = 100;
static const char *notify_path;
static int notify_fd = -1, signal_fd = -1;
static char **program;
static pid_t child;             /* 0 while no service process runs */
static long long restart_at = -1; /* monotonic ms of the next start, -1 for none */
static bool restart_requested, stopping;

/* One line on stdout in one write: the service writes to the same pipe, and
 * the tests read it line by line as it comes. */
static void say(const char *format, ...) {
  char line[FDNAME_MAX + 64];
  va_list args;
  va_start(args, format);
  int length = vsnprintf(line, sizeof line - 1, format, args);
  va_end(args);
  if (length < 0) return;
  if ((size_t)length > sizeof line - 2) length = (int)sizeof line - 2;
  line[length++] = '\n';
  for (int done = 0; done < length;) {
    ssize_t n = write(STDOUT_FILENO, line + done, (size_t)(length - done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return;
    done += (int)n;
  }
}

static void fail(const char *call) {
  fprintf(stderr, "service_manager: %s: %s\n", call, strerror(errno));
}

static void usage(const char *problem) {
  fprintf(stderr,
          "service_manager: %s\nusage: service_manager --notify PATH [--fdstore-max N] "
          "[--restart-delay MS] [--newest-first] -- PROGRAM [ARGS...]\n",
          problem);
  exit(2);
}

static long long now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* systemd's fdname_is_valid(): printable ASCII without ':', which separates
 * the names in LISTEN_FDNAMES; the empty name is allowed. */
static bool fdname_is_valid(const char *name) {
  size_t length = 0;
  for (const char *p = name; *p; p++, length++) {
    if (*p == ':' || *p < 0x20 || *p > 0x7e) return false;
  }
  return length <= FDNAME_MAX;
}

/* systemd's same_fd(): systemd keeps one entry per open file, so a
 * descriptor sent twice comes back once. */
static bool same_file(int a, int b) {
  int r = fcntl(a, F_DUPFD_QUERY, b);
  if (r >= 0) return r == 1;
  struct stat sa, sb;
  if (fstat(a, &sa) < 0 || fstat(b, &sb) < 0) return false;
  if (sa.st_dev != sb.st_dev || sa.st_ino != sb.st_ino) return false;
  pid_t self = getpid();
  r = (int)syscall(SYS_kcmp, self, self, KCMP_FILE, a, b);
  if (r >= 0) return r == 0;
  /* No kcmp either: a socket cannot be opened twice, so one inode is one socket. */
  return S_ISSOCK(sa.st_mode);
}

static void store_add(int fd, const char *name, bool poll) {
  if (stored_count >= store_max) {
    close(fd);
    say("full %s", name);
    return;
  }
  for (size_t i = 0; i < stored_count; i++) {
    if (same_file(store[i].fd, fd)) {
      close(fd);
      say("duplicate %s", name);
      return;
    }
  }
  struct stored *entry = &store[stored_count++];
  entry->fd = fd;
  entry->poll = poll;
  snprintf(entry->name, sizeof entry->name, "%s", name);
  say("stored %s %zu", name, stored_count);
}

/* Removal keeps the order of the others: it is the order they are handed back in. */
static void store_drop(size_t index) {
  close(store[index].fd);
  memmove(&store[index], &store[index + 1], (stored_count - index - 1) * sizeof *store);
  stored_count--;
}

static void hangup(int fd) {
  for (size_t i = 0; i < stored_count; i++) {
    if (store[i].fd != fd) continue;
    char name[FDNAME_MAX + 1];
    memcpy(name, store[i].name, sizeof name);
    store_drop(i);
    say("hangup %s", name);
    return;
  }
}

/* As systemd does: a stored descriptor that reports POLLHUP or POLLERR (events
 * 0 asks for nothing else) is dropped, unless it was stored with FDPOLL=0. */
static void sweep_hangups(void) {
  struct pollfd fds[stored_count + 1];
  nfds_t count = 0;
  for (size_t i = 0; i < stored_count; i++) {
    if (store[i].poll) fds[count++] = (struct pollfd){.fd = store[i].fd};
  }
  if (count == 0 || poll(fds, count, 0) <= 0) return;
  for (nfds_t i = 0; i < count; i++) {
    if (fds[i].revents) hangup(fds[i].fd);
  }
}

/* One notification, in systemd's order: STOPPING=1 wins over READY=1, and
 * FDSTOREREMOVE=1 over FDSTORE=1; descriptors not stored are closed. */
static void handle_message(char *text, size_t length, int *fds, int fd_count, pid_t sender) {
  const char *name = NULL;
  bool fdstore = false, remove = false, nopoll = false, ready = false, stopped = false;
  text[length] = '\0';
  for (char *line = text, *end = text + length; line <= end;) {
    char *newline = memchr(line, '\n', (size_t)(end - line));
    if (newline == NULL) newline = end;
    *newline = '\0';
    if (name == NULL && strncmp(line, "FDNAME=", 7) == 0) name = line + 7;
    fdstore |= strcmp(line, "FDSTORE=1") == 0;
    remove |= strcmp(line, "FDSTOREREMOVE=1") == 0;
    nopoll |= strcmp(line, "FDPOLL=0") == 0;
    ready |= strcmp(line, "READY=1") == 0;
    stopped |= strcmp(line, "STOPPING=1") == 0;
    line = newline + 1;
  }
  if (stopped) {
    say("stopping %ld", (long)sender);
  } else if (ready) {
    say("ready %ld", (long)sender);
  }
  if (remove) {
    if (name == NULL || !fdname_is_valid(name)) {
      fprintf(stderr, "service_manager: FDSTOREREMOVE=1 without a valid FDNAME=, ignored\n");
    } else {
      for (size_t i = stored_count; i-- > 0;) {
        if (strcmp(store[i].name, name) != 0) continue;
        store_drop(i);
        say("removed %s %zu", name, stored_count);
      }
    }
  } else if (fdstore) {
    if (name != NULL && !fdname_is_valid(name)) {
      fprintf(stderr, "service_manager: invalid FDNAME=, storing as \"stored\"\n");
      name = NULL;
    }
    for (int i = 0; i < fd_count; i++) store_add(fds[i], name ? name : "stored", !nopoll);
    fd_count = 0;
  }
  if (fd_count > 0) {
    fprintf(stderr, "service_manager: closing %d descriptors sent without FDSTORE=1\n", fd_count);
    for (int i = 0; i < fd_count; i++) close(fds[i]);
  }
}

static void receive_notifications(void) {
  for (;;) {
    char text[NOTIFY_BUFFER_MAX + 1];
    union {
      struct cmsghdr align;
      char space[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * SCM_MAX_FD)];
    } control;
    struct iovec iov = {.iov_base = text, .iov_len = NOTIFY_BUFFER_MAX};
    struct msghdr message = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof control};
    /* MSG_CMSG_CLOEXEC: stored descriptors reach a service only through LISTEN_FDS. */
    ssize_t length = recvmsg(notify_fd, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (length < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) fail("recvmsg");
      return;
    }
    int fds[SCM_MAX_FD];
    int fd_count = 0;
    pid_t sender = child;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c)) {
      if (c->cmsg_level != SOL_SOCKET) continue;
      if (c->cmsg_type == SCM_CREDENTIALS) {
        struct ucred credentials;
        memcpy(&credentials, CMSG_DATA(c), sizeof credentials);
        sender = credentials.pid;
      } else if (c->cmsg_type == SCM_RIGHTS) {
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
          int fd;
          memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          if (fd_count < SCM_MAX_FD) fds[fd_count++] = fd;
          else close(fd);
        }
      }
    }
    if (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
      /* As systemd does: half a message is no message. */
      fprintf(stderr, "service_manager: truncated notification ignored\n");
      for (int i = 0; i < fd_count; i++) close(fds[i]);
      continue;
    }
    handle_message(text, (size_t)length, fds, fd_count, sender);
  }
}

static void close_from(int first) {
  if (syscall(SYS_close_range, (unsigned)first, ~0U, 0) == 0) return;
  struct rlimit limit;
  long last = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
                  ? (long)limit.rlim_cur
                  : 65536;
  for (long fd = first; fd < last; fd++) close((int)fd);
}

/* In the child: the execution environment systemd gives a service. */
static void exec_service(pid_t manager, int gate) {
  /* Under systemd the service dies with its cgroup; here with the manager, so
   * that a test killing the manager leaves nothing behind. */
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) fail("prctl");
  if (getppid() != manager) _exit(EXIT_EXEC);
  /* Wait until the manager has printed "started PID", so that it comes first. */
  char byte;
  while (read(gate, &byte, 1) < 0 && errno == EINTR) {
  }
  for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);

  /* Move the store above its target range first, so that dup2 never lands on
   * a stored descriptor not yet moved; dup2 then clears FD_CLOEXEC. */
  int n = (int)stored_count;
  for (int i = 0; i < n; i++) {
    store[i].fd = fcntl(store[i].fd, F_DUPFD_CLOEXEC, 3 + n);
    if (store[i].fd < 0) fail("fcntl"), _exit(EXIT_EXEC);
  }
  static char names[(FDNAME_MAX + 1) * 1024 + 1];
  char *names_end = names;
  for (int i = 0; i < n; i++) {
    const struct stored *entry = &store[newest_first ? n - 1 - i : i];
    if (dup2(entry->fd, 3 + i) < 0) fail("dup2"), _exit(EXIT_EXEC);
    size_t room = sizeof names - (size_t)(names_end - names);
    if (room > 1) names_end += snprintf(names_end, room, "%s%s", i ? ":" : "", entry->name);
  }
  /* Nothing else of the manager's, nor what it inherited, reaches the service. */
  close_from(3 + n);
  if (n > 0) {
    char number[32];
    snprintf(number, sizeof number, "%ld", (long)getpid());
    setenv("LISTEN_PID", number, 1);
    snprintf(number, sizeof number, "%d", n);
    setenv("LISTEN_FDS", number, 1);
    setenv("LISTEN_FDNAMES", names, 1);
  }
  execvp(program[0], program);
  fail("execvp");
  _exit(EXIT_EXEC);
}

static void start(void) {
  /* Whatever the previous process sent before it ended counts, as it does
   * under systemd, which reads notifications before it handles SIGCHLD. */
  receive_notifications();
  sweep_hangups();
  restart_at = -1;
  int gate[2];
  if (pipe2(gate, O_CLOEXEC) < 0) {
    fail("pipe2");
    restart_at = now_ms() + restart_delay_ms;
    return;
  }
  pid_t manager = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    fail("fork");
    restart_at = now_ms() + restart_delay_ms;
  } else if (pid == 0) {
    close(gate[1]);
    exec_service(manager, gate[0]);
  } else {
    child = pid;
    say("started %ld", (long)pid);
  }
  close(gate[0]);
  close(gate[1]); /* end of file on the gate: the child goes on */
}

static void finish(void) {
  while (stored_count > 0) store_drop(stored_count - 1);
  close(notify_fd);
  if (unlink(notify_path) < 0) fail("unlink");
  close(signal_fd);
  exit(0);
}

static void reap(void) {
  int status;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    if (pid != child) continue;
    if (WIFSIGNALED(status)) {
      say("killed %ld %d", (long)pid, WTERMSIG(status));
    } else {
      say("exited %ld %d", (long)pid, WEXITSTATUS(status));
    }
    child = 0;
    if (stopping) finish();
    if (restart_requested) {
      restart_requested = false;
      start();
    } else {
      restart_at = now_ms() + restart_delay_ms;
    }
  }
}

static void handle_signals(void) {
  struct signalfd_siginfo info;
  while (read(signal_fd, &info, sizeof info) == sizeof info) {
    switch (info.ssi_signo) {
    case SIGCHLD:
      reap();
      break;
    case SIGHUP: /* systemctl restart: stop, then start at once with the store */
      if (stopping || restart_requested) break;
      if (child == 0) {
        start();
      } else if (kill(child, SIGTERM) < 0) {
        fail("kill");
      } else {
        restart_requested = true;
      }
      break;
    default: /* SIGTERM, SIGINT: systemctl stop; a second one does not wait */
      if (child == 0) finish();
      if (kill(child, stopping ? SIGKILL : SIGTERM) < 0) fail("kill");
      stopping = true;
      break;
    }
  }
}

static long parse_number(const char *option, const char *text, long max) {
  char *end;
  errno = 0;
  long value = strtol(text, &end, 10);
  if (errno || end == text || *end || value < 0 || value > max) {
    char problem[128];
    snprintf(problem, sizeof problem, "%s wants a number from 0 to %ld", option, max);
    usage(problem);
  }
  return value;
}

int main(int argc, char **argv) {
  int i = 1;
  for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
    const char *option = argv[i];
    if (strcmp(option, "--") == 0) {
      i++;
      break;
    }
    if (strcmp(option, "--newest-first") == 0) {
      newest_first = true;
      continue;
    }
    if (i + 1 >= argc) usage("an option wants a value");
    const char *value = argv[++i];
    if (strcmp(option, "--notify") == 0) {
      notify_path = value;
    } else if (strcmp(option, "--fdstore-max") == 0) {
      store_max = (size_t)parse_number(option, value, 1024);
    } else if (strcmp(option, "--restart-delay") == 0) {
      restart_delay_ms = parse_number(option, value, 3600000);
    } else {
      usage("unknown option");
    }
  }
  if (notify_path == NULL) usage("--notify PATH is required");
  if (i >= argc) usage("no PROGRAM");
  program = &argv[i];
  struct sockaddr_un address = {.sun_family = AF_UNIX};
  if (strlen(notify_path) >= sizeof address.sun_path) usage("--notify PATH is too long");
  strcpy(address.sun_path, notify_path);

  /* Signals arrive on a descriptor, so that the poll loop sees them, child
   * exits and notifications in one place, without handlers or races. */
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  sigaddset(&mask, SIGHUP);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) return fail("sigprocmask"), 1;
  signal_fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (signal_fd < 0) return fail("signalfd"), 1;

  notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (notify_fd < 0) return fail("socket"), 1;
  int on = 1, buffer = 8 << 20; /* systemd asks for 8 MiB, so that senders do not block */
  if (setsockopt(notify_fd, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) < 0) fail("setsockopt");
  (void)setsockopt(notify_fd, SOL_SOCKET, SO_RCVBUF, &buffer, sizeof buffer);
  if (unlink(notify_path) < 0 && errno != ENOENT) return fail("unlink"), 1;
  if (bind(notify_fd, (struct sockaddr *)&address, sizeof address) < 0) return fail("bind"), 1;

  char number[32];
  snprintf(number, sizeof number, "%zu", store_max);
  setenv("NOTIFY_SOCKET", notify_path, 1);
  if (store_max > 0) setenv("FDSTORE", number, 1); /* systemd sets it only then */
  else unsetenv("FDSTORE");
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");

  store = calloc(store_max + 1, sizeof *store);
  struct pollfd *fds = calloc(store_max + 2, sizeof *fds);
  if (store == NULL || fds == NULL) return fail("calloc"), 1;
  start();
  for (;;) {
    int timeout = -1;
    if (child == 0 && restart_at >= 0) {
      long long left = restart_at - now_ms();
      timeout = left > 0 ? (int)left : 0;
    }
    fds[0] = (struct pollfd){.fd = signal_fd, .events = POLLIN};
    fds[1] = (struct pollfd){.fd = notify_fd, .events = POLLIN};
    nfds_t count = 2;
    for (size_t s = 0; s < stored_count; s++) {
      if (store[s].poll) fds[count++] = (struct pollfd){.fd = store[s].fd};
    }
    if (poll(fds, count, timeout) < 0) {
      if (errno == EINTR) continue;
      return fail("poll"), 1;
    }
    /* Hang-ups first, while the descriptor numbers polled are still the store's. */
    for (nfds_t s = 2; s < count; s++) {
      if (fds[s].revents) hangup(fds[s].fd);
    }
    if (fds[1].revents) receive_notifications();
    if (fds[0].revents) handle_signals();
    if (child == 0 && !stopping && restart_at >= 0 && now_ms() >= restart_at) start();
  }
}
