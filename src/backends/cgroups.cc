#include "backends/cgroups.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include <fmt/ranges.h>

namespace deltavm {
namespace {

constexpr const char* kControllers[] = {"memory", "cpu", "pids"};
constexpr uint64_t kCpuPeriodUs = 100'000;

// Where the host mounts its cgroup hierarchies (from /proc/self/mountinfo).
struct Hierarchies {
  std::optional<std::filesystem::path> v2;
  std::vector<std::string> v2_controllers;
  std::map<std::string, std::filesystem::path> v1;  // Controller -> its hierarchy's mount point.
};

bool has(const std::vector<std::string>& names, std::string_view name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, separator);) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

Hierarchies find_hierarchies() {
  Hierarchies found;
  std::ifstream mountinfo("/proc/self/mountinfo");
  for (std::string line; std::getline(mountinfo, line);) {
    size_t dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::vector<std::string> left = split(line.substr(0, dash), ' ');
    std::vector<std::string> right = split(line.substr(dash + 3), ' ');
    if (left.size() < 5 || right.size() < 3) continue;
    if (right[0] == "cgroup2" && !found.v2) {
      found.v2 = left[4];
      std::ifstream controllers(*found.v2 / "cgroup.controllers");
      for (std::string name; controllers >> name;) found.v2_controllers.push_back(name);
    } else if (right[0] == "cgroup") {
      for (const std::string& option : split(right[2], ',')) {
        for (const char* controller : kControllers) {
          if (option == controller && !found.v1.contains(controller)) found.v1[controller] = left[4];
        }
      }
    }
  }
  // A v2 hierarchy beside v1 ones (hybrid, /sys/fs/cgroup/unified) may hold none of the
  // controllers deltavm uses: then the v1 ones are used.
  if (found.v2 && std::none_of(std::begin(kControllers), std::end(kControllers),
                               [&](const char* name) { return has(found.v2_controllers, name); })) {
    found.v2.reset();
  }
  return found;
}

// The host's hierarchies, read once: a pooled VM's hand-out looks them up twice.
const Hierarchies& host_hierarchies() {
  static const Hierarchies found = find_hierarchies();
  return found;
}

Status write_text(const std::filesystem::path& path, const std::string& text) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_WRONLY | O_CLOEXEC));
  if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    return errno_error(fmt::format("write '{}' to {}", text, path.string()), errno);
  }
  return {};
}

Status make_directory(const std::filesystem::path& path) {
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return errno_error(fmt::format("mkdir {}", path.string()), errno);
  }
  return {};
}

// The kernel's weight for a task of `nice` (sched_prio_to_weight: 1024 at nice 0, each step
// 1.25x), as v1 cpu.shares and as v2 cpu.weight (100 at nice 0, 1 to 10000).
uint64_t v1_shares(int nice) { return static_cast<uint64_t>(std::lround(1024.0 / std::pow(1.25, nice))); }
uint64_t v2_weight(int nice) { return std::clamp<uint64_t>(v1_shares(nice) * 100 / 1024, 1, 10000); }

int calling_thread_nice() {
  errno = 0;
  int nice = ::getpriority(PRIO_PROCESS, 0);
  return errno == 0 ? nice : 0;
}

std::string gib(uint64_t bytes) { return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1ull << 30)); }

// The VM's directories, one per hierarchy it uses.
std::vector<std::filesystem::path> vm_directories(const Hierarchies& hierarchies, const std::string& name) {
  std::vector<std::filesystem::path> directories;
  if (hierarchies.v2) {
    directories.push_back(*hierarchies.v2 / "deltavm" / name);
    return directories;
  }
  for (const auto& [controller, mount] : hierarchies.v1) {
    std::filesystem::path directory = mount / "deltavm" / name;
    if (std::find(directories.begin(), directories.end(), directory) == directories.end())
      directories.push_back(directory);
  }
  return directories;
}

Status create_v2(const Hierarchies& hierarchies, const std::string& name, const ResourceLimits& limits,
                 VmCgroups& made) {
  std::filesystem::path parent = *hierarchies.v2 / "deltavm";
  DELTAVM_TRY(make_directory(parent));
  for (const char* controller : kControllers) {
    if (!has(hierarchies.v2_controllers, controller)) {
      made.missing.push_back(fmt::format("{} (the cgroup v2 hierarchy lacks the controller)", controller));
      continue;
    }
    std::string enable = fmt::format("+{}", controller);
    DELTAVM_TRY(write_text(*hierarchies.v2 / "cgroup.subtree_control", enable));
    DELTAVM_TRY(write_text(parent / "cgroup.subtree_control", enable));
  }
  std::filesystem::path directory = parent / name;
  DELTAVM_TRY(make_directory(directory));
  if (has(hierarchies.v2_controllers, "memory")) {
    DELTAVM_TRY(write_text(directory / "memory.max", std::to_string(limits.memory_bytes)));
    made.set.push_back(fmt::format("memory {}", gib(limits.memory_bytes)));
  }
  if (has(hierarchies.v2_controllers, "cpu")) {
    DELTAVM_TRY(write_text(directory / "cpu.max", fmt::format("{} {}", limits.cpus * kCpuPeriodUs, kCpuPeriodUs)));
    DELTAVM_TRY(write_text(directory / "cpu.weight", std::to_string(v2_weight(calling_thread_nice()))));
    made.set.push_back(fmt::format("cpu {}", limits.cpus));
  }
  if (has(hierarchies.v2_controllers, "pids")) {
    DELTAVM_TRY(write_text(directory / "pids.max", std::to_string(limits.pids)));
    made.set.push_back(fmt::format("pids {}", limits.pids));
  }
  DELTAVM_ASSIGN_OR_RETURN(Fd procs, open_file(directory / "cgroup.procs", O_WRONLY | O_CLOEXEC));
  made.procs.push_back(std::move(procs));
  return {};
}

Status create_v1(const Hierarchies& hierarchies, const std::string& name, const ResourceLimits& limits,
                 VmCgroups& made) {
  std::vector<std::filesystem::path> joined;
  for (const char* controller : kControllers) {
    auto it = hierarchies.v1.find(controller);
    if (it == hierarchies.v1.end()) {
      made.missing.push_back(fmt::format("{} (no cgroup hierarchy has the controller)", controller));
      continue;
    }
    std::filesystem::path directory = it->second / "deltavm" / name;
    DELTAVM_TRY(make_directory(it->second / "deltavm"));
    DELTAVM_TRY(make_directory(directory));
    std::string_view kind = controller;
    if (kind == "memory") {
      DELTAVM_TRY(write_text(directory / "memory.limit_in_bytes", std::to_string(limits.memory_bytes)));
      made.set.push_back(fmt::format("memory {} (v1)", gib(limits.memory_bytes)));
    } else if (kind == "cpu") {
      DELTAVM_TRY(write_text(directory / "cpu.cfs_period_us", std::to_string(kCpuPeriodUs)));
      DELTAVM_TRY(write_text(directory / "cpu.cfs_quota_us", std::to_string(limits.cpus * kCpuPeriodUs)));
      DELTAVM_TRY(write_text(directory / "cpu.shares", std::to_string(v1_shares(calling_thread_nice()))));
      made.set.push_back(fmt::format("cpu {} (v1)", limits.cpus));
    } else {
      DELTAVM_TRY(write_text(directory / "pids.max", std::to_string(limits.pids)));
      made.set.push_back(fmt::format("pids {} (v1)", limits.pids));
    }
    // Controllers mounted together share one directory, joined once.
    if (std::find(joined.begin(), joined.end(), directory) != joined.end()) continue;
    joined.push_back(directory);
    DELTAVM_ASSIGN_OR_RETURN(Fd procs, open_file(directory / "cgroup.procs", O_WRONLY | O_CLOEXEC));
    made.procs.push_back(std::move(procs));
  }
  return {};
}

}  // namespace

std::string vm_cgroup_name(const std::filesystem::path& runtime, const std::string& vm_id) {
  std::error_code error;
  std::filesystem::path canonical = std::filesystem::weakly_canonical(std::filesystem::absolute(runtime), error);
  uint32_t hash = 2166136261u;
  for (char c : (error ? runtime : canonical).string()) hash = (hash ^ static_cast<uint8_t>(c)) * 16777619u;
  return fmt::format("{:08x}-{}", hash, vm_id);
}

ResourceLimits vm_process_limits(uint64_t memory_bytes, uint32_t vcpus, uint64_t overhead_bytes) {
  ResourceLimits limits;
  limits.memory_bytes = memory_bytes + overhead_bytes;
  limits.cpus = vcpus + 1;
  return limits;
}

Result<VmCgroups> create_vm_cgroups(const std::string& name, const ResourceLimits& limits) {
  const Hierarchies& hierarchies = host_hierarchies();
  VmCgroups made;
  Status created =
      hierarchies.v2 ? create_v2(hierarchies, name, limits, made) : create_v1(hierarchies, name, limits, made);
  if (!created) {
    (void)remove_vm_cgroups(name);
    return created.error().with_context(fmt::format("cgroups {}", name));
  }
  return made;
}

Status set_vm_cpu_priority(const std::string& name, int nice) {
  const Hierarchies& hierarchies = host_hierarchies();
  std::filesystem::path file;
  std::string value;
  if (hierarchies.v2) {
    file = *hierarchies.v2 / "deltavm" / name / "cpu.weight";
    value = std::to_string(v2_weight(nice));
  } else if (auto cpu = hierarchies.v1.find("cpu"); cpu != hierarchies.v1.end()) {
    file = cpu->second / "deltavm" / name / "cpu.shares";
    value = std::to_string(v1_shares(nice));
  } else {
    return {};
  }
  std::error_code error;
  if (!std::filesystem::exists(file, error)) return {};
  return write_text(file, value);
}

Status remove_vm_cgroups(const std::string& name) {
  Status result;
  for (const std::filesystem::path& directory : vm_directories(host_hierarchies(), name)) {
    // Whatever still runs in them is the VM's: a VM process whose starter died before it could
    // record it, so that nothing else would ever end it.
    std::error_code exists_error;
    if (std::filesystem::exists(directory / "cgroup.kill", exists_error)) {
      (void)write_text(directory / "cgroup.kill", "1");
    } else {
      std::ifstream procs(directory / "cgroup.procs");
      for (pid_t pid = 0; procs >> pid;) {
        if (pid > 0) ::kill(pid, SIGKILL);
      }
    }
    // A process that has just ended may take a moment to leave its cgroup: EBUSY is retried
    // for up to a second.
    int error = 0;
    for (int attempt = 0; attempt < 100; ++attempt) {
      error = ::rmdir(directory.c_str()) == 0 ? 0 : errno;
      if (error != EBUSY) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (error != 0 && error != ENOENT && result) {
      result = errno_error(fmt::format("remove cgroup {}", directory.string()), error);
    }
  }
  return result;
}

std::string describe_cgroups() {
  const Hierarchies& hierarchies = host_hierarchies();
  std::vector<std::string> enforced, missing;
  for (const char* controller : kControllers) {
    bool present = hierarchies.v2 ? has(hierarchies.v2_controllers, controller) : hierarchies.v1.contains(controller);
    (present ? enforced : missing).push_back(controller);
  }
  std::string version = hierarchies.v2 ? "cgroup v2" : "cgroup v1";
  if (enforced.empty()) return fmt::format("no per-VM limit: neither cgroup v2 nor v1 has memory, cpu or pids here");
  std::string text = fmt::format("{}: per-VM limits of {} (RAM + the process's own, vCPUs + 1, 512 tasks)", version,
                                 fmt::join(enforced, ", "));
  if (!missing.empty()) text += fmt::format("; not limited here: {}", fmt::join(missing, ", "));
  return text;
}

}  // namespace deltavm
