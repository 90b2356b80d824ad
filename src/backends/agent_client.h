// The host side of the guest command agent (guest/agent.c): sends one command over the VM's
// agent socket and collects its stdout, stderr and exit status. Requests to one VM are
// serialised by an flock on the socket's lock file.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>

#include "base/error.h"

namespace deltavm {

struct ExecResult {
  int exit_status = 0;
  std::string stdout_bytes;
  std::string stderr_bytes;
};

Result<ExecResult> agent_exec(const std::filesystem::path& agent_socket, std::string_view command,
                              std::chrono::milliseconds timeout);

}  // namespace deltavm
