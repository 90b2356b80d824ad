// Template specs: what to boot and how to prepare it before capture. A spec is a JSON file
// (docs/templates.md); every field is checked and an error names the file, the field, what
// was expected and what was found.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "base/error.h"

namespace deltavm {

struct TemplateFile {
  std::filesystem::path source;  // On the host; relative paths are relative to the spec file.
  std::string destination;       // Absolute path inside the guest.
  uint32_t mode = 0644;
};

struct TemplateSpec {
  std::string name;
  std::optional<std::string> parent;  // A template whose image this one is stored against.
  std::filesystem::path kernel;       // Empty: the guest kit's kernel.
  std::string command_line;           // Appended to the kernel command line deltavm sets.
  uint32_t memory_mib = 256;
  uint32_t vcpus = 1;
  std::vector<TemplateFile> files;
  std::vector<std::string> setup;  // Shell commands run by /init before the guest is ready.
  bool deterministic = true;       // nokaslr, norandmaps, a fixed clock: makes boots alike.
  uint32_t ready_timeout_s = 120;

  // The spec as canonical JSON: stored with the template, so a build can be reproduced.
  std::string to_json() const;
};

inline constexpr uint32_t kMaxTemplateMemoryMib = 3072;  // Below the PC's 32-bit PCI hole.
inline constexpr uint64_t kMaxTemplateSpecBytes = 1 << 20;

// A template name: 1 to 64 letters, digits, '-', '_' or '.'.
bool valid_template_name(const std::string& name);

Result<TemplateSpec> parse_template_spec(std::string_view json_text, const std::filesystem::path& origin);
Result<TemplateSpec> read_template_spec(const std::filesystem::path& path);

}  // namespace deltavm
