#include "backends/jail.h"

#include <linux/capability.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <random>

#include <fmt/ranges.h>

namespace deltavm {
namespace {

Result<uint32_t> parse_uid(std::string_view text, std::string_view what) {
  uint64_t value = 0;
  if (text.empty() || text.size() > 10) return make_error(ErrorCode::kInvalidArgument, "{}: not a uid", what);
  for (char c : text) {
    if (c < '0' || c > '9') return make_error(ErrorCode::kInvalidArgument, "{}: not a uid", what);
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  if (value == 0 || value >= UINT32_MAX) {
    return make_error(ErrorCode::kInvalidArgument, "{}: uid {} is out of range (1 to {})", what, value, UINT32_MAX - 1);
  }
  return static_cast<uint32_t>(value);
}

Status make_directory(const std::filesystem::path& path, mode_t mode) {
  if (::mkdir(path.c_str(), mode) != 0 && errno != EEXIST)
    return errno_error(fmt::format("mkdir {}", path.string()), errno);
  struct stat status {};
  if (::lstat(path.c_str(), &status) != 0) return errno_error(fmt::format("stat {}", path.string()), errno);
  if (!S_ISDIR(status.st_mode) || status.st_uid != ::geteuid()) {
    return make_error(ErrorCode::kConflict, "{} is not a directory owned by uid {}", path.string(), ::geteuid());
  }
  // Whatever the umask.
  if ((status.st_mode & 07777) != mode && ::chmod(path.c_str(), mode) != 0) {
    return errno_error(fmt::format("chmod {}", path.string()), errno);
  }
  return {};
}

}  // namespace

Result<JailPolicy> JailPolicy::from_environment() {
  JailPolicy policy;
  if (const char* range = std::getenv("DELTAVM_JAIL_UIDS"); range != nullptr && *range) {
    std::string_view text = range;
    size_t dash = text.find('-');
    if (dash == std::string_view::npos) {
      return make_error(ErrorCode::kInvalidArgument, "DELTAVM_JAIL_UIDS={}: expected FIRST-LAST", text);
    }
    DELTAVM_ASSIGN_OR_RETURN(uint32_t first, parse_uid(text.substr(0, dash), "DELTAVM_JAIL_UIDS"));
    DELTAVM_ASSIGN_OR_RETURN(uint32_t last, parse_uid(text.substr(dash + 1), "DELTAVM_JAIL_UIDS"));
    if (last < first) {
      return make_error(ErrorCode::kInvalidArgument, "DELTAVM_JAIL_UIDS={}: the last uid is below the first", text);
    }
    policy.first_uid = first;
    policy.uid_count = last - first + 1;
  }
  const char* jail = std::getenv("DELTAVM_JAIL");
  std::string_view setting = jail != nullptr ? jail : "";
  if (setting == "off") {
    policy.why_not = "DELTAVM_JAIL=off";
  } else if (!setting.empty() && setting != "on") {
    return make_error(ErrorCode::kInvalidArgument, "DELTAVM_JAIL={}: expected on or off", setting);
  } else if (::geteuid() != 0) {
    policy.why_not = fmt::format("deltavm runs as uid {}, not root: VM processes run as that user", ::geteuid());
  } else {
    policy.enabled = true;
  }
  return policy;
}

Result<JailUid> claim_jail_uid(const std::filesystem::path& runtime, const JailPolicy& policy) {
  std::filesystem::path directory = runtime / "jail";
  DELTAVM_TRY(make_directory(directory, 0700));
  // From a random place in the range, so that concurrent claims seldom try the same uids.
  static thread_local std::mt19937 random{std::random_device{}()};
  uint32_t start = std::uniform_int_distribution<uint32_t>(0, policy.uid_count - 1)(random);
  for (uint32_t i = 0; i < policy.uid_count; ++i) {
    uint32_t uid = policy.first_uid + (start + i) % policy.uid_count;
    std::filesystem::path path = directory / fmt::format("{}.lock", uid);
    DELTAVM_ASSIGN_OR_RETURN(Fd lock, open_file(path, O_RDWR | O_CREAT | O_NOFOLLOW, 0600));
    if (::flock(lock.get(), LOCK_EX | LOCK_NB) == 0) return JailUid{uid, std::move(lock)};
    if (errno != EWOULDBLOCK) return errno_error(fmt::format("flock {}", path.string()), errno);
  }
  return make_error(ErrorCode::kLimit,
                    "every jail uid from {} to {} is held by a running VM process (DELTAVM_JAIL_UIDS)",
                    policy.first_uid, policy.first_uid + policy.uid_count - 1);
}

Result<std::filesystem::path> jail_root(const std::filesystem::path& runtime) {
  DELTAVM_TRY(make_directory(runtime / "jail", 0700));
  std::filesystem::path root = runtime / "jail" / "root";
  DELTAVM_TRY(make_directory(root, 0555));
  return root;
}

JailReport describe_jail() {
  JailReport report;
  Result<JailPolicy> policy = JailPolicy::from_environment();
  if (!policy) {
    report.qemu = report.kvm = fmt::format("not jailed: {}", policy.error().message);
  } else if (!policy->enabled) {
    report.qemu = report.kvm = fmt::format("not jailed: {}", policy->why_not);
  } else {
    report.qemu = fmt::format(
        "jailed: a uid of its own from {}-{}, own pid, net, ipc and mount namespaces, no_new_privs; once started: "
        "no capabilities, chroot to an empty directory, seccomp (-sandbox on)",
        policy->first_uid, policy->first_uid + policy->uid_count - 1);
    report.kvm = fmt::format(
        "jailed: a uid of its own from {}-{}, own pid, net, ipc and mount namespaces, no_new_privs; once started: "
        "no capabilities, a root holding only its directory and inputs, seccomp (deltavm-vmm's filter)",
        policy->first_uid, policy->first_uid + policy->uid_count - 1);
  }
  report.cgroups = policy && policy->enabled ? describe_cgroups() : "no per-VM limit: VM processes are not jailed";
  return report;
}

Result<Jail> prepare_jail(const std::filesystem::path& runtime, const JailPolicy& policy, const std::string& vm_id,
                          const ResourceLimits& limits, SpawnOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(JailUid uid, claim_jail_uid(runtime, policy));
  DELTAVM_ASSIGN_OR_RETURN(VmCgroups cgroups, create_vm_cgroups(vm_cgroup_name(runtime, vm_id), limits));
  options.namespaces = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWNS;
  options.no_new_privs = true;
  options.bounding_capabilities = uint64_t{1} << CAP_DAC_OVERRIDE | uint64_t{1} << CAP_SETUID |
                                  uint64_t{1} << CAP_SETGID | uint64_t{1} << CAP_SYS_CHROOT;
  options.pass_fds.emplace_back(uid.lock.get(), kJailLockFd);
  for (const Fd& procs : cgroups.procs) options.join_cgroups.push_back(procs.get());
  if (!options.log.empty()) {
    std::string line = fmt::format("deltavm: jail uid {}; cgroup limits: {}", uid.uid,
                                   cgroups.set.empty() ? "none" : fmt::format("{}", fmt::join(cgroups.set, ", ")));
    if (!cgroups.missing.empty()) line += fmt::format("; not limited: {}", fmt::join(cgroups.missing, ", "));
    line += "\n";
    DELTAVM_ASSIGN_OR_RETURN(Fd log, open_file(options.log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
    DELTAVM_TRY(write_all(log.get(), {reinterpret_cast<const uint8_t*>(line.data()), line.size()}, options.log));
  }
  return Jail{std::move(uid), std::move(cgroups)};
}

}  // namespace deltavm
