#include "templates/initramfs.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "base/file.h"

#ifndef DELTAVM_DEFAULT_KIT
#define DELTAVM_DEFAULT_KIT ""
#endif
#ifndef DELTAVM_DEFAULT_AGENT
#define DELTAVM_DEFAULT_AGENT ""
#endif

namespace deltavm {
namespace {

// A newc ("070701") cpio archive writer. Header fields are 8 hex digits each; names and data
// are padded to 4 bytes (see the kernel's Documentation/driver-api/early-userspace).
class CpioWriter {
 public:
  void directory(const std::string& path) { entry(path, 040755, {}); }
  void file(const std::string& path, uint32_t mode, std::span<const uint8_t> bytes) {
    entry(path, 0100000 | mode, bytes);
  }
  std::vector<uint8_t> finish() {
    entry("TRAILER!!!", 0, {});
    return std::move(out_);
  }

 private:
  void entry(const std::string& path, uint32_t mode, std::span<const uint8_t> bytes) {
    std::string name = path;
    uint32_t fields[13] = {next_inode_++,
                           mode,
                           0,
                           0,
                           (mode & 040000) ? 2u : 1u,
                           0,
                           static_cast<uint32_t>(bytes.size()),
                           0,
                           0,
                           0,
                           0,
                           static_cast<uint32_t>(name.size() + 1),
                           0};
    std::string header = "070701";
    for (uint32_t field : fields) header += fmt::format("{:08X}", field);
    out_.insert(out_.end(), header.begin(), header.end());
    out_.insert(out_.end(), name.begin(), name.end());
    out_.push_back(0);
    pad();
    out_.insert(out_.end(), bytes.begin(), bytes.end());
    pad();
  }
  void pad() {
    while (out_.size() % 4 != 0) out_.push_back(0);
  }
  std::vector<uint8_t> out_;
  uint32_t next_inode_ = 1;
};

}  // namespace

Result<GuestKit> GuestKit::locate() {
  const char* kit_env = std::getenv("DELTAVM_KIT");
  std::filesystem::path kit_directory = kit_env != nullptr && *kit_env ? kit_env : DELTAVM_DEFAULT_KIT;
  const char* agent_env = std::getenv("DELTAVM_AGENT");
  GuestKit kit{kit_directory / "vmlinuz", kit_directory / "busybox",
               agent_env != nullptr && *agent_env ? agent_env : DELTAVM_DEFAULT_AGENT};
  for (const auto& [what, path] : {std::pair{"kernel", kit.kernel}, {"busybox", kit.busybox}, {"agent", kit.agent}}) {
    std::error_code error;
    if (!std::filesystem::is_regular_file(path, error)) {
      return make_error(ErrorCode::kNotFound,
                        "guest kit: {} {} is missing (run scripts/guest-kit.sh, or set DELTAVM_KIT / DELTAVM_AGENT)",
                        what, path.string());
    }
  }
  return kit;
}

Result<std::vector<uint8_t>> build_initramfs(const TemplateSpec& spec, const GuestKit& kit) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> busybox, read_file(kit.busybox));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> agent, read_file(kit.agent));
  // Sorted by path, parents before children: the same spec always gives the same archive.
  std::map<std::string, std::pair<uint32_t, std::vector<uint8_t>>> files;
  files["init"] = {0755, std::vector<uint8_t>(kGuestInit, kGuestInit + std::strlen(kGuestInit))};
  files["bin/busybox"] = {0755, std::move(busybox)};
  files["bin/deltavm-agent"] = {0755, std::move(agent)};
  if (!spec.setup.empty()) {
    std::string script;
    for (const std::string& command : spec.setup) script += command + "\n";
    files["etc/deltavm/setup.sh"] = {0644, std::vector<uint8_t>(script.begin(), script.end())};
  }
  for (const TemplateFile& file : spec.files) {
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(file.source));
    files[file.destination.substr(1)] = {file.mode, std::move(bytes)};
  }
  std::set<std::string> directories = {"bin", "dev", "etc", "proc", "run", "sys", "tmp"};
  for (const auto& [path, content] : files) {
    for (size_t slash = path.find('/'); slash != std::string::npos; slash = path.find('/', slash + 1)) {
      directories.insert(path.substr(0, slash));
    }
  }
  CpioWriter cpio;
  for (const std::string& directory : directories) cpio.directory(directory);
  for (const auto& [path, content] : files) cpio.file(path, content.first, content.second);
  return cpio.finish();
}

}  // namespace deltavm
