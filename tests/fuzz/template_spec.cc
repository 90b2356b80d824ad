// libFuzzer target: the template spec parser (src/templates/spec.h), fed hostile spec files.
// Paths in a spec are only looked at (stat), never opened. Whatever the text, parsing refuses
// it or yields a spec whose canonical JSON parses to the same spec.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "templates/spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  // An absolute origin, so that relative paths resolve to absolute ones and the canonical
  // JSON parses the same from anywhere.
  const std::filesystem::path origin = "/fuzz/spec.json";
  deltavm::Result<deltavm::TemplateSpec> spec = deltavm::parse_template_spec(text, origin);
  if (!spec) return 0;
  if (spec->name.empty() || spec->name.size() > 64 || spec->memory_mib > deltavm::kMaxTemplateMemoryMib) {
    __builtin_trap();
  }
  std::string canonical = spec->to_json();
  deltavm::Result<deltavm::TemplateSpec> again = deltavm::parse_template_spec(canonical, origin);
  if (!again || again->to_json() != canonical) __builtin_trap();
  return 0;
}
