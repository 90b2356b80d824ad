#include "backends/kvm/vmm_client.h"

#include <cstdlib>

#include "backends/process.h"

namespace deltavm {

Result<VmmClient> VmmClient::connect(const std::filesystem::path& socket, Deadline deadline) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, connect_unix(socket, deadline));
  return VmmClient(std::move(fd), socket);
}

Result<vmm::Reply> VmmClient::exchange(const vmm::Request& request, std::chrono::milliseconds timeout) {
  DELTAVM_TRY(channel_.write_line(vmm::encode_request(request)));
  DELTAVM_ASSIGN_OR_RETURN(std::string line, channel_.read_line(deadline_after(timeout)));
  return vmm::decode_reply(line);
}

std::filesystem::path default_vmm_binary() {
  const char* configured = std::getenv("DELTAVM_VMM");
  if (configured != nullptr && *configured) return configured;
  std::error_code error;
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  return self.parent_path() / "deltavm-vmm";
}

Result<VmmProcess> VmmProcess::launch(const std::filesystem::path& binary, const std::filesystem::path& directory,
                                      const std::vector<std::filesystem::path>& read_only,
                                      std::chrono::milliseconds timeout) {
  std::filesystem::path socket = directory / "control.sock";
  std::filesystem::path log = directory / "vmm.log";
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  if (error) return make_error(ErrorCode::kIo, "create {}: {}", directory.string(), error.message());
  SpawnOptions options;
  options.argv = {binary.string(), "--directory", directory.string(), "--control", socket.string()};
  for (const std::filesystem::path& path : read_only)
    options.argv.insert(options.argv.end(), {"--read-only", path.string()});
  options.log = log;
  options.die_with_parent = true;
  DELTAVM_ASSIGN_OR_RETURN(Subprocess process, Subprocess::spawn(options));
  process.kill_on_destroy();
  Deadline deadline = deadline_after(timeout);
  for (;;) {
    Result<VmmClient> client =
        VmmClient::connect(socket, std::min(deadline, deadline_after(std::chrono::milliseconds(50))));
    if (client) return VmmProcess(std::move(process), std::move(client).value(), log);
    DELTAVM_ASSIGN_OR_RETURN(std::optional<int> status, process.poll_exit());
    if (status) {
      return make_error(ErrorCode::kIo, "{} {} at start: {}", binary.string(), describe_wait_status(*status),
                        tail_of_log(log));
    }
    if (std::chrono::steady_clock::now() >= deadline) return client.error().with_context(binary.string());
  }
}

Error VmmProcess::with_log(const Error& error) const {
  return error.with_context(fmt::format("deltavm-vmm (log: {})", tail_of_log(log_)));
}

}  // namespace deltavm
