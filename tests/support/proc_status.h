// Reads a field of /proc/PID/status, for tests that check what a VM process runs as.
#pragma once

#include <sys/types.h>

#include <fstream>
#include <string>

namespace deltavm::testing {

// /proc/PID/status's value of `field` ("Seccomp" -> "2"), or "" if there is none.
inline std::string status_field(pid_t pid, const std::string& field) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      size_t value = line.find_first_not_of(" \t", field.size() + 1);
      return value == std::string::npos ? "" : line.substr(value);
    }
  }
  return "";
}

}  // namespace deltavm::testing
