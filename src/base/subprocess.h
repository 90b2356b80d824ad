// Child processes owned through a pidfd, and processes named so that a reused pid can never be
// mistaken for them. A pid alone names whichever process holds it now; once the process it
// meant has exited, a signal sent to that pid may reach a stranger. Every process deltavm
// starts is therefore held by a pidfd from the moment it exists, and recorded for other
// invocations as a ProcessIdentity (pid and start time), which is checked before any signal.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "base/file.h"
#include "base/socket.h"

namespace deltavm {

// A process as the kernel knows it across its life: its pid and its start time (clock ticks
// after boot, field 22 of /proc/PID/stat). No two processes share both while the system runs.
struct ProcessIdentity {
  pid_t pid = 0;
  uint64_t start_time = 0;

  bool operator==(const ProcessIdentity&) const = default;
  // The identity of the process that holds `pid` now; kNotFound if none does.
  static Result<ProcessIdentity> of(pid_t pid);
  static ProcessIdentity self();
};

// A pidfd for `identity`'s process, if that process still runs (not a zombie): the pidfd pins
// the process, and the start time read after opening it proves it is the same one. An empty
// optional when it has exited (and perhaps its pid was reused).
Result<std::optional<Fd>> open_process(const ProcessIdentity& identity);
bool process_running(const ProcessIdentity& identity);

// Signals `identity`'s process through a pidfd, so a reused pid is never signalled. Ends it
// with SIGTERM, waits up to `grace` for it to exit, then SIGKILLs it and waits until it is
// gone. A process that has already exited is fine.
Status terminate_process(const ProcessIdentity& identity, std::chrono::milliseconds grace);

// Sets the nice value of every thread of `pid` (nice is per thread on Linux) and, if `pid`
// leads its session, of the session (set_session_group_nice). Lowering nice needs
// CAP_SYS_NICE (or RLIMIT_NICE).
Status set_process_nice(pid_t pid, int nice);
// Where the kernel schedules each session as a group (autogroup), the group's nice is what
// weighs against other sessions: against other VMs, each of which leads a session of its own.
// Only for a process that leads its session, so that a command started from a shell never
// changes the shell's priority. Nothing to do (and no error) without autogroup.
Status set_session_group_nice(pid_t pid, int nice);

struct SpawnOptions {
  std::vector<std::string> argv;  // argv[0] is looked up in PATH unless it holds a '/'.
  // stdout and stderr are appended here (created 0600); stdin is /dev/null. Empty: /dev/null.
  std::filesystem::path log;
  // In a session of its own: the caller's terminal and its signals (Ctrl-C) do not reach it.
  // Where the kernel groups each session for scheduling (autogroup), the group takes the nice
  // of the spawning thread, so a child started at low priority stays low next to other groups.
  bool new_session = true;
  // SIGKILLed by the kernel when the thread that spawned it exits (PR_SET_PDEATHSIG), so it
  // can never outlive its owner: for processes that exist only for the owner's operation. The
  // kernel clears that when the child changes its uid (a jailed QEMU's -runas), so a SIGINT,
  // SIGTERM or SIGHUP that ends the caller (one that does not handle them itself) SIGKILLs it
  // first; after a SIGKILL of the caller it is an abandoned VM, ended by the next command.
  bool die_with_parent = false;
  mode_t umask = 077;  // Sockets and files the child creates are its owner's alone.
  // Open fds of the caller handed to the child: {caller's fd, fd number in the child}. Every
  // other fd of the caller is closed in the child, whatever its close-on-exec flag.
  std::vector<std::pair<int, int>> pass_fds;
  // Confinement, applied between fork and exec (needs root). `namespaces`: CLONE_NEWPID,
  // CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWNS or'ed; with CLONE_NEWPID the child is pid 1 of its
  // own pid namespace (the pid returned is the caller's view). `no_new_privs`: nothing it execs
  // gains privileges. `bounding_capabilities` (a bit per CAP_* number): every other capability
  // leaves the bounding set, so a root child execs with these alone.
  int namespaces = 0;
  // cgroup.procs files, open for writing, that the child joins first thing (writing "0").
  std::vector<int> join_cgroups;
  bool no_new_privs = false;
  std::optional<uint64_t> bounding_capabilities;
};

// A child process held by a pidfd. Destroying a Subprocess does not end the process (a VM
// outlives the command that started it) unless kill_on_destroy() was asked for.
class Subprocess {
 public:
  // Starts the program. Fails, naming the program and the step, if it cannot be executed;
  // nothing is left running and no fd leaks on any failure.
  static Result<Subprocess> spawn(const SpawnOptions& options);

  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&& other) noexcept;
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  ~Subprocess();

  const ProcessIdentity& identity() const { return identity_; }
  pid_t pid() const { return identity_.pid; }
  int pidfd() const { return pidfd_.get(); }
  void kill_on_destroy() { kill_on_destroy_ = true; }

  // The wait status if the process has exited (it is then reaped), else nothing.
  Result<std::optional<int>> poll_exit();
  // Waits for the process to exit until `deadline`; kIo "timed out" then.
  Result<int> wait(Deadline deadline);
  // Sends `signal` through the pidfd; a process that has exited is not an error.
  Status send_signal(int signal);
  // SIGKILL, then waits for the exit.
  Status kill();

 private:
  Subprocess(ProcessIdentity identity, Fd pidfd, std::string program)
      : identity_(identity), pidfd_(std::move(pidfd)), program_(std::move(program)) {}
  ProcessIdentity identity_;
  Fd pidfd_;
  std::string program_;
  std::optional<int> exit_status_;
  bool kill_on_destroy_ = false;
  int tie_slot_ = -1;  // Where die_with_parent registered it for the caller's ending signals.
};

// "exited with status 1", "killed by signal 9 (Killed)".
std::string describe_wait_status(int status);

}  // namespace deltavm
