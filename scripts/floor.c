/*
 * The floor: the smallest correct broker for protocol v1
 * (../shared/protocol-v1.md), written in C as the yardstick for
 * scripts/bench.ts. Whatever it spends per pairing is what the kernel makes
 * any broker spend; our broker is measured against it in the same run. It is
 * not shipped and not part of the one-socket binary.
 *
 * It does what a correct broker must and nothing more: one epoll loop,
 * accept until EAGAIN, requests framed across reads and acted on at 1040
 * bytes, every validation rule of the protocol (a bad request closes that
 * connection), a hash table of FIFO queues per (key, mode), a waiter that
 * hangs up leaves its queue, and the failure rule on delivery. No logging, no
 * timeouts, no policy.
 *
 * usage: floor SOCKET_PATH   (a leading @ names a Linux abstract socket)
 * SIGINT or SIGTERM: exits 0 after removing the socket file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum {
  MESSAGE_SIZE = 1044,
  GET_PAIR_MIN_SIZE = 1040, /* what a client following the protocol text sends */
  GET_PAIR_PAYLOAD_SIZE = 1028,
  MAX_KEY_LENGTH = 1024,
  MODE_NONE = 0,
  MODE_CLIENT = 1,
  MODE_SERVER = 2,
  MAX_EVENTS = 256,
  MAX_RECEIVED_DESCRIPTORS = 8, /* the kernel closes any beyond these */
  ACCEPT_PAUSE_MS = 100,
};

struct queue;

/* One client connection, indexed by its descriptor: accept never returns one past the limit. */
struct conn {
  int open;
  uint32_t received;      /* bytes of the request so far (past 1040: the padding) */
  uint8_t *frame;         /* only for a request that arrived in pieces */
  struct queue *queue;    /* set while it waits */
  struct conn *prev, *next;
};

/* The waiters on one (key, mode), oldest first, in a bucket's chain. */
struct queue {
  struct queue *chain;
  struct conn *head, *tail;
  uint32_t hash;
  uint16_t mode, key_length;
  uint8_t key[];
};

static struct conn *conns;
static struct queue **buckets;
static uint32_t bucket_mask;
static int epfd, listen_fd;
static int accept_paused;
static int64_t accept_resume_ms;
static uint8_t inbound[MESSAGE_SIZE];
static uint8_t set_pair[MESSAGE_SIZE];

static const char *socket_path;

static int die(const char *what) {
  fprintf(stderr, "floor: %s (%s): %s\n", what, socket_path, strerror(errno));
  return 1;
}

/* Little-endian hosts only (x86_64, aarch64), like the rest of the project. */
static uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t get_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static uint32_t hash_key(const uint8_t *key, uint16_t length, uint16_t mode) {
  uint32_t h = 2166136261u ^ mode; /* FNV-1a */
  for (uint16_t i = 0; i < length; i++) h = (h ^ key[i]) * 16777619u;
  return h;
}

static struct queue **find_queue(const uint8_t *key, uint16_t length, uint16_t mode, uint32_t h) {
  struct queue **link = &buckets[h & bucket_mask];
  for (; *link; link = &(*link)->chain) {
    struct queue *q = *link;
    if (q->hash == h && q->mode == mode && q->key_length == length && !memcmp(q->key, key, length))
      break;
  }
  return link;
}

/* Takes a waiting client off its queue, and drops the queue once empty. */
static void unqueue(struct conn *c) {
  struct queue *q = c->queue;
  if (c->prev) c->prev->next = c->next; else q->head = c->next;
  if (c->next) c->next->prev = c->prev; else q->tail = c->prev;
  c->queue = NULL;
  if (q->head) return;
  *find_queue(q->key, q->key_length, q->mode, q->hash) = q->chain;
  free(q);
}

static void disconnect(int fd) {
  struct conn *c = &conns[fd];
  if (c->queue) unqueue(c);
  free(c->frame);
  memset(c, 0, sizeof *c);
  close(fd); /* also leaves the epoll set: the descriptor was never duplicated */
}

static int64_t monotonic_ms(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* Out of descriptors or memory, a level-triggered listener would spin: serve who is here first. */
static void pause_accepting(int pause) {
  struct epoll_event event = { .events = pause ? 0 : EPOLLIN, .data.fd = listen_fd };
  epoll_ctl(epfd, EPOLL_CTL_MOD, listen_fd, &event);
  accept_paused = pause;
  accept_resume_ms = monotonic_ms() + ACCEPT_PAUSE_MS;
}

static void accept_all(void) {
  for (;;) {
    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == ECONNABORTED || errno == EINTR) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        pause_accepting(1);
      }
      return;
    }
    struct epoll_event event = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = fd };
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event) < 0) {
      close(fd);
      continue;
    }
    conns[fd].open = 1;
  }
}

/* 0 when all 1044 bytes went out with the descriptor; a short send is a failure too. */
static int send_set_pair(int fd, int pair_fd) {
  union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
  struct iovec iov = { .iov_base = set_pair, .iov_len = MESSAGE_SIZE };
  struct msghdr message = {
    .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof control,
  };
  struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cmsg), &pair_fd, sizeof(int));
  return sendmsg(fd, &message, MSG_NOSIGNAL) == MESSAGE_SIZE ? 0 : -1;
}

/*
 * The waiting partner is served first: if it has hung up, nothing was
 * delivered yet and the newcomer can be matched again (returns 0). Every
 * other outcome ends both clients (returns 1).
 */
static int deliver(int partner, int newcomer) {
  int pair[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) {
    disconnect(partner);
    disconnect(newcomer);
    return 1;
  }
  int partner_failed = send_set_pair(partner, pair[0]) < 0;
  if (!partner_failed) send_set_pair(newcomer, pair[1]);
  close(pair[0]);
  close(pair[1]);
  disconnect(partner);
  if (partner_failed) return 0;
  disconnect(newcomer);
  return 1;
}

static void pair_or_wait(int fd, const uint8_t *key, uint16_t length, uint16_t mode) {
  uint16_t wanted = mode == MODE_NONE ? MODE_NONE : mode == MODE_CLIENT ? MODE_SERVER : MODE_CLIENT;
  uint32_t wanted_hash = hash_key(key, length, wanted);
  for (;;) {
    struct queue *q = *find_queue(key, length, wanted, wanted_hash);
    if (q == NULL) break;
    struct conn *partner = q->head;
    if (deliver((int)(partner - conns), fd)) return;
  }
  uint32_t h = hash_key(key, length, mode);
  struct queue **link = find_queue(key, length, mode, h);
  struct queue *q = *link;
  if (q == NULL) {
    q = malloc(sizeof *q + length);
    if (q == NULL) {
      disconnect(fd);
      return;
    }
    *q = (struct queue){ .hash = h, .mode = mode, .key_length = length };
    memcpy(q->key, key, length);
    *link = q;
  }
  struct conn *c = &conns[fd];
  c->queue = q;
  c->prev = q->tail;
  c->next = NULL;
  if (q->tail) q->tail->next = c; else q->head = c;
  q->tail = c;
}

/* Validates a GET_PAIR as the protocol's rules say, then pairs or files it. */
static void handle_request(int fd, const uint8_t *m) {
  uint16_t mode = get_u16(m + 12), length = get_u16(m + 14);
  if (get_u32(m) != 1 || get_u32(m + 4) != 1 || get_u32(m + 8) != GET_PAIR_PAYLOAD_SIZE ||
      mode > MODE_SERVER || length == 0 || length > MAX_KEY_LENGTH) {
    disconnect(fd);
    return;
  }
  pair_or_wait(fd, m + 16, length, mode);
  /* A waiter's key lives in its queue now; a client that was closed has no frame left. */
  struct conn *c = &conns[fd];
  free(c->frame);
  c->frame = NULL;
}

static void on_readable(int fd) {
  struct conn *c = &conns[fd];
  if (!c->open) return; /* closed earlier in this batch */
  int requested = c->received >= GET_PAIR_MIN_SIZE;
  /* After the request, read one byte past the frame to tell a hang-up from extra data. */
  size_t want = MESSAGE_SIZE - c->received;
  if (requested && want == 0) want = 1;
  uint8_t *into = c->frame && !requested ? c->frame + c->received : inbound;
  union { struct cmsghdr header; char space[CMSG_SPACE(MAX_RECEIVED_DESCRIPTORS * sizeof(int))]; } control;
  struct iovec iov = { .iov_base = into, .iov_len = want };
  struct msghdr message = {
    .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof control,
  };
  ssize_t count = recvmsg(fd, &message, MSG_CMSG_CLOEXEC);
  if (count < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (count <= 0) { /* a hang-up, whether it was still sending or already waiting */
    disconnect(fd);
    return;
  }
  if (message.msg_controllen > 0 || (message.msg_flags & MSG_CTRUNC)) {
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message); cmsg; cmsg = CMSG_NXTHDR(&message, cmsg)) {
      if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
      int *fds = (int *)CMSG_DATA(cmsg);
      for (size_t i = 0; i < (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) close(fds[i]);
    }
    disconnect(fd); /* a request carries no descriptors */
    return;
  }
  uint32_t before = c->received;
  c->received += (uint32_t)count;
  if (requested) {
    if (c->received > MESSAGE_SIZE) disconnect(fd); /* one request per connection */
    return;
  }
  /* As the C broker does, a request of another version is closed at once, not waited for:
     that close is how a protocol v2 client learns to fall back to v1. */
  if (c->received >= 8 && get_u32((before == 0 ? inbound : c->frame) + 4) != 1) {
    disconnect(fd);
    return;
  }
  if (before == 0 && c->received >= GET_PAIR_MIN_SIZE) {
    handle_request(fd, inbound); /* whole in one read, as nearly always */
    return;
  }
  if (c->frame == NULL) {
    c->frame = malloc(MESSAGE_SIZE);
    if (c->frame == NULL) {
      disconnect(fd);
      return;
    }
    memcpy(c->frame, inbound, (size_t)count);
  }
  if (c->received >= GET_PAIR_MIN_SIZE) handle_request(fd, c->frame);
}

/* Soft descriptor limit raised to the hard one: every client costs a descriptor. */
static rlim_t raise_descriptor_limit(void) {
  struct rlimit limit;
  if (getrlimit(RLIMIT_NOFILE, &limit) < 0) return 1024;
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
  getrlimit(RLIMIT_NOFILE, &limit);
  return limit.rlim_cur;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: floor SOCKET_PATH\n");
    return 2;
  }
  const char *path = socket_path = argv[1];
  struct sockaddr_un address = { .sun_family = AF_UNIX };
  size_t path_length = strlen(path);
  if (path_length >= sizeof address.sun_path) {
    fprintf(stderr, "floor: socket path too long: %s\n", path);
    return 2;
  }
  memcpy(address.sun_path, path, path_length);
  int abstract = path[0] == '@';
  if (abstract) address.sun_path[0] = '\0';
  socklen_t address_length = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_length);

  rlim_t capacity = raise_descriptor_limit();
  conns = calloc(capacity, sizeof *conns);
  uint32_t bucket_count = 1024;
  while (bucket_count < capacity) bucket_count <<= 1;
  buckets = calloc(bucket_count, sizeof *buckets);
  bucket_mask = bucket_count - 1;
  if (conns == NULL || buckets == NULL) return die("calloc");

  /* The SET_PAIR the C broker sends: request 2, version 1, size 8, zeros. */
  set_pair[0] = 2;
  set_pair[4] = 1;
  set_pair[8] = 8;

  /* Signals arrive as a readable descriptor, so the loop never races them. */
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigprocmask(SIG_BLOCK, &signals, NULL);
  int signal_fd = signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC);
  if (signal_fd < 0) return die("signalfd");

  listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listen_fd < 0) return die("socket");
  if (bind(listen_fd, (struct sockaddr *)&address, address_length) < 0) return die("bind");
  if (listen(listen_fd, 4096) < 0) return die("listen");

  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) return die("epoll_create1");
  struct epoll_event event = { .events = EPOLLIN, .data.fd = listen_fd };
  epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &event);
  event.data.fd = signal_fd;
  epoll_ctl(epfd, EPOLL_CTL_ADD, signal_fd, &event);

  struct epoll_event events[MAX_EVENTS];
  for (;;) {
    int ready = epoll_wait(epfd, events, MAX_EVENTS, accept_paused ? ACCEPT_PAUSE_MS : -1);
    if (ready < 0 && errno != EINTR) return die("epoll_wait");
    if (accept_paused && monotonic_ms() >= accept_resume_ms) pause_accepting(0);
    for (int i = 0; i < ready; i++) {
      int fd = events[i].data.fd;
      if (fd == listen_fd) {
        accept_all();
      } else if (fd == signal_fd) {
        if (!abstract) unlink(path);
        return 0;
      } else {
        on_readable(fd);
      }
    }
  }
}
