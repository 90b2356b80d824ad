// deltavm-vmm: the kvm backend's per-VM process. It opens /dev/kvm once, listens on a control
// socket and runs one machine: booted, or restored from a machine state and RAM layers. The
// protocol (vmm/protocol.h, docs/kvm.md) is one JSON object per line each way; a malformed
// request gets an error reply and the VMM serves on.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>

#include "base/socket.h"
#include "vmm/guest_memory.h"
#include "vmm/jail_entry.h"
#include "vmm/kvm.h"
#include "vmm/path_policy.h"
#include "vmm/protocol.h"
#include "vmm/seccomp_filter.h"
#include "vmm/serial_socket.h"
#include "vmm/vmm.h"

namespace deltavm::vmm {
namespace {

// Serves one connection until it closes; returns true if the client asked the VMM to quit.
bool serve(Vmm& vmm, Fd connection) {
  LineChannel channel(std::move(connection), "control connection", kMaxLineBytes);
  for (;;) {
    Result<std::string> line = channel.read_line(Deadline::max());
    if (!line) return false;  // Closed, or a line too long to be a request: the connection ends.
    Result<Request> request = decode_request(*line);
    Result<Reply> reply = request ? vmm.handle(*request) : Result<Reply>(request.error());
    if (!channel.write_line(encode_reply(reply))) return false;
    if (request && std::holds_alternative<QuitRequest>(*request)) return true;
  }
}

int fail(const Error& error) {
  std::fprintf(stderr, "deltavm-vmm: %s\n", error.message.c_str());
  return 1;
}

}  // namespace
}  // namespace deltavm::vmm

namespace {

int run(int argc, char** argv) {
  using namespace deltavm;
  using namespace deltavm::vmm;
  CLI::App app{"deltavm-vmm: runs one VM on /dev/kvm, controlled over a Unix socket"};
  std::string control, device = "/dev/kvm", console, agent, directory;
  int console_log_fd = -1;
  std::vector<std::string> read_only;
  std::string jail_root;
  uint32_t jail_uid = 0;
  bool check = false;
  app.add_flag("--check", check, "say whether KVM can run this VMM's guests here, and exit (0: yes, 1: no)");
  app.add_option("--control", control, "control socket to create");
  app.add_option("--device", device, "KVM device");
  app.add_option("--console", console, "socket to serve ttyS0 on");
  app.add_option("--console-log-fd", console_log_fd,
                 "an fd it inherits, open for appending, to write everything the guest writes to ttyS0 to");
  app.add_option("--agent", agent, "socket to serve ttyS1 on");
  app.add_option("--directory", directory, "the VM's directory: the only place this VMM writes");
  app.add_option("--read-only", read_only, "a file or directory this VMM may also read (repeatable)");
  app.add_option("--jail-root", jail_root,
                 "once set up, take a root of its own built on this empty directory, holding only --directory and "
                 "the --read-only paths (needs root in a mount namespace of its own)");
  app.add_option("--jail-uid", jail_uid, "with --jail-root: the uid and gid to run as from then on");
  CLI11_PARSE(app, argc, argv);

  if (check) {
    std::optional<std::string> why = kvm_unusable_reason(device);
    Result<KvmSystem> system = why ? Result<KvmSystem>(Error{ErrorCode::kUnsupported, *why}) : KvmSystem::open(device);
    if (!system) {
      std::printf("not usable: %s\n", system.error().message.c_str());
      return 1;
    }
    std::printf("%s ready\n", device.c_str());
    return 0;
  }
  if (control.empty() || directory.empty()) {
    std::fprintf(stderr, "deltavm-vmm: --control and --directory are required\n");
    return 2;
  }
  if (jail_root.empty() != (jail_uid == 0)) {
    std::fprintf(stderr, "deltavm-vmm: --jail-root and --jail-uid (not 0) go together\n");
    return 2;
  }
  // Sockets and files this VMM creates are its owner's alone (0600).
  ::umask(0177);
  Result<PathPolicy> policy = PathPolicy::make(directory, {read_only.begin(), read_only.end()});
  if (!policy) return fail(policy.error());
  Result<KvmSystem> system = KvmSystem::open(device);
  if (!system) return fail(system.error());
  Result<Fd> listener = listen_unix(control);
  if (!listener) return fail(listener.error());
  // The console log is the host's file (it lies outside the VMM's directory): the host opens
  // it and hands it over.
  Fd log;
  if (console_log_fd >= 0) {
    if (console_log_fd <= 2 || ::fcntl(console_log_fd, F_GETFL) < 0) {
      std::fprintf(stderr, "deltavm-vmm: --console-log-fd %d is not an open file\n", console_log_fd);
      return 2;
    }
    ::fcntl(console_log_fd, F_SETFD, FD_CLOEXEC);
    log = Fd(console_log_fd);
  }
  // ttyS0, the console (kept 64 KiB for a late reader, and logged); ttyS1, the agent.
  std::unique_ptr<SerialSocket> console_socket, agent_socket;
  if (!console.empty()) {
    Result<std::unique_ptr<SerialSocket>> socket = SerialSocket::listen(console, 64 << 10, std::move(log));
    if (!socket) return fail(socket.error());
    console_socket = std::move(socket).value();
  }
  if (!agent.empty()) {
    Result<std::unique_ptr<SerialSocket>> socket = SerialSocket::listen(agent, 0, Fd());
    if (!socket) return fail(socket.error());
    agent_socket = std::move(socket).value();
  }
  Result<Fd> userfault = GuestMemory::create_userfaultfd();
  // Everything that needs root is open: from here on the VMM sees only its own files, as a
  // uid of its own, without capabilities.
  if (!jail_root.empty()) {
    JailSetup setup{jail_root, jail_uid, policy->directory(), policy->read_only()};
    if (Status jailed = enter_jail(setup); !jailed) return fail(jailed.error());
  }
  Vmm vmm(std::move(system).value(), std::move(policy).value(), std::move(console_socket), std::move(agent_socket),
          std::move(userfault));
  // From here on every thread may make only the calls the run loop needs (no userfaultfd,
  // no mount: those are done).
  if (Status filtered = install_seccomp_filter(); !filtered) return fail(filtered.error());
  for (;;) {
    Fd connection(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!connection.valid()) {
      if (errno == EINTR) continue;
      return fail(errno_error("accept", errno));
    }
    if (serve(vmm, std::move(connection))) break;
  }
  ::unlink(control.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Errors are values below; only the standard library (out of memory) or the parser's setup
  // can still throw, and then the VMM ends with one line instead of abort().
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "deltavm-vmm: internal error: %s\n", error.what());
    return 70;
  }
}
