// bench/snapshot: snapshots of running VMs (templates/snapshot.h) against a full capture of the
// same VM, and loads against chain depth.
//
//   bench-snapshot --store DIR --template NAME [--rounds 5] [--changed 1,10] [--depths 1,4,16,64]
//                  [--parts pause,depth] [--json]
//
// pause: per round two VMs are loaded from TEMPLATE and made to change a given percentage of
// their pages (a file of random bytes in the guest's tmpfs); one is snapshotted, the other
// captured in full by QEMU's stock snapshot (RAM inside the migration stream: the whole of guest
// memory and the machine state, what `virsh save` and `savevm` do), in alternate order. Reported, medians over the
// rounds: the time each kept the VM paused (paused -> running again), the snapshot's stored bytes, and the zstd size of
// the pages that differ from the template (what any delta must hold at least).
//
// depth: a chain of snapshots is grown by snapshotting a VM loaded from the previous one, up
// to the deepest depth asked, once with no depth limit and once under the default limit (8);
// then VMs are loaded from the snapshots at each depth (request -> first exec answered),
// medians over the rounds. The bench removes every template it stored (run store gc after).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>
#include <zstd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <map>

#include "backends/agent_client.h"
#include "backends/qemu/qemu_backend.h"
#include "base/page.h"
#include "templates/kernel_image.h"
#include "templates/snapshot.h"
#include "templates/templates.h"

namespace {

using namespace deltavm;
using Clock = std::chrono::steady_clock;

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "bench-snapshot: {}\n", message);
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

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t middle = values.size() / 2;
  return values.size() % 2 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
}

std::vector<int> parse_list(const std::string& text) {
  std::vector<int> values;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (!item.empty()) values.push_back(std::stoi(item));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return values;
}

std::string exec_or_fail(const VmDirectory& vm, const std::string& command) {
  ExecResult result = check(agent_exec(vm.agent_socket(), command, std::chrono::seconds(120)), command);
  if (result.exit_status != 0) fail(fmt::format("{}: exit {}: {}", command, result.exit_status, result.stderr_bytes));
  return result.stdout_bytes;
}

// The zstd size (level 3, one frame) of the pages of `image` that differ from `base`, and their count.
std::pair<uint64_t, uint64_t> changed_pages_compressed(std::span<const uint8_t> base, std::span<const uint8_t> image) {
  std::vector<uint8_t> changed;
  uint64_t pages = 0;
  for (size_t offset = 0; offset + kPageSize <= image.size(); offset += kPageSize) {
    if (!std::equal(image.begin() + offset, image.begin() + offset + kPageSize, base.begin() + offset)) {
      changed.insert(changed.end(), image.begin() + offset, image.begin() + offset + kPageSize);
      ++pages;
    }
  }
  std::vector<uint8_t> out(ZSTD_compressBound(changed.size()));
  size_t size = ZSTD_compress(out.data(), out.size(), changed.data(), changed.size(), 3);
  if (ZSTD_isError(size)) fail(fmt::format("zstd: {}", ZSTD_getErrorName(size)));
  return {size, pages};
}

struct PauseRow {
  int percent = 0;
  std::vector<double> snapshot_pause_ms, full_pause_ms, snapshot_check_ms, snapshot_store_ms;
  std::vector<double> stored_bytes, changed_zstd_bytes, changed_pages, captured_pages, full_stream_bytes;
};

PauseRow measure_pause(Store& store, Backend& backend, const std::filesystem::path& runtime, const Template& loaded,
                       int percent, int rounds) {
  PauseRow row;
  row.percent = percent;
  Mapping base = check(store.get_image(loaded.name()), "template image");
  uint64_t bytes = loaded.machine.memory_bytes * static_cast<uint64_t>(percent) / 100;
  // Each capture is the first of a fresh VM (a VM's first migration costs QEMU more than the
  // next), the two kinds in alternate order.
  auto loaded_and_filled = [&]() {
    StartedVm started = check(start_vm(loaded, store, backend, runtime), "load");
    VmDirectory vm = check(VmDirectory::open(runtime, started.id), "vm");
    // Random bytes in the guest's tmpfs: that many page-cache pages change, and a few more
    // (the file system's and the kernel's own bookkeeping).
    exec_or_fail(vm, fmt::format("head -c {} /dev/urandom > /tmp/bench-fill && sync", bytes));
    return vm;
  };
  for (int round = 0; round < rounds; ++round) {
    for (int turn = 0; turn < 2; ++turn) {
      bool snapshot_turn = (turn + round) % 2 == 0;
      VmDirectory vm = loaded_and_filled();
      if (snapshot_turn) {
        std::string name = fmt::format("bench-snap-{}-{}", percent, round);
        Snapshot snapshot = check(snapshot_vm(vm.id(), name, store, backend, runtime), "snapshot");
        row.snapshot_pause_ms.push_back(snapshot.pause_ms);
        row.snapshot_check_ms.push_back(snapshot.check_ms);
        row.snapshot_store_ms.push_back(snapshot.store_ms);
        row.stored_bytes.push_back(static_cast<double>(snapshot.record.stored_size_bytes));
        row.captured_pages.push_back(static_cast<double>(snapshot.changed_pages));
        Mapping image = check(store.get_image(name), "snapshot image");
        auto [zstd_bytes, pages] = changed_pages_compressed(base.bytes(), image.bytes());
        row.changed_zstd_bytes.push_back(static_cast<double>(zstd_bytes));
        row.changed_pages.push_back(static_cast<double>(pages));
        check(store.remove_image(name), "remove the snapshot");
      } else {
        // QEMU's own full snapshot: stop, every page and the devices into a file, cont.
        std::filesystem::path stream = runtime / fmt::format("bench-full-{}.stream", vm.id());
        auto full_start = Clock::now();
        check(save_stock_snapshot(vm, stream), "full capture");
        check(backend.resume(vm), "resume after the full capture");
        row.full_pause_ms.push_back(ms_since(full_start));
        std::error_code error;
        row.full_stream_bytes.push_back(static_cast<double>(std::filesystem::file_size(stream, error)));
        std::filesystem::remove(stream, error);
      }
      check(stop_vm(vm.id(), backend, runtime), "stop");
    }
    fmt::print(stderr, "  {}% round {}: snapshot paused {:.1f} ms, full capture {:.1f} ms\n", percent, round + 1,
               row.snapshot_pause_ms.back(), row.full_pause_ms.back());
  }
  return row;
}

struct DepthRow {
  int depth = 0;
  std::string policy;
  uint32_t stored_depth = 0;
  std::vector<double> load_ms;
};

// Grows a chain of `deepest` snapshots from `root` (each of a VM loaded from the previous one)
// under `max_depth`, and times loads at each of `depths`. Returns the rows and the names to remove.
std::vector<DepthRow> measure_depth(Store& store, Backend& backend, const std::filesystem::path& runtime,
                                    const std::string& root, const std::vector<int>& depths, uint32_t max_depth,
                                    int rounds, std::vector<std::string>& made) {
  std::vector<DepthRow> rows;
  int deepest = *std::max_element(depths.begin(), depths.end());
  std::string policy = max_depth == 0 ? "none" : fmt::format("max {}", max_depth);
  std::string previous = root;
  for (int generation = 1; generation <= deepest; ++generation) {
    StartedVm started = check(start_vm(previous, store, backend, runtime), "load for the chain");
    VmDirectory vm = check(VmDirectory::open(runtime, started.id), "vm");
    exec_or_fail(vm, fmt::format("echo {} > /tmp/generation", generation));
    std::string name = fmt::format("bench-depth-{}-{}", max_depth, generation);
    SnapshotOptions options;
    options.stop = true;
    options.max_chain_depth = max_depth;
    check(snapshot_vm(started.id, name, store, backend, runtime, options), "snapshot for the chain");
    made.push_back(name);
    previous = name;
    if (std::find(depths.begin(), depths.end(), generation) == depths.end()) continue;
    DepthRow row;
    row.depth = generation;
    row.policy = policy;
    row.stored_depth = check(store.find(name), "find").chain_depth;
    Template loaded = check(load_template(store, name), "template");
    for (int round = 0; round < rounds; ++round) {
      auto start = Clock::now();
      StartedVm clone = check(start_vm(loaded, store, backend, runtime), "load at depth");
      VmDirectory clone_vm = check(VmDirectory::open(runtime, clone.id), "vm");
      std::string answer = exec_or_fail(clone_vm, "cat /tmp/generation");
      row.load_ms.push_back(ms_since(start));
      if (answer != fmt::format("{}\n", generation))
        fail(fmt::format("depth {}: the clone says {}", generation, answer));
      check(stop_vm(clone.id, backend, runtime), "stop");
    }
    fmt::print(stderr, "  depth {} ({}): stored at depth {}, load -> answer {:.1f} ms\n", generation, policy,
               row.stored_depth, median(row.load_ms));
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Snapshots of running VMs against full captures, and loads against chain depth"};
  std::string store_path, template_name, changed = "1,10", depths_text = "1,4,16,64", parts = "pause,depth";
  std::string runtime_path = fmt::format("/tmp/bench-snapshot-{}", ::getpid());
  int rounds = 5;
  bool json = false;
  app.add_option("--store", store_path)->required();
  app.add_option("--template", template_name)->required();
  app.add_option("--rounds", rounds)->check(CLI::Range(1, 100));
  app.add_option("--changed", changed, "Percentages of pages the VM changes before its snapshot");
  app.add_option("--depths", depths_text, "Chain depths to load from");
  app.add_option("--parts", parts, "pause, depth or both");
  app.add_option("--runtime", runtime_path);
  app.add_flag("--json", json);
  CLI11_PARSE(app, argc, argv);

  Store store = check(Store::open(store_path, template_reference_kinds()), "store");
  Template loaded = check(load_template(store, template_name), "template");
  if (loaded.backend != "qemu") fail("the full-capture peer is QEMU's stock snapshot: use a qemu template");
  std::unique_ptr<Backend> backend = check(make_backend("qemu"), "backend");
  std::filesystem::path runtime = runtime_path;
  check(prepare_runtime_directory(runtime), "runtime");

  nlohmann::json report = {{"template", template_name},
                           {"memory_bytes", loaded.machine.memory_bytes},
                           {"rounds", rounds},
                           {"pause", nlohmann::json::array()},
                           {"depth", nlohmann::json::array()}};
  if (parts.find("pause") != std::string::npos) {
    fmt::print("snapshot of a {} MiB VM against QEMU's full capture of it ({} rounds, medians)\n",
               loaded.machine.memory_bytes >> 20, rounds);
    fmt::print("{:>8} {:>10} {:>10} {:>7} {:>10} {:>10} {:>13} {:>7} {:>9} {:>10}\n", "changed", "snap pause",
               "full pause", "ratio", "check", "store", "stored bytes", "pages", "zstd chg", "ratio");
    for (int percent : parse_list(changed)) {
      PauseRow row = measure_pause(store, *backend, runtime, loaded, percent, rounds);
      double snap = median(row.snapshot_pause_ms), full = median(row.full_pause_ms);
      double stored = median(row.stored_bytes), zstd_bytes = median(row.changed_zstd_bytes);
      fmt::print("{:>7}% {:>8.1f}ms {:>8.1f}ms {:>7.2f} {:>8.1f}ms {:>8.1f}ms {:>13.0f} {:>7.0f} {:>9.0f} {:>10.2f}\n",
                 percent, snap, full, snap / full, median(row.snapshot_check_ms), median(row.snapshot_store_ms), stored,
                 median(row.changed_pages), zstd_bytes, stored / zstd_bytes);
      report["pause"].push_back({{"changed_percent", percent},
                                 {"snapshot_pause_ms", snap},
                                 {"full_capture_pause_ms", full},
                                 {"pause_ratio", snap / full},
                                 {"snapshot_check_ms", median(row.snapshot_check_ms)},
                                 {"snapshot_store_ms", median(row.snapshot_store_ms)},
                                 {"stored_bytes", stored},
                                 {"changed_pages", median(row.changed_pages)},
                                 {"captured_pages", median(row.captured_pages)},
                                 {"changed_pages_zstd_bytes", zstd_bytes},
                                 {"stored_ratio", stored / zstd_bytes},
                                 {"full_capture_bytes", median(row.full_stream_bytes)},
                                 {"snapshot_pause_ms_all", row.snapshot_pause_ms},
                                 {"full_capture_pause_ms_all", row.full_pause_ms}});
    }
  }
  if (parts.find("depth") != std::string::npos) {
    std::vector<int> depths = parse_list(depths_text);
    if (depths.empty() || *std::min_element(depths.begin(), depths.end()) < 1) fail("--depths: positive depths");
    std::vector<std::string> made;
    std::vector<DepthRow> rows;
    for (uint32_t max_depth : {0u, kDefaultMaxChainDepth}) {
      std::vector<DepthRow> more =
          measure_depth(store, *backend, runtime, template_name, depths, max_depth, rounds, made);
      rows.insert(rows.end(), more.begin(), more.end());
    }
    fmt::print("\nload (request -> first answer) against snapshot depth above {} ({} rounds, medians)\n", template_name,
               rounds);
    fmt::print("{:>6} {:>8} {:>12} {:>10} {:>16}\n", "depth", "policy", "stored depth", "load", "vs first depth");
    std::map<std::string, double> first;
    for (const DepthRow& row : rows) {
      double load = median(row.load_ms);
      if (!first.contains(row.policy)) first[row.policy] = load;
      fmt::print("{:>6} {:>8} {:>12} {:>8.1f}ms {:>16.2f}\n", row.depth, row.policy, row.stored_depth, load,
                 load / first[row.policy]);
      report["depth"].push_back({{"depth", row.depth},
                                 {"policy", row.policy},
                                 {"stored_depth", row.stored_depth},
                                 {"load_ms", load},
                                 {"load_ms_all", row.load_ms}});
    }
    for (auto it = made.rbegin(); it != made.rend(); ++it) {
      // Children first; a policy chain's snapshots may share a parent.
      (void)store.remove_image(*it);
    }
    for (const std::string& name : made) (void)store.remove_image(name);
  }
  if (json) fmt::print("{}\n", report.dump(2));
  std::error_code error;
  std::filesystem::remove_all(runtime, error);
  return 0;
}
