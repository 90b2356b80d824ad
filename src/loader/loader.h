// The loader: builds a VM's RAM from a stored chain (base + deltas) and hands it to a backend.
//
// The base image is materialised once into an immutable flat file in the store's cache
// (verified against its digest when written); each VM maps it private, so no clone ever
// writes into it and nothing is copied up front. The deltas of the chain are squashed into
// one and only their pages are written into the clone's RAM before it starts.
#pragma once

#include <filesystem>
#include <string>

#include "backends/backend.h"
#include "base/file.h"
#include "image/delta.h"
#include "store/store.h"

namespace deltavm {

// How a clone's RAM is built.
enum class RamStrategy {
  kBasePlusDeltas,  // Base flat file mapped private + the chain's pages written over it.
  kFlatTarget,      // The whole target image materialised as its own flat file, mapped private.
};

const char* ram_strategy_name(RamStrategy strategy);
Result<RamStrategy> parse_ram_strategy(std::string_view name);

// RAM ready for a restore: the file to map private and the pages to write over it.
struct PreparedRam {
  std::filesystem::path flat_file;
  Mapping flat_mapping;  // The same file mapped here, to read base pages from.
  Delta overlay;         // Empty for kFlatTarget.
  double prepare_ms = 0;

  // Writes every page the overlay changes (base page + edit) through `writer`.
  Status fill(GuestMemoryWriter& writer) const;
};

class Loader {
 public:
  explicit Loader(Store& store) : store_(store) {}

  // The flat file holding image `record`, materialising it on first use.
  Result<std::filesystem::path> flat_file(const ImageRecord& record);

  Result<PreparedRam> prepare(const std::string& image_name, RamStrategy strategy);

 private:
  Store& store_;
};

}  // namespace deltavm
