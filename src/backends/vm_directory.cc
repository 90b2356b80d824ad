#include "backends/vm_directory.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <random>

#include "base/file.h"

namespace deltavm {

std::filesystem::path default_runtime_directory() {
  if (const char* runtime = std::getenv("DELTAVM_RUNTIME"); runtime != nullptr && *runtime) return runtime;
  if (::geteuid() == 0) return "/run/deltavm";
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg) {
    return std::filesystem::path(xdg) / "deltavm";
  }
  return fmt::format("/tmp/deltavm-{}", ::geteuid());
}

Result<VmDirectory> VmDirectory::create(const std::filesystem::path& runtime) {
  std::error_code error;
  std::filesystem::create_directories(runtime / "vms", error);
  if (error) return make_error(ErrorCode::kIo, "create {}: {}", (runtime / "vms").string(), error.message());
  std::mt19937_64 random{std::random_device{}()};
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::string id = fmt::format("{:08x}", static_cast<uint32_t>(random()));
    std::filesystem::path path = runtime / "vms" / id;
    if (std::filesystem::create_directory(path, error)) return VmDirectory(id, path);
    if (error) return make_error(ErrorCode::kIo, "create {}: {}", path.string(), error.message());
  }
  return make_error(ErrorCode::kIo, "could not find a free VM id under {}", runtime.string());
}

Result<VmDirectory> VmDirectory::open(const std::filesystem::path& runtime, const std::string& id) {
  bool valid = !id.empty() && id.size() <= 16 && id.find_first_not_of("0123456789abcdef") == std::string::npos;
  std::filesystem::path path = runtime / "vms" / id;
  if (!valid || !std::filesystem::is_directory(path)) {
    return make_error(ErrorCode::kNotFound, "no VM {} (see deltavm ps)", id);
  }
  return VmDirectory(id, path);
}

Result<std::vector<VmDirectory>> VmDirectory::list(const std::filesystem::path& runtime) {
  std::vector<VmDirectory> vms;
  std::error_code error;
  if (!std::filesystem::exists(runtime / "vms")) return vms;
  for (const auto& entry : std::filesystem::directory_iterator(runtime / "vms", error)) {
    if (entry.is_directory()) vms.push_back(VmDirectory(entry.path().filename().string(), entry.path()));
  }
  if (error) return make_error(ErrorCode::kIo, "list {}: {}", (runtime / "vms").string(), error.message());
  std::sort(vms.begin(), vms.end(), [](const VmDirectory& a, const VmDirectory& b) { return a.id_ < b.id_; });
  return vms;
}

Result<nlohmann::json> VmDirectory::read_record() const {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(path_ / "vm.json"));
  nlohmann::json record = nlohmann::json::parse(bytes.begin(), bytes.end(), nullptr, false);
  if (record.is_discarded() || !record.is_object()) {
    return make_error(ErrorCode::kCorruption, "{}: not a JSON object", (path_ / "vm.json").string());
  }
  return record;
}

Status VmDirectory::write_record(const nlohmann::json& record) const {
  // Readers see the old record or the new one (rename), never a partial one. No fsync: the
  // runtime directory describes processes, which do not survive a crash either.
  std::string text = record.dump(2) + "\n";
  std::filesystem::path temporary = path_ / "vm.json.tmp";
  {
    DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(temporary, O_WRONLY | O_CREAT | O_TRUNC, 0644));
    DELTAVM_TRY(write_all(fd.get(), {reinterpret_cast<const uint8_t*>(text.data()), text.size()}, temporary));
  }
  if (::rename(temporary.c_str(), (path_ / "vm.json").c_str()) != 0) {
    return errno_error(fmt::format("rename {}", temporary.string()), errno);
  }
  return {};
}

int VmDirectory::pid() const {
  Result<nlohmann::json> record = read_record();
  if (!record || !record->contains("pid") || !(*record)["pid"].is_number_integer()) return 0;
  return (*record)["pid"].get<int>();
}

bool VmDirectory::running() const {
  int process = pid();
  return process > 0 && ::kill(process, 0) == 0;
}

Status VmDirectory::remove() const {
  std::error_code error;
  std::filesystem::remove_all(path_, error);
  if (error) return make_error(ErrorCode::kIo, "remove {}: {}", path_.string(), error.message());
  return {};
}

}  // namespace deltavm
