// bench/kvm-restore: loads of a micro-guest image at chain depth 3 by the kvm backend's VMM,
// under each memory strategy, next to the floor measured in the same run.
//
//   bench-kvm-restore [--memory-mib 256] [--loads 100] [--clones 100] [--dir DIR] [--json]
//
// The chain: a micro guest is booted and captured at checkpoints 1-4 into a real store (c1 base,
// c2..c4 deltas from KVM's dirty log), so c4 sits at depth 3. Its base flat file and the
// overlay of the pages the chain changes are prepared once (the loader's work, timed apart),
// as a running deltavm keeps them.
//
// Each load uses a fresh deltavm-vmm process started beforehand (a warm pool, as Firecracker
// starts its process before the load request). Timed inside the VMM from the request's
// arrival: to the first guest instruction (the vCPU single-steps it, KVM_GUESTDBG_SINGLESTEP),
// and to the guest's first port write (its next heartbeat: the guest answered). The floor, in
// the same process just before: create a bare VM with a vCPU and run an empty guest to its
// first exit. Loads are interleaved across strategies.
//
// Clones: N VMMs load c4 at once with userfault (and 4 with private, which copies the chain's
// pages into each), each runs until its first answer and pauses; the sum of their PSS
// (/proc/PID/smaps_rollup) is compared with the budget base image + their dirty pages (KVM's
// log) + 1 MiB each.
#include <fmt/format.h>
#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "backends/kvm/overlay_memory_writer.h"
#include "backends/kvm/vmm_client.h"
#include "base/page.h"
#include "loader/loader.h"
#include "store/store.h"
#include "vmm/ram_overlay.h"

namespace {

using namespace deltavm;
using namespace deltavm::vmm;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "bench-kvm-restore: {}\n", message);
  std::exit(1);
}

template <typename T>
T check(Result<T> result, std::string_view what) {
  if (!result) fail(fmt::format("{}: {}", what, result.error().message));
  return std::move(result).value();
}

void check(const Status& status, std::string_view what) {
  if (!status) fail(fmt::format("{}: {}", what, status.error().message));
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t index = static_cast<size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[index];
}

void progress(bool quiet, const std::string& text) {
  if (!quiet) fmt::print(stderr, "{}\n", text);
}

std::filesystem::path micro_guest_program() {
  const char* configured = std::getenv("DELTAVM_MICRO_GUEST");
  if (configured != nullptr && *configured) return configured;
  std::filesystem::path beside = std::filesystem::read_symlink("/proc/self/exe").parent_path() / "micro-guest.bin";
  return std::filesystem::exists(beside) ? beside : std::filesystem::path(DELTAVM_MICRO_GUEST_BIN);
}

std::filesystem::path vmm_binary() {
  std::filesystem::path binary = default_vmm_binary();
  return std::filesystem::exists(binary) ? binary : std::filesystem::path(DELTAVM_VMM_BIN);
}

// PSS of a process in KiB, from /proc/PID/smaps_rollup.
uint64_t pss_kib(int pid) {
  std::ifstream in(fmt::format("/proc/{}/smaps_rollup", pid));
  std::string key;
  uint64_t value = 0;
  while (in >> key) {
    if (key == "Pss:") {
      in >> value;
      return value;
    }
    in.ignore(1 << 10, '\n');
  }
  fail(fmt::format("no Pss in /proc/{}/smaps_rollup", pid));
}

struct RestoreFiles {
  std::filesystem::path base, overlay, state;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvm backend restore benchmark: lazy and eager loads of a depth-3 chain vs the KVM floor"};
  uint64_t memory_mib = 256;
  int loads = 100;
  int clones = 100;
  std::string dir = "/tmp/deltavm-bench-kvm";
  bool json_output = false;
  app.add_option("--memory-mib", memory_mib, "Guest RAM of the micro guest")->check(CLI::Range(64, 2048));
  app.add_option("--loads", loads, "Loads per strategy")->check(CLI::Range(1, 10000));
  app.add_option("--clones", clones, "Concurrent clones for the memory measurement (0: skip)")
      ->check(CLI::Range(0, 1000));
  app.add_option("--dir", dir, "Work directory (removed and recreated)");
  app.add_flag("--json", json_output, "Print JSON");
  CLI11_PARSE(app, argc, argv);
  const bool quiet = json_output;

  std::filesystem::path root = dir;
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  uint64_t memory_bytes = memory_mib << 20;
  uint64_t work_bytes = memory_bytes - (32ull << 20);

  // 1. The chain c1 <- c2 <- c3 <- c4, captured from one micro guest at checkpoints 1-4.
  Store store = check(Store::open_or_create(root / "store"), "opening the store");
  {
    progress(quiet, fmt::format("capturing a {} MiB micro guest at checkpoints 1-4", memory_mib));
    VmmProcess vmm = check(VmmProcess::launch(vmm_binary(), root / "capture", {micro_guest_program(), root}),
                           "starting deltavm-vmm");
    std::filesystem::path ram = root / "capture" / "ram";
    BootMicroRequest boot;
    boot.program = micro_guest_program().string();
    boot.memory_bytes = memory_bytes;
    boot.work_bytes = work_bytes;
    boot.passes = 1000;
    boot.heartbeat_bytes = 256 << 10;
    boot.ram_file = ram.string();
    boot.start.log_dirty = true;
    boot.start.pause_at_checkpoint = 1;
    check(vmm.call<StatusReply>(boot), "booting the micro guest");
    std::optional<std::string> parent;
    for (uint64_t checkpoint = 1; checkpoint <= 4; ++checkpoint) {
      StatusReply status =
          check(vmm.call<StatusReply>(WaitRequest{}, std::chrono::minutes(10)), "waiting for a checkpoint");
      if (status.state != RunState::kPaused || !status.micro || status.micro->checkpoint != checkpoint) {
        fail(fmt::format("unexpected state {} ({}) at checkpoint {}", run_state_name(status.state), status.failure,
                         checkpoint));
      }
      std::filesystem::path state = root / "capture" / "state", dirty = root / "capture" / "dirty";
      check(vmm.call<SaveReply>(SaveRequest{state.string(), dirty.string(), std::nullopt}), "saving");
      Mapping image = check(Mapping::map_file_readonly(ram), "mapping the capture");
      std::vector<uint8_t> state_bytes = check(read_file(state), "reading the state");
      DirtyBitmap bitmap = check(DirtyBitmap::read_file(dirty, page_count(memory_bytes)), "reading the dirty log");
      PutOptions options;
      options.attachments = {{"machine-state", state_bytes}};
      options.dirty = parent ? &bitmap : nullptr;
      std::string name = fmt::format("c{}", checkpoint);
      check(store.put_image(name, image.bytes(), parent, options), "storing " + name);
      parent = name;
      if (checkpoint < 4) check(vmm.call<StatusReply>(ResumeRequest{checkpoint + 1}), "resuming");
    }
  }
  std::filesystem::remove_all(root / "capture");
  ImageRecord record = check(store.find("c4"), "finding c4");

  // 2. The load's inputs, prepared once: base flat file, overlay, machine state.
  Clock::time_point prepare_start = Clock::now();
  Loader loader(store);
  PreparedRam prepared =
      check(loader.prepare(check(store.chain("c4"), "chain of c4"), RamStrategy::kBasePlusDeltas), "preparing c4");
  RestoreFiles files{prepared.flat_file(), root / "overlay", root / "state"};
  RamOverlayWriter overlay = check(RamOverlayWriter::create(files.overlay), "creating the overlay");
  OverlayMemoryWriter writer(overlay);
  check(prepared.fill(writer), "filling the overlay");
  check(overlay.commit(), "writing the overlay");
  check(write_scratch_file(files.state, check(store.read_attachment(record, "machine-state"), "reading state")),
        "writing the state");
  double prepare_ms = std::chrono::duration<double, std::milli>(Clock::now() - prepare_start).count();
  uint64_t overlay_pages =
      check(RamOverlay::open(files.overlay, page_count(memory_bytes)), "reading the overlay").page_count();

  auto restore_request = [&](MemoryStrategy strategy) {
    RestoreRequest request;
    request.state = files.state.string();
    request.base = files.base.string();
    request.overlay = files.overlay.string();
    request.strategy = strategy;
    request.wait_first_report = true;
    return request;
  };

  // 3. Loads, interleaved across strategies, each in a fresh VMM process.
  const std::vector<MemoryStrategy> strategies = {MemoryStrategy::kUserfault, MemoryStrategy::kPrivate,
                                                  MemoryStrategy::kEager};
  std::map<std::string, std::vector<double>> first_instruction, answered;
  std::vector<double> floor;
  for (int load = 0; load < loads; ++load) {
    if (!quiet && isatty(STDERR_FILENO)) fmt::print(stderr, "\rload {}/{}", load + 1, loads);
    if (!isatty(STDERR_FILENO) && (load + 1) % 10 == 0) fmt::print(stderr, "load {}/{}\n", load + 1, loads);
    for (MemoryStrategy strategy : strategies) {
      std::string name(memory_strategy_name(strategy));
      VmmProcess vmm =
          check(VmmProcess::launch(vmm_binary(), root / "load", {micro_guest_program(), root}), "starting deltavm-vmm");
      floor.push_back(check(vmm.call<FloorReply>(FloorRequest{}), "floor").floor_us);
      RestoreRequest request = restore_request(strategy);
      request.step_first_instruction = true;
      StatusReply restored = check(vmm.call<StatusReply>(request), "restore (" + name + ")");
      if (!restored.timings) fail("restore answered without timings");
      first_instruction[name].push_back(restored.timings->first_instruction_us);
      answered[name].push_back(restored.timings->first_report_us);
    }
  }
  if (!quiet && isatty(STDERR_FILENO)) fmt::print(stderr, "\n");

  // 4. Concurrent clones and their memory.
  // The private strategy copies every overlay page into each clone (the chain's pages are
  // written over the base), so its clones cost the overlay each: a few of them show it.
  json clone_results = json::object();
  for (MemoryStrategy strategy : {MemoryStrategy::kUserfault, MemoryStrategy::kPrivate}) {
    if (clones == 0) break;
    std::string name(memory_strategy_name(strategy));
    int count = strategy == MemoryStrategy::kPrivate ? std::min(clones, 4) : clones;
    progress(quiet, fmt::format("{} concurrent clones ({})", count, name));
    std::vector<VmmProcess> running;
    uint64_t dirty_pages = 0;
    for (int i = 0; i < count; ++i) {
      running.push_back(
          check(VmmProcess::launch(vmm_binary(), root / fmt::format("clone{}", i), {micro_guest_program(), root}),
                "starting deltavm-vmm"));
      RestoreRequest request = restore_request(strategy);
      request.start.log_dirty = true;
      check(running.back().call<StatusReply>(request), "restoring a clone");
      check(running.back().call<StatusReply>(PauseRequest{}), "pausing a clone");
      SaveRequest save;
      save.dirty = (root / fmt::format("clone{}", i) / "dirty").string();
      dirty_pages += check(running.back().call<SaveReply>(save), "reading a clone's dirty log").dirty_pages.value_or(0);
    }
    uint64_t pss_total_kib = 0;
    for (VmmProcess& vmm : running) pss_total_kib += pss_kib(vmm.pid());
    double base_mib = static_cast<double>(memory_bytes) / (1 << 20);
    double budget_mib = base_mib + static_cast<double>(dirty_pages) * kPageSize / (1 << 20) + count * 1.0;
    clone_results[name] = {{"clones", count},
                           {"pss_total_mib", static_cast<double>(pss_total_kib) / 1024},
                           {"dirty_pages", dirty_pages},
                           {"budget_mib", budget_mib},
                           {"within_budget", static_cast<double>(pss_total_kib) / 1024 <= budget_mib}};
    running.clear();
    for (int i = 0; i < count; ++i) std::filesystem::remove_all(root / fmt::format("clone{}", i));
  }

  double floor_p50 = percentile(floor, 0.5);
  json result = {{"memory_mib", memory_mib},
                 {"chain_depth", record.chain_depth},
                 {"overlay_pages", overlay_pages},
                 {"prepare_ms", prepare_ms},
                 {"loads", loads},
                 {"floor_us", {{"p50", floor_p50}, {"p99", percentile(floor, 0.99)}}},
                 {"clones", clone_results}};
  for (MemoryStrategy kind : strategies) {
    std::string strategy(memory_strategy_name(kind));
    result["strategies"][strategy] = {
        {"first_instruction_us",
         {{"p50", percentile(first_instruction[strategy], 0.5)},
          {"p99", percentile(first_instruction[strategy], 0.99)}}},
        {"answered_us", {{"p50", percentile(answered[strategy], 0.5)}, {"p99", percentile(answered[strategy], 0.99)}}},
        {"first_instruction_over_floor", percentile(first_instruction[strategy], 0.5) / floor_p50}};
  }
  if (json_output) {
    fmt::print("{}\n", result.dump(2));
    return 0;
  }
  fmt::print("micro guest {} MiB, chain depth {}, overlay {} pages (prepared once in {:.1f} ms); {} loads each\n\n",
             memory_mib, record.chain_depth, overlay_pages, prepare_ms, loads);
  fmt::print("{:<12} {:>24} {:>24} {:>10}\n", "strategy", "first instruction p50/p99", "answered p50/p99", "p50/floor");
  for (MemoryStrategy kind : strategies) {
    std::string strategy(memory_strategy_name(kind));
    fmt::print("{:<12} {:>13.0f} / {:>6.0f} us {:>13.0f} / {:>6.0f} us {:>10.2f}\n", strategy,
               percentile(first_instruction[strategy], 0.5), percentile(first_instruction[strategy], 0.99),
               percentile(answered[strategy], 0.5), percentile(answered[strategy], 0.99),
               percentile(first_instruction[strategy], 0.5) / floor_p50);
  }
  fmt::print("{:<12} {:>13.0f} / {:>6.0f} us\n", "floor", floor_p50, percentile(floor, 0.99));
  for (auto& [strategy, clone] : clone_results.items()) {
    fmt::print("\n{} clones ({}): PSS {:.1f} MiB, budget (base + {} dirty pages + 1 MiB each) {:.1f} MiB: {}\n",
               clone["clones"].get<int>(), strategy, clone["pss_total_mib"].get<double>(),
               clone["dirty_pages"].get<uint64_t>(), clone["budget_mib"].get<double>(),
               clone["within_budget"].get<bool>() ? "within" : "OVER");
  }
  return 0;
}
