// deltavm image diff | apply | inspect | verify
#include <chrono>
#include <cstring>

#include "base/file.h"
#include "base/progress.h"
#include "cli/commands.h"
#include "image/delta_file.h"

namespace deltavm::cli {
namespace {

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

nlohmann::json stats_json(const DeltaStats& stats) {
  return {{"zero_pages", stats.zero_pages},
          {"run_pages", stats.run_pages},
          {"full_pages", stats.full_pages},
          {"runs", stats.runs},
          {"data_bytes", stats.data_bytes}};
}

void print_stats_table(const Delta& delta, uint64_t file_bytes) {
  DeltaStats stats = delta.stats();
  Table table({"field", "value"}, Table::Kind::kFieldValue);
  table.add_row({"image size", human_bytes(delta.image_size_bytes)});
  table.add_row({"pages changed", fmt::format("{} of {}", delta.edits.size(), page_count(delta.image_size_bytes))});
  table.add_row({"  zero pages", std::to_string(stats.zero_pages)});
  table.add_row({"  run pages", fmt::format("{} ({} runs)", stats.run_pages, stats.runs)});
  table.add_row({"  whole pages", std::to_string(stats.full_pages)});
  table.add_row({"page bytes", human_bytes(stats.data_bytes)});
  table.add_row({"delta size", human_bytes(file_bytes)});
  table.add_row({"base digest", delta.base_digest ? delta.base_digest->hex() : "(not recorded)"});
  table.add_row({"target digest", delta.target_digest ? delta.target_digest->hex() : "(not recorded)"});
  table.print();
}

Status run_diff(const GlobalOptions& options, const std::string& base_path, const std::string& target_path,
                const std::string& output_path, const std::string& dirty_path, int level) {
  auto start = Clock::now();
  DELTAVM_TRY(check_output_file(output_path, {base_path, target_path, dirty_path}));
  DELTAVM_ASSIGN_OR_RETURN(Mapping base, Mapping::map_file_readonly(base_path));
  DELTAVM_ASSIGN_OR_RETURN(Mapping target, Mapping::map_file_readonly(target_path));
  DELTAVM_TRY(check_image_size(base.size(), base_path));
  DELTAVM_TRY(check_image_size(target.size(), target_path));
  if (base.size() != target.size()) {
    return make_error(ErrorCode::kInvalidArgument, "{} is {} bytes but {} is {} bytes; images must be the same size",
                      base_path, base.size(), target_path, target.size());
  }
  DiffOptions diff_options;
  Delta delta_storage;
  DirtyBitmap dirty;
  if (!dirty_path.empty()) {
    DELTAVM_ASSIGN_OR_RETURN(dirty, DirtyBitmap::read_file(dirty_path, page_count(base.size())));
    diff_options.dirty = &dirty;
  }
  {
    Progress progress("comparing " + target_path, page_count(base.size()), !options.json);
    diff_options.progress = [&progress](uint64_t done, uint64_t) { progress.update(done); };
    DELTAVM_ASSIGN_OR_RETURN(Delta computed, diff(base.bytes(), target.bytes(), diff_options));
    diff_options.progress = nullptr;
    delta_storage = std::move(computed);
  }
  Delta& delta = delta_storage;
  std::vector<uint8_t> encoded = encode_delta(delta, level);
  DELTAVM_TRY(write_file_atomic(output_path, encoded));
  double total_ms = elapsed_ms(start);
  if (options.json) {
    print_json({{"delta", output_path},
                {"image_size_bytes", delta.image_size_bytes},
                {"pages_changed", delta.edits.size()},
                {"delta_bytes", encoded.size()},
                {"stats", stats_json(delta.stats())},
                {"elapsed_ms", total_ms}});
  } else {
    print_stats_table(delta, encoded.size());
    fmt::print("wrote {} in {}\n", output_path, human_duration_ms(total_ms));
  }
  return {};
}

Status run_apply(const GlobalOptions& options, const std::string& base_path,
                 const std::vector<std::string>& delta_paths, const std::string& output_path) {
  auto start = Clock::now();
  std::vector<std::string> inputs = delta_paths;
  inputs.push_back(base_path);
  DELTAVM_TRY(check_output_file(output_path, inputs));
  DELTAVM_ASSIGN_OR_RETURN(Mapping base, Mapping::map_file_readonly(base_path));
  std::vector<Delta> deltas;
  for (const std::string& path : delta_paths) {
    DELTAVM_ASSIGN_OR_RETURN(Delta delta, read_delta_file(path));
    if (delta.image_size_bytes != base.size()) {
      return make_error(ErrorCode::kInvalidArgument, "{} is for {}-byte images but {} is {} bytes", path,
                        delta.image_size_bytes, base_path, base.size());
    }
    if (!deltas.empty() && deltas.back().target_digest && delta.base_digest &&
        *deltas.back().target_digest != *delta.base_digest) {
      return make_error(ErrorCode::kInvalidArgument,
                        "{} applies to image {}, but the delta before it produces image {}", path,
                        delta.base_digest->hex(), deltas.back().target_digest->hex());
    }
    deltas.push_back(std::move(delta));
  }
  if (!deltas.empty() && deltas.front().base_digest) {
    ImageDigest base_digest = digest_image(base.bytes());
    if (base_digest != *deltas.front().base_digest) {
      return make_error(ErrorCode::kInvalidArgument, "{} applies to image {}, but {} is image {}", delta_paths.front(),
                        deltas.front().base_digest->hex(), base_path, base_digest.hex());
    }
  }
  DELTAVM_ASSIGN_OR_RETURN(Mapping memory, Mapping::map_anonymous(base.size()));
  std::memcpy(memory.writable_bytes().data(), base.bytes().data(), base.size());
  for (const Delta& delta : deltas) DELTAVM_TRY(apply_delta(delta, memory.writable_bytes()));
  ImageDigest result = digest_image(memory.bytes());
  // The last delta that recorded its target vouches for the result only if no later delta
  // changed it; with every delta recording digests, that is the last one.
  if (!deltas.empty() && deltas.back().target_digest && result != *deltas.back().target_digest) {
    return make_error(ErrorCode::kCorruption, "result has digest {} but {} promises {}", result.hex(),
                      delta_paths.back(), deltas.back().target_digest->hex());
  }
  DELTAVM_TRY(write_image_file(output_path, memory.bytes(), options.json));
  double total_ms = elapsed_ms(start);
  if (options.json) {
    print_json({{"image", output_path},
                {"image_size_bytes", memory.size()},
                {"deltas", delta_paths.size()},
                {"digest", result.hex()},
                {"elapsed_ms", total_ms}});
  } else {
    fmt::print("wrote {} ({}, digest {}) from {} and {} delta(s) in {}\n", output_path, human_bytes(memory.size()),
               result.hex(), base_path, delta_paths.size(), human_duration_ms(total_ms));
  }
  return {};
}

Status run_inspect(const GlobalOptions& options, const std::string& path) {
  DELTAVM_ASSIGN_OR_RETURN(Mapping file, Mapping::map_file_readonly(path));
  if (looks_like_delta(file.bytes())) {
    DELTAVM_ASSIGN_OR_RETURN(DeltaFileInfo info, inspect_delta(file.bytes(), path));
    DELTAVM_ASSIGN_OR_RETURN(Delta delta, decode_delta(file.bytes(), path));
    if (options.json) {
      nlohmann::json sections = nlohmann::json::array();
      for (const auto& section : info.sections) {
        sections.push_back(
            {{"name", section.name}, {"raw_bytes", section.raw_bytes}, {"stored_bytes", section.stored_bytes}});
      }
      print_json(
          {{"kind", "delta"},
           {"file", path},
           {"version", info.version},
           {"file_bytes", info.file_bytes},
           {"image_size_bytes", delta.image_size_bytes},
           {"pages_changed", delta.edits.size()},
           {"stats", stats_json(delta.stats())},
           {"base_digest", delta.base_digest ? nlohmann::json(delta.base_digest->hex()) : nlohmann::json()},
           {"target_digest", delta.target_digest ? nlohmann::json(delta.target_digest->hex()) : nlohmann::json()},
           {"sections", sections}});
      return {};
    }
    fmt::print("{}: deltavm delta, format version {}\n", path, info.version);
    print_stats_table(delta, info.file_bytes);
    Table sections({"section", "raw", "stored"});
    for (const auto& section : info.sections) {
      sections.add_row({section.name, human_bytes(section.raw_bytes), human_bytes(section.stored_bytes)});
    }
    sections.print();
    return {};
  }
  DELTAVM_TRY(check_image_size(file.size(), path));
  uint64_t zero_pages = 0;
  for (uint64_t page = 0; page < page_count(file.size()); ++page) {
    if (is_zero_page(file.bytes().data() + page * kPageSize)) ++zero_pages;
  }
  ImageDigest digest = digest_image(file.bytes());
  if (options.json) {
    print_json({{"kind", "image"},
                {"file", path},
                {"image_size_bytes", file.size()},
                {"pages", page_count(file.size())},
                {"zero_pages", zero_pages},
                {"digest", digest.hex()}});
    return {};
  }
  fmt::print("{}: raw RAM image\n", path);
  Table table({"field", "value"}, Table::Kind::kFieldValue);
  table.add_row({"size", human_bytes(file.size())});
  table.add_row({"pages", std::to_string(page_count(file.size()))});
  table.add_row({"zero pages", std::to_string(zero_pages)});
  table.add_row({"digest", digest.hex()});
  table.print();
  return {};
}

Status run_verify(const GlobalOptions& options, const std::string& path) {
  DELTAVM_ASSIGN_OR_RETURN(Mapping file, Mapping::map_file_readonly(path));
  if (!looks_like_delta(file.bytes())) {
    return make_error(ErrorCode::kCorruption, "{}: bad magic: not a deltavm delta file", path);
  }
  DELTAVM_ASSIGN_OR_RETURN(Delta delta, decode_delta(file.bytes(), path));
  if (options.json) {
    print_json({{"file", path}, {"ok", true}, {"pages_changed", delta.edits.size()}});
  } else {
    fmt::print("{}: ok (header, 2 sections and {} page edits verified)\n", path, delta.edits.size());
  }
  return {};
}

}  // namespace

void add_image_commands(CLI::App& app, const GlobalOptions& options, int& exit_status) {
  CLI::App* image = app.add_subcommand("image", "Diff, apply and check guest RAM images and deltas");
  image->require_subcommand(1);
  auto finish = [&exit_status](const Status& status) { exit_status = status ? 0 : report_error(status.error()); };

  struct DiffArguments {
    std::string base, target, output, dirty;
    int level = kDefaultDeltaCompressionLevel;
  };
  auto diff_arguments = std::make_shared<DiffArguments>();
  CLI::App* diff_command = image->add_subcommand("diff", "Write the delta that turns BASE into TARGET");
  diff_command->add_option("BASE", diff_arguments->base, "Base RAM image")->required()->check(CLI::ExistingFile);
  diff_command->add_option("TARGET", diff_arguments->target, "Target RAM image")->required()->check(CLI::ExistingFile);
  diff_command->add_option("-o,--output", diff_arguments->output, "Delta file to write")->required();
  diff_command
      ->add_option("--dirty", diff_arguments->dirty, "Dirty bitmap (one bit per page): compare only these pages")
      ->check(CLI::ExistingFile);
  diff_command->add_option("--level", diff_arguments->level, "zstd compression level")->check(CLI::Range(1, 22));
  diff_command->callback([&options, diff_arguments, finish] {
    finish(run_diff(options, diff_arguments->base, diff_arguments->target, diff_arguments->output,
                    diff_arguments->dirty, diff_arguments->level));
  });

  struct ApplyArguments {
    std::string base, output;
    std::vector<std::string> deltas;
  };
  auto apply_arguments = std::make_shared<ApplyArguments>();
  CLI::App* apply_command = image->add_subcommand("apply", "Apply a chain of deltas to BASE");
  apply_command->add_option("BASE", apply_arguments->base, "Base RAM image")->required()->check(CLI::ExistingFile);
  apply_command->add_option("DELTA", apply_arguments->deltas, "Deltas, applied in order")
      ->required()
      ->check(CLI::ExistingFile);
  apply_command->add_option("-o,--output", apply_arguments->output, "Image file to write")->required();
  apply_command->callback([&options, apply_arguments, finish] {
    finish(run_apply(options, apply_arguments->base, apply_arguments->deltas, apply_arguments->output));
  });

  auto inspect_path = std::make_shared<std::string>();
  CLI::App* inspect_command = image->add_subcommand("inspect", "Describe a delta file or a raw RAM image");
  inspect_command->add_option("FILE", *inspect_path)->required()->check(CLI::ExistingFile);
  inspect_command->callback([&options, inspect_path, finish] { finish(run_inspect(options, *inspect_path)); });

  auto verify_path = std::make_shared<std::string>();
  CLI::App* verify_command = image->add_subcommand("verify", "Check every checksum, length and offset of a delta file");
  verify_command->add_option("FILE", *verify_path)->required()->check(CLI::ExistingFile);
  verify_command->callback([&options, verify_path, finish] { finish(run_verify(options, *verify_path)); });
}

}  // namespace deltavm::cli
