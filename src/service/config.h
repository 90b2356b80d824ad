// The service's configuration (`deltavm serve --config FILE`): limits, lifetimes and warm pools.
// A JSON object; every field is optional and checked, and an error names the file and the
// field. docs/service.md shows an example.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>

#include "base/error.h"

namespace deltavm {

struct ServiceConfig {
  // At most this many VMs at once: running, starting, held in pools and being built.
  uint64_t max_vms = 64;
  // At most this much guest RAM for all of them together. Default: the host's RAM.
  uint64_t max_memory_bytes = 0;
  // The lifetime of a VM whose request names none (0: until it is deleted).
  uint64_t default_ttl_seconds = 0;
  uint64_t max_ttl_seconds = 7 * 24 * 3600;
  // VMs loaded at once (cold requests and pool refills); more wait for a turn. Loads beyond
  // the host's CPUs only share them, and each holds its chain's decoded deltas. Default: the
  // number of CPUs, at least 2.
  uint64_t max_concurrent_loads = 2;
  // A VM whose ttl expires is paused into the store (deltavm resume loads it back) instead
  // of stopped.
  bool auto_pause = false;
  // Snapshots deeper than this are stored against an ancestor (templates/snapshot.h); 0: no limit.
  uint32_t max_chain_depth = 8;
  // Warm pool size by template name.
  std::map<std::string, uint64_t> pools;
};

inline constexpr uint64_t kMaxPoolSize = 256;
inline constexpr uint64_t kMaxConcurrentLoads = 256;

// The defaults, with max_memory_bytes set to the host's RAM and max_concurrent_loads to its CPUs.
ServiceConfig default_service_config();
Result<ServiceConfig> parse_service_config(std::string_view json_text, const std::string& origin);
Result<ServiceConfig> read_service_config(const std::filesystem::path& path);

}  // namespace deltavm
