// deltavm serve as users run it: the real binary on the shared store of real Linux templates
// (support/guest_templates.h), driven over its Unix socket. Concurrent clients with and without
// a warm pool, lifetimes, kill -9 in the middle of loads and a restart that adopts what still
// runs, and the command line going through the service. Every route, body and error against
// docs/api.yaml is tests/service/api_conformance.py.
#include <gtest/gtest.h>

#include <signal.h>

#include <atomic>
#include <fstream>
#include <set>
#include <thread>

#include "backends/cgroups.h"
#include "backends/vm_directory.h"
#include "base/subprocess.h"
#include "service/client.h"
#include "service/service_record.h"
#include "support/command.h"
#include "support/guest_templates.h"

namespace deltavm {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

class Service : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    Result<testing::GuestTemplates> templates = testing::guest_templates();
    ASSERT_TRUE(templates) << templates.error().message;
    store_ = templates->root / "store";
  }

  void SetUp() override {
    // Short: the VMs' socket paths must fit a Unix socket address.
    root_ = templates_root() / "svc";
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
    runtime_ = root_ / "run";
  }

  void TearDown() override {
    if (service_) (void)service_->kill();
    // Whatever a test left: stopped directly (no service serves the runtime any more).
    testing::run_deltavm({"--store", store_.string(), "--runtime", runtime_.string(), "stop", "--all"});
    // A VM process whose directory is gone is beyond `stop --all`: ended here, so that one
    // test's leftover never fails the next.
    for (pid_t pid : vm_processes()) ::kill(pid, SIGKILL);
  }

  // What a test left behind, and the service's log: for failure messages.
  std::string leftovers() {
    std::string text = "service log:\n" + log();
    for (pid_t pid : vm_processes()) {
      Result<std::vector<uint8_t>> cmdline = read_file(fmt::format("/proc/{}/cmdline", pid));
      std::string line = cmdline ? std::string(cmdline->begin(), cmdline->end()) : "";
      size_t at = line.find("/vms/");
      std::string id = at == std::string::npos ? "?" : line.substr(at + 5, line.find('/', at + 5) - at - 5);
      std::error_code error;
      text += fmt::format("VM process {} (VM {}) still runs; its directory {}\n", pid, id,
                          std::filesystem::exists(runtime_ / "vms" / id, error) ? "exists" : "is gone");
    }
    return text;
  }

  static std::filesystem::path templates_root() { return store_.parent_path(); }

  // Starts `deltavm serve` with `config` and waits until it serves.
  void serve(const json& config = json::object()) {
    std::filesystem::path config_file = root_ / "serve.json";
    std::string text = config.dump();
    ASSERT_TRUE(write_file_atomic(config_file, {reinterpret_cast<const uint8_t*>(text.data()), text.size()}));
    Result<Subprocess> spawned =
        Subprocess::spawn({.argv = {DELTAVM_BINARY, "--store", store_.string(), "--runtime", runtime_.string(), "serve",
                                    "--config", config_file.string()},
                           .log = root_ / "serve.log",
                           // A test process that dies (a crash, a sanitizer's abort) takes it along.
                           .die_with_parent = true});
    ASSERT_TRUE(spawned) << spawned.error().message;
    service_ = std::move(*spawned);
    for (auto deadline = std::chrono::steady_clock::now() + 30s; std::chrono::steady_clock::now() < deadline;) {
      Result<std::optional<ServiceRecord>> record = find_service(runtime_);
      if (record && *record && (*record)->process.pid == service_->pid()) {
        socket_ = (*record)->socket;
        return;
      }
      Result<std::optional<int>> exited = service_->poll_exit();
      ASSERT_TRUE(exited && !exited->has_value()) << "deltavm serve ended: " << log();
      std::this_thread::sleep_for(20ms);
    }
    FAIL() << "deltavm serve did not start serving in 30 s: " << log();
  }

  std::string log() {
    Result<std::vector<uint8_t>> bytes = read_file(root_ / "serve.log");
    return bytes ? std::string(bytes->begin(), bytes->end()) : "";
  }

  ServiceClient client() { return ServiceClient::over_unix_socket(socket_); }

  // The reply's body; fails the test (naming the request) on an error.
  json call(ServiceClient& client, const std::string& method, const std::string& path, const json& body = nullptr) {
    Result<json> reply = client.call(method, path, body);
    EXPECT_TRUE(reply) << method << " " << path << ": " << reply.error().message;
    return reply ? *reply : json();
  }

  json wait_for_pool(ServiceClient& client, const std::string& name, uint64_t ready) {
    json pool;
    for (auto deadline = std::chrono::steady_clock::now() + 300s; std::chrono::steady_clock::now() < deadline;) {
      pool = call(client, "GET", "/v1/templates/" + name)["pool"];
      if (pool["ready"] == ready) return pool;
      std::this_thread::sleep_for(100ms);
    }
    ADD_FAILURE() << "the pool of " << name << " never held " << ready << ": " << pool.dump();
    return pool;
  }

  // VM processes (QEMU) whose command line names this test's runtime.
  std::set<pid_t> vm_processes() {
    std::set<pid_t> pids;
    for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
      std::string name = entry.path().filename();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      Result<std::vector<uint8_t>> cmdline = read_file(entry.path() / "cmdline");
      if (!cmdline) continue;
      std::string text(cmdline->begin(), cmdline->end());
      if (text.find("qemu-system") == 0 && text.find(runtime_.string()) != std::string::npos) {
        pids.insert(std::stoi(name));
      }
    }
    return pids;
  }

  static std::filesystem::path store_;
  std::filesystem::path root_, runtime_, socket_;
  std::optional<Subprocess> service_;
};

std::filesystem::path Service::store_;

// 8 clients at once, each create -> exec -> delete twice: every cycle succeeds, every VM
// answers as its own, and nothing is left. With a pool of 4, requests take pooled VMs.
void run_clients(const std::filesystem::path& socket, int clients, int rounds, std::atomic<int>& pooled,
                 std::vector<std::string>& failures, std::mutex& failures_mutex) {
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      ServiceClient client = ServiceClient::over_unix_socket(socket);
      for (int round = 0; round < rounds; ++round) {
        auto fail = [&](const std::string& what) {
          std::lock_guard lock(failures_mutex);
          failures.push_back(fmt::format("client {} round {}: {}", c, round, what));
        };
        Result<json> vm = client.call("POST", "/v1/vms", {{"template", "base"}});
        if (!vm) {
          fail("create: " + vm.error().message);
          continue;
        }
        std::string id = (*vm)["id"];
        if ((*vm)["pooled"] == true) ++pooled;
        std::string marker = fmt::format("client-{}-round-{}", c, round);
        Result<json> result = client.call("POST", "/v1/vms/" + id + "/exec",
                                          {{"command", {"sh", "-c", "echo " + marker + " > /tmp/m; cat /tmp/m"}}});
        if (!result) {
          fail("exec: " + result.error().message);
        } else if ((*result)["stdout"] != marker + "\n") {
          fail("exec answered " + result->dump());
        }
        if (Result<json> deleted = client.call("DELETE", "/v1/vms/" + id); !deleted) {
          fail("delete: " + deleted.error().message);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
}

TEST_F(Service, EightConcurrentClientsWithoutAPoolAllSucceed) {
  serve();
  std::atomic<int> pooled = 0;
  std::vector<std::string> failures;
  std::mutex failures_mutex;
  run_clients(socket_, 8, 2, pooled, failures, failures_mutex);
  EXPECT_TRUE(failures.empty()) << fmt::format("{}", fmt::join(failures, "\n"));
  EXPECT_EQ(pooled, 0);
  ServiceClient c = client();
  EXPECT_EQ(call(c, "GET", "/v1/vms")["vms"].size(), 0u);
  EXPECT_TRUE(vm_processes().empty()) << leftovers();
}

TEST_F(Service, EightConcurrentClientsTakePooledVmsAndThePoolRefills) {
  serve({{"pools", {{"base", 4}}}});
  ServiceClient c = client();
  wait_for_pool(c, "base", 4);
  std::atomic<int> pooled = 0;
  std::vector<std::string> failures;
  std::mutex failures_mutex;
  run_clients(socket_, 8, 2, pooled, failures, failures_mutex);
  EXPECT_TRUE(failures.empty()) << fmt::format("{}", fmt::join(failures, "\n"));
  EXPECT_GE(pooled, 4);  // At least the four loaded before the first request.
  wait_for_pool(c, "base", 4);
  EXPECT_EQ(call(c, "GET", "/v1/vms")["vms"].size(), 0u);
  EXPECT_EQ(vm_processes().size(), 4u) << leftovers();  // The pool alone.
  std::string metrics = c.request("GET", "/metrics")->body;
  EXPECT_NE(metrics.find("deltavm_load_seconds_bucket{pooled=\"true\""), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("deltavm_pool_vms{template=\"base\",state=\"ready\"} 4"), std::string::npos) << metrics;
}

// A pool VM waits at the refill priority; the one handed out runs at the others' priority. In a
// cgroup of its own (a jailed VM) that priority is the cgroup's CPU weight.
TEST_F(Service, PoolVmsWaitAtALowCpuWeightAndAHandedOutOneRunsAtTheNormalOne) {
  auto weight_file = [](const std::string& name) {
    for (const char* path : {"/sys/fs/cgroup/cpu/deltavm/{}/cpu.shares", "/sys/fs/cgroup/deltavm/{}/cpu.weight"}) {
      std::filesystem::path file = fmt::format(fmt::runtime(path), name);
      if (std::filesystem::exists(file)) return file;
    }
    return std::filesystem::path();
  };
  auto weight = [](const std::filesystem::path& file) {
    std::ifstream in(file);
    int value = 0;
    in >> value;
    return value;
  };
  serve({{"pools", {{"base", 1}}}});
  ServiceClient c = client();
  wait_for_pool(c, "base", 1);
  std::string pool_id;
  for (const auto& entry : std::filesystem::directory_iterator(runtime_ / "vms")) pool_id = entry.path().filename();
  std::filesystem::path file = weight_file(vm_cgroup_name(runtime_, pool_id));
  if (file.empty()) GTEST_SKIP() << "VMs have no cgroup CPU weight here (not root, or no cpu controller)";
  bool v1 = file.filename() == "cpu.shares";
  EXPECT_EQ(weight(file), v1 ? 110 : 10) << file;  // nice 10.
  json created = call(c, "POST", "/v1/vms", {{"template", "base"}});
  ASSERT_EQ(created["id"], pool_id) << created.dump();
  EXPECT_EQ(created["pooled"], true);
  EXPECT_EQ(weight(file), v1 ? 1024 : 100) << file;  // nice 0.
}

TEST_F(Service, VmPastItsTtlIsStoppedAndReaped) {
  serve();
  ServiceClient c = client();
  json vm = call(c, "POST", "/v1/vms", {{"template", "base"}, {"ttl_seconds", 2}});
  json kept = call(c, "POST", "/v1/vms", {{"template", "base"}});
  std::string id = vm["id"];
  EXPECT_GT(vm["expires_at_unix"].get<int64_t>(), 0);
  EXPECT_EQ(kept["expires_at_unix"], 0);
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (c.request("GET", "/v1/vms/" + id)->status != 404 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_EQ(c.request("GET", "/v1/vms/" + id)->status, 404);
  // The VM leaves the list when its stop begins; its process, directory and the count follow.
  std::string metrics;
  auto stopped = [&] {
    metrics = c.request("GET", "/metrics")->body;
    return !std::filesystem::exists(runtime_ / "vms" / id) && vm_processes().size() == 1 &&
           metrics.find("deltavm_vm_ends_total{reason=\"expired\"} 1") != std::string::npos;
  };
  while (!stopped() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(std::filesystem::exists(runtime_ / "vms" / id));
  EXPECT_EQ(vm_processes().size(), 1u);
  EXPECT_NE(metrics.find("deltavm_vm_ends_total{reason=\"expired\"} 1"), std::string::npos) << metrics;
}

// auto_pause: a VM past its ttl is paused into the store instead of stopped, listed as paused
// with no process, and resumed under its id with what it held; deleting it then discards its
// image.
TEST_F(Service, WithAutoPauseAVmPastItsTtlIsPausedAndResumesWithItsState) {
  serve({{"auto_pause", true}});
  ServiceClient c = client();
  json vm = call(c, "POST", "/v1/vms", {{"template", "base"}, {"ttl_seconds", 2}});
  std::string id = vm["id"];
  call(c, "POST", "/v1/vms/" + id + "/exec", {{"command", {"sh", "-c", "echo kept > /tmp/kept"}}});
  json state;
  for (auto deadline = std::chrono::steady_clock::now() + 60s; std::chrono::steady_clock::now() < deadline;) {
    state = call(c, "GET", "/v1/vms/" + id);
    if (state["state"] == "paused") break;
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_EQ(state["state"], "paused") << state.dump() << leftovers();
  EXPECT_EQ(state["pid"], 0);
  EXPECT_FALSE(std::filesystem::exists(runtime_ / "vms" / id));
  EXPECT_TRUE(vm_processes().empty()) << leftovers();
  json resumed = call(c, "POST", "/v1/vms/" + id + "/resume");
  EXPECT_EQ(resumed["id"], id);
  EXPECT_EQ(resumed["expires_at_unix"], 0) << "a resumed VM takes the default ttl (none here)";
  json answer = call(c, "POST", "/v1/vms/" + id + "/exec", {{"command", {"cat", "/tmp/kept"}}});
  EXPECT_EQ(answer["stdout"], "kept\n");
  std::string image = resumed["template"];
  EXPECT_EQ(c.request("DELETE", "/v1/vms/" + id)->status, 204);
  EXPECT_EQ(c.request("GET", "/v1/templates/" + image)->status, 404) << "the paused image outlived its VM";
  std::string metrics = c.request("GET", "/metrics")->body;
  EXPECT_NE(metrics.find("deltavm_vm_ends_total{reason=\"paused\"} 1"), std::string::npos) << metrics;
}

// kill -9 while clients are loading VMs: the next service adopts every VM that still runs
// (listed, exec works, its ttl still holds), ends what the dead one was loading or held in its
// pool, and no QEMU is left without a VM the service knows.
TEST_F(Service, KilledServiceIsReplacedAndTheNextAdoptsWhatRuns) {
  serve({{"pools", {{"counter", 1}}}});
  ServiceClient c = client();
  wait_for_pool(c, "counter", 1);
  json lasting = call(c, "POST", "/v1/vms", {{"template", "base"}});
  json expiring = call(c, "POST", "/v1/vms", {{"template", "base"}, {"ttl_seconds", 20}});
  ASSERT_TRUE(lasting.contains("id") && expiring.contains("id"));
  std::atomic<int> created = 0;
  std::vector<std::thread> loaders;
  for (int i = 0; i < 4; ++i) {
    loaders.emplace_back([&, i] {
      ServiceClient own = client();
      if (own.call("POST", "/v1/vms", {{"template", i % 2 ? "base" : "counter"}})) ++created;
    });
  }
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(service_->kill());
  for (std::thread& thread : loaders) thread.join();

  serve({{"pools", {{"counter", 1}}}});
  c = client();
  json vms = call(c, "GET", "/v1/vms")["vms"];
  std::set<std::string> listed;
  for (const json& vm : vms) listed.insert(vm["id"].get<std::string>());
  EXPECT_TRUE(listed.count(lasting["id"])) << vms.dump();
  EXPECT_TRUE(listed.count(expiring["id"])) << vms.dump();
  // Answered creates are adopted too; loads cut off by the kill were ended.
  EXPECT_GE(listed.size(), 2u + created);
  for (const std::string& id : listed) {
    Result<json> result = c.call("POST", "/v1/vms/" + id + "/exec", {{"command", {"echo", "adopted"}}});
    ASSERT_TRUE(result) << id << ": " << result.error().message;
    EXPECT_EQ((*result)["stdout"], "adopted\n");
  }
  wait_for_pool(c, "counter", 1);
  // Every QEMU of this runtime is a listed VM or the new pool's: none is left unowned.
  std::set<pid_t> known;
  json listed_now = call(c, "GET", "/v1/vms");
  for (const json& vm : listed_now["vms"]) known.insert(vm["pid"].get<pid_t>());
  std::set<pid_t> running = vm_processes();
  EXPECT_EQ(running.size(), known.size() + 1)
      << "VM processes running: " << running.size() << ", listed " << known.size() << "\n"
      << leftovers();
  for (pid_t pid : known) EXPECT_TRUE(running.count(pid)) << pid;
  // The adopted ttl still holds.
  std::string expiring_id = expiring["id"];
  auto deadline = std::chrono::steady_clock::now() + 60s;
  while (c.request("GET", "/v1/vms/" + expiring_id)->status != 404 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(250ms);
  }
  EXPECT_EQ(c.request("GET", "/v1/vms/" + expiring_id)->status, 404);
}

// run, exec, ps and stop go through a serving service (so pools are used), with the output
// they have without one.
TEST_F(Service, CommandLineGoesThroughTheService) {
  serve({{"pools", {{"base", 1}}}});
  ServiceClient c = client();
  wait_for_pool(c, "base", 1);
  std::vector<std::string> global = {"--store", store_.string(), "--runtime", runtime_.string()};
  auto deltavm = [&](std::vector<std::string> arguments) {
    arguments.insert(arguments.begin(), global.begin(), global.end());
    return testing::run_deltavm(arguments);
  };
  testing::CommandResult run = deltavm({"--json", "run", "base"});
  ASSERT_EQ(run.status, 0) << run.err;
  json started = json::parse(run.out);
  EXPECT_EQ(started["pooled"], true) << run.out;
  std::string id = started["id"];
  testing::CommandResult exec = deltavm({"exec", id, "--", "sh", "-c", "echo out; echo err >&2; exit 7"});
  EXPECT_EQ(exec.status, 7);
  EXPECT_EQ(exec.out, "out\n");
  EXPECT_EQ(exec.err, "err\n");
  testing::CommandResult ps = deltavm({"ps"});
  EXPECT_EQ(ps.status, 0) << ps.err;
  EXPECT_NE(ps.out.find(id), std::string::npos) << ps.out;
  testing::CommandResult stop = deltavm({"stop", id});
  EXPECT_EQ(stop.status, 0) << stop.err;
  EXPECT_EQ(c.request("GET", "/v1/vms/" + id)->status, 404);
  // A service of another store is named, not used.
  testing::CommandResult other =
      testing::run_deltavm({"--store", (root_ / "other").string(), "--runtime", runtime_.string(), "ps"});
  EXPECT_EQ(other.status, 1);
  EXPECT_NE(other.err.find("serves runtime"), std::string::npos) << other.err;
}

}  // namespace
}  // namespace deltavm
