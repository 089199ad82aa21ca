/*
 * A socket-activated service written the way sd_listen_fds() users are: it
 * takes its socket from LISTEN_PID/LISTEN_FDS (descriptor 3), insists that it
 * is a plain blocking stream socket as the broker created it, then echoes
 * every byte back until end of stream. It proves that `one-socket pair --exec`
 * serves a C program that knows nothing about the broker.
 *
 * usage: activated_echo EXIT_CODE FDNAME KEY
 * prints "activated" once the checks pass, exits EXIT_CODE after the echo;
 * otherwise exits 100 with one line on stderr saying what was wrong.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define LISTEN_FDS_START 3

static int fail(const char *what, const char *detail) {
  fprintf(stderr, "activated_echo: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  return 100;
}

static int expect_variable(const char *name, const char *expected) {
  const char *value = getenv(name);
  if (value == NULL || strcmp(value, expected) != 0) {
    fprintf(stderr, "activated_echo: %s is %s, expected %s\n", name, value ? value : "unset",
            expected);
    return 0;
  }
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 4) return fail("usage", "activated_echo EXIT_CODE FDNAME KEY");

  char pid[32];
  snprintf(pid, sizeof pid, "%ld", (long)getpid());
  if (!expect_variable("LISTEN_PID", pid) || !expect_variable("LISTEN_FDS", "1") ||
      !expect_variable("LISTEN_FDNAMES", argv[2]) || !expect_variable("ONE_SOCKET_FD", "3") ||
      !expect_variable("ONE_SOCKET_KEY", argv[3])) {
    return 100;
  }

  int fd = LISTEN_FDS_START;
  int type = 0;
  socklen_t length = sizeof type;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) < 0) {
    return fail("descriptor 3 is not a socket", strerror(errno));
  }
  if (type != SOCK_STREAM) return fail("descriptor 3 is not a stream socket", NULL);
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return fail("fcntl F_GETFL", strerror(errno));
  if (flags & O_NONBLOCK) return fail("descriptor 3 is nonblocking", NULL);
  puts("activated");
  fflush(stdout);

  char buffer[4096];
  for (;;) {
    ssize_t count = read(fd, buffer, sizeof buffer);
    if (count == 0) break;
    if (count < 0) return fail("read", strerror(errno));
    for (ssize_t sent = 0; sent < count;) {
      ssize_t n = write(fd, buffer + sent, (size_t)(count - sent));
      if (n < 0) return fail("write", strerror(errno));
      sent += n;
    }
  }
  return atoi(argv[1]);
}
