/*
 * The load generator of scripts/bench.ts, in C so that it costs less CPU per
 * pairing than the brokers it measures (a Deno generator cost more than our
 * broker did, and the two share the machine's cores).
 *
 * usage:
 *   loadgen pair SOCKET [--concurrency N] [--pairs N] [--warmup N] [--idle N] [--broker-pid PID]
 *     Keeps --concurrency pairings in flight. A pairing is two nonblocking connects, a
 *     GET_PAIR as server and one as client on a fresh key, both SET_PAIR
 *     replies checked (1044 bytes, one descriptor) and every descriptor
 *     closed; its latency runs from the first socket() to the second reply.
 *     --idle opens that many extra connections first, each waiting on a key
 *     nobody else sends; one closed by the broker fails the run. Measures
 *     after the warm-up; given the broker's pid, also its CPU time over the
 *     measured pairings (/proc/PID/stat) and its peak RSS (VmHWM).
 *   loadgen stream SOCKET KEY read|write [--bytes N] [--chunk N]
 *     Pairs on KEY through the broker (read as server, write as client), then
 *     reads to end of stream, or writes N bytes and closes.
 *   loadgen socketpair [--bytes N] [--chunk N]
 *     The baseline for stream: the same write loop in a child process and
 *     the same read loop here, on a plain socketpair.
 *
 * Prints one JSON object on stdout; exits 1 with one line on stderr if a
 * pairing fails or nothing completes for 10 s, 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum {
  MESSAGE_SIZE = 1044,
  MODE_CLIENT = 1,
  MODE_SERVER = 2,
  STALL_MS = 10000,
  MAX_EVENTS = 256,
};

static const char USAGE[] =
    "usage: loadgen pair SOCKET [--concurrency N] [--pairs N] [--warmup N] [--idle N] "
    "[--broker-pid PID]\n"
    "       loadgen stream SOCKET KEY read|write [--bytes N] [--chunk N]\n"
    "       loadgen socketpair [--bytes N] [--chunk N]\n";

static struct sockaddr_un address = { .sun_family = AF_UNIX };
static socklen_t address_length;

static _Noreturn void fail(const char *what) {
  if (errno) fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
  else fprintf(stderr, "loadgen: %s\n", what);
  exit(1);
}

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* This process's user and system CPU time in µs (getrusage: µs resolution). */
static void own_cpu(double *user, double *system) {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  *user = usage.ru_utime.tv_sec * 1e6 + usage.ru_utime.tv_usec;
  *system = usage.ru_stime.tv_sec * 1e6 + usage.ru_stime.tv_usec;
}

/* Another process's user and system CPU time in µs, from /proc (clock-tick resolution); 0 if unreadable. */
static int process_cpu(int pid, double *user, double *system) {
  char path[64], text[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *file = fopen(path, "r");
  if (file == NULL) return 0;
  size_t length = fread(text, 1, sizeof text - 1, file);
  fclose(file);
  text[length] = '\0';
  /* The command name in parentheses may hold spaces; utime and stime are the 12th and 13th fields after it. */
  char *rest = strrchr(text, ')');
  unsigned long utime, stime;
  if (rest == NULL || sscanf(rest + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime,
                             &stime) != 2) {
    return 0;
  }
  double micros_per_tick = 1e6 / (double)sysconf(_SC_CLK_TCK);
  *user = utime * micros_per_tick;
  *system = stime * micros_per_tick;
  return 1;
}

/* Another process's peak resident set size in KiB (VmHWM), or -1 if unreadable. */
static long peak_rss_kib(int pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", pid);
  FILE *file = fopen(path, "r");
  if (file == NULL) return -1;
  long kib = -1;
  while (kib < 0 && fgets(line, sizeof line, file)) sscanf(line, "VmHWM: %ld kB", &kib);
  fclose(file);
  return kib;
}

static void raise_descriptor_limit(void) {
  struct rlimit limit;
  if (getrlimit(RLIMIT_NOFILE, &limit) < 0) return;
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
}

static void set_address(const char *path) {
  size_t length = strlen(path);
  if (length >= sizeof address.sun_path) {
    errno = 0;
    fail("socket path too long");
  }
  memcpy(address.sun_path, path, length);
  if (path[0] == '@') address.sun_path[0] = '\0'; /* abstract */
  address_length = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + length);
}

static void encode_get_pair(uint8_t *message, const char *key, uint16_t mode) {
  uint32_t request = 1, flags = 1, size = 1028;
  uint16_t key_length = (uint16_t)strlen(key);
  memset(message, 0, MESSAGE_SIZE);
  memcpy(message, &request, 4); /* little-endian hosts */
  memcpy(message + 4, &flags, 4);
  memcpy(message + 8, &size, 4);
  memcpy(message + 12, &mode, 2);
  memcpy(message + 14, &key_length, 2);
  memcpy(message + 16, key, key_length);
}

/* A SET_PAIR as the C client accepts it: request 2, flags 1, size 8. */
static int valid_set_pair(const uint8_t *m) {
  static const uint8_t header[12] = { 2, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0 };
  return memcmp(m, header, sizeof header) == 0;
}

/*
 * One recvmsg of (part of) a SET_PAIR into `into`; every descriptor that came
 * with it is added to `*descriptors` and closed, except the first, which is
 * kept in `*kept` when `kept` is not NULL. Returns what recvmsg returned.
 */
static ssize_t receive_reply(int fd, uint8_t *into, size_t want, int *descriptors, int *kept) {
  union { struct cmsghdr header; char space[CMSG_SPACE(4 * sizeof(int))]; } control;
  struct iovec iov = { .iov_base = into, .iov_len = want };
  struct msghdr message = {
    .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof control,
  };
  ssize_t count = recvmsg(fd, &message, MSG_CMSG_CLOEXEC);
  if (count <= 0) return count;
  for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message); cmsg; cmsg = CMSG_NXTHDR(&message, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
    int *fds = (int *)CMSG_DATA(cmsg);
    for (size_t i = 0; i < (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
      if (kept && *descriptors == 0) *kept = fds[i];
      else close(fds[i]);
      ++*descriptors;
    }
  }
  if (message.msg_flags & MSG_CTRUNC) *descriptors += 1000; /* more than fit: invalid anyway */
  return count;
}

/* A nonblocking socket connected to the broker; a full backlog (EAGAIN) is retried after 1 ms. */
static int connect_broker(void) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) fail("socket");
  while (connect(fd, (struct sockaddr *)&address, address_length) < 0) {
    if (errno != EAGAIN && errno != EINTR) fail("connect");
    usleep(1000);
  }
  return fd;
}

static void send_request(int fd, const char *key, uint16_t mode) {
  uint8_t message[MESSAGE_SIZE];
  encode_get_pair(message, key, mode);
  /* A fresh Unix stream socket takes 1044 bytes at once, accepted or not. */
  if (send(fd, message, MESSAGE_SIZE, MSG_NOSIGNAL) != MESSAGE_SIZE) fail("send GET_PAIR");
}

/* ---- pair ---- */

struct side {
  int fd;
  uint32_t received;
  int descriptors;
  uint8_t reply[MESSAGE_SIZE];
};

struct slot {
  struct side sides[2]; /* server, client */
  int pending;          /* sides still waiting for their reply */
  uint64_t started;
};

/* The epoll data word of an idle waiter; pairing sides use slot * 2 + side. */
#define IDLE_TAG (UINT64_C(1) << 63)

static int epfd;
static uint32_t key_sequence;

static void start_side(struct slot *slot, uint64_t index, const char *key) {
  struct side *side = &slot->sides[index & 1];
  side->fd = connect_broker();
  side->received = 0;
  side->descriptors = 0;
  send_request(side->fd, key, (index & 1) ? MODE_CLIENT : MODE_SERVER);
  struct epoll_event event = { .events = EPOLLIN, .data.u64 = index };
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, side->fd, &event) < 0) fail("epoll_ctl");
}

static void start_pairing(struct slot *slots, uint64_t slot_index) {
  char key[48];
  snprintf(key, sizeof key, "loadgen-%d-%" PRIu32, (int)getpid(), key_sequence++);
  struct slot *slot = &slots[slot_index];
  slot->started = now_ns();
  slot->pending = 2;
  start_side(slot, slot_index * 2, key);
  start_side(slot, slot_index * 2 + 1, key);
}

/* Whether the side is done: its whole reply and exactly one descriptor are in. Fails the run on anything else. */
static int on_reply(struct side *side) {
  ssize_t count = receive_reply(side->fd, side->reply + side->received, MESSAGE_SIZE - side->received,
                                &side->descriptors, NULL);
  if (count < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
  errno = 0;
  if (count == 0) fail("the broker closed a connection without a SET_PAIR reply");
  if (count < 0) fail("recvmsg");
  side->received += (uint32_t)count;
  if (side->received < MESSAGE_SIZE) return 0;
  if (!valid_set_pair(side->reply) || side->descriptors != 1) fail("invalid SET_PAIR reply");
  close(side->fd);
  return 1;
}

/* Runs `count` pairings, `concurrency` at a time; their latencies (ns) go to `latencies`. */
static void run_pairings(uint64_t count, uint64_t concurrency, uint64_t *latencies) {
  static struct slot *slots;
  static uint64_t capacity;
  if (capacity < concurrency) {
    free(slots);
    slots = calloc(concurrency, sizeof *slots);
    if (slots == NULL) fail("calloc");
    capacity = concurrency;
  }
  uint64_t started = 0, completed = 0, last_completed = 0;
  uint64_t last_progress = now_ns();
  for (; started < concurrency && started < count; started++) start_pairing(slots, started);
  struct epoll_event events[MAX_EVENTS];
  while (completed < count) {
    int ready = epoll_wait(epfd, events, MAX_EVENTS, 1000);
    if (ready < 0 && errno != EINTR) fail("epoll_wait");
    for (int i = 0; i < ready; i++) {
      uint64_t data = events[i].data.u64;
      errno = 0;
      if (data & IDLE_TAG) fail("the broker closed an idle waiter's connection");
      struct slot *slot = &slots[data / 2];
      if (!on_reply(&slot->sides[data & 1]) || --slot->pending > 0) continue;
      latencies[completed++] = now_ns() - slot->started;
      if (started < count) {
        start_pairing(slots, data / 2);
        started++;
      }
    }
    uint64_t now = now_ns();
    if (completed != last_completed) {
      last_completed = completed;
      last_progress = now;
    } else if (now - last_progress > STALL_MS * UINT64_C(1000000)) {
      fprintf(stderr, "loadgen: no pairing completed for %d ms (%" PRIu64 " of %" PRIu64 ")\n",
              STALL_MS, completed, count);
      exit(1);
    }
  }
}

/* Connections that each wait on a key of their own, never matched; left open until exit. */
static void open_idle_waiters(uint64_t count) {
  for (uint64_t i = 0; i < count; i++) {
    char key[48];
    snprintf(key, sizeof key, "loadgen-idle-%d-%" PRIu64, (int)getpid(), i);
    int fd = connect_broker();
    send_request(fd, key, MODE_SERVER);
    struct epoll_event event = { .events = EPOLLIN, .data.u64 = IDLE_TAG | i };
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event) < 0) fail("epoll_ctl");
  }
}

/* Fails the run if the broker closed an idle waiter: those are the only descriptors left registered. */
static void check_idle_waiters(void) {
  struct epoll_event event;
  errno = 0;
  if (epoll_wait(epfd, &event, 1, 0) > 0) fail("the broker closed an idle waiter's connection");
}

static int compare_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted values, in µs. */
static double percentile_micros(const uint64_t *sorted, uint64_t count, uint64_t permille) {
  uint64_t rank = (count * permille + 999) / 1000;
  return sorted[rank > 0 ? rank - 1 : 0] / 1e3;
}

static int pair_command(uint64_t concurrency, uint64_t pairs, uint64_t warmup, uint64_t idle,
                        int broker_pid) {
  raise_descriptor_limit();
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) fail("epoll_create1");
  uint64_t *latencies = malloc((pairs > warmup ? pairs : warmup) * sizeof *latencies);
  if (latencies == NULL) fail("malloc");
  open_idle_waiters(idle);
  if (warmup > 0) run_pairings(warmup, concurrency, latencies);

  double user0, system0, user1, system1, broker_user0 = 0, broker_system0 = 0, broker_user1,
                                                 broker_system1;
  int broker_known = broker_pid > 0 && process_cpu(broker_pid, &broker_user0, &broker_system0);
  own_cpu(&user0, &system0);
  uint64_t start = now_ns();
  run_pairings(pairs, concurrency, latencies);
  double seconds = (now_ns() - start) / 1e9;
  own_cpu(&user1, &system1);
  broker_known = broker_known && process_cpu(broker_pid, &broker_user1, &broker_system1);
  check_idle_waiters();

  qsort(latencies, pairs, sizeof *latencies, compare_u64);
  printf("{\"concurrency\":%" PRIu64 ",\"idle\":%" PRIu64 ",\"pairs\":%" PRIu64
         ",\"seconds\":%.6f,\"pairsPerSecond\":%.1f,\"p50Micros\":%.1f,\"p99Micros\":%.1f,"
         "\"maxMicros\":%.1f,\"userMicrosPerPair\":%.3f,\"systemMicrosPerPair\":%.3f",
         concurrency, idle, pairs, seconds, pairs / seconds, percentile_micros(latencies, pairs, 500),
         percentile_micros(latencies, pairs, 990), latencies[pairs - 1] / 1e3,
         (user1 - user0) / pairs, (system1 - system0) / pairs);
  if (broker_known) {
    printf(",\"brokerUserMicrosPerPair\":%.3f,\"brokerSystemMicrosPerPair\":%.3f,"
           "\"brokerPeakRssKiB\":%ld",
           (broker_user1 - broker_user0) / pairs, (broker_system1 - broker_system0) / pairs,
           peak_rss_kib(broker_pid));
  }
  printf("}\n");
  return 0;
}

/* ---- stream and socketpair ---- */

/* Writes `bytes` in `chunk`-sized writes, then closes. */
static void write_all(int fd, uint64_t bytes, size_t chunk) {
  uint8_t *buffer = calloc(1, chunk);
  if (buffer == NULL) fail("calloc");
  while (bytes > 0) {
    ssize_t count = write(fd, buffer, bytes < chunk ? bytes : chunk);
    if (count < 0 && errno == EINTR) continue;
    if (count < 0) fail("write");
    bytes -= (uint64_t)count;
  }
  close(fd);
  free(buffer);
}

/* Reads to end of stream; prints the rate, timed from the first byte, and this process's CPU time since then. */
static void read_all(int fd, size_t chunk) {
  uint8_t *buffer = malloc(chunk);
  if (buffer == NULL) fail("malloc");
  uint64_t bytes = 0, start = 0;
  double user0 = 0, system0 = 0, user1, system1;
  for (;;) {
    ssize_t count = read(fd, buffer, chunk);
    if (count < 0 && errno == EINTR) continue;
    if (count < 0) fail("read");
    if (count == 0) break;
    if (bytes == 0) {
      start = now_ns();
      own_cpu(&user0, &system0);
    }
    bytes += (uint64_t)count;
  }
  double seconds = (now_ns() - start) / 1e9;
  own_cpu(&user1, &system1);
  close(fd);
  free(buffer);
  printf("{\"bytes\":%" PRIu64 ",\"seconds\":%.6f,\"bytesPerSecond\":%.0f,\"userMicros\":%.0f,"
         "\"systemMicros\":%.0f}\n",
         bytes, seconds, bytes / seconds, user1 - user0, system1 - system0);
}

/* getPair in C: connect, request, wait for the reply; returns the paired (blocking) descriptor. */
static int get_pair(const char *key, uint16_t mode) {
  int fd = connect_broker();
  send_request(fd, key, mode);
  uint8_t reply[MESSAGE_SIZE];
  uint32_t received = 0;
  int descriptors = 0, paired = -1;
  while (received < MESSAGE_SIZE) {
    ssize_t count = receive_reply(fd, reply + received, MESSAGE_SIZE - received, &descriptors, &paired);
    if (count < 0 && (errno == EAGAIN || errno == EINTR)) {
      struct pollfd readable = { .fd = fd, .events = POLLIN };
      poll(&readable, 1, -1);
      continue;
    }
    errno = 0;
    if (count <= 0) fail("the broker closed the connection without a SET_PAIR reply");
    received += (uint32_t)count;
  }
  if (!valid_set_pair(reply) || descriptors != 1) fail("invalid SET_PAIR reply");
  close(fd);
  return paired;
}

static int stream_command(const char *key, const char *direction, uint64_t bytes, size_t chunk) {
  if (strcmp(direction, "read") == 0) {
    read_all(get_pair(key, MODE_SERVER), chunk);
  } else if (strcmp(direction, "write") == 0) {
    write_all(get_pair(key, MODE_CLIENT), bytes, chunk);
    printf("{\"bytes\":%" PRIu64 "}\n", bytes); /* the reader times the transfer */
  } else {
    fputs(USAGE, stderr);
    return 2;
  }
  return 0;
}

static int socketpair_command(uint64_t bytes, size_t chunk) {
  int pair[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) fail("socketpair");
  pid_t child = fork();
  if (child < 0) fail("fork");
  if (child == 0) {
    close(pair[0]);
    write_all(pair[1], bytes, chunk);
    _exit(0);
  }
  close(pair[1]);
  read_all(pair[0], chunk);
  int status;
  waitpid(child, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

static uint64_t number(const char *name, const char *text) {
  char *end;
  errno = 0;
  unsigned long long value = strtoull(text, &end, 10);
  if (errno || *end || end == text || text[0] == '-') {
    fprintf(stderr, "loadgen: --%s wants a non-negative integer\n%s", name, USAGE);
    exit(2);
  }
  return value;
}

int main(int argc, char **argv) {
  static const struct option options[] = {
    { "concurrency", required_argument, NULL, 'c' }, { "pairs", required_argument, NULL, 'n' },
    { "warmup", required_argument, NULL, 'w' },      { "idle", required_argument, NULL, 'i' },
    { "broker-pid", required_argument, NULL, 'p' },  { "bytes", required_argument, NULL, 'b' },
    { "chunk", required_argument, NULL, 'k' },       { NULL, 0, NULL, 0 },
  };
  uint64_t concurrency = 16, pairs = 20000, warmup = 1000, idle = 0, bytes = UINT64_C(1) << 30;
  uint64_t chunk = 65536, broker_pid = 0;
  for (int option, index; (option = getopt_long(argc, argv, "", options, &index)) != -1;) {
    if (option == '?') {
      fputs(USAGE, stderr);
      return 2;
    }
    uint64_t value = number(options[index].name, optarg);
    switch (option) {
      case 'c': concurrency = value; break;
      case 'n': pairs = value; break;
      case 'w': warmup = value; break;
      case 'i': idle = value; break;
      case 'p': broker_pid = value; break;
      case 'b': bytes = value; break;
      case 'k': chunk = value; break;
    }
  }
  char **args = argv + optind;
  int count = argc - optind;
  if (concurrency == 0 || pairs == 0 || chunk == 0 || broker_pid > INT32_MAX) {
    fputs(USAGE, stderr);
    return 2;
  }
  if (count == 2 && strcmp(args[0], "pair") == 0) {
    set_address(args[1]);
    return pair_command(concurrency, pairs, warmup, idle, (int)broker_pid);
  }
  if (count == 4 && strcmp(args[0], "stream") == 0) {
    set_address(args[1]);
    return stream_command(args[2], args[3], bytes, chunk);
  }
  if (count == 1 && strcmp(args[0], "socketpair") == 0) return socketpair_command(bytes, chunk);
  fputs(USAGE, stderr);
  return 2;
}
