// deltavm-agent: the command agent inside every deltavm guest. It serves one serial port
// (ttyS1 by default) in raw mode and runs the commands it is sent, concurrently, each with
// /bin/sh -c in a session of its own, streaming back their stdout and stderr and ending each
// with its exit status. guest/agent_protocol.h defines the frames.
//
// Nothing the agent holds leaks into a command: every fd it opens is close-on-exec and a
// command's child closes all but its stdin, stdout and stderr, so a command's background
// processes never keep the agent's port or another command's pipes open.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent_protocol.h"

// Stdin the host sent that the command has not read yet; more than this ends the command.
enum { kMaxPendingStdinBytes = 16 << 20 };

struct Command {
  int used;
  uint64_t id;
  pid_t pid;  // Also its process group.
  int out_fd, err_fd, in_fd;
  unsigned char* in_buffer;
  size_t in_length;
  int in_closing;  // Close stdin once the pending bytes are written.
  uint64_t out_sent, err_sent;
  uint32_t flags;
  int exited;
  int wait_status;
  int64_t deadline_ms;  // CLOCK_MONOTONIC milliseconds; 0: none.
};

static struct Command commands[AGENT_MAX_COMMANDS];
static int port = -1;

static int64_t now_ms(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static int write_all(int fd, const void* bytes, size_t length) {
  const char* p = bytes;
  while (length > 0) {
    ssize_t n = write(fd, p, length);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        struct pollfd wait = {fd, POLLOUT, 0};
        poll(&wait, 1, 100);
        continue;
      }
      return -1;
    }
    p += n;
    length -= (size_t)n;
  }
  return 0;
}

static void send_frame(char kind, uint64_t id, const void* payload, size_t length) {
  unsigned char header[AGENT_HEADER_BYTES];
  agent_make_header(header, kind, id, payload, (uint32_t)length);
  write_all(port, header, sizeof header);
  if (length > 0) write_all(port, payload, length);
}

static void send_failure(uint64_t id, const char* message) { send_frame('F', id, message, strlen(message)); }

static struct Command* find_command(uint64_t id) {
  for (int i = 0; i < AGENT_MAX_COMMANDS; ++i) {
    if (commands[i].used && commands[i].id == id) return &commands[i];
  }
  return NULL;
}

static void close_fd(int* fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

// Sends what a command wrote to one of its pipes, up to the output limit; reads past the rest.
// Returns 0 when the pipe has nothing more for now (EAGAIN) or is closed.
static void relay_output(struct Command* command, int* fd, char kind) {
  static unsigned char chunk[AGENT_MAX_CHUNK_BYTES];
  uint64_t* sent = kind == 'O' ? &command->out_sent : &command->err_sent;
  uint32_t truncated = kind == 'O' ? AGENT_STATUS_STDOUT_TRUNCATED : AGENT_STATUS_STDERR_TRUNCATED;
  for (;;) {
    ssize_t n = read(*fd, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      close_fd(fd);
      return;
    }
    size_t keep = (size_t)n;
    if (*sent + keep > AGENT_MAX_OUTPUT_BYTES) {
      keep = (size_t)(AGENT_MAX_OUTPUT_BYTES - *sent);
      command->flags |= truncated;
    }
    if (keep > 0) send_frame(kind, command->id, chunk, keep);
    *sent += keep;
  }
}

static void finish(struct Command* command) {
  // The command's process has exited: what it wrote is in its pipes now. Send that, and do not
  // wait for background processes that may hold the pipes open.
  if (command->out_fd >= 0) relay_output(command, &command->out_fd, 'O');
  if (command->err_fd >= 0) relay_output(command, &command->err_fd, 'E');
  close_fd(&command->out_fd);
  close_fd(&command->err_fd);
  close_fd(&command->in_fd);
  unsigned char payload[12];
  int status = command->wait_status;
  int32_t code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  uint32_t signal_number = WIFSIGNALED(status) ? (uint32_t)WTERMSIG(status) : 0;
  agent_put_u32(payload, (uint32_t)code);
  agent_put_u32(payload + 4, signal_number);
  agent_put_u32(payload + 8, command->flags);
  send_frame('S', command->id, payload, sizeof payload);
  free(command->in_buffer);
  memset(command, 0, sizeof *command);
}

static void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void start_command(uint64_t id, const unsigned char* payload, size_t length) {
  if (length < AGENT_EXEC_PREFIX_BYTES) {
    send_failure(id, "exec request shorter than its 8-byte prefix");
    return;
  }
  if (find_command(id) != NULL) {
    send_failure(id, "a command with this id is already running");
    return;
  }
  struct Command* command = NULL;
  for (int i = 0; i < AGENT_MAX_COMMANDS && command == NULL; ++i) {
    if (!commands[i].used) command = &commands[i];
  }
  if (command == NULL) {
    send_failure(id, "too many commands running at once (64)");
    return;
  }
  uint32_t timeout_ms = agent_get_u32(payload);
  uint32_t flags = agent_get_u32(payload + 4);
  size_t command_length = length - AGENT_EXEC_PREFIX_BYTES;
  if (memchr(payload + AGENT_EXEC_PREFIX_BYTES, '\0', command_length) != NULL) {
    send_failure(id, "the command holds a NUL byte");
    return;
  }
  char* text = malloc(command_length + 1);
  if (text == NULL) {
    send_failure(id, "out of memory");
    return;
  }
  memcpy(text, payload + AGENT_EXEC_PREFIX_BYTES, command_length);
  text[command_length] = '\0';

  int out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1}, in_pipe[2] = {-1, -1};
  int ok = pipe2(out_pipe, O_CLOEXEC) == 0 && pipe2(err_pipe, O_CLOEXEC) == 0;
  if (ok && (flags & AGENT_FLAG_STDIN)) {
    ok = pipe2(in_pipe, O_CLOEXEC) == 0;
  } else if (ok) {
    in_pipe[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ok = in_pipe[0] >= 0;
  }
  pid_t pid = ok ? fork() : -1;
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    dup2(in_pipe[0], 0);
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    close_range(3, ~0u, 0);
    if (chdir("/") != 0) _exit(127);
    execl("/bin/sh", "sh", "-c", text, (char*)NULL);
    _exit(127);
  }
  free(text);
  close_fd(&out_pipe[1]);
  close_fd(&err_pipe[1]);
  close_fd(&in_pipe[0]);
  if (pid < 0) {
    close_fd(&out_pipe[0]);
    close_fd(&err_pipe[0]);
    close_fd(&in_pipe[1]);
    char message[128];
    snprintf(message, sizeof message, "could not start the command: %s", strerror(errno));
    send_failure(id, message);
    return;
  }
  memset(command, 0, sizeof *command);
  command->used = 1;
  command->id = id;
  command->pid = pid;
  command->out_fd = out_pipe[0];
  command->err_fd = err_pipe[0];
  command->in_fd = in_pipe[1];
  command->deadline_ms = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
  set_nonblocking(command->out_fd);
  set_nonblocking(command->err_fd);
  if (command->in_fd >= 0) set_nonblocking(command->in_fd);
}

static void add_stdin(uint64_t id, const unsigned char* bytes, size_t length) {
  struct Command* command = find_command(id);
  if (command == NULL || command->in_fd < 0 || command->in_closing) return;
  if (length == 0) {
    command->in_closing = 1;
    if (command->in_length == 0) close_fd(&command->in_fd);
    return;
  }
  if (command->in_length + length > kMaxPendingStdinBytes) {
    kill(-command->pid, SIGKILL);
    command->flags |= AGENT_STATUS_CANCELLED;
    close_fd(&command->in_fd);
    return;
  }
  unsigned char* grown = realloc(command->in_buffer, command->in_length + length);
  if (grown == NULL) return;
  command->in_buffer = grown;
  memcpy(command->in_buffer + command->in_length, bytes, length);
  command->in_length += length;
}

static void write_stdin(struct Command* command) {
  while (command->in_length > 0) {
    ssize_t n = write(command->in_fd, command->in_buffer, command->in_length);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n < 0) {  // The command closed its stdin: what it did not read is dropped.
      command->in_length = 0;
      close_fd(&command->in_fd);
      return;
    }
    memmove(command->in_buffer, command->in_buffer + n, command->in_length - (size_t)n);
    command->in_length -= (size_t)n;
  }
  if (command->in_closing) close_fd(&command->in_fd);
}

// A new identity after a load (see the N frame): the host's clock, and entropy the kernel's
// random number generator is reseeded with before anyone reads it again.
static void take_identity(uint64_t id, const unsigned char* payload, size_t length) {
  if (length != 8 + AGENT_IDENTITY_ENTROPY_BYTES) {
    send_failure(id, "an identity frame must hold 8 + 32 bytes");
    return;
  }
  uint64_t realtime_ns = agent_get_u64(payload);
  struct timespec now = {(time_t)(realtime_ns / 1000000000u), (long)(realtime_ns % 1000000000u)};
  if (clock_settime(CLOCK_REALTIME, &now) != 0) {
    send_failure(id, strerror(errno));
    return;
  }
  struct {
    struct rand_pool_info info;
    unsigned char bytes[AGENT_IDENTITY_ENTROPY_BYTES];
  } entropy;
  entropy.info.entropy_count = AGENT_IDENTITY_ENTROPY_BYTES * 8;
  entropy.info.buf_size = AGENT_IDENTITY_ENTROPY_BYTES;
  memcpy(entropy.bytes, payload + 8, AGENT_IDENTITY_ENTROPY_BYTES);
  int random = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
  int failed = random < 0 || ioctl(random, RNDADDENTROPY, &entropy.info) != 0 || ioctl(random, RNDRESEEDCRNG) != 0;
  int error = errno;
  if (random >= 0) close(random);
  explicit_bzero(&entropy, sizeof entropy);
  if (failed) {
    send_failure(id, strerror(error));
    return;
  }
  unsigned char status[12] = {0};
  send_frame('S', id, status, sizeof status);
}

static void handle_frame(char kind, uint64_t id, const unsigned char* payload, size_t length) {
  switch (kind) {
    case 'X': start_command(id, payload, length); break;
    case 'I': add_stdin(id, payload, length); break;
    case 'N': take_identity(id, payload, length); break;
    case 'K': {
      struct Command* command = find_command(id);
      if (command != NULL && !command->exited) {
        kill(-command->pid, SIGKILL);
        command->flags |= AGENT_STATUS_CANCELLED;
      }
      break;
    }
    default: break;  // Unknown kinds are read past: a newer host may send more.
  }
}

// The bytes read from the port and not yet used: at most one whole frame, and a little more.
static unsigned char input[AGENT_HEADER_BYTES + AGENT_MAX_FRAME_BYTES + 4096];
static size_t input_length;
static uint64_t discard_left, discard_id, discard_total;
static size_t input_needed;  // Bytes the frame at the start of `input` needs to be whole.

static void drop_input(size_t count) {
  memmove(input, input + count, input_length - count);
  input_length -= count;
}

static void process_input(void) {
  if (discard_left == 0 && input_length < input_needed) return;  // The frame is not whole yet.
  input_needed = 0;
  for (;;) {
    if (discard_left > 0) {  // The rest of a frame too long to take: read past it whole.
      size_t count = input_length < discard_left ? input_length : (size_t)discard_left;
      drop_input(count);
      discard_left -= count;
      if (discard_left > 0) return;
      char message[160];
      snprintf(message, sizeof message, "a request of %llu bytes is longer than the %u bytes allowed",
               (unsigned long long)discard_total, (unsigned)AGENT_MAX_FRAME_BYTES);
      send_failure(discard_id, message);
      continue;
    }
    unsigned char* magic = memmem(input, input_length, AGENT_MAGIC, 4);
    if (magic == NULL) {  // Keep a possible start of the magic; the rest is not a frame.
      if (input_length > 3) drop_input(input_length - 3);
      return;
    }
    drop_input((size_t)(magic - input));
    if (input_length < AGENT_HEADER_BYTES) {
      input_needed = AGENT_HEADER_BYTES;
      return;
    }
    if (!agent_header_valid(input)) {
      drop_input(1);
      continue;
    }
    char kind = (char)input[4];
    uint64_t id = agent_get_u64(input + 8);
    uint32_t length = agent_get_u32(input + 16);
    uint32_t payload_check = agent_get_u32(input + 20);
    if (length > AGENT_MAX_FRAME_BYTES) {
      drop_input(AGENT_HEADER_BYTES);
      discard_left = discard_total = length;
      discard_id = id;
      continue;
    }
    if (input_length < AGENT_HEADER_BYTES + (size_t)length) {
      input_needed = AGENT_HEADER_BYTES + (size_t)length;
      return;
    }
    const unsigned char* payload = input + AGENT_HEADER_BYTES;
    if (agent_fnv1a(AGENT_FNV_START, payload, length) != payload_check) {
      send_failure(id, "the request was damaged in transit (payload check failed)");
    } else {
      handle_frame(kind, id, payload, length);
    }
    drop_input(AGENT_HEADER_BYTES + (size_t)length);
  }
}

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "/dev/ttyS1";
  port = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
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
  signal(SIGPIPE, SIG_IGN);
  sigset_t child;
  sigemptyset(&child);
  sigaddset(&child, SIGCHLD);
  sigprocmask(SIG_BLOCK, &child, NULL);
  int children = signalfd(-1, &child, SFD_CLOEXEC | SFD_NONBLOCK);
  if (children < 0) {
    perror("signalfd");
    return 1;
  }
  send_frame('R', 0, AGENT_READY_TEXT, strlen(AGENT_READY_TEXT));
  // /init waits for this file before it announces the guest ready, so that no request can
  // reach the port while it still echoes in cooked mode.
  int ready = open("/run/deltavm-agent.ready", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (ready >= 0) close(ready);

  struct pollfd fds[2 + 3 * AGENT_MAX_COMMANDS];
  struct Command* owners[2 + 3 * AGENT_MAX_COMMANDS];
  for (;;) {
    size_t count = 0;
    fds[count] = (struct pollfd){port, POLLIN, 0};
    owners[count++] = NULL;
    fds[count] = (struct pollfd){children, POLLIN, 0};
    owners[count++] = NULL;
    int64_t next_deadline = 0;
    for (int i = 0; i < AGENT_MAX_COMMANDS; ++i) {
      struct Command* command = &commands[i];
      if (!command->used) continue;
      if (command->out_fd >= 0) {
        fds[count] = (struct pollfd){command->out_fd, POLLIN, 0};
        owners[count++] = command;
      }
      if (command->err_fd >= 0) {
        fds[count] = (struct pollfd){command->err_fd, POLLIN, 0};
        owners[count++] = command;
      }
      if (command->in_fd >= 0 && command->in_length > 0) {
        fds[count] = (struct pollfd){command->in_fd, POLLOUT, 0};
        owners[count++] = command;
      }
      if (command->deadline_ms > 0 && (next_deadline == 0 || command->deadline_ms < next_deadline)) {
        next_deadline = command->deadline_ms;
      }
    }
    int timeout = -1;
    if (next_deadline > 0) {
      int64_t left = next_deadline - now_ms();
      timeout = left < 0 ? 0 : left > 60000 ? 60000 : (int)left;
    }
    if (poll(fds, count, timeout) < 0 && errno != EINTR) return 1;

    if (fds[0].revents & POLLIN) {
      ssize_t n = read(port, input + input_length, sizeof input - input_length);
      if (n > 0) {
        input_length += (size_t)n;
        process_input();
      } else {
        usleep(10000);  // The host side of the port is closed; wait for the next one.
      }
    } else if (fds[0].revents & (POLLHUP | POLLERR)) {
      usleep(10000);
    }
    for (size_t i = 2; i < count; ++i) {
      struct Command* command = owners[i];
      if (fds[i].revents == 0 || !command->used) continue;
      if (fds[i].fd == command->out_fd)
        relay_output(command, &command->out_fd, 'O');
      else if (fds[i].fd == command->err_fd)
        relay_output(command, &command->err_fd, 'E');
      else if (fds[i].fd == command->in_fd)
        write_stdin(command);
    }
    if (fds[1].revents & POLLIN) {
      struct signalfd_siginfo info;
      while (read(children, &info, sizeof info) > 0) {
      }
      int status;
      pid_t pid;
      while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < AGENT_MAX_COMMANDS; ++i) {
          if (commands[i].used && commands[i].pid == pid) {
            commands[i].exited = 1;
            commands[i].wait_status = status;
          }
        }
      }
    }
    int64_t now = now_ms();
    for (int i = 0; i < AGENT_MAX_COMMANDS; ++i) {
      struct Command* command = &commands[i];
      if (!command->used) continue;
      if (command->exited) {
        finish(command);
      } else if (command->deadline_ms > 0 && now >= command->deadline_ms) {
        kill(-command->pid, SIGKILL);
        command->flags |= AGENT_STATUS_TIMED_OUT;
        command->deadline_ms = 0;
      }
    }
  }
}
