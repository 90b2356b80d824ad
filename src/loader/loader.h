// The loader: builds a VM's RAM from a stored chain (base + deltas) and hands it to a backend.
//
// The base image is materialised once into an immutable flat file in the store's cache
// (Store::flat_file: verified against its digest, sealed, checked at every use); each VM maps
// it private, so no clone ever
// writes into it and nothing is copied up front. Then, as the patent has it, the first set of
// differences is applied, then the second, and so on: for every page any delta of the chain
// changes, the base page is taken and each delta's edit of it applied in chain order, and only
// those pages are written into the clone's RAM before it starts.
#pragma once

#include <filesystem>
#include <span>
#include <string>
#include <vector>

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

// RAM ready for a restore: the file to map private, and the chain's deltas to write over it.
class PreparedRam {
 public:
  const std::filesystem::path& flat_file() const { return flat_file_; }
  double prepare_ms() const { return prepare_ms_; }

  // Reads and verifies the chain's deltas, then writes every page they change (base page +
  // each delta's edit in order) through `writer`. Runs while the backend starts its VM, so
  // the reading overlaps the VM's start-up; a delta that fails verification fails the load
  // before any vCPU runs.
  Status fill(GuestMemoryWriter& writer) const;

 private:
  friend class Loader;
  Store* store_ = nullptr;
  std::filesystem::path flat_file_;
  Mapping flat_mapping_;             // The flat file mapped here, to read base pages from.
  std::vector<ImageRecord> layers_;  // The chain after the flat file's image, in order.
  ImageDigest flat_digest_;
  double prepare_ms_ = 0;
};

class Loader {
 public:
  explicit Loader(Store& store) : store_(store) {}

  // RAM for the last image of `chain` (Store::chain: base first).
  Result<PreparedRam> prepare(std::span<const ImageRecord> chain, RamStrategy strategy);

 private:
  Store& store_;
};

}  // namespace deltavm
