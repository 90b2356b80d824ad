// What the command prints: aligned tables for people, JSON for machines, one-line errors.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"

namespace deltavm::cli {

// Options every command shares.
struct GlobalOptions {
  bool json = false;
  std::string store_directory;    // Empty: default_store_directory().
  std::string runtime_directory;  // Empty: default_runtime_directory().
};

// A table printed with columns padded to their widest cell. Columns whose cells all start with
// a digit are right-aligned, unless the table is a field/value listing.
class Table {
 public:
  enum class Kind { kRows, kFieldValue };
  explicit Table(std::vector<std::string> headers, Kind kind = Kind::kRows)
      : headers_(std::move(headers)), kind_(kind) {}
  void add_row(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }
  void print() const;

 private:
  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
  Kind kind_;
};

// "1.5 MiB", "256.0 MiB", "812 B".
std::string human_bytes(uint64_t bytes);
std::string human_duration_ms(double milliseconds);

void print_json(const nlohmann::json& value);

// Checks that `output` may be written by replacing it: it does not exist yet, or it is a
// regular file that is none of `inputs` (compared by device and inode, so another name for an
// input is caught too). A device, a FIFO or a directory is never replaced.
Status check_output_file(const std::string& output, const std::vector<std::string>& inputs);

// Writes `bytes` crash-safely to `path`, showing progress unless `quiet`; the file appears
// only when complete.
Status write_image_file(const std::string& path, std::span<const uint8_t> bytes, bool quiet);

// Prints "deltavm: <kind>: <message>" on stderr and returns the exit status for it.
int report_error(const Error& error);

}  // namespace deltavm::cli
