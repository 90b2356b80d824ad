// Starting the processes that run VMs (QEMU, deltavm-vmm) so that they outlive the command
// that started them, and reading what they said when they fail.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "base/error.h"

namespace deltavm {

// Starts `argv` as a daemon (its own session, stdin from /dev/null, output to `log`) that
// outlives this process, and returns its pid.
Result<int> spawn_detached(const std::vector<std::string>& argv, const std::filesystem::path& log);

// The last few hundred bytes of `log`, for an error message; "(no output)" if empty.
std::string tail_of_log(const std::filesystem::path& log);

}  // namespace deltavm
