#include "service/vm_service.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include "backends/cgroups.h"
#include "backends/kvm/kvm_backend.h"
#include "base/file.h"
#include "store/remote.h"
#include "templates/templates.h"

namespace deltavm {
namespace {

// How long a request that may evict pool VMs waits for one still loading to be ready.
constexpr std::chrono::seconds kPoolLoadWait{30};

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

int64_t now_unix() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// How often the watch thread looks at every VM (exits, ttl, console size), and how often it
// looks for VMs in the runtime it does not know.
constexpr auto kWatchInterval = std::chrono::milliseconds(500);
constexpr int kAdoptEveryTicks = 4;
// A pool whose refill failed waits this long before trying again.
constexpr auto kRefillRetry = std::chrono::seconds(2);
// Pool refills are background work: the refill thread, and the VM processes it starts (a
// child, the scheduling group of its session, and a jailed VM's cgroup CPU weight take the
// nice value of the thread that forked it), run at this nice value and yield the CPU to
// requests. A pool VM handed out is set back to 0.
constexpr int kRefillNice = 10;
// A pool VM's first answer (its check before it waits in the pool).
constexpr auto kPoolCheckTimeout = std::chrono::seconds(60);
// Finished builds kept for GET /v1/builds/{id}.
constexpr size_t kKeptBuilds = 64;

const std::vector<double> kLoadSecondsBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                 0.25,  0.5,    1,     2.5,  5,     10,   30};

std::string mib(uint64_t bytes) { return fmt::format("{} MiB", bytes >> 20); }

// The service logs one line per event that changes what runs, on stderr.
template <typename... Args>
void log_event(fmt::format_string<Args...> format, Args&&... args) {
  fmt::print(stderr, "deltavm serve: {}\n", fmt::format(format, std::forward<Args>(args)...));
}

uint64_t resident_bytes() {
  FILE* statm = std::fopen("/proc/self/statm", "r");
  if (statm == nullptr) return 0;
  unsigned long size = 0, resident = 0;
  int fields = std::fscanf(statm, "%lu %lu", &size, &resident);
  std::fclose(statm);
  return fields == 2 ? static_cast<uint64_t>(resident) * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)) : 0;
}

bool is_template(const ImageRecord& record) {
  nlohmann::json metadata = nlohmann::json::parse(record.metadata, nullptr, false);
  return metadata.is_object() && metadata.contains("machine");
}

}  // namespace

struct VmService::Build {
  BuildView view;
  Reservation reservation;
  bool finished = false;
  std::thread thread;
};

void FifoTurns::acquire() {
  std::unique_lock lock(mutex_);
  uint64_t ticket = next_ticket_++;
  released_.wait(lock, [&] { return ticket < releases_ + count_; });
}

void FifoTurns::release() {
  {
    std::lock_guard lock(mutex_);
    ++releases_;
  }
  released_.notify_all();
}

VmService::VmService(Store& store, std::filesystem::path runtime, ServiceConfig config)
    : store_(store),
      runtime_(std::move(runtime)),
      config_(std::move(config)),
      load_turns_(config_.max_concurrent_loads) {
  metrics_.declare("deltavm_loads_total", "counter", "VMs handed to requesters, by template, backend and pooled");
  metrics_.declare_histogram("deltavm_load_seconds", "Request to running VM, by pooled", kLoadSecondsBuckets);
  metrics_.declare("deltavm_errors_total", "counter", "Failed actions and refills, by error code");
  metrics_.declare("deltavm_vm_ends_total", "counter", "VMs stopped or reaped, by reason");
  metrics_.declare("deltavm_vms_adopted_total", "counter", "Running VMs found in the runtime and adopted");
  metrics_.declare("deltavm_builds_total", "counter", "Template builds finished, by result");
  metrics_.declare("deltavm_snapshots_total", "counter", "Snapshots of running VMs, by result");
  metrics_.declare_histogram("deltavm_snapshot_pause_seconds", "How long a snapshot kept its VM paused",
                             kLoadSecondsBuckets);
  metrics_.declare("deltavm_vms", "gauge", "VMs by state (running, pooled, starting)");
  metrics_.declare("deltavm_pool_size", "gauge", "Warm pool size wanted, by template");
  metrics_.declare("deltavm_pool_vms", "gauge", "Warm pool VMs by template and state (ready, loading)");
  metrics_.declare("deltavm_guest_memory_bytes", "gauge", "Guest RAM of all VMs, pools and builds included");
  metrics_.declare("deltavm_guest_memory_limit_bytes", "gauge", "The configured maximum of deltavm_guest_memory_bytes");
  metrics_.declare("deltavm_vms_limit", "gauge", "The configured maximum number of VMs");
  metrics_.declare("deltavm_store_bytes", "gauge", "Bytes the store's images take (stored, compressed)");
  metrics_.declare("process_resident_memory_bytes", "gauge", "The service process's resident memory, VMs excluded");
}

Result<std::unique_ptr<VmService>> VmService::start(Store& store, std::filesystem::path runtime, ServiceConfig config) {
  DELTAVM_TRY(prepare_runtime_directory(runtime));
  std::unique_ptr<VmService> service(new VmService(store, std::move(runtime), std::move(config)));
  for (const auto& [name, size] : service->config_.pools) service->pools_[name].size = size;
  service->adopt_unknown_vms();
  service->refill_thread_ = std::thread([raw = service.get()] { raw->refill_pools(); });
  service->watch_thread_ = std::thread([raw = service.get()] { raw->watch_vms(); });
  return service;
}

VmService::~VmService() {
  {
    std::lock_guard lock(mutex_);
    stopping_threads_ = true;
    draining_ = true;
  }
  changed_.notify_all();
  if (refill_thread_.joinable()) refill_thread_.join();
  if (watch_thread_.joinable()) watch_thread_.join();
  for (auto& [id, build] : builds_) {
    if (build->thread.joinable()) build->thread.join();
  }
}

Result<Backend*> VmService::backend(const std::string& key) {
  std::lock_guard lock(mutex_);
  auto it = backends_.find(key);
  if (it != backends_.end()) return it->second.get();
  std::unique_ptr<Backend> made;
  if (size_t colon = key.find(':'); colon != std::string::npos) {
    DELTAVM_ASSIGN_OR_RETURN(vmm::MemoryStrategy strategy, vmm::parse_memory_strategy(key.substr(colon + 1)));
    made = make_kvm_backend(strategy);
  } else {
    DELTAVM_ASSIGN_OR_RETURN(made, make_backend(key));
  }
  Backend* raw = made.get();
  backends_.emplace(key, std::move(made));
  return raw;
}

Result<VmService::Reservation> VmService::reserve(uint64_t memory_bytes, bool may_evict) {
  // The room each eviction frees is this call's: it is held as a reservation from the moment
  // the victim is chosen, so a pool refill cannot take it before this call does.
  uint64_t credit_vms = 0;
  uint64_t credit_bytes = 0;
  // A pool VM still loading holds room it gives way with once it is ready: a request that may
  // evict waits for it that long, not for ever.
  const Clock::time_point wait_until = Clock::now() + kPoolLoadWait;
  for (;;) {
    std::shared_ptr<Vm> victim;
    bool wait_for_pool = false;
    {
      std::lock_guard lock(mutex_);
      uint64_t used_bytes = reserved_bytes_ - credit_bytes;
      for (const auto& [id, vm] : vms_) used_bytes += vm->memory_bytes;
      uint64_t used_vms = vms_.size() + reserved_vms_ - credit_vms;
      auto give_back = [&] {
        reserved_vms_ -= credit_vms;
        reserved_bytes_ -= credit_bytes;
      };
      if (draining_) {
        give_back();
        return make_error(ErrorCode::kUnavailable, "the service is shutting down");
      }
      if (used_vms + 1 <= config_.max_vms && used_bytes + memory_bytes <= config_.max_memory_bytes) {
        give_back();
        ++reserved_vms_;
        reserved_bytes_ += memory_bytes;
        return Reservation{memory_bytes};
      }
      // Room is taken from the fullest pool first.
      Pool* fullest = nullptr;
      for (auto& [name, pool] : pools_) {
        if (!pool.ready.empty() && (fullest == nullptr || pool.ready.size() > fullest->ready.size())) fullest = &pool;
      }
      bool pool_loading =
          std::any_of(pools_.begin(), pools_.end(), [](const auto& entry) { return entry.second.loading > 0; });
      if (may_evict && fullest == nullptr && pool_loading && Clock::now() < wait_until) {
        wait_for_pool = true;
      } else if (!may_evict || fullest == nullptr) {
        give_back();
        return make_error(ErrorCode::kLimit,
                          "the service's limits are reached: {} of at most {} VMs, {} of at most {} of guest RAM in "
                          "use, and {} more asked",
                          used_vms, config_.max_vms, mib(used_bytes), mib(config_.max_memory_bytes), mib(memory_bytes));
      } else {
        victim = vms_.at(fullest->ready.front());
        fullest->ready.pop_front();
        victim->state = VmState::kStopping;
        ++credit_vms;
        credit_bytes += victim->memory_bytes;
        ++reserved_vms_;
        reserved_bytes_ += victim->memory_bytes;
      }
    }
    if (wait_for_pool) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    stop_and_forget(victim, "evicted");
  }
}

void VmService::release(const Reservation& reservation) {
  {
    std::lock_guard lock(mutex_);
    --reserved_vms_;
    reserved_bytes_ -= reservation.memory_bytes;
  }
  changed_.notify_all();
}

VmView VmService::view_of(const Vm& vm) const {
  VmView view;
  view.id = vm.id;
  view.template_name = vm.template_name;
  view.backend = vm.backend;
  view.pooled = vm.pooled;
  view.pid = vm.pid;
  view.memory_bytes = vm.memory_bytes;
  view.created_at_unix = vm.created_at_unix;
  view.expires_at_unix = vm.expires_at_unix;
  view.timings = vm.timings;
  return view;
}

void VmService::stop_and_forget(const std::shared_ptr<Vm>& vm, const std::string& reason) {
  std::unique_ptr<HeldControl> control;
  {
    std::lock_guard lock(mutex_);
    control = std::move(vm->control);
  }
  control.reset();  // Its process's control socket is free for the stop.
  Result<Backend*> runner = backend(vm->backend_key.empty() ? "qemu" : vm->backend_key);
  if (runner) {
    Status stopped = stop_vm(vm->id, **runner, runtime_);
    // A VM that could not be stopped is forgotten all the same: it has no owner now, so the
    // next look at the runtime adopts it again (and its ttl still holds).
    if (!stopped && stopped.error().code != ErrorCode::kNotFound) {
      log_event("VM {}: could not stop it ({}): {}", vm->id, reason, stopped.error().message);
      metrics_.add("deltavm_errors_total", {{"code", error_code_id(stopped.error().code)}});
    }
  }
  metrics_.add("deltavm_vm_ends_total", {{"reason", reason}});
  {
    std::lock_guard lock(mutex_);
    auto it = vms_.find(vm->id);
    if (it != vms_.end() && it->second == vm) vms_.erase(it);
  }
  // The image of a fork or of a resumed VM goes with the last VM loaded from it.
  if (Status released = release_transient_template(store_, runtime_, vm->template_name, vm->id); !released) {
    log_event("VM {}: its template {} stays: {}", vm->id, vm->template_name, released.error().message);
  }
  changed_.notify_all();
}

Result<VmView> VmService::create_vm(const CreateVmRequest& request) {
  Clock::time_point start = Clock::now();
  if (draining()) return make_error(ErrorCode::kUnavailable, "the service is shutting down");
  uint64_t ttl = request.ttl_seconds.value_or(config_.default_ttl_seconds);
  if (ttl > config_.max_ttl_seconds) {
    return make_error(ErrorCode::kInvalidArgument,
                      "field ttl_seconds must be at most {} (the service's maximum), found {}", config_.max_ttl_seconds,
                      ttl);
  }
  int64_t expires_at_unix = ttl > 0 ? now_unix() + static_cast<int64_t>(ttl) : 0;
  Result<VmView> created = [&]() -> Result<VmView> {
    bool poolable = request.memory.empty() && (request.ram.empty() || request.ram == "base+deltas");
    if (poolable) {
      std::optional<VmView> pooled = take_from_pool(request, expires_at_unix, start);
      if (pooled) return *pooled;
    }
    return start_cold(request, expires_at_unix, start);
  }();
  if (!created) return created;  // Counted with the reply (http_api.cc).
  metrics_.add("deltavm_loads_total", {{"template", created->template_name},
                                       {"backend", created->backend},
                                       {"pooled", created->pooled ? "true" : "false"}});
  metrics_.observe("deltavm_load_seconds", {{"pooled", created->pooled ? "true" : "false"}},
                   created->timings.total_ms / 1000);
  return created;
}

std::optional<VmView> VmService::take_from_pool(const CreateVmRequest& request, int64_t expires_at_unix,
                                                Clock::time_point start) {
  std::shared_ptr<Vm> vm;
  std::unique_ptr<HeldControl> control;
  {
    std::lock_guard lock(mutex_);
    auto pool = pools_.find(request.template_name);
    if (pool == pools_.end() || pool->second.ready.empty()) return std::nullopt;
    std::shared_ptr<Vm> candidate = vms_.at(pool->second.ready.front());
    if (!request.backend.empty() && candidate->backend != request.backend) return std::nullopt;
    pool->second.ready.pop_front();
    vm = candidate;
    vm->state = VmState::kStarting;
    control = std::move(vm->control);
  }
  changed_.notify_all();  // The pool refills.
  Result<VmView> view = [&]() -> Result<VmView> {
    DELTAVM_ASSIGN_OR_RETURN(Backend * runner, backend(vm->backend_key));
    DELTAVM_ASSIGN_OR_RETURN(VmDirectory directory, VmDirectory::open(runtime_, vm->id));
    Clock::time_point resume_start = Clock::now();
    // Handing a VM out is the service's work: its process answers the resume at the service's
    // priority, not behind the guests that run, then runs as they do (pool VMs wait below them).
    // A jailed VM's priority against the others is its cgroup's CPU weight.
    if (!set_process_nice(vm->pid, kServiceNice)) (void)set_process_nice(vm->pid, 0);
    (void)set_vm_cpu_priority(vm_cgroup_name(runtime_, vm->id), kServiceNice);
    Status resumed = control ? control->resume() : runner->resume(directory);
    control.reset();
    Status normal = set_process_nice(vm->pid, 0);
    if (normal) normal = set_vm_cpu_priority(vm_cgroup_name(runtime_, vm->id), 0);
    if (!normal) log_event("VM {} keeps its pool priority: {}", vm->id, normal.error().message);
    DELTAVM_TRY(resumed);
    double resume_ms = elapsed_ms(resume_start);
    Clock::time_point identity_start = Clock::now();
    if (vm->refresh_identity) {
      DELTAVM_TRY(agent_refresh_identity(directory.agent_socket(), std::chrono::seconds(30)));
    }
    double identity_ms = vm->refresh_identity ? elapsed_ms(identity_start) : 0.0;
    // Only now is the VM the requester's: until the record says so, a service that dies
    // leaves it abandoned (owned, purpose "pool") and the next one ends it.
    DELTAVM_TRY(directory.update_record([&](VmRecord& record) {
      record.owner.reset();
      record.purpose.clear();
      record.expires_at_unix = expires_at_unix;
    }));
    std::lock_guard lock(mutex_);
    vm->state = VmState::kRunning;
    vm->pooled = true;
    vm->created_at_unix = now_unix();
    vm->expires_at_unix = expires_at_unix;
    vm->timings.resume_ms = resume_ms;
    vm->timings.identity_ms = identity_ms;
    vm->timings.total_ms = elapsed_ms(start);
    return view_of(*vm);
  }();
  if (!view) {
    // A pool VM that will not resume is ended; the request is served cold instead.
    log_event("pool VM {} of {} failed to resume: {}", vm->id, vm->template_name, view.error().message);
    metrics_.add("deltavm_errors_total", {{"code", error_code_id(view.error().code)}});
    stop_and_forget(vm, "failed");
    return std::nullopt;
  }
  return *view;
}

Result<VmView> VmService::start_cold(const CreateVmRequest& request, int64_t expires_at_unix, Clock::time_point start,
                                     const std::string& id) {
  // A template known only on one of the store's remotes is fetched (verified) first.
  DELTAVM_ASSIGN_OR_RETURN(std::optional<PullReport> pulled, pull_if_missing(store_, request.template_name));
  if (pulled) {
    // Within the cache's bound: pools' templates, every VM's and this one are pinned.
    std::set<std::string> pinned = {request.template_name};
    {
      std::lock_guard lock(mutex_);
      for (const auto& [name, pool] : pools_) pinned.insert(name);
    }
    Result<EvictReport> evicted = evict_unused_cache(store_, runtime_, pinned);
    if (!evicted) {
      log_event("cache eviction after pulling {}: {}", request.template_name, evicted.error().message);
    } else if (!evicted->evicted.empty()) {
      log_event("cache: evicted {}", fmt::join(evicted->evicted, ", "));
    }
  }
  Result<Template> found = load_template(store_, request.template_name);
  if (!found) {
    if (found.error().code == ErrorCode::kNotFound) {
      return make_error(ErrorCode::kNotFound, "no template {} in the store", request.template_name);
    }
    return found.error();
  }
  const Template& loaded = *found;
  std::string backend_name = request.backend.empty() ? loaded.backend : request.backend;
  if (backend_name != "qemu" && backend_name != "kvm") {
    return make_error(ErrorCode::kInvalidArgument, "field backend must be qemu or kvm, found {:?}", backend_name);
  }
  if (backend_name != loaded.backend) {
    return make_error(ErrorCode::kInvalidArgument,
                      "field backend: template {} was captured by the {} backend, which alone can load it, not {}",
                      loaded.name(), loaded.backend, backend_name);
  }
  std::string key = backend_name;
  if (!request.memory.empty()) {
    if (backend_name != "kvm") {
      return make_error(ErrorCode::kInvalidArgument, "field memory applies to the kvm backend, not {}", backend_name);
    }
    Result<vmm::MemoryStrategy> memory = vmm::parse_memory_strategy(request.memory);
    if (!memory) return make_error(ErrorCode::kInvalidArgument, "field memory: {}", memory.error().message);
    key += ":" + request.memory;
  }
  Result<RamStrategy> strategy = parse_ram_strategy(request.ram.empty() ? "base+deltas" : request.ram);
  if (!strategy) return make_error(ErrorCode::kInvalidArgument, "field ram: {}", strategy.error().message);
  DELTAVM_ASSIGN_OR_RETURN(Backend * runner, backend(key));

  DELTAVM_ASSIGN_OR_RETURN(Reservation reservation, reserve(loaded.machine.memory_bytes, /*may_evict=*/true));
  load_turns_.acquire();
  Result<StartedVm> started =
      start_vm(loaded, store_, *runner, runtime_, {.strategy = *strategy, .stay_owner = true, .id = id});
  load_turns_.release();
  if (!started) {
    release(reservation);
    return started.error();
  }
  auto vm = std::make_shared<Vm>();
  vm->id = started->id;
  vm->template_name = loaded.name();
  vm->backend_key = key;
  vm->backend = backend_name;
  vm->memory_bytes = loaded.machine.memory_bytes;
  vm->created_at_unix = now_unix();
  vm->expires_at_unix = expires_at_unix;
  vm->timings.prepare_ms = started->prepare_ms;
  vm->timings.launch_ms = started->restore.launch_ms;
  vm->timings.fill_ms = started->restore.fill_ms;
  vm->timings.state_ms = started->restore.state_ms;
  vm->timings.identity_ms = started->identity_ms;
  Status recorded = [&]() -> Status {
    DELTAVM_ASSIGN_OR_RETURN(VmDirectory directory, VmDirectory::open(runtime_, vm->id));
    return directory.update_record([&](VmRecord& record) {
      record.owner.reset();
      record.expires_at_unix = expires_at_unix;
      if (record.process) vm->pid = record.process->pid;
    });
  }();
  {
    std::lock_guard lock(mutex_);
    --reserved_vms_;
    reserved_bytes_ -= reservation.memory_bytes;
    vm->state = recorded ? VmState::kRunning : VmState::kStopping;
    vm->timings.total_ms = elapsed_ms(start);
    vms_[vm->id] = vm;
  }
  if (!recorded) {
    stop_and_forget(vm, "failed");
    return recorded.error();
  }
  return view_of(*vm);
}

namespace {

VmView paused_view(Store& store, const PausedVm& paused) {
  VmView view;
  view.id = paused.id;
  view.state = "paused";
  view.template_name = paused.image.name;
  view.backend = "qemu";
  if (Result<Template> loaded = load_template(store, paused.image.name); loaded) {
    view.backend = loaded->backend;
    view.memory_bytes = loaded->machine.memory_bytes;
  }
  view.created_at_unix = paused.image.created_at_unix;
  return view;
}

}  // namespace

std::vector<VmView> VmService::list_vms() {
  std::vector<VmView> views;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [id, vm] : vms_) {
      if (vm->state == VmState::kRunning) views.push_back(view_of(*vm));
    }
  }
  if (Result<std::vector<PausedVm>> paused = paused_vms(store_, runtime_); paused) {
    for (const PausedVm& vm : *paused) views.push_back(paused_view(store_, vm));
  }
  return views;
}

Result<VmView> VmService::describe_vm(const std::string& id) {
  Result<VmView> running = get_vm(id);
  if (running) return running;
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> image, paused_image(store_, id));
  if (!image || VmDirectory::open(runtime_, id)) return running;
  return paused_view(store_, PausedVm{id, *image});
}

Result<VmView> VmService::get_vm(const std::string& id) {
  std::lock_guard lock(mutex_);
  auto it = vms_.find(id);
  if (it == vms_.end() || it->second->state != VmState::kRunning) {
    return make_error(ErrorCode::kNotFound, "no VM {}", id);
  }
  return view_of(*it->second);
}

Status VmService::delete_vm(const std::string& id) {
  std::shared_ptr<Vm> vm;
  bool known = false;
  {
    std::lock_guard lock(mutex_);
    auto it = vms_.find(id);
    known = it != vms_.end() && it->second->state == VmState::kRunning;
    if (known) vm = it->second;
  }
  if (!known) {
    // A paused VM: deleting it discards its image.
    Result<VmView> paused = describe_vm(id);
    if (paused && paused->state == "paused") {
      return release_transient_template(store_, runtime_, paused->template_name, id);
    }
    return make_error(ErrorCode::kNotFound, "no VM {}", id);
  }
  {
    std::lock_guard lock(mutex_);
    if (vm->state != VmState::kRunning) return make_error(ErrorCode::kNotFound, "no VM {}", id);
    if (vm->snapshotting) return make_error(ErrorCode::kConflict, "VM {} is being snapshotted", id);
    vm->state = VmState::kStopping;
  }
  stop_and_forget(vm, "deleted");
  return {};
}

Result<std::shared_ptr<VmService::Vm>> VmService::begin_snapshot(const std::string& id) {
  if (draining()) return make_error(ErrorCode::kUnavailable, "the service is shutting down");
  std::lock_guard lock(mutex_);
  auto it = vms_.find(id);
  if (it == vms_.end() || it->second->state != VmState::kRunning) {
    return make_error(ErrorCode::kNotFound, "no running VM {}", id);
  }
  std::shared_ptr<Vm> vm = it->second;
  if (vm->snapshotting) return make_error(ErrorCode::kConflict, "VM {} is being snapshotted", id);
  vm->snapshotting = true;
  return vm;
}

Result<Snapshot> VmService::snapshot(const std::string& id, const std::string& name, bool stop) {
  DELTAVM_ASSIGN_OR_RETURN(std::shared_ptr<Vm> vm, begin_snapshot(id));
  Result<Snapshot> taken = [&]() -> Result<Snapshot> {
    DELTAVM_ASSIGN_OR_RETURN(Backend * runner, backend(vm->backend_key.empty() ? "qemu" : vm->backend_key));
    return snapshot_vm(id, name, store_, *runner, runtime_, {.max_chain_depth = config_.max_chain_depth});
  }();
  {
    std::lock_guard lock(mutex_);
    vm->snapshotting = false;
    if (taken && stop) vm->state = VmState::kStopping;
  }
  metrics_.add("deltavm_snapshots_total", {{"result", taken ? "stored" : error_code_id(taken.error().code)}});
  if (!taken) return taken.error();
  metrics_.observe("deltavm_snapshot_pause_seconds", {}, taken->pause_ms / 1000);
  if (stop) stop_and_forget(vm, "snapshotted");
  return taken;
}

Result<Snapshot> VmService::pause(const std::string& id) {
  DELTAVM_ASSIGN_OR_RETURN(std::shared_ptr<Vm> vm, begin_snapshot(id));
  std::unique_ptr<HeldControl> control;
  Result<Snapshot> taken = [&]() -> Result<Snapshot> {
    DELTAVM_ASSIGN_OR_RETURN(Backend * runner, backend(vm->backend_key.empty() ? "qemu" : vm->backend_key));
    return pause_vm(id, store_, *runner, runtime_, config_.max_chain_depth);
  }();
  {
    std::lock_guard lock(mutex_);
    vm->snapshotting = false;
    // Paused, the VM has no process: it is forgotten here and listed from the store.
    if (taken) {
      vm->state = VmState::kStopping;
      vms_.erase(id);
    }
  }
  metrics_.add("deltavm_snapshots_total", {{"result", taken ? "stored" : error_code_id(taken.error().code)}});
  if (!taken) return taken.error();
  metrics_.observe("deltavm_snapshot_pause_seconds", {}, taken->pause_ms / 1000);
  metrics_.add("deltavm_vm_ends_total", {{"reason", "paused"}});
  changed_.notify_all();
  return taken;
}

Result<VmView> VmService::resume(const std::string& id) {
  Clock::time_point start = Clock::now();
  if (draining()) return make_error(ErrorCode::kUnavailable, "the service is shutting down");
  if (VmDirectory::open(runtime_, id)) return make_error(ErrorCode::kConflict, "VM {} is running, not paused", id);
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> image, paused_image(store_, id));
  if (!image) return make_error(ErrorCode::kNotFound, "no paused VM {}", id);
  CreateVmRequest request;
  request.template_name = image->name;
  uint64_t ttl = config_.default_ttl_seconds;
  int64_t expires_at_unix = ttl > 0 ? now_unix() + static_cast<int64_t>(ttl) : 0;
  DELTAVM_ASSIGN_OR_RETURN(VmView view, start_cold(request, expires_at_unix, start, id));
  metrics_.add("deltavm_loads_total",
               {{"template", view.template_name}, {"backend", view.backend}, {"pooled", "false"}});
  metrics_.observe("deltavm_load_seconds", {{"pooled", "false"}}, view.timings.total_ms / 1000);
  return view;
}

Result<VmService::Forked> VmService::fork(const std::string& id, uint64_t count) {
  if (count == 0 || count > kMaxForks) {
    return make_error(ErrorCode::kInvalidArgument, "field count must be an integer from 1 to {}, found {}", kMaxForks,
                      count);
  }
  DELTAVM_ASSIGN_OR_RETURN(std::shared_ptr<Vm> vm, begin_snapshot(id));
  Forked forked;
  Result<Snapshot> taken = [&]() -> Result<Snapshot> {
    DELTAVM_ASSIGN_OR_RETURN(Backend * runner, backend(vm->backend_key.empty() ? "qemu" : vm->backend_key));
    return snapshot_for_fork(id, store_, *runner, runtime_, config_.max_chain_depth);
  }();
  {
    std::lock_guard lock(mutex_);
    vm->snapshotting = false;
  }
  metrics_.add("deltavm_snapshots_total", {{"result", taken ? "stored" : error_code_id(taken.error().code)}});
  if (!taken) return taken.error();
  forked.snapshot = *taken;
  CreateVmRequest request;
  request.template_name = taken->record.name;
  uint64_t ttl = config_.default_ttl_seconds;
  int64_t expires_at_unix = ttl > 0 ? now_unix() + static_cast<int64_t>(ttl) : 0;
  for (uint64_t i = 0; i < count; ++i) {
    Result<VmView> started = start_cold(request, expires_at_unix, Clock::now());
    if (!started) {
      for (const VmView& view : forked.vms) (void)delete_vm(view.id);
      (void)release_transient_template(store_, runtime_, taken->record.name, "");
      return started.error().with_context(fmt::format("fork {} of {}", i + 1, count));
    }
    metrics_.add("deltavm_loads_total",
                 {{"template", started->template_name}, {"backend", started->backend}, {"pooled", "false"}});
    forked.vms.push_back(std::move(*started));
  }
  return forked;
}

Result<ExecResult> VmService::exec(const std::string& id, const ExecRequest& request) {
  DELTAVM_TRY(get_vm(id).status());
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory directory, VmDirectory::open(runtime_, id));
  return agent_exec(directory.agent_socket(), request);
}

Result<ConsoleOutput> VmService::console(const std::string& id) {
  uint64_t dropped = 0;
  {
    std::lock_guard lock(mutex_);
    auto it = vms_.find(id);
    if (it == vms_.end() || it->second->state != VmState::kRunning) {
      return make_error(ErrorCode::kNotFound, "no VM {}", id);
    }
    dropped = it->second->console_dropped_bytes;
  }
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory directory, VmDirectory::open(runtime_, id));
  ConsoleOutput output;
  Result<Fd> fd = open_file(directory.console_log(), O_RDONLY | O_NOFOLLOW);
  if (!fd) {
    if (fd.error().code == ErrorCode::kNotFound) return output;  // Nothing written yet.
    return fd.error();
  }
  struct stat st {};
  if (::fstat(fd->get(), &st) != 0) return errno_error(fmt::format("stat {}", directory.console_log().string()), errno);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  uint64_t offset = size > kMaxConsoleBytes ? size - kMaxConsoleBytes : 0;
  output.bytes.resize(size - offset);
  ssize_t n = ::pread(fd->get(), output.bytes.data(), output.bytes.size(), static_cast<off_t>(offset));
  if (n < 0) return errno_error(fmt::format("read {}", directory.console_log().string()), errno);
  output.bytes.resize(static_cast<size_t>(n));
  output.dropped_bytes = dropped + offset;
  return output;
}

Result<TemplateView> VmService::get_template(const std::string& name) {
  Result<Template> loaded = load_template(store_, name);
  if (!loaded) {
    if (loaded.error().code == ErrorCode::kNotFound) return make_error(ErrorCode::kNotFound, "no template {}", name);
    return loaded.error();
  }
  TemplateView view;
  view.name = name;
  view.parent = loaded->record().parent;
  view.chain_depth = loaded->record().chain_depth;
  view.image_size_bytes = loaded->record().image_size_bytes;
  view.stored_size_bytes = loaded->record().stored_size_bytes;
  for (const ImageRecord& link : loaded->chain) {
    view.chain.push_back(link.name);
    view.chain_stored_bytes += link.stored_size_bytes;
  }
  view.backend = loaded->backend;
  view.memory_bytes = loaded->machine.memory_bytes;
  view.vcpus = loaded->machine.vcpus;
  std::lock_guard lock(mutex_);
  if (auto pool = pools_.find(name); pool != pools_.end()) {
    view.pool.size = pool->second.size;
    view.pool.ready = pool->second.ready.size();
    view.pool.loading = pool->second.loading;
    view.pool.last_error = pool->second.last_error;
  }
  return view;
}

Result<std::vector<TemplateView>> VmService::list_templates() {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, store_.list());
  std::vector<TemplateView> views;
  for (const ImageRecord& record : records) {
    if (!is_template(record)) continue;
    Result<TemplateView> view = get_template(record.name);
    // A template removed meanwhile is simply not listed.
    if (!view && view.error().code == ErrorCode::kNotFound) continue;
    if (!view) return view.error();
    views.push_back(std::move(*view));
  }
  return views;
}

Status VmService::check_template_unused(const std::string& name) const {
  for (const auto& [id, vm] : vms_) {
    if (vm->template_name == name && vm->state != VmState::kPooled) {
      return make_error(ErrorCode::kConflict, "template {} is in use by VM {}", name, id);
    }
  }
  if (auto pool = pools_.find(name); pool != pools_.end() && pool->second.size > 0) {
    return make_error(ErrorCode::kConflict, "template {} has a warm pool of {}; set its size to 0 first", name,
                      pool->second.size);
  }
  if (auto pool = pools_.find(name);
      pool != pools_.end() && (pool->second.loading > 0 || !pool->second.ready.empty())) {
    return make_error(ErrorCode::kConflict, "template {}: its warm pool is still being emptied; try again", name);
  }
  for (const auto& [id, build] : builds_) {
    if (!build->finished && build->view.template_name == name) {
      return make_error(ErrorCode::kConflict, "template {} is being built (build {})", name, id);
    }
  }
  return {};
}

Result<std::vector<std::string>> VmService::delete_template(const std::string& name, bool cascade) {
  DELTAVM_TRY(get_template(name).status());
  DELTAVM_ASSIGN_OR_RETURN(std::vector<std::string> doomed, templates_to_remove(store_, name, cascade));
  {
    std::lock_guard lock(mutex_);
    for (const std::string& one : doomed) DELTAVM_TRY(check_template_unused(one));
  }
  std::vector<std::string> removed;
  for (auto it = doomed.rbegin(); it != doomed.rend(); ++it) {
    DELTAVM_TRY(store_.remove_image(*it));
    removed.push_back(*it);
  }
  return removed;
}

Status VmService::set_pool_size(const std::string& name, uint64_t size) {
  if (size > kMaxPoolSize) {
    return make_error(ErrorCode::kInvalidArgument, "field size must be an integer from 0 to {}, found {}", kMaxPoolSize,
                      size);
  }
  DELTAVM_TRY(get_template(name).status());
  std::vector<std::shared_ptr<Vm>> excess;
  {
    std::lock_guard lock(mutex_);
    if (draining_) return make_error(ErrorCode::kUnavailable, "the service is shutting down");
    Pool& pool = pools_[name];
    pool.size = size;
    pool.last_error.clear();
    pool.retry_after = {};
    while (pool.ready.size() > size) {
      std::shared_ptr<Vm> vm = vms_.at(pool.ready.back());
      pool.ready.pop_back();
      vm->state = VmState::kStopping;
      excess.push_back(vm);
    }
  }
  changed_.notify_all();
  for (const std::shared_ptr<Vm>& vm : excess) stop_and_forget(vm, "pool shrunk");
  return {};
}

Result<std::string> VmService::start_build(const TemplateSpec& spec, const std::string& backend_name) {
  if (draining()) return make_error(ErrorCode::kUnavailable, "the service is shutting down");
  if (backend_name != "qemu" && backend_name != "kvm") {
    return make_error(ErrorCode::kInvalidArgument, "field backend must be qemu or kvm, found {:?}", backend_name);
  }
  if (store_.find(spec.name)) {
    return make_error(ErrorCode::kAlreadyExists, "template {} already exists (delete it first)", spec.name);
  }
  DELTAVM_ASSIGN_OR_RETURN(Backend * runner, backend(backend_name));
  std::string id;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [other_id, build] : builds_) {
      if (!build->finished && build->view.template_name == spec.name) {
        return make_error(ErrorCode::kConflict, "template {} is already being built (build {})", spec.name, other_id);
      }
    }
  }
  DELTAVM_ASSIGN_OR_RETURN(Reservation reservation, reserve(uint64_t{spec.memory_mib} << 20, /*may_evict=*/true));
  std::lock_guard lock(mutex_);
  // Finished builds beyond kKeptBuilds are forgotten, oldest first.
  size_t finished = 0;
  for (const auto& [other_id, build] : builds_) finished += build->finished;
  for (auto it = builds_.begin(); finished >= kKeptBuilds && it != builds_.end();) {
    if (!it->second->finished) {
      ++it;
      continue;
    }
    if (it->second->thread.joinable()) it->second->thread.join();
    it = builds_.erase(it);
    --finished;
  }
  id = fmt::format("b{:06d}", next_build_++);
  auto build = std::make_unique<Build>();
  build->view.id = id;
  build->view.template_name = spec.name;
  build->view.state = "building";
  build->view.started_at_unix = now_unix();
  build->reservation = reservation;
  Build* raw = build.get();
  builds_[id] = std::move(build);
  // The build's VM is tied to this thread (it dies with it), which lives for the build.
  raw->thread = std::thread([this, raw, spec, runner] {
    Clock::time_point start = Clock::now();
    Result<TemplateBuild> result = build_template(spec, store_, *runner, runtime_, [&](std::string_view phase) {
      std::lock_guard build_lock(mutex_);
      raw->view.log.push_back(std::string(phase));
    });
    {
      // Finished and its room given back in one step; after it, this thread takes no lock
      // (start_build may join it while holding mutex_).
      std::lock_guard build_lock(mutex_);
      raw->view.duration_ms = elapsed_ms(start);
      raw->view.state = result ? "succeeded" : "failed";
      if (result) {
        raw->view.log.push_back(fmt::format("stored {} bytes against {} ({})", result->record.stored_size_bytes,
                                            result->record.parent.value_or("nothing"), result->parent_reason));
      } else {
        raw->view.error = result.error().message;
      }
      raw->finished = true;
      --reserved_vms_;
      reserved_bytes_ -= raw->reservation.memory_bytes;
    }
    changed_.notify_all();
    metrics_.add("deltavm_builds_total", {{"result", result ? "succeeded" : "failed"}});
    log_event("build {} of template {}: {}", raw->view.id, spec.name, result ? "done" : result.error().message);
  });
  return id;
}

Result<BuildView> VmService::get_build(const std::string& id) {
  std::lock_guard lock(mutex_);
  auto it = builds_.find(id);
  if (it == builds_.end()) return make_error(ErrorCode::kNotFound, "no build {}", id);
  return it->second->view;
}

void VmService::refill_pools() {
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), kRefillNice);
  std::unique_lock lock(mutex_);
  for (;;) {
    std::string name;
    changed_.wait_for(lock, std::chrono::seconds(1), [&] {
      if (draining_) return true;
      Clock::time_point now = Clock::now();
      for (const auto& [pool_name, pool] : pools_) {
        if (pool.ready.size() + pool.loading < pool.size && now >= pool.retry_after) {
          name = pool_name;
          return true;
        }
      }
      return false;
    });
    if (draining_) return;
    if (name.empty()) continue;
    Pool& pool = pools_[name];
    ++pool.loading;
    lock.unlock();

    Status filled = [&]() -> Status {
      DELTAVM_ASSIGN_OR_RETURN(Template loaded, load_template(store_, name));
      DELTAVM_ASSIGN_OR_RETURN(Backend * runner, backend(loaded.backend));
      DELTAVM_ASSIGN_OR_RETURN(Reservation reservation, reserve(loaded.machine.memory_bytes, /*may_evict=*/false));
      load_turns_.acquire();
      Result<StartedVm> started =
          start_vm(loaded, store_, *runner, runtime_, {.leave_paused = true, .stay_owner = true, .purpose = "pool"});
      load_turns_.release();
      if (!started) {
        release(reservation);
        return started.error();
      }
      // Each pool VM answers once before it waits, so that a VM that would not is never handed
      // out, and the guest's path to a first answer is warm (translated, under TCG) when a
      // request comes: resumed, asked `true`, paused again.
      std::unique_ptr<HeldControl> control;
      Status checked = [&]() -> Status {
        DELTAVM_ASSIGN_OR_RETURN(VmDirectory directory, VmDirectory::open(runtime_, started->id));
        DELTAVM_TRY(runner->resume(directory));
        DELTAVM_ASSIGN_OR_RETURN(ExecResult answer, agent_exec(directory.agent_socket(), "true", kPoolCheckTimeout));
        if (answer.exit_status != 0) {
          return make_error(ErrorCode::kIo, "pool VM {} answered its check with exit status {}", started->id,
                            answer.exit_status);
        }
        DELTAVM_TRY(runner->pause(directory));
        DELTAVM_ASSIGN_OR_RETURN(control, runner->hold_control(directory));
        return {};
      }();
      if (!checked) {
        (void)stop_vm(started->id, *runner, runtime_);
        release(reservation);
        return checked.error();
      }
      auto vm = std::make_shared<Vm>();
      vm->id = started->id;
      vm->template_name = name;
      vm->backend_key = loaded.backend;
      vm->backend = loaded.backend;
      vm->state = VmState::kPooled;
      vm->memory_bytes = loaded.machine.memory_bytes;
      vm->timings.prepare_ms = started->prepare_ms;
      vm->timings.launch_ms = started->restore.launch_ms;
      vm->timings.fill_ms = started->restore.fill_ms;
      vm->timings.state_ms = started->restore.state_ms;
      vm->control = std::move(control);
      vm->refresh_identity = loaded.agent_protocol >= 3;
      if (Result<VmDirectory> directory = VmDirectory::open(runtime_, vm->id)) {
        if (Result<VmRecord> record = directory->read_record(); record && record->process) {
          vm->pid = record->process->pid;
        }
      }
      std::lock_guard fill_lock(mutex_);
      --reserved_vms_;
      reserved_bytes_ -= reservation.memory_bytes;
      vms_[vm->id] = vm;
      pools_[name].ready.push_back(vm->id);
      return {};
    }();

    lock.lock();
    Pool& refilled = pools_[name];
    --refilled.loading;
    if (!filled) {
      if (refilled.last_error != filled.error().message) {
        log_event("pool {}: refill failed: {}", name, filled.error().message);
      }
      refilled.last_error = filled.error().message;
      refilled.retry_after = Clock::now() + kRefillRetry;
      // A pool that waits for room under the limits is not failing.
      if (filled.error().code != ErrorCode::kLimit) {
        metrics_.add("deltavm_errors_total", {{"code", error_code_id(filled.error().code)}});
      }
    } else {
      refilled.last_error.clear();
    }
    // A pool shrunk while this VM loaded gives the extra back.
    if (refilled.ready.size() > refilled.size) {
      std::shared_ptr<Vm> extra = vms_.at(refilled.ready.back());
      refilled.ready.pop_back();
      extra->state = VmState::kStopping;
      lock.unlock();
      stop_and_forget(extra, "pool shrunk");
      lock.lock();
    }
  }
}

void VmService::watch_vms() {
  for (int tick = 1;; ++tick) {
    std::vector<std::shared_ptr<Vm>> vms;
    {
      std::unique_lock lock(mutex_);
      changed_.wait_for(lock, kWatchInterval, [&] { return stopping_threads_; });
      if (stopping_threads_) return;
      for (const auto& [id, vm] : vms_) {
        if (vm->state == VmState::kRunning || vm->state == VmState::kPooled) vms.push_back(vm);
      }
    }
    int64_t now = now_unix();
    for (const std::shared_ptr<Vm>& vm : vms) {
      Result<VmDirectory> directory = VmDirectory::open(runtime_, vm->id);
      std::optional<std::string> ended;
      if (!directory) {
        ended = "its directory is gone";
      } else if (Result<Backend*> runner = backend(vm->backend_key); runner) {
        ended = (*runner)->ended(*directory);
      }
      std::string reason;
      if (ended) {
        reason = "exited";
      } else if (vm->state == VmState::kRunning && vm->expires_at_unix > 0 && now >= vm->expires_at_unix &&
                 !vm->snapshotting) {
        reason = "expired";
      }
      if (!reason.empty()) {
        {
          std::lock_guard lock(mutex_);
          if (vm->state != VmState::kRunning && vm->state != VmState::kPooled) continue;  // Someone else's now.
          if (vm->state == VmState::kPooled) std::erase(pools_[vm->template_name].ready, vm->id);
          vm->state = VmState::kStopping;
        }
        if (ended) log_event("VM {} ({}) ended: {}", vm->id, vm->template_name, *ended);
        if (reason == "expired" && config_.auto_pause) {
          {
            std::lock_guard lock(mutex_);
            vm->state = VmState::kRunning;  // pause() takes it from here.
          }
          Result<Snapshot> paused = pause(vm->id);
          if (paused) {
            log_event("VM {} ({}) expired: paused into {}", vm->id, vm->template_name, paused->record.name);
            continue;
          }
          log_event("VM {} ({}) expired: could not pause it ({}); stopping it", vm->id, vm->template_name,
                    paused.error().message);
          std::lock_guard lock(mutex_);
          if (vm->state != VmState::kRunning) continue;
          vm->state = VmState::kStopping;
        }
        stop_and_forget(vm, reason);
        continue;
      }
      // The console log is kept under kMaxConsoleBytes: past it, it starts again (O_APPEND
      // writers continue at the new end).
      struct stat st {};
      if (::stat(directory->console_log().c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) > kMaxConsoleBytes &&
          ::truncate(directory->console_log().c_str(), 0) == 0) {
        std::lock_guard lock(mutex_);
        vm->console_dropped_bytes += static_cast<uint64_t>(st.st_size);
      }
    }
    if (tick % kAdoptEveryTicks == 0) {
      adopt_unknown_vms();
      // What loads and requests freed goes back to the system, the store's compression
      // reference (the kernel and initramfs, ~16 MiB) included.
      store_.drop_reference_cache();
      ::malloc_trim(0);
    }
  }
}

void VmService::adopt_unknown_vms() {
  Result<std::vector<VmDirectory>> directories = VmDirectory::list(runtime_);
  if (!directories) {
    log_event("cannot list the runtime: {}", directories.error().message);
    return;
  }
  ProcessIdentity self = ProcessIdentity::self();
  for (const VmDirectory& directory : *directories) {
    {
      std::lock_guard lock(mutex_);
      if (vms_.contains(directory.id())) continue;
    }
    Result<VmRecord> record = directory.read_record();
    if (!record) continue;  // Being created (no record yet), or damaged: left for a person.
    if (record->owner) {
      if (*record->owner == self || process_running(*record->owner)) continue;
      // Abandoned: its owner died mid-start, mid-build, or while holding it in a pool.
      if (record->process) (void)terminate_process(*record->process, std::chrono::seconds(2));
      (void)directory.remove();
      log_event("ended VM {} ({}), abandoned by process {}", directory.id(),
                record->purpose.empty() ? record->template_name : record->purpose, record->owner->pid);
      metrics_.add("deltavm_vm_ends_total", {{"reason", "abandoned"}});
      continue;
    }
    if (!record->process || !process_running(*record->process)) {
      (void)directory.remove();
      metrics_.add("deltavm_vm_ends_total", {{"reason", "exited"}});
      continue;
    }
    auto vm = std::make_shared<Vm>();
    vm->id = directory.id();
    vm->template_name = record->template_name;
    vm->backend = record->backend.empty() ? "qemu" : record->backend;
    vm->backend_key = vm->backend;
    vm->state = VmState::kRunning;
    vm->pid = record->process->pid;
    vm->memory_bytes = record->memory_bytes;
    vm->created_at_unix = record->created_at_unix;
    vm->expires_at_unix = record->expires_at_unix;
    {
      std::lock_guard lock(mutex_);
      vms_.emplace(vm->id, vm);
    }
    metrics_.add("deltavm_vms_adopted_total", {});
    log_event("adopted running VM {} ({})", vm->id, vm->template_name);
  }
}

void VmService::update_gauges() {
  std::map<std::string, uint64_t> by_state = {{"running", 0}, {"pooled", 0}, {"starting", 0}, {"stopping", 0}};
  uint64_t memory = 0;
  metrics_.clear("deltavm_pool_size");
  metrics_.clear("deltavm_pool_vms");
  {
    std::lock_guard lock(mutex_);
    for (const auto& [id, vm] : vms_) {
      memory += vm->memory_bytes;
      switch (vm->state) {
        case VmState::kRunning: ++by_state["running"]; break;
        case VmState::kPooled: ++by_state["pooled"]; break;
        case VmState::kStarting: ++by_state["starting"]; break;
        case VmState::kStopping: ++by_state["stopping"]; break;
      }
    }
    by_state["starting"] += reserved_vms_;
    memory += reserved_bytes_;
    for (const auto& [name, pool] : pools_) {
      metrics_.set("deltavm_pool_size", {{"template", name}}, static_cast<double>(pool.size));
      metrics_.set("deltavm_pool_vms", {{"template", name}, {"state", "ready"}},
                   static_cast<double>(pool.ready.size()));
      metrics_.set("deltavm_pool_vms", {{"template", name}, {"state", "loading"}}, static_cast<double>(pool.loading));
    }
  }
  for (const auto& [state, count] : by_state)
    metrics_.set("deltavm_vms", {{"state", state}}, static_cast<double>(count));
  metrics_.set("deltavm_guest_memory_bytes", {}, static_cast<double>(memory));
  metrics_.set("deltavm_guest_memory_limit_bytes", {}, static_cast<double>(config_.max_memory_bytes));
  metrics_.set("deltavm_vms_limit", {}, static_cast<double>(config_.max_vms));
  if (Result<std::vector<ImageRecord>> records = store_.list()) {
    uint64_t stored = 0;
    for (const ImageRecord& record : *records) stored += record.stored_size_bytes;
    metrics_.set("deltavm_store_bytes", {}, static_cast<double>(stored));
  }
  metrics_.set("process_resident_memory_bytes", {}, static_cast<double>(resident_bytes()));
}

std::string VmService::metrics_text() {
  update_gauges();
  return metrics_.render();
}

void VmService::stop_taking_work() {
  {
    std::lock_guard lock(mutex_);
    draining_ = true;
  }
  changed_.notify_all();
}

void VmService::drain() {
  stop_taking_work();
  if (refill_thread_.joinable()) refill_thread_.join();
  std::vector<Build*> running;
  {
    std::lock_guard lock(mutex_);
    for (auto& [id, build] : builds_) running.push_back(build.get());
  }
  for (Build* build : running) {
    if (build->thread.joinable()) build->thread.join();
  }
  std::vector<std::shared_ptr<Vm>> pooled;
  {
    std::lock_guard lock(mutex_);
    for (auto& [name, pool] : pools_) {
      for (const std::string& id : pool.ready) {
        std::shared_ptr<Vm> vm = vms_.at(id);
        vm->state = VmState::kStopping;
        pooled.push_back(vm);
      }
      pool.ready.clear();
    }
  }
  for (const std::shared_ptr<Vm>& vm : pooled) stop_and_forget(vm, "drained");
}

bool VmService::draining() const {
  std::lock_guard lock(mutex_);
  return draining_;
}

Metrics& VmService::metrics() { return metrics_; }

}  // namespace deltavm
