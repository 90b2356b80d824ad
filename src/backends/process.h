// Reading what the processes that run VMs (QEMU, deltavm-vmm) said when they fail.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "base/error.h"

namespace deltavm {

// The last few hundred bytes of `log`, for an error message; "(no output)" if empty.
std::string tail_of_log(const std::filesystem::path& log);

}  // namespace deltavm
