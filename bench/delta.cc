// bench/delta: deltavm's diff and apply next to xdelta3, zstd --patch-from and the floor, on
// real guest RAM images, in one run. Prints medians over --runs repetitions and ratios.
//
//   bench-delta --base A.ram --target B.ram --third C.ram [--runs 5] [--json]
//
// Measured, per repetition:
//   floor         one XXH3-64 pass over base and target (in memory)
//   deltavm       diff(base, target) + encode to the file format (in memory)
//   xdelta3       `xdelta3 -e -s base target out` and `xdelta3 -d -s base out result`
//   zstd          `zstd --patch-from=base target` and `zstd -d --patch-from=base`
//   memcpy        copying the base into fresh anonymous memory
//   chain apply   fresh memory <- base, then decode + apply d(base,target) and d(target,third)
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>

#include "base/file.h"
#include "image/delta_file.h"

namespace {

using deltavm::Mapping;
using Clock = std::chrono::steady_clock;

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "bench-delta: {}\n", message);
  std::exit(1);
}

template <typename T>
T check(deltavm::Result<T> result, std::string_view what) {
  if (!result) fail(fmt::format("{}: {}", what, result.error().message));
  return std::move(result).value();
}

double time_ms(const std::function<void()>& work) {
  auto start = Clock::now();
  work();
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  size_t n = values.size();
  return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

// Runs a command to completion; fails the benchmark if it does not exit 0.
void run_command(const std::vector<std::string>& argv) {
  pid_t pid = fork();
  if (pid < 0) fail("fork failed");
  if (pid == 0) {
    std::vector<char*> args;
    for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    // The peers' chatter ("long mode automatically triggered") is not the benchmark's output.
    int null = open("/dev/null", O_WRONLY);
    if (null >= 0) dup2(null, STDERR_FILENO);
    execvp(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail(fmt::format("{} failed (status {})", argv[0], status));
}

// A copy of a file in fresh anonymous memory, so that every tool reads from RAM.
Mapping load(const std::string& path) {
  Mapping file = check(Mapping::map_file_readonly(path), "map " + path);
  Mapping memory = check(Mapping::map_anonymous(file.size()), "allocate");
  std::memcpy(memory.writable_bytes().data(), file.bytes().data(), file.size());
  return memory;
}

uint64_t file_size(const std::filesystem::path& path) { return std::filesystem::file_size(path); }

bool same_file(const std::filesystem::path& a, const std::filesystem::path& b) {
  Mapping x = check(Mapping::map_file_readonly(a), "map " + a.string());
  Mapping y = check(Mapping::map_file_readonly(b), "map " + b.string());
  return x.size() == y.size() && std::memcmp(x.bytes().data(), y.bytes().data(), x.size()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Delta benchmark: deltavm vs xdelta3 vs zstd --patch-from vs the XXH3 floor"};
  std::string base_path, target_path, third_path, work_directory = "/tmp";
  int runs = 5;
  bool json = false;
  app.add_option("--base", base_path, "Base RAM image")->required()->check(CLI::ExistingFile);
  app.add_option("--target", target_path, "Target RAM image (same size)")->required()->check(CLI::ExistingFile);
  app.add_option("--third", third_path, "Third RAM image, for the 2-delta chain")->required()->check(CLI::ExistingFile);
  app.add_option("--runs", runs, "Repetitions; medians are reported")->check(CLI::Range(1, 1000));
  app.add_option("--work-dir", work_directory, "Where peer tools write their files");
  app.add_flag("--json", json, "Print JSON");
  CLI11_PARSE(app, argc, argv);

  Mapping base = load(base_path), target = load(target_path), third = load(third_path);
  if (base.size() != target.size() || base.size() != third.size()) fail("images differ in size");
  const size_t size = base.size();
  std::filesystem::path work = std::filesystem::path(work_directory) / fmt::format("deltavm-bench-{}", getpid());
  std::filesystem::create_directories(work);
  const std::string xdelta_file = (work / "delta.xd3").string(), xdelta_out = (work / "xdelta.out").string();
  const std::string zstd_file = (work / "delta.zst").string(), zstd_out = (work / "zstd.out").string();

  // Deltas of the chain, made once for the apply measurements.
  deltavm::Delta d12 = check(deltavm::diff(base.bytes(), target.bytes()), "diff base target");
  deltavm::Delta d23 = check(deltavm::diff(target.bytes(), third.bytes()), "diff target third");
  std::vector<uint8_t> e12 = deltavm::encode_delta(d12), e23 = deltavm::encode_delta(d23);

  std::map<std::string, std::vector<double>> times;
  uint64_t deltavm_bytes = 0;
  volatile uint64_t sink = 0;
  for (int run = 0; run < runs; ++run) {
    if (!json && isatty(STDERR_FILENO)) fmt::print(stderr, "\rrun {}/{}", run + 1, runs);
    times["floor"].push_back(time_ms(
        [&] { sink = sink + XXH3_64bits(base.bytes().data(), size) + XXH3_64bits(target.bytes().data(), size); }));
    std::vector<uint8_t> encoded;
    times["deltavm encode"].push_back(time_ms([&] {
      deltavm::Delta delta = check(deltavm::diff(base.bytes(), target.bytes()), "diff");
      encoded = deltavm::encode_delta(delta);
    }));
    deltavm_bytes = encoded.size();
    times["deltavm apply"].push_back(time_ms([&] {
      Mapping memory = check(Mapping::map_anonymous(size), "allocate");
      std::memcpy(memory.writable_bytes().data(), base.bytes().data(), size);
      deltavm::Delta delta = check(deltavm::decode_delta(encoded, "delta"), "decode");
      if (!deltavm::apply_delta(delta, memory.writable_bytes())) fail("apply");
      sink = sink + memory.bytes()[size / 2];
    }));
    times["memcpy"].push_back(time_ms([&] {
      Mapping memory = check(Mapping::map_anonymous(size), "allocate");
      std::memcpy(memory.writable_bytes().data(), base.bytes().data(), size);
      sink = sink + memory.bytes()[size / 2];
    }));
    times["chain apply"].push_back(time_ms([&] {
      Mapping memory = check(Mapping::map_anonymous(size), "allocate");
      std::memcpy(memory.writable_bytes().data(), base.bytes().data(), size);
      for (const auto* bytes : {&e12, &e23}) {
        deltavm::Delta delta = check(deltavm::decode_delta(*bytes, "delta"), "decode");
        if (!deltavm::apply_delta(delta, memory.writable_bytes())) fail("apply");
      }
      sink = sink + memory.bytes()[size / 2];
    }));
    times["xdelta3 encode"].push_back(time_ms([&] {
      run_command({"xdelta3", "-e", "-f", "-s", base_path, target_path, xdelta_file});
    }));
    times["xdelta3 apply"].push_back(time_ms([&] {
      run_command({"xdelta3", "-d", "-f", "-s", base_path, xdelta_file, xdelta_out});
    }));
    times["zstd encode"].push_back(time_ms([&] {
      run_command({"zstd", "-q", "-f", "--patch-from=" + base_path, target_path, "-o", zstd_file});
    }));
    times["zstd apply"].push_back(time_ms([&] {
      run_command({"zstd", "-q", "-d", "-f", "--patch-from=" + base_path, zstd_file, "-o", zstd_out});
    }));
  }
  if (!json && isatty(STDERR_FILENO)) fmt::print(stderr, "\n");

  // Every tool must have reproduced the target exactly, or its numbers mean nothing.
  if (!same_file(xdelta_out, target_path)) fail("xdelta3 did not reproduce the target");
  if (!same_file(zstd_out, target_path)) fail("zstd did not reproduce the target");
  {
    Mapping memory = check(Mapping::map_anonymous(size), "allocate");
    std::memcpy(memory.writable_bytes().data(), base.bytes().data(), size);
    if (!deltavm::apply_delta(d12, memory.writable_bytes()) || !deltavm::apply_delta(d23, memory.writable_bytes()) ||
        std::memcmp(memory.bytes().data(), third.bytes().data(), size) != 0) {
      fail("deltavm chain did not reproduce the third image");
    }
  }
  uint64_t xdelta_bytes = file_size(xdelta_file), zstd_bytes = file_size(zstd_file);
  std::filesystem::remove_all(work);

  std::map<std::string, double> m;
  for (const auto& [name, values] : times) m[name] = median(values);
  nlohmann::json result = {
      {"image_bytes", size},
      {"runs", runs},
      {"pages_changed", d12.edits.size()},
      {"size_bytes", {{"deltavm", deltavm_bytes}, {"xdelta3", xdelta_bytes}, {"zstd_patch_from", zstd_bytes}}},
      {"median_ms", m},
      {"ratios",
       {{"deltavm_size_over_xdelta3", double(deltavm_bytes) / xdelta_bytes},
        {"deltavm_size_over_zstd", double(deltavm_bytes) / zstd_bytes},
        {"deltavm_encode_over_xdelta3", m["deltavm encode"] / m["xdelta3 encode"]},
        {"deltavm_encode_over_floor", m["deltavm encode"] / m["floor"]},
        {"chain_apply_over_memcpy", m["chain apply"] / m["memcpy"]}}}};
  if (json) {
    fmt::print("{}\n", result.dump(2));
    return 0;
  }
  fmt::print("images: {} MiB each, {} of {} pages differ (base -> target); median of {} runs\n\n", size >> 20,
             d12.edits.size(), size / deltavm::kPageSize, runs);
  fmt::print("{:<26} {:>12} {:>12} {:>12}\n", "tool", "delta size", "encode", "apply");
  auto row = [&](const char* name, uint64_t bytes, double encode, double apply) {
    fmt::print("{:<26} {:>10.3f} MB {:>9.1f} ms {:>9.1f} ms\n", name, bytes / 1e6, encode, apply);
  };
  row("deltavm", deltavm_bytes, m["deltavm encode"], m["deltavm apply"]);
  row("xdelta3 -e -s", xdelta_bytes, m["xdelta3 encode"], m["xdelta3 apply"]);
  row("zstd --patch-from", zstd_bytes, m["zstd encode"], m["zstd apply"]);
  fmt::print("{:<26} {:>13} {:>9.1f} ms\n", "floor (XXH3 over both)", "", m["floor"]);
  fmt::print("\n{:<44} {:>9.1f} ms\n", "memcpy of the image into fresh memory", m["memcpy"]);
  fmt::print("{:<44} {:>9.1f} ms\n", "base + 2-delta chain into fresh memory", m["chain apply"]);
  fmt::print("\nratios (target):\n");
  fmt::print("  deltavm size / xdelta3 size      {:6.3f}  (<= 1)\n", double(deltavm_bytes) / xdelta_bytes);
  fmt::print("  deltavm encode / xdelta3 encode  {:6.3f}  (<= 0.1)\n", m["deltavm encode"] / m["xdelta3 encode"]);
  fmt::print("  deltavm encode / floor           {:6.3f}  (<= 2)\n", m["deltavm encode"] / m["floor"]);
  fmt::print("  chain apply / memcpy             {:6.3f}  (<= 2)\n", m["chain apply"] / m["memcpy"]);
  fmt::print(
      "\nthe peers run as processes on files in the page cache; deltavm and the floor on memory.\n"
      "deltavm diff hashes both images on a second thread while it compares them.\n");
  return 0;
}
