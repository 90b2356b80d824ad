// bench/restore: from request to the first command answered in the new VM, deltavm's load
// from a delta chain next to QEMU restoring the same machine state from a flat full RAM file
// (x-ignore-shared, share=off) and QEMU's stock restore with RAM inside the migration stream.
//
//   bench-restore --store DIR --template NAME [--loads 10] [--json]
//
// Loads run one at a time and interleaved (deltavm, deltavm flat, flat-file peer, stock peer),
// each VM stopped after it answers, so no load shares the CPU with another VM.
#include <fmt/format.h>
#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <map>

#include "backends/agent_client.h"
#include "backends/qemu/qemu_backend.h"
#include "templates/kernel_image.h"
#include "templates/templates.h"

namespace {

using namespace deltavm;
using Clock = std::chrono::steady_clock;

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "bench-restore: {}\n", message);
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

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

double percentile(std::vector<double> values, double p) {
  std::sort(values.begin(), values.end());
  size_t index = static_cast<size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[index];
}

void answer(const VmDirectory& vm) {
  ExecResult result = check(agent_exec(vm.agent_socket(), "true", std::chrono::seconds(60)), "first command");
  if (result.exit_status != 0) fail("first command failed");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Restore benchmark: deltavm load vs QEMU flat-file restore vs QEMU stock restore"};
  std::string store_directory, template_name, runtime_directory;
  int loads = 10;
  bool json = false;
  app.add_option("--store", store_directory, "Store holding the template")->required();
  app.add_option("--template", template_name, "Template to load")->required();
  app.add_option("--loads", loads, "Loads per way; medians are reported")->check(CLI::Range(1, 1000));
  app.add_option("--runtime", runtime_directory, "Directory for the VMs");
  app.add_flag("--json", json, "Print JSON");
  CLI11_PARSE(app, argc, argv);
  std::filesystem::path runtime = runtime_directory.empty()
                                      ? std::filesystem::path(fmt::format("/tmp/deltavm-bench-restore-{}", getpid()))
                                      : std::filesystem::path(runtime_directory);

  Store store = check(Store::open(store_directory, template_reference_kinds()), "open store");
  std::unique_ptr<Backend> backend = make_qemu_backend();
  Template loaded = check(load_template(store, template_name), "template");
  const ImageRecord& record = loaded.record();
  const std::vector<ImageRecord>& chain = loaded.chain;
  MachineSpec machine = loaded.machine;
  check(add_boot_files(store, loaded, machine), "kernel and initramfs");
  std::vector<uint8_t> state = check(store.read_attachment(record, kMachineStateRole), "machine state");
  Loader loader(store);
  // The peers' inputs are made before any timing: the flat file of the whole target image...
  std::filesystem::path flat = check(store.flat_file(record), "flat file");
  check(store.flat_file(chain.front()), "base flat file");
  // ...and a stock snapshot, RAM in the stream, of a VM loaded from the template.
  std::filesystem::path stream = runtime / "stock.stream";
  {
    StartedVm vm = check(start_vm(template_name, store, *backend, runtime), "load");
    VmDirectory directory = check(VmDirectory::open(runtime, vm.id), "vm");
    answer(directory);
    check(save_stock_snapshot(directory, stream), "stock snapshot");
    check(stop_vm(vm.id, *backend, runtime), "stop");
  }

  std::map<std::string, std::vector<double>> totals;
  std::map<std::string, std::vector<double>> phases;
  const std::vector<std::string> ways = {"deltavm (base+deltas)", "deltavm (flat)", "qemu flat file",
                                         "qemu stock stream"};
  for (int load = 0; load < loads; ++load) {
    if (!json && isatty(STDERR_FILENO)) fmt::print(stderr, "\rload {}/{}", load + 1, loads);
    for (const std::string& way : ways) {
      auto start = Clock::now();
      std::string id;
      if (way.starts_with("deltavm")) {
        RamStrategy strategy = way == "deltavm (flat)" ? RamStrategy::kFlatTarget : RamStrategy::kBasePlusDeltas;
        StartedVm vm = check(start_vm(template_name, store, *backend, runtime, {.strategy = strategy}), way);
        id = vm.id;
        if (strategy == RamStrategy::kBasePlusDeltas) {
          phases["prepare"].push_back(vm.prepare_ms);
          phases["launch"].push_back(vm.restore.launch_ms);
          phases["fill"].push_back(vm.restore.fill_ms);
          phases["state"].push_back(vm.restore.state_ms);
        }
      } else {
        VmDirectory vm = check(VmDirectory::create(runtime), "vm directory");
        id = vm.id();
        if (way == "qemu flat file") {
          check(backend->restore(
                    machine, flat, [](GuestMemoryWriter&) { return Status(); }, state, vm, false),
                way);
        } else {
          check(restore_stock_snapshot(machine, stream, vm), way);
        }
      }
      VmDirectory vm = check(VmDirectory::open(runtime, id), "vm");
      auto answer_start = Clock::now();
      answer(vm);
      totals[way].push_back(ms_since(start));
      if (way == ways[0]) phases["answer"].push_back(ms_since(answer_start));
      check(stop_vm(id, *backend, runtime), "stop");
    }
  }
  if (!json && isatty(STDERR_FILENO)) fmt::print(stderr, "\n");
  uint64_t stream_bytes = std::filesystem::file_size(stream);
  std::filesystem::remove_all(runtime);

  std::map<std::string, double> median;
  for (const auto& [way, values] : totals) median[way] = percentile(values, 0.5);
  double ours = median[ways[0]];
  nlohmann::json result = {
      {"template", template_name},
      {"chain_depth", chain.size() - 1},
      {"loads", loads},
      {"image_size_bytes", record.image_size_bytes},
      {"machine_state_bytes", state.size()},
      {"stock_stream_bytes", stream_bytes},
      {"median_ms", median},
      {"p90_ms",
       {{ways[0], percentile(totals[ways[0]], 0.9)},
        {ways[2], percentile(totals[ways[2]], 0.9)},
        {ways[3], percentile(totals[ways[3]], 0.9)}}},
      {"phases_median_ms",
       {{"prepare", percentile(phases["prepare"], 0.5)},
        {"launch", percentile(phases["launch"], 0.5)},
        {"fill", percentile(phases["fill"], 0.5)},
        {"state", percentile(phases["state"], 0.5)},
        {"answer", percentile(phases["answer"], 0.5)}}},
      {"ratios", {{"deltavm_over_flat_file", ours / median[ways[2]]}, {"stock_over_deltavm", median[ways[3]] / ours}}}};
  if (json) {
    fmt::print("{}\n", result.dump(2));
    return 0;
  }
  fmt::print(
      "template {} (chain depth {}, {} MiB RAM, machine state {} KiB, stock stream {:.1f} MB); {} loads each\n\n",
      template_name, chain.size() - 1, record.image_size_bytes >> 20, state.size() >> 10, stream_bytes / 1e6, loads);
  fmt::print("{:<24} {:>12} {:>12}\n", "request -> answer", "median", "p90");
  for (const std::string& way : ways) {
    fmt::print("{:<24} {:>9.1f} ms {:>9.1f} ms\n", way, median[way], percentile(totals[way], 0.9));
  }
  fmt::print(
      "\ndeltavm (base+deltas) phases, median: prepare {:.1f} ms, launch {:.1f} ms, fill {:.1f} ms, "
      "state {:.1f} ms, first answer {:.1f} ms\n",
      percentile(phases["prepare"], 0.5), percentile(phases["launch"], 0.5), percentile(phases["fill"], 0.5),
      percentile(phases["state"], 0.5), percentile(phases["answer"], 0.5));
  fmt::print("\nratios (target):\n");
  fmt::print("  deltavm / qemu flat file        {:6.3f}  (<= 1.1)\n", ours / median[ways[2]]);
  fmt::print("  qemu stock stream / deltavm     {:6.3f}  (>= 1.5)\n", median[ways[3]] / ours);
  return 0;
}
