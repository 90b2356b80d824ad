#include "backends/vm_directory.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <random>

#include "backends/cgroups.h"
#include "base/file.h"

namespace deltavm {
namespace {

using nlohmann::json;

// vm.json is written by deltavm and is a few hundred bytes; anything larger is not one.
constexpr size_t kMaxRecordBytes = 64 << 10;

// Checks (and with `create`, makes) one directory of the runtime tree.
Status check_private_directory(const std::filesystem::path& directory, bool create) {
  struct stat st {};
  if (::lstat(directory.c_str(), &st) != 0) {
    if (errno != ENOENT || !create) return errno_error(fmt::format("runtime directory {}", directory.string()), errno);
    if (::mkdir(directory.c_str(), 0700) != 0 && errno != EEXIST) {
      return errno_error(fmt::format("create runtime directory {}", directory.string()), errno);
    }
    if (::lstat(directory.c_str(), &st) != 0) {
      return errno_error(fmt::format("runtime directory {}", directory.string()), errno);
    }
  }
  if (S_ISLNK(st.st_mode) || !S_ISDIR(st.st_mode)) {
    return make_error(ErrorCode::kInvalidArgument, "runtime directory {} is not a directory{}; refusing to use it",
                      directory.string(), S_ISLNK(st.st_mode) ? " (a symbolic link)" : "");
  }
  if (st.st_uid != ::geteuid()) {
    return make_error(ErrorCode::kInvalidArgument,
                      "runtime directory {} is owned by uid {}, not by you (uid {}); refusing to use it: its owner "
                      "could reach your VMs' control sockets (set --runtime or $DELTAVM_RUNTIME)",
                      directory.string(), st.st_uid, ::geteuid());
  }
  if ((st.st_mode & 022) != 0) {
    return make_error(ErrorCode::kInvalidArgument,
                      "runtime directory {} has mode {:04o}: writable by group or others, who could replace your VMs' "
                      "sockets; refusing to use it (chmod go-w it, or set --runtime)",
                      directory.string(), st.st_mode & 07777);
  }
  return {};
}

Status check_runtime(const std::filesystem::path& runtime, bool create) {
  // Every VM's sockets live in RUNTIME/vms/ID/, and a Unix socket's path must fit sun_path.
  constexpr size_t kLongestSocketSuffix = std::string_view("/vms/01234567/control.sock").size();
  if (runtime.native().size() + kLongestSocketSuffix >= sizeof(sockaddr_un::sun_path)) {
    return make_error(ErrorCode::kInvalidArgument,
                      "runtime directory {} is {} bytes long: its VMs' socket paths would not fit a Unix socket "
                      "address; use a runtime directory of at most {} bytes",
                      runtime.string(), runtime.native().size(),
                      sizeof(sockaddr_un::sun_path) - kLongestSocketSuffix - 1);
  }
  if (create) {
    std::error_code error;
    if (runtime.has_parent_path()) std::filesystem::create_directories(runtime.parent_path(), error);
  }
  DELTAVM_TRY(check_private_directory(runtime, create));
  return check_private_directory(runtime / "vms", create);
}

// Typed reads of a record's fields: a field that is absent keeps its default, one of the wrong
// type is an error naming it.
class FieldReader {
 public:
  FieldReader(const json& object, std::string where) : object_(object), where_(std::move(where)) {}

  Status text(const char* field, std::string& out) const {
    auto it = object_.find(field);
    if (it == object_.end()) return {};
    if (!it->is_string()) return wrong(field, "a string");
    out = it->get_ref<const std::string&>();
    return {};
  }
  Status integer(const char* field, int64_t& out) const {
    auto it = object_.find(field);
    if (it == object_.end()) return {};
    if (!it->is_number_integer()) return wrong(field, "an integer");
    out = it->get<int64_t>();
    return {};
  }
  Status identity(const char* field, std::optional<ProcessIdentity>& out) const {
    auto it = object_.find(field);
    if (it == object_.end() || it->is_null()) return {};
    if (!it->is_object()) return wrong(field, "an object {pid, start_time}");
    auto pid = it->find("pid");
    auto start = it->find("start_time");
    if (pid == it->end() || !pid->is_number_unsigned() || pid->get<uint64_t>() == 0 ||
        pid->get<uint64_t>() > 0x7fffffff || start == it->end() || !start->is_number_unsigned()) {
      return wrong(field, "an object {pid, start_time} of positive integers");
    }
    out = ProcessIdentity{static_cast<pid_t>(pid->get<uint64_t>()), start->get<uint64_t>()};
    return {};
  }

 private:
  Error wrong(const char* field, const char* expected) const {
    return make_error(ErrorCode::kCorruption, "{}: field {} is not {}", where_, field, expected);
  }
  const json& object_;
  std::string where_;
};

json identity_json(const std::optional<ProcessIdentity>& identity) {
  if (!identity) return nullptr;
  return {{"pid", identity->pid}, {"start_time", identity->start_time}};
}

bool valid_id(const std::string& id) {
  return !id.empty() && id.size() <= 16 && id.find_first_not_of("0123456789abcdef") == std::string::npos;
}

}  // namespace

std::filesystem::path default_runtime_directory() {
  if (const char* runtime = std::getenv("DELTAVM_RUNTIME"); runtime != nullptr && *runtime) return runtime;
  if (::geteuid() == 0) return "/run/deltavm";
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg) {
    return std::filesystem::path(xdg) / "deltavm";
  }
  return fmt::format("/tmp/deltavm-{}", ::geteuid());
}

Status prepare_runtime_directory(const std::filesystem::path& runtime) { return check_runtime(runtime, true); }

Result<VmDirectory> VmDirectory::create(const std::filesystem::path& runtime, const std::string& wanted_id) {
  DELTAVM_TRY(check_runtime(runtime, true));
  if (!wanted_id.empty() && !valid_id(wanted_id)) {
    return make_error(ErrorCode::kInvalidArgument, "{:?} is not a VM id (1 to 16 hex digits)", wanted_id);
  }
  std::mt19937_64 random{std::random_device{}()};
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::string id = wanted_id.empty() ? fmt::format("{:08x}", static_cast<uint32_t>(random())) : wanted_id;
    std::filesystem::path path = runtime / "vms" / id;
    // mkdir's mode is masked by the umask but never widened by it: 0700 at most, whatever it is.
    if (::mkdir(path.c_str(), 0700) == 0) {
      VmDirectory vm(id, path);
      if (::mkdir(vm.process_directory().c_str(), 0700) != 0) {
        return errno_error(fmt::format("create {}", vm.process_directory().string()), errno);
      }
      return vm;
    }
    if (errno != EEXIST) return errno_error(fmt::format("create {}", path.string()), errno);
    if (!wanted_id.empty()) return make_error(ErrorCode::kAlreadyExists, "VM {} exists already", id);
  }
  return make_error(ErrorCode::kIo, "could not find a free VM id under {}", runtime.string());
}

Result<VmDirectory> VmDirectory::open(const std::filesystem::path& runtime, const std::string& id) {
  if (!valid_id(id)) return make_error(ErrorCode::kNotFound, "no VM {} (see deltavm ps)", id);
  std::error_code error;
  if (!std::filesystem::exists(runtime / "vms", error)) {
    return make_error(ErrorCode::kNotFound, "no VM {} (see deltavm ps)", id);
  }
  DELTAVM_TRY(check_runtime(runtime, false));
  std::filesystem::path path = runtime / "vms" / id;
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return make_error(ErrorCode::kNotFound, "no VM {} (see deltavm ps)", id);
  }
  return VmDirectory(id, path);
}

Result<std::vector<VmDirectory>> VmDirectory::list(const std::filesystem::path& runtime) {
  std::vector<VmDirectory> vms;
  std::error_code error;
  if (!std::filesystem::exists(runtime, error) && !error) return vms;
  DELTAVM_TRY(check_private_directory(runtime, false));
  if (!std::filesystem::exists(runtime / "vms", error) && !error) return vms;
  DELTAVM_TRY(check_private_directory(runtime / "vms", false));
  for (auto it = std::filesystem::directory_iterator(runtime / "vms", error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    std::string id = it->path().filename().string();
    bool directory = it->is_directory(error);
    if (error) break;
    if (directory && valid_id(id)) vms.push_back(VmDirectory(id, it->path()));
  }
  if (error) return make_error(ErrorCode::kIo, "list {}: {}", (runtime / "vms").string(), error.message());
  std::sort(vms.begin(), vms.end(), [](const VmDirectory& a, const VmDirectory& b) { return a.id_ < b.id_; });
  return vms;
}

Result<VmRecord> VmDirectory::read_record() const {
  std::filesystem::path path = path_ / "vm.json";
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_RDONLY | O_NOFOLLOW));
  std::string text(kMaxRecordBytes + 1, '\0');
  size_t size = 0;
  while (size < text.size()) {
    ssize_t n = ::read(fd.get(), text.data() + size, text.size() - size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(fmt::format("read {}", path.string()), errno);
    if (n == 0) break;
    size += static_cast<size_t>(n);
  }
  if (size > kMaxRecordBytes) {
    return make_error(ErrorCode::kCorruption, "{}: larger than {} bytes: not a VM record", path.string(),
                      kMaxRecordBytes);
  }
  text.resize(size);
  json document = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (document.is_discarded() || !document.is_object()) {
    return make_error(ErrorCode::kCorruption, "{}: not a JSON object", path.string());
  }
  VmRecord record;
  FieldReader reader(document, path.string());
  DELTAVM_TRY(reader.text("id", record.id));
  DELTAVM_TRY(reader.text("backend", record.backend));
  DELTAVM_TRY(reader.text("template", record.template_name));
  DELTAVM_TRY(reader.text("image", record.image_digest));
  DELTAVM_TRY(reader.text("purpose", record.purpose));
  DELTAVM_TRY(reader.identity("process", record.process));
  DELTAVM_TRY(reader.identity("owner", record.owner));
  DELTAVM_TRY(reader.text("ram_file", record.ram_file));
  DELTAVM_TRY(reader.text("strategy", record.strategy));
  int64_t memory_bytes = 0;
  DELTAVM_TRY(reader.integer("memory_bytes", memory_bytes));
  if (memory_bytes < 0) return make_error(ErrorCode::kCorruption, "{}: field memory_bytes is negative", path.string());
  record.memory_bytes = static_cast<uint64_t>(memory_bytes);
  DELTAVM_TRY(reader.integer("created_at_unix", record.created_at_unix));
  DELTAVM_TRY(reader.integer("expires_at_unix", record.expires_at_unix));
  if (record.id != id_) {
    return make_error(ErrorCode::kCorruption, "{}: records VM {:?}, but the directory is VM {}", path.string(),
                      record.id, id_);
  }
  return record;
}

Status VmDirectory::write_record(const VmRecord& record) const {
  json document = {{"id", record.id},
                   {"backend", record.backend},
                   {"template", record.template_name},
                   {"image", record.image_digest},
                   {"purpose", record.purpose},
                   {"process", identity_json(record.process)},
                   {"owner", identity_json(record.owner)},
                   {"ram_file", record.ram_file},
                   {"strategy", record.strategy},
                   {"memory_bytes", record.memory_bytes},
                   {"created_at_unix", record.created_at_unix},
                   {"expires_at_unix", record.expires_at_unix}};
  std::string text = document.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
  // Readers see the old record or the new one (rename), never a partial one. No fsync: the
  // runtime directory describes processes, which do not survive a crash either.
  std::filesystem::path temporary = path_ / "vm.json.tmp";
  {
    DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0600));
    DELTAVM_TRY(write_all(fd.get(), {reinterpret_cast<const uint8_t*>(text.data()), text.size()}, temporary));
  }
  if (::rename(temporary.c_str(), (path_ / "vm.json").c_str()) != 0) {
    return errno_error(fmt::format("rename {}", temporary.string()), errno);
  }
  return {};
}

Status VmDirectory::update_record(const std::function<void(VmRecord&)>& change) const {
  VmRecord record;
  std::error_code error;
  if (std::filesystem::exists(path_ / "vm.json", error)) {
    DELTAVM_ASSIGN_OR_RETURN(record, read_record());
  } else {
    record.id = id_;
    record.created_at_unix =
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  }
  change(record);
  return write_record(record);
}

bool VmDirectory::running() const {
  Result<VmRecord> record = read_record();
  return record && record->process && process_running(*record->process);
}

Status VmDirectory::remove() const {
  // Its process has ended: its cgroups (backends/cgroups.h) hold no task and go with it.
  DELTAVM_TRY(remove_vm_cgroups(vm_cgroup_name(runtime(), id_)));
  std::error_code error;
  std::filesystem::remove_all(path_, error);
  if (error) return make_error(ErrorCode::kIo, "remove {}: {}", path_.string(), error.message());
  return {};
}

bool abandoned(const VmRecord& record) { return record.owner && !process_running(*record.owner); }

Result<size_t> remove_abandoned_vms(const std::filesystem::path& runtime) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<VmDirectory> vms, VmDirectory::list(runtime));
  size_t removed = 0;
  for (const VmDirectory& vm : vms) {
    Result<VmRecord> record = vm.read_record();
    // Only a record that proves the owner gone lets its directory go.
    if (!record || !abandoned(*record)) continue;
    if (record->process) DELTAVM_TRY(terminate_process(*record->process, std::chrono::seconds(2)));
    DELTAVM_TRY(vm.remove());
    ++removed;
  }
  return removed;
}

}  // namespace deltavm
