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
                                      std::chrono::milliseconds timeout) {
  std::filesystem::path socket = directory / "control.sock";
  std::filesystem::path log = directory / "vmm.log";
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  std::filesystem::remove(socket, error);
  pid_t pid = ::fork();
  if (pid < 0) return errno_error("fork", errno);
  if (pid == 0) {
    int null = ::open("/dev/null", O_RDONLY);
    int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (null < 0 || out < 0) ::_exit(127);
    ::dup2(null, 0);
    ::dup2(out, 1);
    ::dup2(out, 2);
    ::execl(binary.c_str(), binary.c_str(), "--control", socket.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  Deadline deadline = deadline_after(timeout);
  for (;;) {
    Result<VmmClient> client = VmmClient::connect(socket, std::min(deadline, deadline_after(std::chrono::milliseconds(50))));
    if (client) return VmmProcess(pid, std::move(client).value(), log);
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      return make_error(ErrorCode::kIo, "{} exited at start: {}", binary.string(), tail_of_log(log));
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return client.error().with_context(binary.string());
    }
  }
}

VmmProcess::VmmProcess(VmmProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)), client_(std::move(other.client_)), log_(std::move(other.log_)) {}

VmmProcess::~VmmProcess() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
}

Result<nlohmann::json> VmmProcess::request(const nlohmann::json& request, std::chrono::milliseconds timeout) {
  Result<nlohmann::json> answer = client_.request(request, timeout);
  if (!answer && answer.error().code == ErrorCode::kIo) {
    return answer.error().with_context(fmt::format("deltavm-vmm (log: {})", tail_of_log(log_)));
  }
  return answer;
}

}  // namespace deltavm::kvm
