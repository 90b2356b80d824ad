#include "service/config.h"

#include <unistd.h>

#include <algorithm>
#include <thread>

#include "base/file.h"
#include "base/json_fields.h"

namespace deltavm {

namespace {
constexpr size_t kMaxConfigBytes = 1 << 20;
}  // namespace

ServiceConfig default_service_config() {
  ServiceConfig config;
  long pages = ::sysconf(_SC_PHYS_PAGES);
  long page_size = ::sysconf(_SC_PAGESIZE);
  config.max_memory_bytes =
      pages > 0 && page_size > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size) : uint64_t{4} << 30;
  config.max_concurrent_loads = std::max<uint64_t>(2, std::thread::hardware_concurrency());
  return config;
}

Result<ServiceConfig> parse_service_config(std::string_view json_text, const std::string& origin) {
  nlohmann::json document = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded() || !document.is_object()) {
    return make_error(ErrorCode::kInvalidArgument, "{}: not a JSON object", origin);
  }
  ServiceConfig config = default_service_config();
  JsonFields fields(document, origin, ErrorCode::kInvalidArgument);
  DELTAVM_TRY(fields.unsigned_integer("max_vms", config.max_vms, false, 100000));
  std::optional<uint64_t> memory_mib;
  DELTAVM_TRY(fields.unsigned_integer("max_memory_mib", memory_mib, uint64_t{1} << 30));
  if (memory_mib) config.max_memory_bytes = *memory_mib << 20;
  DELTAVM_TRY(fields.unsigned_integer("max_concurrent_loads", config.max_concurrent_loads, false, kMaxConcurrentLoads));
  if (config.max_concurrent_loads == 0) {
    return make_error(ErrorCode::kInvalidArgument, "{}: field max_concurrent_loads must be from 1 to {}, found 0",
                      origin, kMaxConcurrentLoads);
  }
  DELTAVM_TRY(fields.unsigned_integer("max_ttl_seconds", config.max_ttl_seconds, false, uint64_t{365} * 24 * 3600));
  DELTAVM_TRY(
      fields.unsigned_integer("default_ttl_seconds", config.default_ttl_seconds, false, config.max_ttl_seconds));
  DELTAVM_TRY(fields.boolean("auto_pause", config.auto_pause));
  uint64_t max_chain_depth = config.max_chain_depth;
  DELTAVM_TRY(fields.unsigned_integer("max_chain_depth", max_chain_depth, false, 1024));
  config.max_chain_depth = static_cast<uint32_t>(max_chain_depth);
  DELTAVM_ASSIGN_OR_RETURN(const nlohmann::json* pools, fields.object("pools"));
  if (pools != nullptr) {
    for (const auto& [name, size] : pools->items()) {
      if (!size.is_number_unsigned() || size.get<uint64_t>() > kMaxPoolSize) {
        return make_error(ErrorCode::kInvalidArgument, "{}: field pools.{} must be an integer from 0 to {}, found {}",
                          origin, name, kMaxPoolSize, dump_json(size));
      }
      config.pools[name] = size.get<uint64_t>();
    }
  }
  DELTAVM_TRY(fields.no_other_fields());
  return config;
}

Result<ServiceConfig> read_service_config(const std::filesystem::path& path) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(path, kMaxConfigBytes));
  return parse_service_config(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                              path.string());
}

}  // namespace deltavm
