// deltavm-agent: the command agent inside every deltavm guest. It serves one serial port
// (ttyS1 by default) in raw mode and runs each command it is sent with /bin/sh -c, answering
// with the command's stdout, stderr and exit status.
//
// Protocol (binary-safe; every header is one ASCII line):
//   host  -> guest:  "X <id> <length>\n" then <length> bytes of command
//   guest -> host:   "O <id> <length>\n" <bytes>   stdout (once)
//                    "E <id> <length>\n" <bytes>   stderr (once)
//                    "S <id> <status>\n"           exit status (0-255, or 128+signal)
// A line that is not a request header is skipped, so a host can resynchronise by sending a
// newline. The agent announces itself with "READY\n" when it starts.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

enum { kMaxCommandBytes = 1 << 20 };

static int port = -1;

static int write_all(int fd, const char* bytes, size_t length) {
  while (length > 0) {
    ssize_t n = write(fd, bytes, length);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    bytes += n;
    length -= (size_t)n;
  }
  return 0;
}

static int read_byte(void) {
  unsigned char c;
  for (;;) {
    ssize_t n = read(port, &c, 1);
    if (n == 1) return c;
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) {
      // The host side of the port was closed; wait for the next one.
      usleep(10000);
      continue;
    }
    return -1;
  }
}

// Reads one line (without the newline) of at most size - 1 bytes; longer lines are cut.
static int read_line(char* line, size_t size) {
  size_t length = 0;
  for (;;) {
    int c = read_byte();
    if (c < 0) return -1;
    if (c == '\n') break;
    if (length + 1 < size) line[length++] = (char)c;
  }
  line[length] = '\0';
  return 0;
}

// Output of a child's pipe, grown as it arrives.
struct Buffer {
  char* bytes;
  size_t length, capacity;
};

static void append(struct Buffer* buffer, const char* bytes, size_t length) {
  if (buffer->length + length > buffer->capacity) {
    size_t capacity = buffer->capacity ? buffer->capacity * 2 : 4096;
    while (capacity < buffer->length + length) capacity *= 2;
    buffer->bytes = realloc(buffer->bytes, capacity);
    buffer->capacity = capacity;
  }
  memcpy(buffer->bytes + buffer->length, bytes, length);
  buffer->length += length;
}

static void send_block(char kind, unsigned long id, const struct Buffer* buffer) {
  char header[64];
  int n = snprintf(header, sizeof header, "%c %lu %zu\n", kind, id, buffer->length);
  write_all(port, header, (size_t)n);
  write_all(port, buffer->bytes, buffer->length);
}

static void run_command(unsigned long id, const char* command) {
  int out_pipe[2], err_pipe[2];
  struct Buffer out = {0}, err = {0};
  int status = 127;
  if (pipe(out_pipe) == 0 && pipe(err_pipe) == 0) {
    pid_t pid = fork();
    if (pid == 0) {
      int null = open("/dev/null", O_RDONLY);
      dup2(null, 0);
      dup2(out_pipe[1], 1);
      dup2(err_pipe[1], 2);
      close(out_pipe[0]);
      close(err_pipe[0]);
      execl("/bin/sh", "sh", "-c", command, (char*)NULL);
      _exit(127);
    }
    close(out_pipe[1]);
    close(err_pipe[1]);
    struct pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
    struct Buffer* buffers[2] = {&out, &err};
    int open_pipes = 2;
    while (open_pipes > 0) {
      if (poll(fds, 2, -1) < 0 && errno != EINTR) break;
      for (int i = 0; i < 2; ++i) {
        if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        char chunk[4096];
        ssize_t n = read(fds[i].fd, chunk, sizeof chunk);
        if (n > 0) {
          append(buffers[i], chunk, (size_t)n);
        } else if (n == 0 || errno != EINTR) {
          close(fds[i].fd);
          fds[i].fd = -1;
          --open_pipes;
        }
      }
    }
    int wait_status = 0;
    if (pid > 0 && waitpid(pid, &wait_status, 0) == pid) {
      status = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
    }
  } else {
    const char* message = "deltavm-agent: pipe failed\n";
    append(&err, message, strlen(message));
  }
  send_block('O', id, &out);
  send_block('E', id, &err);
  char trailer[64];
  int n = snprintf(trailer, sizeof trailer, "S %lu %d\n", id, status);
  write_all(port, trailer, (size_t)n);
  free(out.bytes);
  free(err.bytes);
}

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "/dev/ttyS1";
  port = open(path, O_RDWR | O_NOCTTY);
  if (port < 0) {
    perror(path);
    return 1;
  }
  struct termios settings;
  if (tcgetattr(port, &settings) == 0) {
    cfmakeraw(&settings);
    settings.c_iflag &= ~(IXON | IXOFF);
    settings.c_cc[VMIN] = 1;
    settings.c_cc[VTIME] = 0;
    tcsetattr(port, TCSANOW, &settings);
  }
  write_all(port, "READY\n", 6);
  // /init waits for this file before it announces the guest ready, so that no request can
  // reach the port while it still echoes in cooked mode.
  int ready = open("/run/deltavm-agent.ready", O_WRONLY | O_CREAT, 0644);
  if (ready >= 0) close(ready);
  char* command = malloc(kMaxCommandBytes + 1);
  char line[128];
  while (read_line(line, sizeof line) == 0) {
    unsigned long id, length;
    if (sscanf(line, "X %lu %lu", &id, &length) != 2 || length > kMaxCommandBytes) continue;
    size_t received = 0;
    while (received < length) {
      int c = read_byte();
      if (c < 0) return 1;
      command[received++] = (char)c;
    }
    command[length] = '\0';
    run_command(id, command);
  }
  return 0;
}
