/*
 * A C client of protocol v1 that behaves like the reference library
 * (libspbroker): one 1044-byte GET_PAIR in a single write, one recvmsg that
 * must return exactly 1044 bytes with exactly one descriptor, then the demo's
 * echo game on the paired socket. Written from ../../shared/protocol-v1.md to
 * check our broker against a C peer in a separate process.
 *
 * usage: sp_client SOCKET_PATH KEY server|client
 * exit 0 on success; otherwise one line on stderr saying what was wrong.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MESSAGE_SIZE 1044

static int fail(const char *what) {
  fprintf(stderr, "sp_client: %s: %s\n", what, errno ? strerror(errno) : "protocol");
  return 1;
}

static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); } /* little-endian hosts */
static void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: sp_client SOCKET_PATH KEY server|client\n"); return 2; }
  int server = strcmp(argv[3], "server") == 0;
  size_t key_len = strlen(argv[2]);

  int broker = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un address = { .sun_family = AF_UNIX };
  strncpy(address.sun_path, argv[1], sizeof address.sun_path - 1);
  if (connect(broker, (struct sockaddr *)&address, sizeof address) < 0) return fail("connect");

  uint8_t request[MESSAGE_SIZE] = { 0 };
  put_u32(request, 1);         /* GET_PAIR */
  put_u32(request + 4, 1);     /* version 1 */
  put_u32(request + 8, 1028);  /* size */
  put_u16(request + 12, server ? 2 : 1);
  put_u16(request + 14, (uint16_t)key_len);
  memcpy(request + 16, argv[2], key_len);
  errno = 0;
  if (write(broker, request, sizeof request) != sizeof request) return fail("write GET_PAIR");

  uint8_t reply[2 * MESSAGE_SIZE];
  union { struct cmsghdr header; char space[CMSG_SPACE(4 * sizeof(int))]; } control;
  struct iovec iov = { .iov_base = reply, .iov_len = sizeof reply };
  struct msghdr message = {
    .msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof control,
  };
  errno = 0;
  ssize_t got = recvmsg(broker, &message, 0);
  if (got != MESSAGE_SIZE) { errno = 0; fprintf(stderr, "sp_client: reply of %zd bytes\n", got); return 1; }
  struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
  if (!cmsg || cmsg->cmsg_type != SCM_RIGHTS || cmsg->cmsg_len != CMSG_LEN(sizeof(int)))
    return fail("expected exactly one descriptor");
  if (get_u32(reply) != 2 || get_u32(reply + 4) != 1 || get_u32(reply + 8) != 8)
    return fail("reply header is not SET_PAIR v1 size 8");
  int paired;
  memcpy(&paired, CMSG_DATA(cmsg), sizeof paired);
  close(broker);
  if (fcntl(paired, F_GETFL) & O_NONBLOCK) return fail("paired socket arrived nonblocking");

  char line[64] = { 0 };
  if (server) {
    ssize_t n = read(paired, line, sizeof line - 1);
    if (n <= 0) return fail("server read");
    line[0] = 'P'; /* "ping" -> "Ping": proof the bytes went through this process */
    if (write(paired, line, (size_t)n) != n) return fail("server write");
  } else {
    if (write(paired, "ping", 4) != 4) return fail("client write");
    ssize_t n = read(paired, line, sizeof line - 1);
    if (n != 4 || memcmp(line, "Ping", 4) != 0) return fail("client expected Ping");
  }
  printf("%s ok\n", argv[3]);
  return 0;
}
