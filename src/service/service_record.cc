#include "service/service_record.h"

#include <fcntl.h>
#include <sys/file.h>

#include <nlohmann/json.hpp>

#include "base/json_fields.h"

namespace deltavm {
namespace {

std::filesystem::path record_path(const std::filesystem::path& runtime) { return runtime / "service.json"; }

constexpr size_t kMaxRecordBytes = 64 << 10;

}  // namespace

Result<Fd> lock_service_runtime(const std::filesystem::path& runtime) {
  std::filesystem::path path = runtime / "service.lock";
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return errno_error(fmt::format("flock {}", path.string()), errno);
    Result<std::optional<ServiceRecord>> holder = find_service(runtime);
    std::string who = holder && *holder ? fmt::format(" (pid {})", (*holder)->process.pid) : "";
    return make_error(ErrorCode::kBusy, "another deltavm serve{} already serves runtime {}", who, runtime.string());
  }
  return fd;
}

Status write_service_record(const std::filesystem::path& runtime, const ServiceRecord& record) {
  nlohmann::json document = {{"pid", record.process.pid},
                             {"start_time", record.process.start_time},
                             {"socket", record.socket.string()},
                             {"store", record.store.string()},
                             {"tcp", record.tcp}};
  std::string text = dump_json(document, 2) + "\n";
  return write_file_atomic(record_path(runtime), {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

void remove_service_record(const std::filesystem::path& runtime) {
  std::error_code error;
  std::filesystem::remove(record_path(runtime), error);
}

Result<std::optional<ServiceRecord>> find_service(const std::filesystem::path& runtime) {
  std::error_code error;
  if (!std::filesystem::exists(record_path(runtime), error)) return std::optional<ServiceRecord>();
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(record_path(runtime), kMaxRecordBytes));
  nlohmann::json document = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded() || !document.is_object()) {
    return make_error(ErrorCode::kCorruption, "{}: not a JSON object", record_path(runtime).string());
  }
  JsonFields fields(document, record_path(runtime).string(), ErrorCode::kCorruption);
  uint64_t pid = 0;
  ServiceRecord record;
  std::string socket, store;
  DELTAVM_TRY(fields.unsigned_integer("pid", pid, true, 0x7fffffff));
  DELTAVM_TRY(fields.unsigned_integer("start_time", record.process.start_time, true));
  DELTAVM_TRY(fields.text("socket", socket, true));
  DELTAVM_TRY(fields.text("store", store, true));
  DELTAVM_TRY(fields.text("tcp", record.tcp));
  record.process.pid = static_cast<pid_t>(pid);
  record.socket = socket;
  record.store = store;
  if (!process_running(record.process)) return std::optional<ServiceRecord>();
  return std::optional<ServiceRecord>(std::move(record));
}

}  // namespace deltavm
