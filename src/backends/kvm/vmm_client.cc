#include "backends/kvm/vmm_client.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include "backends/process.h"

namespace deltavm::kvm {

Result<VmmClient> VmmClient::connect(const std::filesystem::path& socket, Deadline deadline) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, connect_unix(socket, deadline));
  return VmmClient(std::move(fd), socket.string());
}

Result<nlohmann::json> VmmClient::request(const nlohmann::json& request, std::chrono::milliseconds timeout) {
  DELTAVM_TRY(send_all(fd_.get(), request.dump() + "\n", socket_));
  Deadline deadline = deadline_after(timeout);
  size_t newline;
  while ((newline = buffer_.find('\n')) == std::string::npos) {
    DELTAVM_TRY(read_some(fd_.get(), buffer_, deadline, socket_));
  }
  std::string line = buffer_.substr(0, newline);
  buffer_.erase(0, newline + 1);
  nlohmann::json answer = nlohmann::json::parse(line, nullptr, false);
  if (answer.is_discarded() || !answer.is_object()) {
    return make_error(ErrorCode::kIo, "{}: answer is not a JSON object: {}", socket_, line.substr(0, 200));
  }
  if (!answer.value("ok", false)) {
    return make_error(ErrorCode::kInvalidArgument, "{}", answer.value("error", std::string("VMM reported an error")));
  }
  return answer;
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
  for (const std::filesystem::path& path : read_only) options.argv.insert(options.argv.end(), {"--read-only", path.string()});
  options.log = log;
  options.die_with_parent = true;
  DELTAVM_ASSIGN_OR_RETURN(Subprocess process, Subprocess::spawn(options));
  process.kill_on_destroy();
  Deadline deadline = deadline_after(timeout);
  for (;;) {
    Result<VmmClient> client = VmmClient::connect(socket, std::min(deadline, deadline_after(std::chrono::milliseconds(50))));
    if (client) return VmmProcess(std::move(process), std::move(client).value(), log);
    DELTAVM_ASSIGN_OR_RETURN(std::optional<int> status, process.poll_exit());
    if (status) {
      return make_error(ErrorCode::kIo, "{} {} at start: {}", binary.string(), describe_wait_status(*status),
                        tail_of_log(log));
    }
    if (std::chrono::steady_clock::now() >= deadline) return client.error().with_context(binary.string());
  }
}

Result<nlohmann::json> VmmProcess::request(const nlohmann::json& request, std::chrono::milliseconds timeout) {
  Result<nlohmann::json> answer = client_.request(request, timeout);
  if (!answer && answer.error().code == ErrorCode::kIo) {
    return answer.error().with_context(fmt::format("deltavm-vmm (log: {})", tail_of_log(log_)));
  }
  return answer;
}

}  // namespace deltavm::kvm
