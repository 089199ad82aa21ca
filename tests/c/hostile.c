/*
 * A hostile local user of the broker, for the abuse tests: as cheap per
 * connection as C can be, so that the broker, not the attacker, is what is
 * measured. Runs until killed (or, for hoard, until done), and prints one
 * line to stdout once its connections are up.
 *
 * usage: hostile SOCKET_PATH hold N PREFIX   keep N requests waiting on unique keys;
 *                                            reconnect each one the broker closes
 *        hostile SOCKET_PATH silent N        keep N connections open that never send;
 *                                            reconnect each one the broker closes
 *        hostile SOCKET_PATH malformed       connect, send a bad request, wait for the broker
 *                                            to close it; forever
 *        hostile SOCKET_PATH hoard N KEY     pair with itself N times and never read
 *                                            the replies, keeping every connection open
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MESSAGE_SIZE 1044

static struct sockaddr_un address = { .sun_family = AF_UNIX };
static unsigned long serial;

static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); } /* little-endian hosts */
static void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static int dial(void) {
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0) { close(fd); return -1; }
  return fd;
}

static void request(int fd, const char *key, int server) {
  uint8_t frame[MESSAGE_SIZE] = { 0 };
  size_t length = strlen(key);
  put_u32(frame, 1);        /* GET_PAIR */
  put_u32(frame + 4, 1);    /* version 1 */
  put_u32(frame + 8, 1028); /* size */
  put_u16(frame + 12, server ? 2 : 0);
  put_u16(frame + 14, (uint16_t)length);
  memcpy(frame + 16, key, length);
  (void)!write(fd, frame, sizeof frame);
}

/* A connection that waits on a key of its own, or one that says nothing. */
static int open_one(const char *prefix) {
  int fd = dial();
  if (fd < 0 || prefix == NULL) return fd;
  char key[64];
  snprintf(key, sizeof key, "%s-%lu", prefix, serial++);
  request(fd, key, 1);
  return fd;
}

/* Keeps n connections open, replacing each one the broker closes. */
static int keep(int n, const char *prefix) {
  struct pollfd *fds = calloc(n, sizeof *fds);
  for (int i = 0; i < n; i++) { fds[i].fd = open_one(prefix); fds[i].events = POLLIN; }
  printf("up\n");
  fflush(stdout);
  for (;;) {
    if (poll(fds, n, 1000) < 0 && errno != EINTR) return 1;
    for (int i = 0; i < n; i++) {
      if (fds[i].fd >= 0 && !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      if (fds[i].fd >= 0) close(fds[i].fd);
      fds[i].fd = open_one(prefix);
      fds[i].revents = 0;
      if (fds[i].fd < 0) usleep(1000); /* the backlog is full: try again soon */
    }
  }
}

/*
 * A client that gets the protocol wrong as fast as the broker answers it.
 * (Not waiting for the answer makes a plain connect flood, which saturates any
 * single-threaded broker, the C floor too: see the README's security section.)
 */
static int malformed(void) {
  uint8_t garbage[MESSAGE_SIZE];
  memset(garbage, 0x5a, sizeof garbage);
  printf("up\n");
  fflush(stdout);
  for (;;) {
    int fd = dial();
    if (fd < 0) continue;
    (void)!write(fd, garbage, sizeof garbage);
    while (read(fd, garbage, sizeof garbage) > 0) {}
    memset(garbage, 0x5a, sizeof garbage);
    close(fd);
  }
}

static int hoard(int n, const char *key) {
  for (int i = 0; i < n; i++) {
    /* Both ends stay open and unread: each reply's descriptor stays in flight. */
    int a = dial(), b = dial();
    if (a < 0 || b < 0) return 1;
    request(a, key, 0);
    request(b, key, 0);
    usleep(200);
  }
  printf("up\n");
  fflush(stdout);
  pause();
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: hostile SOCKET_PATH MODE ...\n"); return 2; }
  /* The broker may refuse a connection between its connect and its write: the attack goes on. */
  signal(SIGPIPE, SIG_IGN);
  strncpy(address.sun_path, argv[1], sizeof address.sun_path - 1);
  serial = (unsigned long)getpid() << 20;
  if (strcmp(argv[2], "hold") == 0 && argc == 5) return keep(atoi(argv[3]), argv[4]);
  if (strcmp(argv[2], "silent") == 0 && argc == 4) return keep(atoi(argv[3]), NULL);
  if (strcmp(argv[2], "malformed") == 0) return malformed();
  if (strcmp(argv[2], "hoard") == 0 && argc == 5) return hoard(atoi(argv[3]), argv[4]);
  fprintf(stderr, "hostile: unknown mode %s\n", argv[2]);
  return 2;
}
