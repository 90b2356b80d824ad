#include "vmm/seccomp_filter.h"

#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <memory>

namespace deltavm::vmm {
namespace {

// What the VMM's threads call after start-up: memory, files in the VM's directory and the
// read-only inputs (by path policy), KVM ioctls, the control and serial sockets it already
// listens on (accept, send, receive), its own threads and their signals, time. (Its
// userfaultfd is made before the filter, with the other things that need root.)
// clang-format off
constexpr const char* kAllowed[] = {
    // Files (opened by path policy), descriptors.
    "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "close_range", "openat", "open",
    "newfstatat", "fstat", "lstat", "stat", "statx", "access", "faccessat", "faccessat2", "readlink", "readlinkat",
    "getcwd", "getdents64", "ftruncate", "fallocate", "fsync", "fdatasync", "rename", "renameat", "renameat2",
    "unlink", "unlinkat", "fcntl", "dup", "dup2", "dup3", "pipe2", "eventfd2", "umask",
    // Memory, KVM and userfaultfd ioctls.
    "mmap", "munmap", "mprotect", "madvise", "mremap", "brk", "mincore", "ioctl",
    // Waiting, and the sockets it already listens on.
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "accept", "accept4", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername",
    // Its threads (clone is below) and their signals.
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield", "sched_getaffinity",
    "gettid", "getpid", "getppid", "tgkill", "tkill", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
    "sigaltstack", "rt_sigtimedwait", "restart_syscall", "exit", "exit_group", "prctl", "getrlimit", "prlimit64",
    "getuid", "geteuid", "getgid", "getegid", "uname", "sysinfo", "membarrier",
    // Time and randomness.
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time", "getrandom",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
};
// clang-format on

// Writes "deltavm-vmm: seccomp refused system call N (name)" and ends the process: a clear
// line in the VM's log instead of a bare SIGSYS. Only async-signal-safe calls.
void refused(int, siginfo_t* info, void*) {
  char line[160] = "deltavm-vmm: seccomp refused system call ";
  size_t length = std::strlen(line);
  int number = info->si_syscall;
  char digits[12];
  int count = 0;
  do {
    digits[count++] = static_cast<char>('0' + number % 10);
    number /= 10;
  } while (number > 0 && count < 11);
  while (count > 0) line[length++] = digits[--count];
  const char* name = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, info->si_syscall);
  line[length++] = ' ';
  line[length++] = '(';
  for (const char* c = name != nullptr ? name : "?"; *c != '\0' && length < sizeof line - 3; ++c) line[length++] = *c;
  line[length++] = ')';
  line[length++] = '\n';
  (void)!::write(STDERR_FILENO, line, length);
  ::_exit(128 + SIGSYS);
}

}  // namespace

Status install_seccomp_filter() {
  struct sigaction action {};
  action.sa_sigaction = refused;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  if (::sigaction(SIGSYS, &action, nullptr) != 0) return errno_error("sigaction SIGSYS", errno);

  std::unique_ptr<void, void (*)(scmp_filter_ctx)> filter(seccomp_init(SCMP_ACT_TRAP), seccomp_release);
  if (!filter) return make_error(ErrorCode::kIo, "seccomp_init failed");
  auto fail = [](const char* step, int result) {
    return make_error(ErrorCode::kIo, "seccomp: {}: {}", step, std::strerror(-result));
  };
  // Every thread, also those started before the filter (the serial sockets' servers).
  if (int r = seccomp_attr_set(filter.get(), SCMP_FLTATR_CTL_TSYNC, 1); r != 0) return fail("TSYNC", r);
  for (const char* name : kAllowed) {
    int number = seccomp_syscall_resolve_name(name);
    if (number == __NR_SCMP_ERROR) continue;  // Not a call of this architecture.
    if (int r = seccomp_rule_add(filter.get(), SCMP_ACT_ALLOW, number, 0); r != 0) return fail(name, r);
  }
  // Threads only: clone with CLONE_THREAD. clone3 hides its flags behind a pointer no filter
  // can read, so it answers ENOSYS and the C library falls back to clone.
  if (int r = seccomp_rule_add(filter.get(), SCMP_ACT_ALLOW, SCMP_SYS(clone), 1,
                               SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD));
      r != 0) {
    return fail("clone", r);
  }
  if (int r = seccomp_rule_add(filter.get(), SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0); r != 0) {
    return fail("clone3", r);
  }
  if (int r = seccomp_load(filter.get()); r != 0) return fail("load", r);
  return {};
}

}  // namespace deltavm::vmm
