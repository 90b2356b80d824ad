// bench/serve: deltavm serve under a bounded load on its Unix socket. C concurrent clients
// (1, 4, 8 by default) each run create -> exec -> delete for N rounds after W unmeasured ones
// (their failures count), first with no warm pool (every create loads cold: base + deltas +
// machine state), then from the template's warm pool: in waves of at most --pool cycles, each
// begun with the pool full, so each create can take a pooled VM (the fraction that did is
// reported). One service serves both. The clients run at the service's priority, above the
// guests, so that their own wait for a CPU is not counted as the service's.
//
//   bench-serve --store DIR --template NAME [--clients 1,4,8] [--rounds 5] [--warmup 1] [--pool 64]
//               [--modes cold,pooled] [--deltavm PATH] [--json]
//
// Reported per level: cycles, failures, creates taken from the pool, p50/p99 of request ->
// running (the create's reply) and of request -> first exec answered, cycles/s and requests/s;
// and the service's peak resident memory, sampled every 100 ms (VMs are processes of their own;
// the guest RAM the service maps while it loads a VM is reported apart).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <mutex>
#include <thread>

#include "base/socket.h"
#include "base/subprocess.h"
#include "service/client.h"
#include "service/service_record.h"
#include "service/vm_service.h"

namespace {

using namespace deltavm;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "bench-serve: {}\n", message);
  std::exit(1);
}

template <typename T>
T check(Result<T> result, std::string_view what) {
  if (!result) fail(fmt::format("{}: {}", what, result.error().message));
  return std::move(result).value();
}

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t index = static_cast<size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[index];
}

// The service's resident memory, from /proc/PID/smaps: all of it, and its own alone. While it
// loads a VM it maps that VM's RAM (the base flat file in the store, the VM's RAM file in the
// runtime) and writes the chain into it: those pages are the VM's, resident whether or not the
// service maps them, so they are left out of its own.
struct Resident {
  uint64_t total = 0;
  uint64_t own = 0;
};

Resident resident(pid_t pid, const std::vector<std::string>& vm_directories) {
  std::ifstream smaps(fmt::format("/proc/{}/smaps", pid));
  Resident bytes;
  bool vm_memory = false;
  for (std::string line; std::getline(smaps, line);) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && line.find('-') < line.find(' ')) {
      size_t path = line.find('/');
      vm_memory = false;
      for (const std::string& directory : vm_directories) {
        if (path != std::string::npos && line.compare(path, directory.size(), directory) == 0) vm_memory = true;
      }
    } else if (line.starts_with("Rss:")) {
      uint64_t kib = std::stoull(line.substr(4));
      bytes.total += kib << 10;
      if (!vm_memory) bytes.own += kib << 10;
    }
  }
  return bytes;
}

struct Level {
  std::string mode;
  int clients = 0;
  int cycles = 0;
  int failures = 0;
  int pooled = 0;
  double seconds = 0;
  int cycles_run = 0;  // Warm-up included: what cycles/s is over.
  std::vector<double> create_ms, first_exec_ms;
  std::vector<std::string> errors;  // The first few.
};

Level run_level(const std::filesystem::path& socket, const std::string& template_name, const std::string& mode,
                int clients, int rounds, int warmup) {
  Level level{mode, clients, clients * rounds};
  std::mutex mutex;
  auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&] {
      ServiceClient client = ServiceClient::over_unix_socket(socket);
      for (int round = -warmup; round < rounds; ++round) {
        auto failed = [&](const std::string& what) {
          std::lock_guard lock(mutex);
          ++level.failures;
          if (level.errors.size() < 5) level.errors.push_back(what);
        };
        auto request = Clock::now();
        Result<json> vm = client.call("POST", "/v1/vms", {{"template", template_name}});
        double create_ms = ms_since(request);
        if (!vm) {
          failed("create: " + vm.error().message);
          continue;
        }
        std::string id = (*vm)["id"];
        Result<json> answer = client.call("POST", "/v1/vms/" + id + "/exec", {{"command", {"true"}}});
        double first_exec_ms = ms_since(request);
        if (!answer || (*answer)["exit_code"] != 0)
          failed("exec: " + (answer ? answer->dump() : answer.error().message));
        Result<json> deleted = client.call("DELETE", "/v1/vms/" + id);
        if (!deleted) failed("delete: " + deleted.error().message);
        std::lock_guard lock(mutex);
        if (round < 0) continue;  // Warm-up: its failures count, its times do not.
        level.create_ms.push_back(create_ms);
        if (answer) level.first_exec_ms.push_back(first_exec_ms);
        if ((*vm)["pooled"] == true) ++level.pooled;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  level.seconds = ms_since(start) / 1000;
  level.cycles_run = clients * (rounds + warmup);
  return level;
}

void set_pool(ServiceClient& client, const std::string& template_name, uint64_t size) {
  check(client.call("PUT", fmt::format("/v1/templates/{}/pool", template_name), {{"size", size}}), "set pool");
  auto deadline = Clock::now() + std::chrono::minutes(10);
  for (;;) {
    json pool = check(client.call("GET", "/v1/templates/" + template_name), "template")["pool"];
    if (pool["ready"] == size && pool["loading"] == 0) return;
    if (Clock::now() > deadline) fail(fmt::format("the pool never reached {}: {}", size, pool.dump()));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// The clients are the load, not what is measured: they run at the service's priority so that
// their own wait for a CPU behind busy guests is not counted as the service's. In a session of
// their own, so the caller's shell keeps its priority; the caller waits, and ending it (Ctrl-C)
// ends the run.
void run_at_service_priority() {
  if (::getsid(0) != ::getpid()) {
    pid_t child = ::fork();
    if (child < 0) fail(fmt::format("fork: {}", std::strerror(errno)));
    if (child > 0) {
      int status = 0;
      while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
      }
      std::exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    }
    pid_t parent = ::getppid();
    if (::setsid() < 0 || ::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) std::exit(1);
  }
  if (Status raised = set_session_group_nice(::getpid(), kServiceNice); !raised) {
    fmt::print(stderr, "bench-serve: clients run at the guests' priority: {}\n", raised.error().message);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Service benchmark: concurrent create -> exec -> delete, cold and from a warm pool"};
  std::string store_directory, template_name, runtime_directory, deltavm_binary = DELTAVM_BINARY;
  std::vector<int> client_levels = {1, 4, 8};
  std::vector<std::string> modes = {"cold", "pooled"};
  int rounds = 5;
  int warmup = 1;
  uint64_t max_pool = 64;
  bool as_json = false;
  app.add_option("--store", store_directory, "Store holding the template")->required();
  app.add_option("--template", template_name, "Template the VMs are made from")->required();
  app.add_option("--clients", client_levels, "Concurrent clients, one level each")
      ->delimiter(',')
      ->check(CLI::Range(1, 64));
  app.add_option("--rounds", rounds, "create -> exec -> delete cycles per client")->check(CLI::Range(1, 1000));
  app.add_option("--warmup", warmup, "Unmeasured cycles per client before the measured ones")
      ->check(CLI::Range(0, 100));
  app.add_option("--pool", max_pool, "Largest warm pool of the pooled mode (more cycles run in waves)")
      ->check(CLI::Range(1, 256));
  app.add_option("--modes", modes, "cold, pooled or both")->delimiter(',')->check(CLI::IsMember({"cold", "pooled"}));
  app.add_option("--runtime", runtime_directory, "Runtime directory of the service (default: a fresh one)");
  app.add_option("--deltavm", deltavm_binary, "The deltavm binary");
  app.add_flag("--json", as_json, "Print JSON");
  CLI11_PARSE(app, argc, argv);
  run_at_service_priority();
  std::filesystem::path runtime = runtime_directory.empty()
                                      ? std::filesystem::path(fmt::format("/tmp/deltavm-bench-serve-{}", getpid()))
                                      : std::filesystem::path(runtime_directory);
  std::filesystem::create_directories(runtime);

  Subprocess service = check(
      Subprocess::spawn({.argv = {deltavm_binary, "--store", store_directory, "--runtime", runtime.string(), "serve"},
                         .log = runtime / "serve.log",
                         .die_with_parent = true}),
      "start deltavm serve");
  service.kill_on_destroy();
  std::filesystem::path socket;
  for (auto deadline = Clock::now() + std::chrono::seconds(30); socket.empty();) {
    std::optional<ServiceRecord> record = check(find_service(runtime), "find the service");
    if (record && record->process.pid == service.pid()) socket = record->socket;
    if (check(service.poll_exit(), "service").has_value())
      fail("deltavm serve exited; see " + (runtime / "serve.log").string());
    if (Clock::now() > deadline) fail("deltavm serve did not start in 30 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ServiceClient control = ServiceClient::over_unix_socket(socket);
  check(control.call("GET", "/v1/templates/" + template_name), "template");

  // The service's memory, sampled every 100 ms for the whole run.
  std::vector<std::string> vm_directories = {std::filesystem::canonical(store_directory).string() + "/",
                                             std::filesystem::canonical(runtime).string() + "/"};
  Resident peak;
  std::atomic<bool> done = false;
  std::thread sampler([&] {
    while (!done) {
      Resident now = resident(service.pid(), vm_directories);
      peak.total = std::max(peak.total, now.total);
      peak.own = std::max(peak.own, now.own);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  std::vector<Level> levels;
  for (const std::string& mode : modes) {
    for (int clients : client_levels) {
      if (!as_json && isatty(STDERR_FILENO)) fmt::print(stderr, "{} x{} ...\n", mode, clients);
      if (mode == "cold") {
        set_pool(control, template_name, 0);
        levels.push_back(run_level(socket, template_name, mode, clients, rounds, warmup));
        continue;
      }
      // In waves of at most --pool cycles, each begun with the pool full: every measured create
      // can take a pooled VM, however many rounds are asked.
      int wave_rounds = std::max(1, static_cast<int>(max_pool / static_cast<uint64_t>(clients)));
      Level level{mode, clients, clients * rounds};
      for (int done = 0, wave_warmup = warmup; done < rounds; wave_warmup = 0) {
        int measured = std::clamp(wave_rounds - wave_warmup, 1, rounds - done);
        set_pool(control, template_name, static_cast<uint64_t>(clients) * (measured + wave_warmup));
        Level wave = run_level(socket, template_name, mode, clients, measured, wave_warmup);
        level.failures += wave.failures;
        level.pooled += wave.pooled;
        level.seconds += wave.seconds;
        level.cycles_run += wave.cycles_run;
        level.create_ms.insert(level.create_ms.end(), wave.create_ms.begin(), wave.create_ms.end());
        level.first_exec_ms.insert(level.first_exec_ms.end(), wave.first_exec_ms.begin(), wave.first_exec_ms.end());
        for (std::string& error : wave.errors) {
          if (level.errors.size() < 5) level.errors.push_back(std::move(error));
        }
        done += measured;
      }
      levels.push_back(std::move(level));
    }
  }
  set_pool(control, template_name, 0);
  done = true;
  sampler.join();
  std::string metrics = check(control.request("GET", "/metrics"), "metrics").body;
  (void)service.send_signal(SIGTERM);
  (void)service.wait(deadline_after(std::chrono::seconds(60)));
  if (runtime_directory.empty()) std::filesystem::remove_all(runtime);

  // Pooled create p50 against the cold create p50 at the same concurrency.
  auto find = [&](const std::string& mode, int clients) -> const Level* {
    for (const Level& level : levels) {
      if (level.mode == mode && level.clients == clients) return &level;
    }
    return nullptr;
  };
  json rows = json::array();
  for (const Level& level : levels) {
    rows.push_back({{"mode", level.mode},
                    {"clients", level.clients},
                    {"cycles", level.cycles},
                    {"failures", level.failures},
                    {"pooled_creates", level.pooled},
                    {"create_p50_ms", percentile(level.create_ms, 0.5)},
                    {"create_p99_ms", percentile(level.create_ms, 0.99)},
                    {"first_exec_p50_ms", percentile(level.first_exec_ms, 0.5)},
                    {"first_exec_p99_ms", percentile(level.first_exec_ms, 0.99)},
                    {"cycles_per_second", level.cycles_run / level.seconds},
                    {"requests_per_second", 3 * level.cycles_run / level.seconds},
                    {"errors", level.errors}});
  }
  json ratios = json::object();
  for (int clients : client_levels) {
    const Level* cold = find("cold", clients);
    const Level* pooled = find("pooled", clients);
    if (cold != nullptr && pooled != nullptr) {
      ratios[fmt::format("pooled_over_cold_create_p50_at_{}", clients)] =
          percentile(pooled->create_ms, 0.5) / percentile(cold->create_ms, 0.5);
    }
    for (const Level* level : {cold, pooled}) {
      if (level != nullptr) {
        ratios[fmt::format("{}_create_p99_over_p50_at_{}", level->mode, clients)] =
            percentile(level->create_ms, 0.99) / percentile(level->create_ms, 0.5);
      }
    }
  }
  int failures = 0;
  for (const Level& level : levels) failures += level.failures;
  json result = {{"template", template_name},
                 {"rounds", rounds},
                 {"warmup_rounds", warmup},
                 {"levels", rows},
                 {"ratios", ratios},
                 {"failures", failures},
                 {"service_peak_rss_bytes", peak.own},
                 {"service_peak_rss_with_vm_memory_bytes", peak.total}};
  if (as_json) {
    fmt::print("{}\n", result.dump(2));
    return failures == 0 ? 0 : 1;
  }
  fmt::print("template {}; each client: {} x (create -> exec true -> delete), after {} unmeasured\n\n", template_name,
             rounds, warmup);
  fmt::print("{:<7} {:>7} {:>6} {:>8} {:>6}  {:>10} {:>10}  {:>10} {:>10}  {:>8} {:>7}\n", "mode", "clients", "cycles",
             "failures", "pooled", "create p50", "p99", "1st exec", "p99", "cycles/s", "req/s");
  for (const Level& level : levels) {
    fmt::print("{:<7} {:>7} {:>6} {:>8} {:>6}  {:>7.1f} ms {:>7.1f} ms  {:>7.1f} ms {:>7.1f} ms  {:>8.1f} {:>7.1f}\n",
               level.mode, level.clients, level.cycles, level.failures, level.pooled, percentile(level.create_ms, 0.5),
               percentile(level.create_ms, 0.99), percentile(level.first_exec_ms, 0.5),
               percentile(level.first_exec_ms, 0.99), level.cycles_run / level.seconds,
               3 * level.cycles_run / level.seconds);
  }
  fmt::print("\nratios (target):\n");
  for (const auto& [name, value] : ratios.items()) {
    fmt::print("  {:<40} {:6.3f}  {}\n", name, value.get<double>(),
               name.starts_with("pooled_over") ? "(<= 0.1)" : (name.ends_with("_at_8") ? "(<= 3)" : ""));
  }
  fmt::print(
      "service peak RSS, VMs excluded: {:.1f} MiB (<= 30); with the guest RAM it maps while loading: {:.1f} MiB\n",
      peak.own / 1048576.0, peak.total / 1048576.0);
  for (const Level& level : levels) {
    for (const std::string& error : level.errors) fmt::print(stderr, "{} x{}: {}\n", level.mode, level.clients, error);
  }
  std::string excerpt;
  for (size_t at = 0; (at = metrics.find("deltavm_loads_total{", at)) != std::string::npos;) {
    size_t end = metrics.find('\n', at);
    excerpt += "  " + metrics.substr(at, end - at) + "\n";
    at = end;
  }
  fmt::print("\nGET /metrics (loads):\n{}", excerpt);
  return failures == 0 ? 0 : 1;
}
