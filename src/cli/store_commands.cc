// deltavm store ls | put | get | rm | verify | gc | fsck
#include <fmt/ranges.h>

#include <ctime>

#include "base/progress.h"
#include "cli/commands.h"
#include "store/store.h"
#include "templates/kernel_image.h"
#include "templates/templates.h"

namespace deltavm::cli {
namespace {

nlohmann::json object_ids(const std::vector<ObjectId>& ids) {
  nlohmann::json out = nlohmann::json::array();
  for (const ObjectId& id : ids) out.push_back(id.hex());
  return out;
}

nlohmann::json record_json(const ImageRecord& record) {
  return {{"name", record.name},
          {"parent", record.parent ? nlohmann::json(*record.parent) : nlohmann::json()},
          {"chain_depth", record.chain_depth},
          {"object_id", record.object_id.hex()},
          {"image_size_bytes", record.image_size_bytes},
          {"stored_size_bytes", record.stored_size_bytes},
          {"digest", record.digest.hex()},
          {"created_at_unix", record.created_at_unix}};
}

std::string format_time(int64_t unix_seconds) {
  std::time_t time = unix_seconds;
  std::tm utc{};
  gmtime_r(&time, &utc);
  char buffer[32];
  std::strftime(buffer, sizeof buffer, "%Y-%m-%d %H:%M:%S", &utc);
  return buffer;
}

Status run_ls(const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, store.list());
  if (options.json) {
    nlohmann::json images = nlohmann::json::array();
    for (const auto& record : records) images.push_back(record_json(record));
    print_json({{"store", store.directory().string()}, {"images", images}});
    return {};
  }
  Table table({"name", "parent", "depth", "image", "stored", "ratio", "created (UTC)"});
  uint64_t total_image = 0, total_stored = 0;
  for (const auto& record : records) {
    total_image += record.image_size_bytes;
    total_stored += record.stored_size_bytes;
    double ratio = record.image_size_bytes == 0 ? 0 : 100.0 * record.stored_size_bytes / record.image_size_bytes;
    table.add_row({record.name, record.parent.value_or("-"), std::to_string(record.chain_depth),
                   human_bytes(record.image_size_bytes), human_bytes(record.stored_size_bytes),
                   fmt::format("{:.2f}%", ratio), format_time(record.created_at_unix)});
  }
  table.print();
  fmt::print("{} image(s): {} stored for {} of images\n", records.size(), human_bytes(total_stored),
             human_bytes(total_image));
  return {};
}

Status run_put(const GlobalOptions& options, const std::string& name, const std::string& path,
               const std::string& parent) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options, StoreAccess::kCreate));
  DELTAVM_ASSIGN_OR_RETURN(Mapping image, Mapping::map_file_readonly(path));
  std::optional<std::string> parent_name;
  if (!parent.empty()) parent_name = parent;
  std::optional<Progress> progress(std::in_place, "storing " + name, page_count(image.size()), !options.json);
  PutOptions put_options;
  put_options.progress = [&progress](uint64_t done, uint64_t) { progress->update(done); };
  if (!parent_name) put_options.encoding.merge_gap_bytes = kBaseImageMergeGapBytes;
  DELTAVM_ASSIGN_OR_RETURN(ImageRecord record, store.put_image(name, image.bytes(), parent_name, put_options));
  progress.reset();  // Finishes the progress line before the result is printed.
  if (options.json) {
    print_json(record_json(record));
  } else {
    fmt::print("stored {} ({} as {}, chain depth {}, object {})\n", record.name, human_bytes(record.image_size_bytes),
               human_bytes(record.stored_size_bytes), record.chain_depth, record.object_id);
  }
  return {};
}

Status run_get(const GlobalOptions& options, const std::string& name, const std::string& output) {
  DELTAVM_TRY(check_output_file(output, {}));
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(Mapping image, store.get_image(name));
  DELTAVM_TRY(write_image_file(output, image.bytes(), options.json));
  if (options.json)
    print_json({{"name", name}, {"output", output}, {"image_size_bytes", image.size()}});
  else
    fmt::print("wrote {} ({})\n", output, human_bytes(image.size()));
  return {};
}

Status run_rm(const GlobalOptions& options, const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_TRY(store.remove_image(name));
  if (options.json)
    print_json({{"removed", name}});
  else
    fmt::print("removed {} (its object is freed by the next gc)\n", name);
  return {};
}

Status run_verify(const GlobalOptions& options, const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> chain, store.chain(name));
  DELTAVM_ASSIGN_OR_RETURN(Mapping image, store.get_image(name));
  if (options.json) {
    print_json({{"name", name}, {"ok", true}, {"chain_length", chain.size()}, {"digest", chain.back().digest.hex()}});
  } else {
    fmt::print("{}: ok (chain of {} object(s) verified, image digest {})\n", name, chain.size(), chain.back().digest);
  }
  return {};
}

// Enforces the cache's bound, with the templates of this runtime's VMs pinned; says what went.
Result<EvictReport> evict(const GlobalOptions& options, Store& store) {
  DELTAVM_ASSIGN_OR_RETURN(EvictReport report, evict_unused_cache(store, runtime_directory(options)));
  if (!report.evicted.empty() && !options.json) {
    fmt::print(stderr, "cache: evicted {} (least recently used, {} -> {} of a {} limit)\n",
               fmt::join(report.evicted, ", "), human_bytes(report.cached_bytes_before),
               human_bytes(report.cached_bytes_after), human_bytes(report.limit_bytes.value_or(0)));
  }
  return report;
}

Status run_gc(const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(EvictReport evicted, evict(options, store));
  DELTAVM_ASSIGN_OR_RETURN(GcReport report, store.gc());
  report.objects_removed += evicted.collected.objects_removed;
  report.bytes_freed += evicted.collected.bytes_freed;
  if (options.json) {
    print_json({{"evicted", evicted.evicted},
                {"objects_removed", report.objects_removed},
                {"temporaries_removed", report.temporaries_removed},
                {"bytes_freed", report.bytes_freed}});
  } else {
    fmt::print("removed {} unreferenced object(s) and {} temporary file(s), freed {}\n", report.objects_removed,
               report.temporaries_removed, human_bytes(report.bytes_freed));
  }
  return {};
}

// Returns the exit status: 0 when the store is clean, 1 when fsck found corruption.
Result<int> run_fsck(const GlobalOptions& options) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  DELTAVM_ASSIGN_OR_RETURN(FsckReport report, store.fsck());
  if (options.json) {
    print_json({{"clean", report.clean()},
                {"images_checked", report.images_checked},
                {"objects_checked", report.objects_checked},
                {"problems", report.problems},
                {"unreferenced_objects", object_ids(report.unreferenced)},
                {"temporaries", report.temporaries}});
  } else {
    fmt::print("checked {} image(s) and {} object(s) in {}\n", report.images_checked, report.objects_checked,
               store.directory().string());
    for (const auto& id : report.unreferenced) fmt::print("unreferenced object {} (gc removes it)\n", id);
    for (const auto& path : report.temporaries) fmt::print("leftover temporary {} (gc removes it)\n", path);
    for (const auto& problem : report.problems) fmt::print(stderr, "problem: {}\n", problem);
    fmt::print("{}\n", report.clean() ? "clean" : fmt::format("NOT CLEAN: {} problem(s)", report.problems.size()));
  }
  if (!options.json) {
    DELTAVM_ASSIGN_OR_RETURN(std::vector<CachedImage> cached, store.cached_images());
    DELTAVM_ASSIGN_OR_RETURN(uint64_t cached_bytes, store.cached_bytes());
    DELTAVM_ASSIGN_OR_RETURN(std::optional<uint64_t> limit, store.cache_limit());
    fmt::print("cache: {} fetched image(s) using {}, limit {}{}\n", cached.size(), human_bytes(cached_bytes),
               limit ? human_bytes(*limit) : "none",
               limit && cached_bytes > *limit ? " (over: gc evicts what nothing needs)" : "");
  }
  return report.clean() ? 0 : 1;
}

Status run_cache(const GlobalOptions& options, const std::optional<uint64_t>& limit, bool no_limit) {
  DELTAVM_ASSIGN_OR_RETURN(Store store, open_store(options));
  if (limit || no_limit) DELTAVM_TRY(store.set_cache_limit(no_limit ? std::nullopt : limit));
  DELTAVM_ASSIGN_OR_RETURN(EvictReport evicted, evict(options, store));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<CachedImage> cached, store.cached_images());
  DELTAVM_ASSIGN_OR_RETURN(uint64_t cached_bytes, store.cached_bytes());
  DELTAVM_ASSIGN_OR_RETURN(std::optional<uint64_t> current, store.cache_limit());
  if (options.json) {
    nlohmann::json images = nlohmann::json::array();
    for (const CachedImage& image : cached) {
      images.push_back({{"name", image.name}, {"remote", image.remote}, {"last_used_unix", image.last_used_unix}});
    }
    print_json({{"limit_bytes", current ? nlohmann::json(*current) : nlohmann::json()},
                {"cached_bytes", cached_bytes},
                {"images", images},
                {"evicted", evicted.evicted}});
    return {};
  }
  fmt::print("fetched images use {} of {}\n", human_bytes(cached_bytes),
             current ? "a " + human_bytes(*current) + " limit" : "no limit");
  Table table({"image", "remote", "last used (UTC)"});
  for (const CachedImage& image : cached) table.add_row({image.name, image.remote, format_time(image.last_used_unix)});
  table.print();
  return {};
}

}  // namespace

Result<Store> open_store(const GlobalOptions& options, StoreAccess access) {
  std::filesystem::path directory =
      options.store_directory.empty() ? default_store_directory() : std::filesystem::path(options.store_directory);
  // Template bases are compressed against their kernel's text: the store needs that kind.
  return access == StoreAccess::kCreate ? Store::open_or_create(directory, template_reference_kinds())
                                        : Store::open(directory, template_reference_kinds());
}

void add_store_commands(CLI::App& app, const GlobalOptions& options, int& exit_status) {
  CLI::App* store = app.add_subcommand("store", "List, check and collect the image store");
  store->require_subcommand(1);
  auto finish = [&exit_status](const Status& status) { exit_status = status ? 0 : report_error(status.error()); };

  store->add_subcommand("ls", "List the stored images with their chains and sizes")->callback([&options, finish] {
    finish(run_ls(options));
  });

  struct PutArguments {
    std::string name, image, parent;
  };
  auto put = std::make_shared<PutArguments>();
  CLI::App* put_command = store->add_subcommand("put", "Store a raw RAM image, as a delta from --parent if given");
  put_command->add_option("NAME", put->name, "Name of the new image")->required();
  put_command->add_option("IMAGE", put->image, "Raw RAM image file")->required()->check(CLI::ExistingFile);
  put_command->add_option("--parent", put->parent, "Stored image to diff against");
  put_command->callback([&options, put, finish] { finish(run_put(options, put->name, put->image, put->parent)); });

  struct GetArguments {
    std::string name, output;
  };
  auto get = std::make_shared<GetArguments>();
  CLI::App* get_command = store->add_subcommand("get", "Rebuild a stored image into a raw file");
  get_command->add_option("NAME", get->name)->required();
  get_command->add_option("-o,--output", get->output, "Raw image file to write")->required();
  get_command->callback([&options, get, finish] { finish(run_get(options, get->name, get->output)); });

  auto rm_name = std::make_shared<std::string>();
  CLI::App* rm_command = store->add_subcommand("rm", "Remove an image that no other image depends on");
  rm_command->add_option("NAME", *rm_name)->required();
  rm_command->callback([&options, rm_name, finish] { finish(run_rm(options, *rm_name)); });

  auto verify_name = std::make_shared<std::string>();
  CLI::App* verify_command = store->add_subcommand("verify", "Rebuild an image and check every object and digest");
  verify_command->add_option("NAME", *verify_name)->required();
  verify_command->callback([&options, verify_name, finish] { finish(run_verify(options, *verify_name)); });

  struct CacheArguments {
    std::optional<uint64_t> limit;
    bool no_limit = false;
  };
  auto cache = std::make_shared<CacheArguments>();
  CLI::App* cache_command = store->add_subcommand(
      "cache", "Images fetched from remotes: their size, and the limit past which what nothing needs is evicted");
  cache_command->add_option("--limit", cache->limit, "Bytes fetched images may use (2GiB, 500MB, ...)")
      ->transform(CLI::AsSizeValue(false));
  cache_command->add_flag("--no-limit", cache->no_limit, "Remove the limit");
  cache_command->callback([&options, cache, finish] { finish(run_cache(options, cache->limit, cache->no_limit)); });

  store->add_subcommand("gc", "Evict past the cache limit, remove unreferenced objects and leftover temporaries")
      ->callback([&options, finish] { finish(run_gc(options)); });

  store->add_subcommand("fsck", "Check the catalog and every object; exit 1 on corruption")
      ->callback([&options, &exit_status] {
        Result<int> status = run_fsck(options);
        exit_status = status ? *status : report_error(status.error());
      });
}

}  // namespace deltavm::cli
