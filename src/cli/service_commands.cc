// deltavm serve: the long-lived service (docs/service.md).
#include <arpa/inet.h>
#include <malloc.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "base/file.h"
#include "base/subprocess.h"
#include "cli/commands.h"
#include "service/http_api.h"
#include "service/service_record.h"
#include "service/vm_service.h"

namespace deltavm::cli {
namespace {

constexpr size_t kMaxTokenBytes = 4096;

// HOST:PORT with HOST a loopback address (127.0.0.0/8): the TCP listener is for this host
// alone; the token guards it against other local users.
Result<std::pair<std::string, int>> parse_listen_address(const std::string& text) {
  size_t colon = text.rfind(':');
  if (colon == std::string::npos) {
    return make_error(ErrorCode::kInvalidArgument, "--listen {:?}: expected HOST:PORT, e.g. 127.0.0.1:8000", text);
  }
  std::string host = text.substr(0, colon);
  in_addr address{};
  if (::inet_pton(AF_INET, host.c_str(), &address) != 1 || (ntohl(address.s_addr) >> 24) != 127) {
    return make_error(ErrorCode::kInvalidArgument, "--listen {:?}: the host must be a loopback address (127.0.0.0/8)",
                      text);
  }
  std::string port_text = text.substr(colon + 1);
  if (port_text.empty() || port_text.size() > 5 || port_text.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(port_text) > 65535) {
    return make_error(ErrorCode::kInvalidArgument, "--listen {:?}: the port must be a number from 0 to 65535", text);
  }
  return std::pair{host, std::stoi(port_text)};
}

// The token: the file's first line. The file must be its owner's alone.
Result<std::string> read_token(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return errno_error(fmt::format("--token-file {}", path), errno);
  if ((st.st_mode & 077) != 0) {
    return make_error(ErrorCode::kInvalidArgument,
                      "--token-file {} has mode {:04o}: others could read the token; chmod 600 it", path,
                      st.st_mode & 07777);
  }
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(path, kMaxTokenBytes));
  std::string token(bytes.begin(), bytes.end());
  token = token.substr(0, token.find_first_of("\r\n"));
  if (token.size() < 16 || token.find_first_of(" \t") != std::string::npos) {
    return make_error(ErrorCode::kInvalidArgument,
                      "--token-file {}: the token must be at least 16 characters, no spaces", path);
  }
  return token;
}

struct ServeArguments {
  std::string socket, listen, token_file, config;
};

Status run_serve(const GlobalOptions& options, const ServeArguments& arguments) {
  // Everything the service creates (its socket from the moment it is bound, records, logs) is
  // its user's alone, whatever umask it was started with.
  ::umask(077);
  std::filesystem::path runtime = runtime_directory(options);
  DELTAVM_TRY(prepare_runtime_directory(runtime));
  DELTAVM_ASSIGN_OR_RETURN(Fd runtime_lock, lock_service_runtime(runtime));
  ServiceConfig config = default_service_config();
  if (!arguments.config.empty()) {
    DELTAVM_ASSIGN_OR_RETURN(config, read_service_config(arguments.config));
  }
  std::optional<std::pair<std::string, int>> tcp;
  std::string token;
  if (!arguments.listen.empty()) {
    if (arguments.token_file.empty()) {
      return make_error(ErrorCode::kInvalidArgument, "--listen needs --token-file: TCP requests must carry a token");
    }
    DELTAVM_ASSIGN_OR_RETURN(tcp, parse_listen_address(arguments.listen));
    DELTAVM_ASSIGN_OR_RETURN(token, read_token(arguments.token_file));
  }
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options, StoreAccess::kCreate));

  // SIGTERM and SIGINT are taken by sigwait below; every thread started from here on inherits
  // the mask (and children get a clean one, base/subprocess.cc).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  ::pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  // glibc gives each thread that allocates an arena of its own and keeps what is freed in it:
  // with dozens of request threads that alone would hold tens of MiB. Two arenas, trimmed by
  // the service's watch thread, keep the service's memory near what it uses. A fixed mmap
  // threshold (glibc otherwise raises it to the largest block freed) gives every large buffer,
  // decoded deltas and request bodies, back to the system as soon as it is freed.
  ::mallopt(M_ARENA_MAX, 2);
  ::mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  // Above the guests (each VM process leads a session of its own, scheduled as a group of its
  // own where the kernel has autogroup). Needs CAP_SYS_NICE and a session of its own: systemd
  // gives one; from a shell, `setsid deltavm serve`.
  if (Status raised = set_session_group_nice(::getpid(), kServiceNice); !raised) {
    fmt::print(stderr, "deltavm serve: runs at the priority of the guests: {}\n", raised.error().message);
  }
  DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<VmService> service, VmService::start(store, runtime, config));
  HttpApi api(*service);
  std::filesystem::path socket =
      arguments.socket.empty() ? runtime / "service.sock" : std::filesystem::path(arguments.socket);
  DELTAVM_TRY(api.listen_unix(socket));
  ServiceRecord record{ProcessIdentity::self(), std::filesystem::absolute(socket),
                       std::filesystem::weakly_canonical(store.directory()), ""};
  if (tcp) {
    DELTAVM_ASSIGN_OR_RETURN(int port, api.listen_tcp(tcp->first, tcp->second, token));
    record.tcp = fmt::format("{}:{}", tcp->first, port);
  }
  DELTAVM_TRY(write_service_record(runtime, record));
  if (options.json) {
    print_json({{"pid", record.process.pid},
                {"socket", record.socket.string()},
                {"tcp", record.tcp},
                {"store", record.store.string()}});
  } else {
    fmt::print("serving store {} on {}{}\n", record.store.string(), record.socket.string(),
               record.tcp.empty() ? "" : " and " + record.tcp);
  }
  std::fflush(stdout);

  int signal = 0;
  ::sigwait(&signals, &signal);
  fmt::print(stderr, "deltavm serve: {}: draining\n", strsignal(signal));
  // New work is refused (503) while the requests already taken finish; then the sockets close,
  // builds finish and the pools are emptied. Running VMs stay for the next service.
  service->stop_taking_work();
  while (api.in_flight() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  api.stop();
  service->drain();
  remove_service_record(runtime);
  std::error_code error;
  std::filesystem::remove(socket, error);
  fmt::print(stderr, "deltavm serve: stopped; {} VM(s) left running for the next service\n",
             service->list_vms().size());
  return {};
}

}  // namespace

std::filesystem::path runtime_directory(const GlobalOptions& options) {
  return options.runtime_directory.empty() ? default_runtime_directory()
                                           : std::filesystem::path(options.runtime_directory);
}

Result<std::optional<ServiceClient>> connect_service(const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ServiceRecord> record, find_service(runtime_directory(options)));
  if (!record) return std::optional<ServiceClient>();
  std::filesystem::path store =
      options.store_directory.empty() ? default_store_directory() : std::filesystem::path(options.store_directory);
  std::error_code error;
  std::filesystem::path canonical = std::filesystem::weakly_canonical(store, error);
  if (error || canonical != std::filesystem::weakly_canonical(record->store, error)) {
    return make_error(ErrorCode::kConflict,
                      "a deltavm serve (pid {}) serves runtime {} with store {}, not {}: use that store, or another "
                      "--runtime",
                      record->process.pid, runtime_directory(options).string(), record->store.string(), store.string());
  }
  return std::optional<ServiceClient>(ServiceClient::over_unix_socket(record->socket));
}

void add_service_commands(CLI::App& app, const GlobalOptions& options, int& exit_status) {
  auto arguments = std::make_shared<ServeArguments>();
  CLI::App* serve = app.add_subcommand(
      "serve", "Serve the store over an HTTP API with warm pools, lifetimes and limits (until SIGTERM)");
  serve->add_option("--socket", arguments->socket, "Unix socket to serve on (default: RUNTIME/service.sock)");
  serve->add_option("--listen", arguments->listen, "Also serve on loopback TCP, HOST:PORT (needs --token-file)");
  serve->add_option("--token-file", arguments->token_file, "File holding the bearer token TCP requests must carry");
  serve->add_option("--config", arguments->config, "Service configuration (JSON: limits, ttl, pools)");
  serve->callback([&options, &exit_status, arguments] {
    Status status = run_serve(options, *arguments);
    exit_status = status ? 0 : report_error(status.error());
  });
}

}  // namespace deltavm::cli
