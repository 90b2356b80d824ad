#include "base/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
#endif

namespace deltavm {
namespace {

// Reads field 22 (starttime) and the state (field 3) of /proc/PID/stat. The command name
// (field 2) is in parentheses and may itself hold spaces and parentheses: fields are counted
// after its last ')'.
Result<std::pair<char, uint64_t>> read_stat(pid_t pid) {
  std::filesystem::path path = fmt::format("/proc/{}/stat", pid);
  Result<std::vector<uint8_t>> bytes = read_file(path);
  if (!bytes) {
    if (bytes.error().code == ErrorCode::kNotFound) return make_error(ErrorCode::kNotFound, "no process {}", pid);
    return bytes.error();  // Out of fds, say: not a reason to think the process gone.
  }
  std::string text(bytes->begin(), bytes->end());
  size_t close = text.rfind(')');
  if (close == std::string::npos) return make_error(ErrorCode::kIo, "{}: unparsable", path.string());
  // After ") ": state is field 3, starttime field 22.
  const char* cursor = text.c_str() + close + 1;
  char state = 0;
  uint64_t start_time = 0;
  for (int field = 3; field <= 22; ++field) {
    while (*cursor == ' ') ++cursor;
    if (*cursor == '\0') return make_error(ErrorCode::kIo, "{}: only {} fields", path.string(), field - 1);
    if (field == 3) state = *cursor;
    if (field == 22) start_time = std::strtoull(cursor, nullptr, 10);
    while (*cursor != ' ' && *cursor != '\0') ++cursor;
  }
  return std::pair{state, start_time};
}

// Debian 12's <sys/pidfd.h> declares these without C linkage, so they are called directly.
int open_pidfd(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
int signal_pidfd(int pidfd, int signal) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0));
}

bool has_exited(char state) { return state == 'Z' || state == 'X' || state == 'x'; }

Result<std::string> find_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* path = std::getenv("PATH");
  std::string directories = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= directories.size()) {
    size_t end = directories.find(':', start);
    if (end == std::string::npos) end = directories.size();
    std::string directory = directories.substr(start, end - start);
    std::string candidate = (directory.empty() ? "." : directory) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return make_error(ErrorCode::kNotFound, "program {} is not in PATH ({})", name, directories);
}

// What the child reports through the error pipe when a step before exec fails.
struct ChildFailure {
  int step;
  int error;
};
constexpr const char* kSteps[] = {"setsid",
                                  "prctl(PR_SET_PDEATHSIG)",
                                  "dup2",
                                  "fcntl",
                                  "close_range",
                                  "execve",
                                  "no_new_privs",
                                  "dropping capabilities",
                                  "joining its cgroups"};

// The highest capability number this kernel knows (CAP_LAST_CAP of the running kernel).
int highest_capability() {
  Result<std::vector<uint8_t>> text = read_file("/proc/sys/kernel/cap_last_cap");
  int last = 0;
  if (text) {
    for (uint8_t c : *text) {
      if (c < '0' || c > '9') break;
      last = last * 10 + (c - '0');
    }
  }
  return last > 0 && last < 64 ? last : 40;
}

[[noreturn]] void child_fail(int error_fd, int step) {
  ChildFailure failure{step, errno};
  (void)!::write(error_fd, &failure, sizeof failure);
  ::_exit(127);
}

}  // namespace

Result<ProcessIdentity> ProcessIdentity::of(pid_t pid) {
  DELTAVM_ASSIGN_OR_RETURN(auto stat, read_stat(pid));
  return ProcessIdentity{pid, stat.second};
}

ProcessIdentity ProcessIdentity::self() {
  Result<ProcessIdentity> identity = of(::getpid());
  return identity ? *identity : ProcessIdentity{::getpid(), 0};
}

Result<std::optional<Fd>> open_process(const ProcessIdentity& identity) {
  if (identity.pid <= 0) return std::optional<Fd>();
  Fd pidfd(open_pidfd(identity.pid));
  if (!pidfd.valid()) {
    if (errno == ESRCH) return std::optional<Fd>();
    return errno_error(fmt::format("pidfd_open {}", identity.pid), errno);
  }
  // The pidfd now pins whichever process held the pid. If that process started when ours did,
  // it is ours (ours started before this call, and a pid is not reused while it is held).
  Result<std::pair<char, uint64_t>> stat = read_stat(identity.pid);
  if (!stat && stat.error().code != ErrorCode::kNotFound) return stat.error();
  if (!stat || stat->second != identity.start_time || has_exited(stat->first)) return std::optional<Fd>();
  return std::optional<Fd>(std::move(pidfd));
}

bool process_running(const ProcessIdentity& identity) {
  Result<std::optional<Fd>> process = open_process(identity);
  return process && process->has_value();
}

namespace {

// The children spawned with die_with_parent, as pidfds + 1 (0: a free slot). The kernel's
// parent-death signal is cleared when a child changes its uid (a jailed QEMU's -runas), so a
// signal that would end this process (SIGINT, SIGTERM, SIGHUP) SIGKILLs them first. Only a
// SIGKILL of this process leaves them, as abandoned VMs for the next deltavm command to end.
constexpr int kMaxTiedChildren = 64;
std::atomic<int> tied_children[kMaxTiedChildren];

void end_tied_children_and_die(int signal) {
  for (std::atomic<int>& slot : tied_children) {
    int pidfd = slot.load() - 1;
    if (pidfd >= 0) (void)::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0);
  }
  ::signal(signal, SIG_DFL);
  ::raise(signal);
}

// Returns the slot holding a copy of `pidfd`, or -1 if every slot is taken.
int tie_child(int pidfd) {
  static std::once_flag handlers;
  std::call_once(handlers, [] {
    for (int signal : {SIGINT, SIGTERM, SIGHUP}) {
      struct sigaction current {};
      // A process that handles the signal itself (serve) keeps its own way.
      if (::sigaction(signal, nullptr, &current) != 0 || current.sa_handler != SIG_DFL) continue;
      struct sigaction action {};
      action.sa_handler = end_tied_children_and_die;
      sigemptyset(&action.sa_mask);
      ::sigaction(signal, &action, nullptr);
    }
  });
  int copy = ::fcntl(pidfd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return -1;
  for (int slot = 0; slot < kMaxTiedChildren; ++slot) {
    int free = 0;
    if (tied_children[slot].compare_exchange_strong(free, copy + 1)) return slot;
  }
  ::close(copy);
  return -1;
}

void untie_child(int slot) {
  if (slot < 0) return;
  int pidfd = tied_children[slot].exchange(0) - 1;
  if (pidfd >= 0) ::close(pidfd);
}

// Waits until the process behind `pidfd` exits (the pidfd turns readable), or `timeout`.
bool wait_for_exit(int pidfd, std::chrono::milliseconds timeout) {
  Deadline deadline = deadline_after(timeout);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd fd{pidfd, POLLIN, 0};
    int ready = ::poll(&fd, 1, static_cast<int>(std::max<int64_t>(0, left.count())));
    if (ready > 0) return true;
    if (ready == 0) return false;
    if (errno != EINTR) return false;
  }
}

}  // namespace

Status terminate_process(const ProcessIdentity& identity, std::chrono::milliseconds grace) {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<Fd> process, open_process(identity));
  if (!process) return {};
  if (signal_pidfd(process->get(), SIGTERM) != 0 && errno != ESRCH) {
    return errno_error(fmt::format("signal process {}", identity.pid), errno);
  }
  if (wait_for_exit(process->get(), grace)) return {};
  if (signal_pidfd(process->get(), SIGKILL) != 0 && errno != ESRCH) {
    return errno_error(fmt::format("kill process {}", identity.pid), errno);
  }
  if (!wait_for_exit(process->get(), std::chrono::seconds(10))) {
    return make_error(ErrorCode::kIo, "process {} did not exit 10 s after SIGKILL", identity.pid);
  }
  return {};
}

Result<Subprocess> Subprocess::spawn(const SpawnOptions& options) {
  if (options.argv.empty()) return make_error(ErrorCode::kInvalidArgument, "spawn: no program given");
  DELTAVM_ASSIGN_OR_RETURN(std::string program, find_program(options.argv[0]));
  std::vector<char*> argv;
  for (const std::string& argument : options.argv) argv.push_back(const_cast<char*>(argument.c_str()));
  argv.push_back(nullptr);
  DELTAVM_ASSIGN_OR_RETURN(Fd null, open_file("/dev/null", O_RDWR));
  Fd out;
  if (options.log.empty()) {
    out = Fd(::dup(null.get()));
  } else {
    DELTAVM_ASSIGN_OR_RETURN(out, open_file(options.log, O_WRONLY | O_CREAT | O_APPEND, 0600));
  }
  int error_pipe[2];
  if (::pipe2(error_pipe, O_CLOEXEC) != 0) return errno_error("pipe", errno);
  Fd error_read(error_pipe[0]), error_write(error_pipe[1]);
  int highest_target = 2;
  for (const auto& [from, to] : options.pass_fds) highest_target = std::max(highest_target, to);
  const pid_t parent = ::getpid();
  errno = 0;
  int nice = ::getpriority(PRIO_PROCESS, 0);  // The calling thread's.
  std::string group_nice = options.new_session && errno == 0 && nice != 0 ? std::to_string(nice) : "";

  int last_capability = options.bounding_capabilities ? highest_capability() : 0;

  // A plain fork, or (for new namespaces) the same through clone, so that the child itself is
  // the first process of a new pid namespace.
  pid_t pid =
      options.namespaces == 0
          ? ::fork()
          : static_cast<pid_t>(::syscall(SYS_clone, options.namespaces | SIGCHLD, nullptr, nullptr, nullptr, nullptr));
  if (pid < 0) return errno_error(fmt::format("fork for {}", program), errno);
  if (pid == 0) {
#if defined(__SANITIZE_THREAD__)
    // ThreadSanitizer cannot follow a fork made through clone, and takes the child's reads of
    // the parent's memory for races with the parent's other threads.
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
    // The child: only async-signal-safe calls from here to execve.
    sigset_t all;
    sigemptyset(&all);
    ::sigprocmask(SIG_SETMASK, &all, nullptr);
    for (int signal : {SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGCHLD}) ::signal(signal, SIG_DFL);
    int error_fd = ::fcntl(error_write.get(), F_DUPFD_CLOEXEC, highest_target + 1);
    if (error_fd < 0) child_fail(error_write.get(), 3);
    if (options.new_session && ::setsid() < 0) child_fail(error_fd, 0);
    for (int cgroup : options.join_cgroups) {
      if (::write(cgroup, "0", 1) != 1) child_fail(error_fd, 8);
    }
    if (!group_nice.empty()) {
      // Best effort: kernels without autogroup have no such file, and their thread nice holds.
      int group = ::open("/proc/self/autogroup", O_WRONLY | O_CLOEXEC);
      if (group >= 0) {
        (void)!::write(group, group_nice.data(), group_nice.size());
        ::close(group);
      }
    }
    if (options.die_with_parent) {
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) child_fail(error_fd, 1);
      // The owner is already gone. (In a new pid namespace the parent is out of sight: getppid
      // is 0.)
      if ((options.namespaces & CLONE_NEWPID) == 0 && ::getppid() != parent) ::_exit(127);
    }
    if (options.bounding_capabilities) {
      for (int capability = 0; capability <= last_capability; ++capability) {
        if ((*options.bounding_capabilities >> capability & 1) == 0 && ::prctl(PR_CAPBSET_DROP, capability) != 0) {
          child_fail(error_fd, 7);
        }
      }
    }
    if (options.no_new_privs && ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) child_fail(error_fd, 6);
    ::umask(options.umask);
    int moved[64];
    size_t count = std::min<size_t>(options.pass_fds.size(), 64);
    for (size_t i = 0; i < count; ++i) {
      moved[i] = ::fcntl(options.pass_fds[i].first, F_DUPFD_CLOEXEC, highest_target + 1);
      if (moved[i] < 0) child_fail(error_fd, 3);
    }
    if (::dup2(null.get(), 0) < 0 || ::dup2(out.get(), 1) < 0 || ::dup2(out.get(), 2) < 0) child_fail(error_fd, 2);
    for (size_t i = 0; i < count; ++i) {
      if (::dup2(moved[i], options.pass_fds[i].second) < 0) child_fail(error_fd, 2);
    }
    // Every other fd closes at exec, whether or not whoever opened it asked for that.
    if (::close_range(static_cast<unsigned>(highest_target + 1), ~0u, CLOSE_RANGE_CLOEXEC) != 0) {
      child_fail(error_fd, 4);
    }
    ::execve(program.c_str(), argv.data(), environ);
    child_fail(error_fd, 5);
  }
  error_write = Fd();
  Fd pidfd(open_pidfd(pid));  // The child is not reaped yet: its pid cannot be reused.
  int pidfd_error = errno;
  ChildFailure failure{};
  ssize_t n;
  do {
    n = ::read(error_read.get(), &failure, sizeof failure);
  } while (n < 0 && errno == EINTR);
  if (n > 0 || !pidfd.valid()) {
    if (!pidfd.valid()) ::kill(pid, SIGKILL);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!pidfd.valid()) return errno_error(fmt::format("pidfd_open for {}", program), pidfd_error);
    const char* step = failure.step >= 0 && failure.step < std::ssize(kSteps) ? kSteps[failure.step] : "setup";
    return make_error(ErrorCode::kIo, "start {}: {}: {}", program, step, std::strerror(failure.error));
  }
  Result<std::pair<char, uint64_t>> stat = read_stat(pid);
  ProcessIdentity identity{pid, stat ? stat->second : 0};
  Subprocess child(identity, std::move(pidfd), std::move(program));
  if (options.die_with_parent) child.tie_slot_ = tie_child(child.pidfd());
  return child;
}

Subprocess::Subprocess(Subprocess&& other) noexcept
    : identity_(std::exchange(other.identity_, {})),
      pidfd_(std::move(other.pidfd_)),
      program_(std::move(other.program_)),
      exit_status_(other.exit_status_),
      kill_on_destroy_(std::exchange(other.kill_on_destroy_, false)),
      tie_slot_(std::exchange(other.tie_slot_, -1)) {}

Subprocess& Subprocess::operator=(Subprocess&& other) noexcept {
  if (this != &other) {
    if (kill_on_destroy_) (void)kill();
    identity_ = std::exchange(other.identity_, {});
    pidfd_ = std::move(other.pidfd_);
    program_ = std::move(other.program_);
    exit_status_ = other.exit_status_;
    kill_on_destroy_ = std::exchange(other.kill_on_destroy_, false);
    untie_child(tie_slot_);
    tie_slot_ = std::exchange(other.tie_slot_, -1);
  }
  return *this;
}

Subprocess::~Subprocess() {
  if (kill_on_destroy_) (void)kill();
  untie_child(tie_slot_);
}

Result<std::optional<int>> Subprocess::poll_exit() {
  if (exit_status_) return exit_status_;
  if (!pidfd_.valid()) return make_error(ErrorCode::kInvalidArgument, "no process");
  siginfo_t info{};
  for (;;) {
    if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd_.get()), &info, WEXITED | WNOHANG) == 0) break;
    if (errno != EINTR) return errno_error(fmt::format("waitid {} ({})", program_, identity_.pid), errno);
  }
  if (info.si_pid == 0) return std::optional<int>();
  int status = info.si_code == CLD_EXITED ? (info.si_status & 0xff) << 8 : (info.si_status & 0x7f);
  exit_status_ = status;
  return exit_status_;
}

Result<int> Subprocess::wait(Deadline deadline) {
  for (;;) {
    DELTAVM_ASSIGN_OR_RETURN(std::optional<int> status, poll_exit());
    if (status) return *status;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return make_error(ErrorCode::kIo, "{} ({}) still running: timed out", program_, identity_.pid);
    }
    wait_for_exit(pidfd_.get(), left);
  }
}

Status Subprocess::send_signal(int signal) {
  if (exit_status_ || !pidfd_.valid()) return {};
  if (signal_pidfd(pidfd_.get(), signal) != 0 && errno != ESRCH) {
    return errno_error(fmt::format("signal {} ({})", program_, identity_.pid), errno);
  }
  return {};
}

Status Subprocess::kill() {
  if (exit_status_ || !pidfd_.valid()) return {};
  DELTAVM_TRY(send_signal(SIGKILL));
  Result<int> status = wait(deadline_after(std::chrono::seconds(10)));
  if (!status) return status.error();
  return {};
}

std::string describe_wait_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return fmt::format("killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return fmt::format("ended with wait status {:#x}", status);
}

Status set_process_nice(pid_t pid, int nice) {
  std::error_code error;
  std::filesystem::directory_iterator tasks(fmt::format("/proc/{}/task", pid), error);
  if (error) return make_error(ErrorCode::kNotFound, "process {}: {}", pid, error.message());
  for (const auto& task : tasks) {
    id_t tid = static_cast<id_t>(std::strtol(task.path().filename().c_str(), nullptr, 10));
    if (::setpriority(PRIO_PROCESS, tid, nice) != 0 && errno != ESRCH) {
      return errno_error(fmt::format("set the priority of process {} thread {}", pid, tid), errno);
    }
  }
  if (::getsid(pid) == pid) return set_session_group_nice(pid, nice);
  return {};
}

Status set_session_group_nice(pid_t pid, int nice) {
  std::filesystem::path group = fmt::format("/proc/{}/autogroup", pid);
  std::error_code error;
  if (!std::filesystem::exists(group, error)) return {};  // No autogroup: thread nice is what counts.
  if (::getsid(pid) != pid) {
    return make_error(ErrorCode::kInvalidArgument,
                      "process {} does not lead its session: its session's priority is not its own to set", pid);
  }
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(group, O_WRONLY));
  std::string value = std::to_string(nice);
  if (::write(fd.get(), value.data(), value.size()) < 0) {
    return errno_error(fmt::format("set the scheduling group priority of process {} to nice {}", pid, nice), errno);
  }
  return {};
}

}  // namespace deltavm
