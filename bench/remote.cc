// bench/remote: templates across hosts through a real object store (store/remote.h).
//
//   bench-remote --store DIR --template NAME [--rounds 5] [--runtime DIR] [--json]
//
// The object store comes from the environment `scripts/object-store.sh env` prints
// (DELTAVM_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); the bench works in a bucket of
// its own. DIR is host A, which built TEMPLATE; every other host is a fresh store. Medians over
// the rounds of:
//
// - run: request -> first exec answer on a host that holds only the template's base (pulled and
//   its flat file made beforehand, as on a host that ran it): the pull of what it lacks
//   (fetched, verified, recorded), the load, the answer. Against the same on the same host once
//   it holds the template (warm), in the same round. Also a host that holds nothing.
// - bytes: what the base-holding host fetched, against the template's whole image compressed
//   with zstd (level 3) - what shipping the image itself would cost.
// - throughput: a push of the whole chain into an empty prefix and a pull of it into an empty
//   store, against curl --aws-sigv4 moving the same number of bytes as one object (PUT, GET),
//   in alternate order.
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <random>

#include "backends/agent_client.h"
#include "store/remote.h"
#include "templates/kernel_image.h"
#include "templates/templates.h"

namespace {

using namespace deltavm;
using Clock = std::chrono::steady_clock;

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "bench-remote: {}\n", message);
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

std::string env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    fail(fmt::format("{} is not set: source <(scripts/object-store.sh env), or point it at an S3 store", name));
  }
  return value;
}

// Load TEMPLATE from `store` and wait for the first exec answer; the VM is stopped after.
double run_and_answer(Store& store, const std::string& name, const std::filesystem::path& runtime) {
  Clock::time_point start = Clock::now();
  Template loaded = check(load_template(store, name), "template");
  std::unique_ptr<Backend> backend = check(make_backend(loaded.backend), "backend");
  StartedVm started = check(start_vm(loaded, store, *backend, runtime), "load");
  VmDirectory vm = check(VmDirectory::open(runtime, started.id), "vm");
  ExecResult answer = check(agent_exec(vm.agent_socket(), "true", std::chrono::seconds(120)), "exec");
  double ms = ms_since(start);
  if (answer.exit_status != 0) fail("exec: the first answer failed");
  check(stop_vm(started.id, *backend, runtime), "stop");
  return ms;
}

struct Curl {
  std::string endpoint, bucket;
  std::filesystem::path netrc;

  // One transfer, timed; the exit status checked.
  double transfer(const std::string& arguments) const {
    std::string command = fmt::format(
        "curl -sS -f --aws-sigv4 aws:amz:us-east-1:s3 --netrc-file {} -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' {}",
        netrc.string(), arguments);
    Clock::time_point start = Clock::now();
    if (std::system(command.c_str()) != 0) fail(fmt::format("curl failed: {}", command));
    return ms_since(start);
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string store_path, template_name, runtime_path = "/tmp/deltavm-bench-remote";
  int rounds = 5;
  bool json = false;
  CLI::App app{"Templates across hosts through an S3 store: cold against warm runs, bytes, throughput against curl"};
  app.add_option("--store", store_path, "Host A's store, which holds the template")->required();
  app.add_option("--template", template_name, "A template of depth 2 or more")->required();
  app.add_option("--rounds", rounds)->check(CLI::Range(1, 100));
  app.add_option("--runtime", runtime_path, "Runtime and scratch directory");
  app.add_flag("--json", json);
  CLI11_PARSE(app, argc, argv);

  std::filesystem::path scratch = runtime_path;
  std::filesystem::remove_all(scratch);
  std::filesystem::path runtime = scratch / "run";
  check(prepare_runtime_directory(runtime), "runtime");
  S3Credentials credentials{env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")};
  std::string endpoint = env("DELTAVM_S3_ENDPOINT");
  std::string bucket = fmt::format("bench-remote-{}", std::random_device{}() % 1000000);

  Store host_a = check(Store::open(store_path, template_reference_kinds()), "store");
  std::vector<ImageRecord> chain = check(host_a.chain(template_name), "chain");
  if (chain.size() < 3)
    fail(fmt::format("{} is at depth {}: the bench wants depth 2 or more", template_name, chain.size() - 1));
  const std::string& base_name = chain.front().name;
  // The chain's objects, each once (images share attachments such as the kernel).
  std::vector<std::pair<ObjectId, uint64_t>> objects;
  uint64_t chain_bytes = 0;
  auto add = [&](const ObjectId& id, uint64_t size) {
    if (std::any_of(objects.begin(), objects.end(), [&](const auto& known) { return known.first == id; })) return;
    objects.emplace_back(id, size);
    chain_bytes += size;
  };
  for (const ImageRecord& record : chain) {
    add(record.object_id, record.stored_size_bytes);
    for (const Attachment& attachment : record.attachments) add(attachment.object_id, attachment.size_bytes);
  }
  auto remote_at = [&](const std::string& prefix) {
    RemoteRecord record{"bench", fmt::format("s3://{}/{}", bucket, prefix), endpoint, "us-east-1"};
    return check(Remote::open(record, credentials), "remote");
  };
  auto fresh_store = [&](const std::string& name) {
    std::filesystem::path path = scratch / name;
    std::filesystem::remove_all(path);
    return check(Store::open_or_create(path, template_reference_kinds()), "store " + name);
  };
  Remote shared = remote_at("shared");
  check(shared.push(host_a, template_name).status(), "push");

  // Cold (holding the base) against warm, in the same round on the same host.
  std::vector<double> cold_ms, warm_ms, empty_ms, fetched_bytes;
  for (int round = 0; round < rounds; ++round) {
    Store host_b = fresh_store(fmt::format("host-b-{}", round));
    Remote remote = remote_at("shared");
    check(remote.pull(host_b, base_name).status(), "pull the base");
    check(host_b.flat_file(check(host_b.find(base_name), "base")).status(), "the base's flat file");
    Clock::time_point start = Clock::now();
    PullReport pulled = check(remote.pull(host_b, template_name), "pull");
    double ms = ms_since(start);
    cold_ms.push_back(ms + run_and_answer(host_b, template_name, runtime));
    fetched_bytes.push_back(static_cast<double>(pulled.import.bytes_fetched + pulled.manifest_bytes));
    warm_ms.push_back(run_and_answer(host_b, template_name, runtime));

    Store host_c = fresh_store(fmt::format("host-c-{}", round));
    start = Clock::now();
    check(remote.pull(host_c, template_name).status(), "pull to an empty host");
    empty_ms.push_back(ms_since(start) + run_and_answer(host_c, template_name, runtime));
    std::filesystem::remove_all(scratch / fmt::format("host-c-{}", round));
    std::filesystem::remove_all(scratch / fmt::format("host-b-{}", round));
  }

  // The whole image, as zstd would ship it.
  Mapping image = check(host_a.get_image(template_name), "image");
  std::vector<uint8_t> compressed(ZSTD_compressBound(image.size()));
  size_t zstd_bytes = ZSTD_compress(compressed.data(), compressed.size(), image.data(), image.size(), 3);
  if (ZSTD_isError(zstd_bytes)) fail(fmt::format("zstd: {}", ZSTD_getErrorName(zstd_bytes)));
  compressed.clear();
  compressed.shrink_to_fit();

  // Throughput: the whole chain into an empty prefix and out into an empty store, against curl
  // moving as many bytes as one object, in alternate order.
  Curl curl{endpoint, bucket, scratch / "netrc"};
  {
    std::string host = endpoint.substr(endpoint.find("://") + 3);
    host = host.substr(0, host.find(':'));
    std::ofstream(curl.netrc) << fmt::format("machine {} login {} password {}\n", host, credentials.access_key_id,
                                             credentials.secret_access_key);
    ::chmod(curl.netrc.c_str(), 0600);
  }
  std::filesystem::path blob = scratch / "blob";
  {
    std::ofstream out(blob, std::ios::binary);
    for (const auto& [id, size] : objects) {
      Mapping bytes = check(host_a.read_object(id, size), "object");
      out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    }
  }
  std::vector<double> push_ms, pull_ms, fetch_ms, curl_put_ms, curl_get_ms;
  for (int round = 0; round < rounds; ++round) {
    for (int turn = 0; turn < 2; ++turn) {
      if ((turn == 0) == (round % 2 == 0)) {
        Remote empty = remote_at(fmt::format("round-{}", round));
        Clock::time_point start = Clock::now();
        PushReport pushed = check(empty.push(host_a, template_name), "push");
        push_ms.push_back(ms_since(start));
        if (pushed.bytes_sent != chain_bytes) fail("the push did not send the whole chain");
        Store empty_host = fresh_store("throughput");
        start = Clock::now();
        PullReport pulled = check(empty.pull(empty_host, template_name), "pull");
        pull_ms.push_back(ms_since(start));
        fetch_ms.push_back(pulled.import.fetch_ms);
      } else {
        std::string url = fmt::format("{}/{}/curl-{}", endpoint, bucket, round);
        curl_put_ms.push_back(curl.transfer(fmt::format("-T {} {}", blob.string(), url)));
        curl_get_ms.push_back(curl.transfer(fmt::format("-o /dev/null {}", url)));
      }
    }
  }

  double cold = median(cold_ms), warm = median(warm_ms), fetched = median(fetched_bytes);
  auto mib_per_s = [&](double ms) { return static_cast<double>(chain_bytes) / (1 << 20) / (ms / 1000); };
  double push_rate = mib_per_s(median(push_ms)), pull_rate = mib_per_s(median(pull_ms));
  double fetch_rate = mib_per_s(median(fetch_ms));
  double curl_put_rate = mib_per_s(median(curl_put_ms)), curl_get_rate = mib_per_s(median(curl_get_ms));
  fmt::print("{} (depth {}, {} MiB) across hosts through {} ({} rounds, medians)\n", template_name, chain.size() - 1,
             image.size() >> 20, endpoint, rounds);
  fmt::print("  run, host holding {}:   {:8.1f} ms  (fetch + verify + load + first answer)\n", base_name, cold);
  fmt::print("  run, warm host:          {:8.1f} ms  -> cold/warm {:.2f}\n", warm, cold / warm);
  fmt::print("  run, empty host:         {:8.1f} ms  -> {:.2f}x warm\n", median(empty_ms), median(empty_ms) / warm);
  fmt::print("  bytes fetched:           {:8.0f}     vs zstd of the whole image {} -> {:.4f}\n", fetched, zstd_bytes,
             fetched / static_cast<double>(zstd_bytes));
  fmt::print("  push {:.1f} MiB: {:7.1f} MiB/s  vs curl PUT {:7.1f} MiB/s -> {:.2f}\n",
             static_cast<double>(chain_bytes) / (1 << 20), push_rate, curl_put_rate, push_rate / curl_put_rate);
  fmt::print(
      "  pull {:.1f} MiB: {:7.1f} MiB/s  vs curl GET {:7.1f} MiB/s -> {:.2f} (fetch, then verify: the chain rebuilt)\n",
      static_cast<double>(chain_bytes) / (1 << 20), pull_rate, curl_get_rate, pull_rate / curl_get_rate);
  fmt::print("    of which the fetch: {:7.1f} MiB/s  vs curl GET -> {:.2f} (transfers, checks against ids, fsyncs)\n",
             fetch_rate, fetch_rate / curl_get_rate);
  if (json) {
    nlohmann::json report = {{"template", template_name},
                             {"depth", chain.size() - 1},
                             {"rounds", rounds},
                             {"cold_run_ms", cold},
                             {"warm_run_ms", warm},
                             {"cold_over_warm", cold / warm},
                             {"empty_host_run_ms", median(empty_ms)},
                             {"fetched_bytes", fetched},
                             {"zstd_image_bytes", zstd_bytes},
                             {"fetched_over_zstd", fetched / static_cast<double>(zstd_bytes)},
                             {"chain_bytes", chain_bytes},
                             {"push_mib_s", push_rate},
                             {"curl_put_mib_s", curl_put_rate},
                             {"pull_mib_s", pull_rate},
                             {"curl_get_mib_s", curl_get_rate},
                             {"fetch_mib_s", fetch_rate},
                             {"fetch_ms_all", fetch_ms},
                             {"cold_run_ms_all", cold_ms},
                             {"warm_run_ms_all", warm_ms},
                             {"push_ms_all", push_ms},
                             {"pull_ms_all", pull_ms},
                             {"curl_put_ms_all", curl_put_ms},
                             {"curl_get_ms_all", curl_get_ms}};
    fmt::print("{}\n", report.dump(2));
  }
  std::filesystem::remove_all(scratch);
  return 0;
}
