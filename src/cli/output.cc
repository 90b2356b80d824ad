#include "cli/output.h"

#include "base/file.h"
#include "base/progress.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cerrno>

#include <algorithm>
#include <cctype>
#include <cstdio>

namespace deltavm::cli {
namespace {

bool looks_numeric(const std::string& cell) {
  return !cell.empty() && (std::isdigit(static_cast<unsigned char>(cell[0])) || cell[0] == '-');
}

}  // namespace

void Table::print() const {
  std::vector<size_t> widths(headers_.size());
  std::vector<bool> numeric(headers_.size(), kind_ == Kind::kRows);
  for (size_t c = 0; c < headers_.size(); ++c) widths[c] = headers_[c].size();
  for (const auto& row : rows_) {
    for (size_t c = 0; c < row.size() && c < widths.size(); ++c) {
      widths[c] = std::max(widths[c], row[c].size());
      if (!looks_numeric(row[c])) numeric[c] = false;
    }
  }
  auto print_row = [&](const std::vector<std::string>& cells) {
    std::string line;
    for (size_t c = 0; c < headers_.size(); ++c) {
      const std::string cell = c < cells.size() ? cells[c] : "";
      if (c > 0) line += "  ";
      if (numeric[c] && !rows_.empty())
        line += fmt::format("{:>{}}", cell, widths[c]);
      else
        line += fmt::format("{:<{}}", cell, widths[c]);
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    fmt::print("{}\n", line);
  };
  print_row(headers_);
  for (const auto& row : rows_) print_row(row);
}

std::string human_bytes(uint64_t bytes) {
  if (bytes < 1024) return fmt::format("{} B", bytes);
  const char* units[] = {"KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes) / 1024;
  int unit = 0;
  while (value >= 1024 && unit < 3) {
    value /= 1024;
    ++unit;
  }
  return fmt::format("{:.1f} {}", value, units[unit]);
}

std::string human_duration_ms(double milliseconds) {
  if (milliseconds < 1) return fmt::format("{:.0f} us", milliseconds * 1000);
  if (milliseconds < 1000) return fmt::format("{:.1f} ms", milliseconds);
  return fmt::format("{:.2f} s", milliseconds / 1000);
}

Status check_output_file(const std::string& output, const std::vector<std::string>& inputs) {
  struct stat out {};
  if (::stat(output.c_str(), &out) != 0) {
    if (errno == ENOENT) return {};
    return errno_error(fmt::format("output {}", output), errno);
  }
  if (!S_ISREG(out.st_mode)) {
    const char* kind = S_ISDIR(out.st_mode)    ? "a directory"
                       : S_ISCHR(out.st_mode)  ? "a character device"
                       : S_ISBLK(out.st_mode)  ? "a block device"
                       : S_ISFIFO(out.st_mode) ? "a FIFO"
                       : S_ISSOCK(out.st_mode) ? "a socket"
                                               : "not a regular file";
    return make_error(ErrorCode::kInvalidArgument, "output {} is {}; refusing to replace it (give a regular file)",
                      output, kind);
  }
  for (const std::string& input : inputs) {
    struct stat in {};
    if (::stat(input.c_str(), &in) == 0 && in.st_dev == out.st_dev && in.st_ino == out.st_ino) {
      return make_error(ErrorCode::kInvalidArgument, "output {} is the input {}; refusing to overwrite an input",
                        output, input);
    }
  }
  return {};
}

Status write_image_file(const std::string& path, std::span<const uint8_t> bytes, bool quiet) {
  DELTAVM_ASSIGN_OR_RETURN(AtomicFileWriter writer, AtomicFileWriter::create(path));
  Progress progress("writing " + path, bytes.size(), !quiet);
  constexpr size_t kChunk = 16 << 20;
  for (size_t offset = 0; offset < bytes.size(); offset += kChunk) {
    DELTAVM_TRY(writer.append(bytes.subspan(offset, std::min(kChunk, bytes.size() - offset))));
    progress.update(offset);
  }
  return writer.commit();
}

void print_json(const nlohmann::json& value) {
  // Bytes that are not UTF-8 (a guest's output) are replaced, never a reason to throw.
  fmt::print("{}\n", value.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
}

int report_error(const Error& error) {
  fmt::print(stderr, "deltavm: {}: {}\n", error_code_name(error.code), error.message);
  return error.code == ErrorCode::kInvalidArgument ? 2 : 1;
}

}  // namespace deltavm::cli
