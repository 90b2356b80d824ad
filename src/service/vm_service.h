// The service's core: one owner of the VM table of a store and a runtime. It answers typed
// actions (create, list, exec, delete, build, pool sizes) and knows no HTTP (http_api.h turns
// requests into these calls). Around the actions it keeps:
//
//  - warm pools: per template, VMs loaded in full (RAM from base and chain, machine state) and
//    left paused, so that a request only resumes one; a thread refills them;
//  - lifetimes: a VM's ttl, after which it is stopped and reaped; VMs whose process died are
//    reaped too;
//  - limits: how many VMs and how much guest RAM, pools and builds included. A request over a
//    limit first takes room from the pools; if there is none it is refused (kLimit) with
//    nothing started;
//  - restart safety: every VM it starts is recorded in its directory (vm_directory.h); a new
//    service adopts the running VMs it finds, with their ttl, and ends the pool VMs and
//    half-started VMs of a service that died (they name it as their owner);
//  - metrics.
//
// Every action may be called from any thread.
#pragma once

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "backends/agent_client.h"
#include "backends/backend.h"
#include "service/config.h"
#include "service/metrics.h"
#include "store/store.h"
#include "templates/snapshot.h"
#include "templates/spec.h"

namespace deltavm {

struct CreateVmRequest {
  std::string template_name;
  std::optional<uint64_t> ttl_seconds;  // Else the configured default.
  std::string backend;                  // Empty: the backend that captured the template.
  std::string memory;                   // kvm backend: eager, private or userfault; empty: its default.
  std::string ram;                      // "base+deltas" (default) or "flat".
};

struct VmTimings {
  double total_ms = 0;  // Request to running VM.
  // How the VM was loaded. For a pooled VM this happened before the request, when the pool
  // loaded it; the request paid only resume_ms.
  double prepare_ms = 0;
  double launch_ms = 0;
  double fill_ms = 0;
  double state_ms = 0;
  double resume_ms = 0;    // Pooled VMs: starting the paused vCPUs.
  double identity_ms = 0;  // Giving the guest the host's clock and fresh entropy (templates/templates.h).
};

struct VmView {
  std::string id;
  std::string state = "running";  // Or "paused": stored, with no process (deltavm resume).
  std::string template_name;
  std::string backend;
  bool pooled = false;  // Taken from a warm pool.
  int pid = 0;
  uint64_t memory_bytes = 0;
  int64_t created_at_unix = 0;
  int64_t expires_at_unix = 0;  // 0: no ttl.
  VmTimings timings;
};

struct PoolView {
  uint64_t size = 0;   // Wanted.
  uint64_t ready = 0;  // Loaded and paused.
  uint64_t loading = 0;
  std::string last_error;  // Why the last refill failed, if it did.
};

struct TemplateView {
  std::string name;
  std::optional<std::string> parent;
  std::vector<std::string> chain;  // Base first.
  uint64_t chain_depth = 0;
  uint64_t image_size_bytes = 0;
  uint64_t stored_size_bytes = 0;
  uint64_t chain_stored_bytes = 0;
  std::string backend;
  uint64_t memory_bytes = 0;
  uint32_t vcpus = 1;
  PoolView pool;
};

struct BuildView {
  std::string id;
  std::string template_name;
  std::string state;  // "building", "succeeded" or "failed".
  std::vector<std::string> log;
  std::string error;
  int64_t started_at_unix = 0;
  double duration_ms = 0;
};

struct ConsoleOutput {
  std::string bytes;
  uint64_t dropped_bytes = 0;  // Output older than the bytes kept (kMaxConsoleBytes).
};

// The most VMs one fork loads.
inline constexpr uint64_t kMaxForks = 64;

// The console output kept per VM; beyond it the oldest output is dropped.
inline constexpr uint64_t kMaxConsoleBytes = 1 << 20;

// A bounded number of turns, given in the order they were asked for: no one waits forever
// while later arrivals go first (as they may with std::counting_semaphore).
class FifoTurns {
 public:
  explicit FifoTurns(uint64_t count) : count_(count) {}
  void acquire();
  void release();

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const uint64_t count_;
  uint64_t next_ticket_ = 0;
  uint64_t releases_ = 0;
};

// The service's priority (nice of its session's scheduling group, where it leads a session):
// above the guests it runs, so that requests are answered while guests keep the CPUs busy.
inline constexpr int kServiceNice = -10;

class VmService {
 public:
  // Adopts what the runtime holds (ending what a dead owner left), then starts the pool and
  // lifetime threads.
  static Result<std::unique_ptr<VmService>> start(Store& store, std::filesystem::path runtime, ServiceConfig config);
  // Stops the threads. VMs keep running (a later service adopts them) except those in pools,
  // which drain() has ended.
  ~VmService();
  VmService(const VmService&) = delete;
  VmService& operator=(const VmService&) = delete;

  Result<VmView> create_vm(const CreateVmRequest& request);
  std::vector<VmView> list_vms();
  Result<VmView> get_vm(const std::string& id);
  Status delete_vm(const std::string& id);
  Result<ExecResult> exec(const std::string& id, const ExecRequest& request);
  Result<ConsoleOutput> console(const std::string& id);
  // Stores what VM `id` changed since its load as template `name` (templates/snapshot.h); the
  // VM runs on, or with `stop` is stopped once the snapshot is stored.
  Result<Snapshot> snapshot(const std::string& id, const std::string& name, bool stop);
  // Pauses running VM `id` into the store and stops it; resume() loads it back under its id.
  Result<Snapshot> pause(const std::string& id);
  Result<VmView> resume(const std::string& id);
  // A snapshot of VM `id`, then `count` VMs loaded from it (all or none).
  struct Forked {
    Snapshot snapshot;
    std::vector<VmView> vms;
  };
  Result<Forked> fork(const std::string& id, uint64_t count);
  // A running or paused VM.
  Result<VmView> describe_vm(const std::string& id);

  Result<std::vector<TemplateView>> list_templates();
  Result<TemplateView> get_template(const std::string& name);
  // Refused (kConflict) while a VM, a pool or a child template depends on it; with `cascade`
  // the templates stored against it go too (each refused while a VM or a pool uses it).
  // Returns the names removed.
  Result<std::vector<std::string>> delete_template(const std::string& name, bool cascade);
  Status set_pool_size(const std::string& name, uint64_t size);
  // Starts building `spec` in the background; returns the build's id.
  Result<std::string> start_build(const TemplateSpec& spec, const std::string& backend);
  Result<BuildView> get_build(const std::string& id);

  // The metrics in the Prometheus text format, gauges brought up to date.
  std::string metrics_text();
  // For the HTTP layer's own counters.
  Metrics& metrics();

  // Takes no new work from now on: creates, builds and pool changes fail with kUnavailable.
  void stop_taking_work();
  // stop_taking_work, then waits for builds, stops refilling and ends the pool VMs. Running
  // VMs are left running for the next service to adopt.
  void drain();
  bool draining() const;

 private:
  enum class VmState { kStarting, kPooled, kRunning, kStopping };
  struct Vm {
    std::string id;
    std::string template_name;
    std::string backend_key;  // Which of backends_ started it.
    std::string backend;
    VmState state = VmState::kStarting;
    bool pooled = false;
    int pid = 0;
    uint64_t memory_bytes = 0;
    int64_t created_at_unix = 0;
    int64_t expires_at_unix = 0;
    VmTimings timings;
    uint64_t console_dropped_bytes = 0;
    bool snapshotting = false;  // A snapshot is being taken: it is not stopped meanwhile.
    // A pool VM: its template's agent takes a new identity when the VM is handed out.
    bool refresh_identity = false;
    // A pool VM's control connection, held so that handing it out is one exchange.
    std::unique_ptr<HeldControl> control;
  };
  struct Pool {
    uint64_t size = 0;
    std::deque<std::string> ready;  // Ids, oldest first.
    uint64_t loading = 0;
    std::string last_error;
    std::chrono::steady_clock::time_point retry_after{};
  };
  struct Build;
  // Room for one VM of `memory_bytes` (counted until released or handed to a VM).
  struct Reservation {
    uint64_t memory_bytes = 0;
  };

  VmService(Store& store, std::filesystem::path runtime, ServiceConfig config);

  Result<Backend*> backend(const std::string& key);
  // Reserves room, taking it from pools if `may_evict`; kLimit if there is none.
  Result<Reservation> reserve(uint64_t memory_bytes, bool may_evict);
  void release(const Reservation& reservation);
  // A pooled VM of `name`, resumed and now the caller's, or nullopt if the pool has none.
  std::optional<VmView> take_from_pool(const CreateVmRequest& request, int64_t expires_at_unix,
                                       std::chrono::steady_clock::time_point start);
  // `id`: the id of a paused VM being resumed; empty: a fresh one.
  Result<VmView> start_cold(const CreateVmRequest& request, int64_t expires_at_unix,
                            std::chrono::steady_clock::time_point start, const std::string& id = "");
  // Refused (kConflict) while a VM, a pool or a build uses template `name`. REQUIRES: mutex_.
  Status check_template_unused(const std::string& name) const;
  // Marks running VM `id` as being snapshotted (kConflict if it already is).
  Result<std::shared_ptr<Vm>> begin_snapshot(const std::string& id);
  // Stops a VM the caller has marked kStopping (or never listed) and forgets it.
  void stop_and_forget(const std::shared_ptr<Vm>& vm, const std::string& reason);
  VmView view_of(const Vm& vm) const;

  void refill_pools();
  void watch_vms();
  // Finds VMs in the runtime this service does not know: adopts the running ones that belong
  // to the runtime and ends the abandoned ones.
  void adopt_unknown_vms();
  void update_gauges();

  Store& store_;
  const std::filesystem::path runtime_;
  const ServiceConfig config_;
  Metrics metrics_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;  // VMs, pools or draining_ changed.
  bool draining_ = false;
  bool stopping_threads_ = false;
  std::map<std::string, std::unique_ptr<Backend>> backends_;
  std::map<std::string, std::shared_ptr<Vm>> vms_;
  std::map<std::string, Pool> pools_;
  uint64_t reserved_vms_ = 0;
  uint64_t reserved_bytes_ = 0;
  // Turns to load a VM (config_.max_concurrent_loads).
  FifoTurns load_turns_;
  std::map<std::string, std::unique_ptr<Build>> builds_;
  uint64_t next_build_ = 1;

  std::thread refill_thread_;
  std::thread watch_thread_;
};

}  // namespace deltavm
