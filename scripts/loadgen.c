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
 *   loadgen listen SOCKET [--concurrency N] [--connections N] [--warmup N] [--backlog N]
 *                  [--credit-batch N] [--eager-credit] [--broker-pid PID]
 *     Connections through one protocol v2 listener. One connection sends a
 *     LISTEN (mode server, type stream, asking for --backlog, on a key of
 *     its own) and checks the HELLO; then --concurrency v1 clients are kept
 *     in flight, each a GET_PAIR as client on that key with its SET_PAIR
 *     reply checked as in pair mode. The listener checks every v2 SET_PAIR
 *     (44 bytes, one descriptor, partner a v1 client), closes the descriptor
 *     and gives credit back with a CREDIT whenever --credit-batch are due
 *     (default, or 0: half the granted backlog); with --eager-credit, also
 *     whatever is due once it has read all there is, as client/listen.ts
 *     does when its queue runs dry. A connection's latency runs from the client's socket() to its
 *     reply; a run ends when every client has its reply and the listener its
 *     end. Measures as pair mode does, per connection. Exits 3 if the broker
 *     closes the listener without a HELLO or sends none within 10 s (a
 *     protocol v1 broker: the floor waits for 1040 bytes and never answers).
 *   loadgen stream SOCKET KEY read|write [--bytes N] [--chunk N]
 *     Pairs on KEY through the broker (read as server, write as client), then
 *     reads to end of stream, or writes N bytes and closes.
 *   loadgen socketpair [--bytes N] [--chunk N]
 *     The baseline for stream: the same write loop in a child process and
 *     the same read loop here, on a plain socketpair.
 *
 * Prints one JSON object on stdout; exits 1 with one line on stderr if a
 * pairing fails or nothing completes for 10 s, 2 on a usage error, 3 as
 * listen describes.
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
  V2_HEADER_FLAGS = 2,
  REQUEST_SET_PAIR = 2,
  REQUEST_LISTEN = 3,
  REQUEST_HELLO = 4,
  REQUEST_CREDIT = 5,
  REQUEST_REFUSED = 6,
  HELLO_SIZE = 20,
  SET_PAIR_V2_SIZE = 44,
  CREDIT_SIZE = 16,
  MAX_REFUSED_SIZE = 12 + 256,
  CAPABILITY_LISTEN = 1,
  PEER_V1 = 2,
  EXIT_NO_V2 = 3,
};

static const char USAGE[] =
    "usage: loadgen pair SOCKET [--concurrency N] [--pairs N] [--warmup N] [--idle N] "
    "[--broker-pid PID]\n"
    "       loadgen listen SOCKET [--concurrency N] [--connections N] [--warmup N] [--backlog N]\n"
    "                      [--credit-batch N] [--eager-credit] [--broker-pid PID]\n"
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

/* ---- listen ---- */

static uint32_t get_u32(const uint8_t *m, size_t at) {
  uint32_t value;
  memcpy(&value, m + at, 4); /* little-endian hosts */
  return value;
}

static uint16_t get_u16(const uint8_t *m, size_t at) {
  uint16_t value;
  memcpy(&value, m + at, 2);
  return value;
}

/* The epoll data word of the listener; clients use their slot index. */
#define LISTENER_TAG (UINT64_C(1) << 62)

struct listener {
  int fd;
  uint32_t backlog;     /* granted in the HELLO */
  uint32_t batch;       /* a CREDIT goes out when this many are due */
  uint32_t received;    /* bytes of the message being read */
  uint32_t expected;    /* its length, as far as known */
  int descriptors;      /* that came with it */
  uint32_t uncredited;  /* SET_PAIRs taken and not yet credited back */
  uint64_t delivered;   /* SET_PAIRs taken */
  uint64_t credits;     /* CREDITs sent */
  uint8_t message[MAX_REFUSED_SIZE];
};

struct client {
  struct side side;
  uint64_t started;
};

static struct listener listener;
static int eager_credit;

/* Fails the run with the reason of the REFUSED in the listener's buffer, or says the connection closed. */
static _Noreturn void listener_closed(const char *when) {
  errno = 0;
  if (listener.received >= 12 && get_u32(listener.message, 0) == REQUEST_REFUSED) {
    uint32_t length = listener.received - 12;
    fprintf(stderr, "loadgen: the broker refused the listener %s: %.*s\n", when, (int)length,
            (const char *)listener.message + 12);
    exit(1);
  }
  fprintf(stderr, "loadgen: the broker closed the listener's connection %s (%" PRIu64
          " SET_PAIRs taken, %" PRIu32 " bytes of the next)\n", when, listener.delivered,
          listener.received);
  exit(1);
}

/*
 * One recvmsg into the listener's message buffer. Returns 1 when a whole
 * message is in, 0 when more is due (or EAGAIN), and fails the run on end of
 * stream or a REFUSED (whose header makes the message longer).
 */
static int listener_read(const char *when) {
  ssize_t count = receive_reply(listener.fd, listener.message + listener.received,
                                listener.expected - listener.received, &listener.descriptors, NULL);
  if (count < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
  if (count < 0 && errno == ECONNRESET) listener_closed(when);
  if (count < 0) fail("recvmsg (listener)");
  if (count == 0) listener_closed(when);
  uint32_t before = listener.received;
  listener.received += (uint32_t)count;
  if (before < 12 && listener.received >= 12 && get_u32(listener.message, 0) == REQUEST_REFUSED) {
    uint32_t size = get_u32(listener.message, 8);
    listener.expected = 12 + (size <= 256 ? size : 256);
  }
  return listener.received >= listener.expected;
}

/* Sends the LISTEN and waits (up to STALL_MS) for the HELLO; fills in the backlog granted. */
static void start_listener(const char *key, uint32_t backlog, uint32_t batch) {
  uint8_t message[24 + 1024];
  uint32_t request = REQUEST_LISTEN, flags = V2_HEADER_FLAGS, options = 0;
  uint16_t key_length = (uint16_t)strlen(key), mode = MODE_SERVER, type = 0;
  uint16_t asked = (uint16_t)backlog;
  uint32_t size = 12 + key_length;
  memcpy(message, &request, 4);
  memcpy(message + 4, &flags, 4);
  memcpy(message + 8, &size, 4);
  memcpy(message + 12, &mode, 2);
  memcpy(message + 14, &type, 2);
  memcpy(message + 16, &options, 4);
  memcpy(message + 20, &key_length, 2);
  memcpy(message + 22, &asked, 2);
  memcpy(message + 24, key, key_length);
  listener.fd = connect_broker();
  if (send(listener.fd, message, 12 + size, MSG_NOSIGNAL) != (ssize_t)(12 + size)) {
    fail("send LISTEN");
  }
  listener.expected = HELLO_SIZE;
  for (;;) {
    struct pollfd readable = { .fd = listener.fd, .events = POLLIN };
    int ready = poll(&readable, 1, STALL_MS);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) fail("poll");
    errno = 0;
    if (ready == 0) {
      /* The floor, for one, waits for the 1040 bytes of a v1 request and never answers. */
      fprintf(stderr, "loadgen: no HELLO within %d ms of the LISTEN: the broker does not speak "
                      "protocol v2 (a v1 broker, such as the floor?) or it stalled\n", STALL_MS);
      exit(EXIT_NO_V2);
    }
    ssize_t count = receive_reply(listener.fd, listener.message + listener.received,
                                  listener.expected - listener.received, &listener.descriptors,
                                  NULL);
    if (count < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if ((count == 0 || (count < 0 && errno == ECONNRESET)) && listener.received == 0) {
      fprintf(stderr, "loadgen: the broker closed the listener's connection without a HELLO: "
                      "it does not speak protocol v2 (a v1 broker, such as the floor?)\n");
      exit(EXIT_NO_V2);
    }
    if (count < 0) fail("recvmsg (listener)");
    if (count == 0) listener_closed("before its HELLO");
    uint32_t before = listener.received;
    listener.received += (uint32_t)count;
    if (before < 12 && listener.received >= 12 && get_u32(listener.message, 0) == REQUEST_REFUSED) {
      uint32_t refused = get_u32(listener.message, 8);
      listener.expected = 12 + (refused <= 256 ? refused : 256);
    }
    if (listener.received >= listener.expected) break;
  }
  if (get_u32(listener.message, 0) == REQUEST_REFUSED) listener_closed("after its LISTEN");
  const uint8_t *m = listener.message;
  uint32_t capabilities = get_u32(m, 12), granted = get_u16(m, 16);
  errno = 0;
  if (get_u32(m, 0) != REQUEST_HELLO || get_u32(m, 4) != V2_HEADER_FLAGS || get_u32(m, 8) != 8 ||
      !(capabilities & CAPABILITY_LISTEN) || get_u16(m, 18) != 0 || listener.descriptors != 0 ||
      granted == 0 || (backlog > 0 && granted > backlog)) {
    fprintf(stderr, "loadgen: invalid HELLO: request %" PRIu32 ", flags %" PRIu32 ", size %" PRIu32
            ", capabilities %#" PRIx32 ", backlog %" PRIu32 " (asked %" PRIu32 "), reserved %u, "
            "%d descriptors\n", get_u32(m, 0), get_u32(m, 4), get_u32(m, 8), capabilities, granted,
            backlog, get_u16(m, 18), listener.descriptors);
    exit(1);
  }
  listener.backlog = granted;
  if (batch == 0) batch = granted / 2 > 0 ? granted / 2 : 1;
  listener.batch = batch < granted ? batch : granted;
  listener.received = 0;
  listener.expected = SET_PAIR_V2_SIZE;
  struct epoll_event event = { .events = EPOLLIN, .data.u64 = LISTENER_TAG };
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, listener.fd, &event) < 0) fail("epoll_ctl");
}

/* Checks the listener's SET_PAIR: v2, a fresh stream socketpair end, one descriptor, a v1 partner. */
static void check_listener_set_pair(void) {
  const uint8_t *m = listener.message;
  if (get_u32(m, 0) == REQUEST_SET_PAIR && get_u32(m, 4) == V2_HEADER_FLAGS && get_u32(m, 8) == 32 &&
      get_u16(m, 12) == 1 && get_u16(m, 14) == 0 && get_u16(m, 16) == 1 && get_u16(m, 18) == PEER_V1 &&
      get_u32(m, 40) == 0 && listener.descriptors == 1) {
    return;
  }
  fprintf(stderr, "loadgen: invalid SET_PAIR to the listener (after %" PRIu64 " valid ones): "
          "request %" PRIu32 ", flags %" PRIu32 ", size %" PRIu32 ", delivery %u, type %u, "
          "descriptors %u, peer_flags %#x, reserved %" PRIu32 "; %d descriptors arrived\n",
          listener.delivered, get_u32(m, 0), get_u32(m, 4), get_u32(m, 8), get_u16(m, 12),
          get_u16(m, 14), get_u16(m, 16), get_u16(m, 18), get_u32(m, 40), listener.descriptors);
  exit(1);
}

static void send_credit(uint32_t count) {
  uint8_t message[CREDIT_SIZE];
  uint32_t request = REQUEST_CREDIT, flags = V2_HEADER_FLAGS, size = 4;
  memcpy(message, &request, 4);
  memcpy(message + 4, &flags, 4);
  memcpy(message + 8, &size, 4);
  memcpy(message + 12, &count, 4);
  ssize_t sent = send(listener.fd, message, CREDIT_SIZE, MSG_NOSIGNAL);
  if (sent < 0 && (errno == EPIPE || errno == ECONNRESET)) listener_closed("while it sent a CREDIT");
  if (sent != CREDIT_SIZE) fail("send CREDIT");
  listener.credits++;
}

/* Takes the SET_PAIRs the listener can read now: each descriptor closed, credit given back in batches. */
static void on_listener_readable(void) {
  for (int taken = 0; taken < MAX_EVENTS; taken++) {
    if (!listener_read("while serving")) {
      if (eager_credit && listener.uncredited > 0 && listener.received == 0) {
        send_credit(listener.uncredited);
        listener.uncredited = 0;
      }
      return;
    }
    check_listener_set_pair();
    listener.delivered++;
    listener.received = 0;
    listener.descriptors = 0;
    if (++listener.uncredited >= listener.batch) {
      send_credit(listener.uncredited);
      listener.uncredited = 0;
    }
  }
}

static void start_client(struct client *clients, uint64_t index, const char *key) {
  struct client *client = &clients[index];
  client->started = now_ns();
  struct side *side = &client->side;
  side->fd = connect_broker();
  side->received = 0;
  side->descriptors = 0;
  send_request(side->fd, key, MODE_CLIENT);
  struct epoll_event event = { .events = EPOLLIN, .data.u64 = index };
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, side->fd, &event) < 0) fail("epoll_ctl");
}

/*
 * Runs `count` connections through the listener, `concurrency` clients at a
 * time; their latencies (ns) go to `latencies`. Returns when every client has
 * its reply and the listener has taken as many SET_PAIRs.
 */
static void run_connections(const char *key, uint64_t count, uint64_t concurrency,
                            uint64_t *latencies) {
  static struct client *clients;
  static uint64_t capacity;
  if (capacity < concurrency) {
    free(clients);
    clients = calloc(concurrency, sizeof *clients);
    if (clients == NULL) fail("calloc");
    capacity = concurrency;
  }
  uint64_t target = listener.delivered + count;
  uint64_t started = 0, completed = 0, last_progress = now_ns();
  uint64_t last_completed = 0, last_delivered = listener.delivered;
  for (; started < concurrency && started < count; started++) start_client(clients, started, key);
  struct epoll_event events[MAX_EVENTS];
  while (completed < count || listener.delivered < target) {
    int ready = epoll_wait(epfd, events, MAX_EVENTS, 1000);
    if (ready < 0 && errno != EINTR) fail("epoll_wait");
    for (int i = 0; i < ready; i++) {
      uint64_t data = events[i].data.u64;
      errno = 0;
      if (data == LISTENER_TAG) {
        on_listener_readable();
        continue;
      }
      struct client *client = &clients[data];
      if (!on_reply(&client->side)) continue;
      latencies[completed++] = now_ns() - client->started;
      if (started < count) {
        start_client(clients, data, key);
        started++;
      }
    }
    if (listener.delivered > target) {
      errno = 0;
      fail("the listener got more SET_PAIRs than there were clients");
    }
    uint64_t now = now_ns();
    if (completed != last_completed || listener.delivered != last_delivered) {
      last_completed = completed;
      last_delivered = listener.delivered;
      last_progress = now;
    } else if (now - last_progress > STALL_MS * UINT64_C(1000000)) {
      fprintf(stderr, "loadgen: no progress for %d ms (%" PRIu64 " of %" PRIu64 " clients replied, "
              "the listener took %" PRIu64 " of %" PRIu64 " SET_PAIRs; %" PRIu32 " uncredited, "
              "%" PRIu64 " CREDITs sent)\n", STALL_MS, completed, count,
              count - (target - listener.delivered), count, listener.uncredited, listener.credits);
      exit(1);
    }
  }
}

/* Fails the run if the listener has anything to read: nothing is due once every client is served. */
static void check_listener_quiet(void) {
  uint8_t byte;
  ssize_t count = recv(listener.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (count < 0 && errno == EAGAIN) return;
  if (count < 0) fail("recv (listener)");
  errno = 0;
  if (count == 0) listener_closed("after the run");
  fail("the listener has unexpected bytes after the run");
}

static int listen_command(uint64_t concurrency, uint64_t connections, uint64_t warmup,
                          uint64_t backlog, uint64_t batch, int broker_pid) {
  raise_descriptor_limit();
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) fail("epoll_create1");
  uint64_t *latencies = malloc((connections > warmup ? connections : warmup) * sizeof *latencies);
  if (latencies == NULL) fail("malloc");
  char key[48];
  snprintf(key, sizeof key, "loadgen-listen-%d", (int)getpid());
  start_listener(key, (uint32_t)backlog, (uint32_t)batch);
  if (warmup > 0) run_connections(key, warmup, concurrency, latencies);

  double user0, system0, user1, system1, broker_user0 = 0, broker_system0 = 0, broker_user1,
                                                 broker_system1;
  int broker_known = broker_pid > 0 && process_cpu(broker_pid, &broker_user0, &broker_system0);
  own_cpu(&user0, &system0);
  uint64_t credits0 = listener.credits, start = now_ns();
  run_connections(key, connections, concurrency, latencies);
  double seconds = (now_ns() - start) / 1e9;
  own_cpu(&user1, &system1);
  broker_known = broker_known && process_cpu(broker_pid, &broker_user1, &broker_system1);
  check_listener_quiet();

  uint64_t n = connections;
  qsort(latencies, n, sizeof *latencies, compare_u64);
  printf("{\"concurrency\":%" PRIu64 ",\"backlog\":%" PRIu32 ",\"creditBatch\":%" PRIu32
         ",\"eagerCredit\":%s,\"connections\":%" PRIu64 ",\"credits\":%" PRIu64 ",\"seconds\":%.6f,"
         "\"connectionsPerSecond\":%.1f,\"p50Micros\":%.1f,\"p99Micros\":%.1f,\"maxMicros\":%.1f,"
         "\"userMicrosPerConnection\":%.3f,\"systemMicrosPerConnection\":%.3f",
         concurrency, listener.backlog, listener.batch, eager_credit ? "true" : "false", n, listener.credits - credits0, seconds,
         n / seconds, percentile_micros(latencies, n, 500), percentile_micros(latencies, n, 990),
         latencies[n - 1] / 1e3, (user1 - user0) / n, (system1 - system0) / n);
  if (broker_known) {
    printf(",\"brokerUserMicrosPerConnection\":%.3f,\"brokerSystemMicrosPerConnection\":%.3f,"
           "\"brokerPeakRssKiB\":%ld",
           (broker_user1 - broker_user0) / n, (broker_system1 - broker_system0) / n,
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
    { "chunk", required_argument, NULL, 'k' },       { "connections", required_argument, NULL, 'C' },
    { "backlog", required_argument, NULL, 'L' },     { "credit-batch", required_argument, NULL, 'B' },
    { "eager-credit", no_argument, NULL, 'E' },      { NULL, 0, NULL, 0 },
  };
  uint64_t concurrency = 16, pairs = 20000, warmup = 1000, idle = 0, bytes = UINT64_C(1) << 30;
  uint64_t chunk = 65536, broker_pid = 0, connections = 20000, backlog = 16, batch = 0;
  for (int option, index; (option = getopt_long(argc, argv, "", options, &index)) != -1;) {
    if (option == '?') {
      fputs(USAGE, stderr);
      return 2;
    }
    if (option == 'E') {
      eager_credit = 1;
      continue;
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
      case 'C': connections = value; break;
      case 'L': backlog = value; break;
      case 'B': batch = value; break;
    }
  }
  char **args = argv + optind;
  int count = argc - optind;
  if (concurrency == 0 || pairs == 0 || chunk == 0 || broker_pid > INT32_MAX || connections == 0 ||
      backlog > UINT16_MAX || batch > UINT16_MAX) {
    fputs(USAGE, stderr);
    return 2;
  }
  if (count == 2 && strcmp(args[0], "pair") == 0) {
    set_address(args[1]);
    return pair_command(concurrency, pairs, warmup, idle, (int)broker_pid);
  }
  if (count == 2 && strcmp(args[0], "listen") == 0 && idle == 0) {
    set_address(args[1]);
    return listen_command(concurrency, connections, warmup, backlog, batch, (int)broker_pid);
  }
  if (count == 4 && strcmp(args[0], "stream") == 0) {
    set_address(args[1]);
    return stream_command(args[2], args[3], bytes, chunk);
  }
  if (count == 1 && strcmp(args[0], "socketpair") == 0) return socketpair_command(bytes, chunk);
  fputs(USAGE, stderr);
  return 2;
}
