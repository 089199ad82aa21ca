/*
 * A service for tests/service_manager_test.ts: it reports what its service
 * manager handed it, and on command uses the file descriptor store.
 *
 * usage: fdstore_probe PEER_PATH
 *
 * On start it prints
 *   probe start PID FDSTORE LISTEN_PID LISTEN_FDS LISTEN_FDNAMES OPEN
 * ("-" for an unset variable; OPEN counts its descriptors from 3 up, so that
 * a leak from the manager shows), then, if LISTEN_PID is its own pid as
 * sd_listen_fds(3) insists, "probe fd N socket|other NAME" for each inherited
 * descriptor, and writes "fd N\n" into each inherited socket, so that the
 * peer can tell which descriptor its connection came back as.
 *
 * Then it reads commands, one a line, from standard input:
 *   store NAME [COUNT] [nopoll] [twice]  connect COUNT (1) times to PEER_PATH,
 *       write "NAME\n" on each, send them all in one FDSTORE=1 message with
 *       FDNAME=NAME (FDPOLL=0 with nopoll; each twice with twice), close them
 *   pair NAME [COUNT]   store one end of COUNT socket pairs, keep the others
 *   remove NAME         FDSTOREREMOVE=1
 *   junk                send a connection without FDSTORE=1
 *   ready, stopping     READY=1, STOPPING=1
 *   exit CODE, abort    end so
 * At end of input it waits to be killed, so that it does not exit in a loop.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 253 /* the kernel's limit per message */

static const char *peer_path;

static void say(const char *format, ...) {
  char line[1024];
  va_list args;
  va_start(args, format);
  int length = vsnprintf(line, sizeof line - 1, format, args);
  va_end(args);
  if (length < 0) return;
  if ((size_t)length > sizeof line - 2) length = (int)sizeof line - 2;
  line[length++] = '\n';
  /* One write per line: the manager writes to the same pipe. */
  if (write(STDOUT_FILENO, line, (size_t)length) < 0) exit(1);
}

static void die(const char *call) {
  fprintf(stderr, "fdstore_probe: %s: %s\n", call, strerror(errno));
  exit(1);
}

static struct sockaddr_un address_of(const char *path) {
  struct sockaddr_un address = {.sun_family = AF_UNIX};
  if (path == NULL || strlen(path) >= sizeof address.sun_path) {
    fprintf(stderr, "fdstore_probe: no usable socket path\n");
    exit(1);
  }
  strcpy(address.sun_path, path);
  return address;
}

static void notify(const char *text, const int *fds, int count) {
  struct sockaddr_un address = address_of(getenv("NOTIFY_SOCKET"));
  int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) die("socket");
  union {
    struct cmsghdr align;
    char space[CMSG_SPACE(sizeof(int) * MAX_FDS)];
  } control;
  struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
  struct msghdr message = {
      .msg_name = &address, .msg_namelen = sizeof address, .msg_iov = &iov, .msg_iovlen = 1};
  if (count > 0) {
    message.msg_control = &control;
    message.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)count);
    struct cmsghdr *c = CMSG_FIRSTHDR(&message);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)count);
  }
  if (sendmsg(s, &message, 0) < 0) die("sendmsg");
  close(s);
}

/* A connection to the test, tagged with NAME so that the test knows which it is. */
static int connect_peer(const char *name) {
  struct sockaddr_un address = address_of(peer_path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0) die("connect");
  char tag[300];
  int length = snprintf(tag, sizeof tag, "%s\n", name);
  if (write(fd, tag, (size_t)length) != length) die("write");
  return fd;
}

static void report_start(void) {
  const char *fdstore = getenv("FDSTORE"), *pid_text = getenv("LISTEN_PID");
  const char *count_text = getenv("LISTEN_FDS"), *names = getenv("LISTEN_FDNAMES");
  int open = 0;
  DIR *directory = opendir("/proc/self/fd");
  if (directory == NULL) die("opendir");
  for (struct dirent *entry; (entry = readdir(directory)) != NULL;) {
    int fd = atoi(entry->d_name);
    if (fd >= 3 && fd != dirfd(directory)) open++;
  }
  closedir(directory);
  say("probe start %ld %s %s %s %s %d", (long)getpid(), fdstore ? fdstore : "-",
      pid_text ? pid_text : "-", count_text ? count_text : "-", names ? names : "-", open);
  if (pid_text == NULL || atol(pid_text) != (long)getpid() || count_text == NULL) return;
  const char *name = names ? names : "";
  for (int i = 0, count = atoi(count_text); i < count; i++) {
    int fd = 3 + i;
    size_t length = strcspn(name, ":");
    struct stat st;
    bool socket = fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
    say("probe fd %d %s %.*s", fd, socket ? "socket" : "other", (int)length, name);
    name += name[length] ? length + 1 : length;
    if (socket) {
      char text[32];
      int n = snprintf(text, sizeof text, "fd %d\n", fd);
      (void)!send(fd, text, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL); /* the peer may be gone */
    }
  }
}

static void run(char *command) {
  char *verb = strtok(command, " "), *name = strtok(NULL, " ");
  if (verb == NULL) return;
  if (strcmp(verb, "ready") == 0 || strcmp(verb, "stopping") == 0) {
    notify(strcmp(verb, "ready") == 0 ? "READY=1" : "STOPPING=1", NULL, 0);
    return;
  }
  if (strcmp(verb, "abort") == 0) {
    struct rlimit none = {0, 0}; /* no core file from a crash on purpose */
    setrlimit(RLIMIT_CORE, &none);
    abort();
  }
  if (strcmp(verb, "exit") == 0) exit(name ? atoi(name) : 0);
  if (strcmp(verb, "junk") == 0) {
    int fd = connect_peer("junk");
    notify("STATUS=junk", &fd, 1);
    close(fd);
    return;
  }
  if (name == NULL) {
    fprintf(stderr, "fdstore_probe: %s wants a NAME\n", verb);
    exit(1);
  }
  char text[512];
  if (strcmp(verb, "remove") == 0) {
    snprintf(text, sizeof text, "FDSTOREREMOVE=1\nFDNAME=%s", name);
    notify(text, NULL, 0);
    return;
  }
  int count = 1;
  bool nopoll = false, twice = false;
  for (char *word; (word = strtok(NULL, " ")) != NULL;) {
    if (strcmp(word, "nopoll") == 0) nopoll = true;
    else if (strcmp(word, "twice") == 0) twice = true;
    else count = atoi(word);
  }
  if (count < 1 || count * (twice ? 2 : 1) > MAX_FDS) {
    fprintf(stderr, "fdstore_probe: bad count\n");
    exit(1);
  }
  int fds[MAX_FDS], sent = 0;
  for (int i = 0; i < count; i++) {
    if (strcmp(verb, "pair") == 0) {
      int pair[2];
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) die("socketpair");
      fds[sent++] = pair[0]; /* pair[1] stays open here until this process ends */
    } else {
      fds[sent++] = connect_peer(name);
      if (twice) {
        fds[sent] = fds[sent - 1];
        sent++;
      }
    }
  }
  snprintf(text, sizeof text, "FDSTORE=1\nFDNAME=%s%s", name, nopoll ? "\nFDPOLL=0" : "");
  notify(text, fds, sent);
  for (int i = 0; i < sent; i += twice ? 2 : 1) close(fds[i]);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: fdstore_probe PEER_PATH\n");
    return 2;
  }
  peer_path = argv[1];
  report_start();
  /* A byte at a time: a restarted probe reads the same pipe, and must find
   * every command its killed predecessor did not take. */
  char line[512];
  size_t length = 0;
  for (char byte;;) {
    ssize_t n = read(STDIN_FILENO, &byte, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (byte != '\n') {
      if (length < sizeof line - 1) line[length++] = byte;
      continue;
    }
    line[length] = '\0';
    length = 0;
    run(line);
  }
  for (;;) pause();
}
