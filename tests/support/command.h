// Runs a program as a user would, without a shell: its exit status or the signal that ended it,
// its stdout and stderr, and the most memory it held, so that tests can assert exact outcomes
// (an abort is signal 6, never "a non-zero status").
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace deltavm::testing {

struct CommandOptions {
  std::vector<std::string> environment;  // "NAME=value" added to (or replacing in) ours.
  std::optional<uid_t> uid;              // Run as this user (and its group: gid = uid).
  std::optional<mode_t> umask;           // The program's umask, else ours.
  std::string stdin_bytes;
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};  // Then SIGKILL.
};

struct CommandResult {
  int status = -1;  // Exit status, or -1 when a signal ended the program.
  int signal = 0;   // The signal that ended it, or 0.
  bool timed_out = false;
  std::string out;
  std::string err;
  long max_rss_kib = 0;  // Peak resident set, from wait4's rusage.
};

CommandResult run_command(const std::vector<std::string>& argv, const CommandOptions& options = {});

// `deltavm ARGS...`: the binary the tests were built with.
CommandResult run_deltavm(const std::vector<std::string>& arguments, const CommandOptions& options = {});

}  // namespace deltavm::testing
