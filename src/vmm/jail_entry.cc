#include "vmm/jail_entry.h"

#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

namespace deltavm::vmm {
namespace {

constexpr unsigned long kLocked = MS_NOSUID | MS_NODEV | MS_NOEXEC;

Status mount_call(const char* source, const std::filesystem::path& target, const char* type, unsigned long flags,
                  const char* data, std::string_view what) {
  if (::mount(source, target.c_str(), type, flags, data) != 0) {
    return errno_error(fmt::format("jail: {} {}", what, target.string()), errno);
  }
  return {};
}

// Makes `path` (below the new root) exist as a directory or an empty file to mount on. Only
// what is missing is created, so nothing is ever created inside an earlier bind mount: what
// lies there exists already.
Status make_mount_point(const std::filesystem::path& path, bool directory) {
  std::filesystem::path partial;
  for (const std::filesystem::path& part : path.parent_path()) {
    partial /= part;
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      return errno_error(fmt::format("jail: mkdir {}", partial.string()), errno);
    }
  }
  if (directory) {
    if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
      return errno_error(fmt::format("jail: mkdir {}", path.string()), errno);
    }
    return {};
  }
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0444);
  if (fd < 0) return errno_error(fmt::format("jail: create {}", path.string()), errno);
  ::close(fd);
  return {};
}

Status bind(const std::filesystem::path& root, const std::filesystem::path& source, bool writable) {
  struct stat status {};
  if (::stat(source.c_str(), &status) != 0) return errno_error(fmt::format("jail: stat {}", source.string()), errno);
  std::filesystem::path target = root / source.relative_path();
  DELTAVM_TRY(make_mount_point(target, S_ISDIR(status.st_mode)));
  DELTAVM_TRY(mount_call(source.c_str(), target, nullptr, MS_BIND | MS_REC, nullptr, "bind-mount"));
  unsigned long flags = MS_BIND | MS_REMOUNT | kLocked | (writable ? 0 : MS_RDONLY);
  return mount_call(nullptr, target, nullptr, flags, nullptr, "remount");
}

Status check_no_capabilities() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (::syscall(SYS_capget, &header, data) != 0) return errno_error("jail: capget", errno);
  for (const __user_cap_data_struct& word : data) {
    if (word.effective != 0 || word.permitted != 0 || word.inheritable != 0) {
      return make_error(ErrorCode::kIo, "jail: capabilities remain after changing to the jail uid");
    }
  }
  return {};
}

}  // namespace

Status enter_jail(const JailSetup& setup) {
  if (setup.uid == 0) return make_error(ErrorCode::kInvalidArgument, "jail: uid 0 is not a jail uid");
  const std::filesystem::path& root = setup.mount_point;
  // Nothing mounted from here on may show in the host's namespace.
  DELTAVM_TRY(mount_call(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr, "make private"));
  DELTAVM_TRY(mount_call("deltavm-jail", root, "tmpfs", kLocked, "mode=0755,size=64k", "mount tmpfs on"));
  // The mount points are made 0755 and 0444 whatever the VMM's umask (0177).
  mode_t umask = ::umask(0);
  // Parents before what lies below them.
  std::vector<std::pair<std::filesystem::path, bool>> entries;
  entries.emplace_back(setup.writable, true);
  for (const std::filesystem::path& path : setup.read_only) entries.emplace_back(path, false);
  std::sort(entries.begin(), entries.end(),
            [](const auto& a, const auto& b) { return a.first.string().size() < b.first.string().size(); });
  for (const auto& [path, writable] : entries) {
    if (Status bound = bind(root, path, writable); !bound) {
      ::umask(umask);
      return bound;
    }
  }
  ::umask(umask);
  DELTAVM_TRY(mount_call(nullptr, root, nullptr, MS_BIND | MS_REMOUNT | MS_RDONLY | kLocked, nullptr, "remount"));
  // The new root goes over the old one (as switch_root does: pivot_root cannot leave an
  // initramfs root). What lies beneath is out of reach once CAP_SYS_CHROOT is gone.
  if (::chdir(root.c_str()) != 0) return errno_error(fmt::format("jail: chdir {}", root.string()), errno);
  DELTAVM_TRY(mount_call(".", "/", nullptr, MS_MOVE, nullptr, "move the new root onto"));
  if (::chroot(".") != 0) return errno_error("jail: chroot", errno);
  if (::chdir("/") != 0) return errno_error("jail: chdir /", errno);
  // Root's groups, then gid, then uid: changing the uid from 0 clears every capability.
  if (::setgroups(0, nullptr) != 0) return errno_error("jail: setgroups", errno);
  if (::setresgid(setup.uid, setup.uid, setup.uid) != 0) return errno_error("jail: setresgid", errno);
  if (::setresuid(setup.uid, setup.uid, setup.uid) != 0) return errno_error("jail: setresuid", errno);
  return check_no_capabilities();
}

}  // namespace deltavm::vmm
