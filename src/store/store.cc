#include "store/store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "base/faults.h"
#include "image/delta_file.h"

namespace deltavm {
namespace {

// Objects and flat files: read-only for everyone once written.
constexpr mode_t kObjectMode = 0444;

// Objects an import fetches at once.
constexpr size_t kParallelFetches = 4;

// A chain longer than this is taken as a corrupt catalog (a parent cycle).
constexpr uint32_t kMaxChainDepth = 1000;

int64_t now_unix() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

Status check_name(const std::string& name) {
  if (name.empty() || name.size() > 200) {
    return make_error(ErrorCode::kInvalidArgument, "image name must be 1 to 200 characters");
  }
  for (char c : name) {
    bool allowed = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
                   c == '.' || c == ':' || c == '/';
    if (!allowed) {
      return make_error(ErrorCode::kInvalidArgument,
                        "image name {:?} has character {:?}; allowed: letters, digits, - _ . : /", name, c);
    }
  }
  return {};
}

// One page in kSampleStride is sampled: enough to rank images by likeness at a tiny cost.
constexpr uint64_t kSampleStride = 64;

std::vector<uint8_t> sample_pages(std::span<const uint8_t> image) {
  std::vector<uint8_t> sample;
  for (uint64_t page = 0; page < page_count(image.size()); page += kSampleStride) {
    uint64_t hash = page_hash(image.data() + page * kPageSize);
    for (int shift = 0; shift < 64; shift += 8) sample.push_back(static_cast<uint8_t>(hash >> shift));
  }
  return sample;
}

std::string reference_spec(const std::vector<std::pair<std::string, std::string>>& reference) {
  std::string spec;
  for (const auto& [role, kind] : reference) {
    if (!spec.empty()) spec += ',';
    spec.append(role).append(":").append(kind);
  }
  return spec;
}

// Builds a reference from {role, kind} parts, taking each role's bytes from `bytes_of`.
Result<std::vector<uint8_t>> build_reference(
    const ReferenceKinds& kinds, const std::vector<std::pair<std::string, std::string>>& parts,
    const std::function<Result<std::vector<uint8_t>>(const std::string& role)>& bytes_of) {
  std::vector<uint8_t> reference;
  for (const auto& [role, kind] : parts) {
    auto it = kinds.find(kind);
    if (it == kinds.end()) {
      return make_error(ErrorCode::kUnsupported, "reference kind {} is not known to this program", kind);
    }
    const ReferenceTransform& transform = it->second;
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> source, bytes_of(role));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> part, transform(source));
    reference.insert(reference.end(), part.begin(), part.end());
  }
  return reference;
}

std::vector<std::pair<std::string, std::string>> parse_reference_spec(const std::string& spec) {
  std::vector<std::pair<std::string, std::string>> parts;
  size_t start = 0;
  while (start < spec.size()) {
    size_t end = spec.find(',', start);
    if (end == std::string::npos) end = spec.size();
    std::string part = spec.substr(start, end - start);
    size_t colon = part.find(':');
    parts.emplace_back(part.substr(0, colon), colon == std::string::npos ? "" : part.substr(colon + 1));
    start = end + 1;
  }
  return parts;
}

}  // namespace

ReferenceKinds with_raw_kind(ReferenceKinds kinds) {
  kinds.try_emplace("raw", [](std::span<const uint8_t> bytes) {
    return Result<std::vector<uint8_t>>(std::vector<uint8_t>(bytes.begin(), bytes.end()));
  });
  return kinds;
}

std::filesystem::path default_store_directory() {
  if (const char* store = std::getenv("DELTAVM_STORE"); store != nullptr && *store != '\0') {
    return store;
  }
  const char* home = std::getenv("HOME");
  return std::filesystem::path(home != nullptr ? home : "/root") / ".local/share/deltavm";
}

Result<StoreLock> StoreLock::acquire(const std::filesystem::path& directory, Mode mode) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(directory / "lock", O_RDWR | O_CREAT, 0644));
  int operation = mode == Mode::kShared ? LOCK_SH : LOCK_EX;
  while (::flock(fd.get(), operation) != 0) {
    if (errno != EINTR) return errno_error(fmt::format("flock {}/lock", directory.string()), errno);
  }
  return StoreLock(std::move(fd));
}

namespace {

// Entries of a store directory that a new store may be created among: what an interrupted
// creation leaves behind, and nothing that holds data.
bool holds_no_data(const std::filesystem::path& directory, std::string& found) {
  std::error_code error;
  for (auto it = std::filesystem::recursive_directory_iterator(directory, error);
       !error && it != std::filesystem::recursive_directory_iterator(); it.increment(error)) {
    std::string name = it->path().filename().string();
    bool directory_entry = it->is_directory(error);
    if (error) break;
    if (directory_entry && (name == "objects" || name == "cache" || name == "flat" || name.size() == 2)) continue;
    if (name == "lock" || name.find(kTemporaryMarker) != std::string::npos) continue;
    found = it->path().string();
    return false;
  }
  if (error) {
    found = fmt::format("{} (unreadable: {})", directory.string(), error.message());
    return false;
  }
  return true;
}

}  // namespace

Result<Store> Store::open(const std::filesystem::path& directory, ReferenceKinds kinds) {
  std::error_code error;
  bool is_directory = std::filesystem::is_directory(directory, error);
  if (error && error != std::errc::no_such_file_or_directory) {
    return make_error(ErrorCode::kIo, "store {}: {}", directory.string(), error.message());
  }
  if (!is_directory) {
    return make_error(
        ErrorCode::kNotFound,
        "no store at {} (check --store or $DELTAVM_STORE; deltavm store put and template build create one)",
        directory.string());
  }
  std::filesystem::path catalog_path = directory / "catalog.sqlite";
  if (!std::filesystem::exists(catalog_path, error)) {
    std::string found;
    if (holds_no_data(directory, found)) {
      return make_error(ErrorCode::kNotFound, "no store at {}: the directory has no catalog.sqlite",
                        directory.string());
    }
    return make_error(ErrorCode::kCorruption,
                      "store {}: its catalog {} is missing but the store holds data ({}); refusing to open it: "
                      "without the catalog every object would look unreferenced (restore catalog.sqlite from a backup)",
                      directory.string(), catalog_path.string(), found);
  }
  Result<Catalog> catalog = Catalog::open(catalog_path);
  if (!catalog) return catalog.error().with_context(fmt::format("store {}", directory.string()));
  return Store(directory, std::move(catalog).value(), with_raw_kind(std::move(kinds)));
}

Result<Store> Store::open_or_create(const std::filesystem::path& directory, ReferenceKinds kinds) {
  std::filesystem::path catalog_path = directory / "catalog.sqlite";
  std::error_code error;
  if (!std::filesystem::exists(catalog_path, error)) {
    std::string found;
    if (std::filesystem::exists(directory, error) && !holds_no_data(directory, found)) {
      return make_error(ErrorCode::kCorruption,
                        "store {}: its catalog {} is missing but the store holds data ({}); refusing to start a new "
                        "catalog over it (restore catalog.sqlite from a backup, or use an empty directory)",
                        directory.string(), catalog_path.string(), found);
    }
    std::filesystem::create_directories(directory / "objects", error);
    if (error) {
      return make_error(ErrorCode::kIo, "create store directory {}: {}", directory.string(), error.message());
    }
    Status created = Catalog::create(catalog_path);
    // Another process may have created the store meanwhile; its catalog is opened below.
    if (!created && !std::filesystem::exists(catalog_path, error)) return created.error();
  }
  return open(directory, std::move(kinds));
}

std::filesystem::path Store::object_path(const ObjectId& object_id) const {
  std::string hex = object_id.hex();
  return directory_ / "objects" / hex.substr(0, 2) / hex;
}

Result<ObjectId> Store::put_object(std::span<const uint8_t> bytes) {
  ObjectId id = ObjectId::of(bytes);
  std::filesystem::path path = object_path(id);
  std::error_code error;
  if (std::filesystem::exists(path, error)) {
    // Same hash: the same content is stored already, if the object is sound. A damaged one is
    // replaced by the good bytes in hand.
    if (map_object(id, bytes.size())) return id;
  }
  DELTAVM_TRY(make_shard(path));
  // Read-only from birth: an object is never changed in place, by us or anyone without root.
  DELTAVM_TRY(write_file_atomic(path, bytes, kObjectMode));
  return id;
}

Status Store::make_shard(const std::filesystem::path& object_path) {
  std::error_code error;
  std::filesystem::path shard = object_path.parent_path();
  if (std::filesystem::exists(shard, error)) return {};
  if (int fault = injected_fault(DurableCall::kCreate)) {
    return errno_error(fmt::format("create {}", shard.string()), fault);
  }
  std::filesystem::create_directories(shard, error);
  if (error) return make_error(ErrorCode::kIo, "create {}: {}", shard.string(), error.message());
  return fsync_directory(shard.parent_path());
}

Result<Mapping> Store::map_object(const ObjectId& object_id, uint64_t expected_size) {
  std::filesystem::path path = object_path(object_id);
  DELTAVM_ASSIGN_OR_RETURN(Mapping bytes, Mapping::map_file_readonly(path));
  if (bytes.size() != expected_size) {
    return make_error(ErrorCode::kCorruption, "object {}: size {} bytes, catalog says {}", object_id, bytes.size(),
                      expected_size);
  }
  ObjectId actual = ObjectId::of(bytes.bytes());
  if (actual != object_id) {
    return make_error(ErrorCode::kCorruption, "object {}: content hash is {}: the object is damaged", object_id,
                      actual);
  }
  return bytes;
}

namespace {

struct FileDigest {
  ImageDigest digest;
  uint64_t size_bytes = 0;
};

// XXH3-128 of a whole file, streamed through one small buffer: hashing a mapping would fault
// in every page of it, which costs more than the copy on hosts where page faults are slow.
// The buffer is the call's: one kept per thread would stay resident in every thread of a
// service that ever verified a file.
Result<FileDigest> digest_file(const std::filesystem::path& path) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_RDONLY | O_NOFOLLOW));
  ImageDigester digester;
  std::vector<uint8_t> buffer(256 << 10);
  FileDigest result;
  for (;;) {
    ssize_t n = ::read(fd.get(), buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(fmt::format("read {}", path.string()), errno);
    if (n == 0) break;
    digester.update({buffer.data(), static_cast<size_t>(n)});
    result.size_bytes += static_cast<uint64_t>(n);
  }
  result.digest = digester.finish();
  return result;
}

}  // namespace

Status Store::fetch_object(const ObjectId& id, uint64_t size_bytes, const FetchObject& fetch) {
  std::filesystem::path path = object_path(id);
  DELTAVM_TRY(make_shard(path));
  static thread_local std::mt19937_64 random{std::random_device{}()};
  std::filesystem::path temporary = path;
  temporary += fmt::format("{}{}-{:016x}", kTemporaryMarker, ::getpid(), random());
  struct Cleanup {
    const std::filesystem::path& file;
    bool keep = false;
    ~Cleanup() {
      if (!keep) ::unlink(file.c_str());
    }
  } cleanup{temporary};
  DELTAVM_TRY(fetch(id, size_bytes, temporary));
  DELTAVM_ASSIGN_OR_RETURN(FileDigest file, digest_file(temporary));
  if (file.size_bytes != size_bytes || ObjectId{file.digest} != id) {
    return make_error(ErrorCode::kCorruption, "object {}: the {} bytes fetched hash to {}, expected {} bytes: refused",
                      id, file.size_bytes, file.digest, size_bytes);
  }
  {
    DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(temporary, O_RDONLY | O_NOFOLLOW));
    if (::fchmod(fd.get(), kObjectMode) != 0) return errno_error(fmt::format("chmod {}", temporary.string()), errno);
    if (int fault = injected_fault(DurableCall::kFsync)) {
      return errno_error(fmt::format("fsync {}", temporary.string()), fault);
    }
    if (::fsync(fd.get()) != 0) return errno_error(fmt::format("fsync {}", temporary.string()), errno);
  }
  if (int fault = injected_fault(DurableCall::kRename)) {
    return errno_error(fmt::format("rename {} to {}", temporary.string(), path.string()), fault);
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    return errno_error(fmt::format("rename {} to {}", temporary.string(), path.string()), errno);
  }
  cleanup.keep = true;
  return fsync_directory(path.parent_path());
}

Status Store::verify_object(const ObjectId& object_id, uint64_t expected_size) {
  DELTAVM_ASSIGN_OR_RETURN(FileDigest file, digest_file(object_path(object_id)));
  if (file.size_bytes != expected_size) {
    return make_error(ErrorCode::kCorruption, "object {}: size {} bytes, catalog says {}", object_id, file.size_bytes,
                      expected_size);
  }
  if (ObjectId{file.digest} != object_id) {
    return make_error(ErrorCode::kCorruption, "object {}: content hash is {}: the object is damaged", object_id,
                      file.digest);
  }
  return {};
}

Result<std::shared_ptr<const std::vector<uint8_t>>> Store::reference_of(const ImageRecord& record) {
  std::string key = record.reference;
  for (const Attachment& attachment : record.attachments)
    key += "|" + attachment.role + "=" + attachment.object_id.hex();
  {
    std::lock_guard lock(reference_cache_->mutex);
    if (key == reference_cache_->key) return reference_cache_->bytes;
  }
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes,
                           build_reference(kinds_, parse_reference_spec(record.reference),
                                           [&](const std::string& role) { return read_attachment(record, role); }));
  auto reference = std::make_shared<const std::vector<uint8_t>>(std::move(bytes));
  std::lock_guard lock(reference_cache_->mutex);
  reference_cache_->key = key;
  reference_cache_->bytes = reference;
  return reference;
}

void Store::drop_reference_cache() {
  std::lock_guard lock(reference_cache_->mutex);
  reference_cache_->key.clear();
  reference_cache_->bytes.reset();
}

Result<Delta> Store::read_delta(const ImageRecord& record) {
  DELTAVM_ASSIGN_OR_RETURN(Mapping bytes, map_object(record.object_id, record.stored_size_bytes));
  std::string name = fmt::format("object {}", record.object_id);
  Result<Delta> decoded = Error{ErrorCode::kIo, ""};
  if (record.reference.empty()) {
    decoded = decode_delta(bytes.bytes(), name);
  } else {
    Result<std::shared_ptr<const std::vector<uint8_t>>> reference = reference_of(record);
    if (!reference) return reference.error().with_context(fmt::format("image {}: compression reference", record.name));
    CompressionReference compression = CompressionReference::of(**reference);
    decoded = decode_delta(bytes.bytes(), name, &compression);
  }
  if (!decoded) return decoded.error();
  Delta delta = std::move(decoded).value();
  if (delta.image_size_bytes != record.image_size_bytes) {
    return make_error(ErrorCode::kCorruption, "image {}: object {} is for {}-byte images, catalog says {}", record.name,
                      record.object_id, delta.image_size_bytes, record.image_size_bytes);
  }
  return delta;
}

Result<std::shared_ptr<const Delta>> Store::read_delta_shared(const ImageRecord& record) {
  std::string key = record.object_id.hex();
  std::shared_ptr<std::mutex> decoding;
  {
    std::lock_guard lock(shared_deltas_->mutex);
    SharedDeltas::Entry& entry = shared_deltas_->entries[key];
    if (std::shared_ptr<const Delta> delta = entry.delta.lock()) return delta;
    decoding = entry.decoding;
  }
  // One decode per object at a time; whoever waited here takes what the first one decoded.
  std::lock_guard decode_lock(*decoding);
  {
    std::lock_guard lock(shared_deltas_->mutex);
    if (std::shared_ptr<const Delta> delta = shared_deltas_->entries[key].delta.lock()) return delta;
  }
  DELTAVM_ASSIGN_OR_RETURN(Delta decoded, read_delta(record));
  auto delta = std::make_shared<const Delta>(std::move(decoded));
  std::lock_guard lock(shared_deltas_->mutex);
  shared_deltas_->entries[key].delta = delta;
  // Entries nobody holds or decodes are forgotten (this one's `decoding` is held here).
  std::erase_if(shared_deltas_->entries,
                [](const auto& item) { return item.second.delta.expired() && item.second.decoding.use_count() == 1; });
  return delta;
}

Result<ImageRecord> Store::put_image(const std::string& name, std::span<const uint8_t> image,
                                     const std::optional<std::string>& parent, const PutOptions& options) {
  DELTAVM_TRY(check_name(name));
  DELTAVM_TRY(check_image_size(image.size(), fmt::format("image {}", name)));
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> existing, catalog_.find(name));
  if (existing) return make_error(ErrorCode::kAlreadyExists, "image {} already exists in the store", name);

  ImageRecord record;
  record.name = name;
  record.image_size_bytes = image.size();
  Mapping base_memory;
  if (parent) {
    DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> parent_record, catalog_.find(*parent));
    if (!parent_record) return make_error(ErrorCode::kNotFound, "parent image {} is not in the store", *parent);
    if (parent_record->image_size_bytes != image.size()) {
      return make_error(ErrorCode::kInvalidArgument, "image {} is {} bytes but its parent {} is {} bytes", name,
                        image.size(), *parent, parent_record->image_size_bytes);
    }
    DELTAVM_ASSIGN_OR_RETURN(base_memory, rebuild_image(*parent));
    record.parent = *parent;
    record.chain_depth = parent_record->chain_depth + 1;
  } else {
    DELTAVM_ASSIGN_OR_RETURN(base_memory, Mapping::map_anonymous(image.size()));
  }
  DiffOptions diff_options;
  diff_options.progress = options.progress;
  diff_options.merge_gap_bytes = options.encoding.merge_gap_bytes;
  if (parent) diff_options.dirty = options.dirty;
  DELTAVM_ASSIGN_OR_RETURN(Delta delta, diff(base_memory.bytes(), image, diff_options));
  std::vector<uint8_t> encoded;
  if (options.reference.empty()) {
    encoded = encode_delta(delta, options.encoding.compression_level);
  } else {
    DELTAVM_ASSIGN_OR_RETURN(
        std::vector<uint8_t> reference,
        build_reference(kinds_, options.reference, [&](const std::string& role) -> Result<std::vector<uint8_t>> {
          for (const auto& [attachment_role, bytes] : options.attachments) {
            if (attachment_role == role) return std::vector<uint8_t>(bytes.begin(), bytes.end());
          }
          return make_error(ErrorCode::kInvalidArgument, "image {}: reference names attachment {}, which is not given",
                            name, role);
        }));
    CompressionReference compression = CompressionReference::of(reference);
    encoded = encode_delta(delta, options.encoding.compression_level, &compression);
    record.reference = reference_spec(options.reference);
  }
  DELTAVM_ASSIGN_OR_RETURN(record.object_id, put_object(encoded));
  record.stored_size_bytes = encoded.size();
  record.digest = *delta.target_digest;
  record.created_at_unix = now_unix();
  record.metadata = options.metadata;
  record.page_sample = sample_pages(image);
  for (const auto& [role, bytes] : options.attachments) {
    DELTAVM_ASSIGN_OR_RETURN(ObjectId id, put_object(bytes));
    record.attachments.push_back(Attachment{role, id, bytes.size()});
  }
  DELTAVM_TRY(catalog_.insert(record));
  return record;
}

Result<std::optional<Similarity>> Store::most_similar(std::span<const uint8_t> image) {
  std::vector<uint8_t> sample = sample_pages(image);
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, catalog_.list());
  std::optional<Similarity> best;
  for (const ImageRecord& record : records) {
    if (record.image_size_bytes != image.size() || record.page_sample.size() != sample.size() || sample.empty())
      continue;
    uint64_t equal = 0;
    for (size_t i = 0; i < sample.size(); i += 8) {
      if (std::memcmp(&sample[i], &record.page_sample[i], 8) == 0) ++equal;
    }
    uint64_t sampled = sample.size() / 8;
    double fraction = static_cast<double>(equal) / static_cast<double>(sampled);
    if (!best || fraction > best->fraction_equal) best = Similarity{record.name, fraction};
  }
  return best;
}

Result<std::vector<uint8_t>> Store::read_attachment(const ImageRecord& record, std::string_view role) {
  for (const Attachment& attachment : record.attachments) {
    if (attachment.role != role) continue;
    DELTAVM_ASSIGN_OR_RETURN(Mapping bytes, map_object(attachment.object_id, attachment.size_bytes));
    return std::vector<uint8_t>(bytes.bytes().begin(), bytes.bytes().end());
  }
  return make_error(ErrorCode::kNotFound, "image {} has no {} attachment", record.name, role);
}

Result<std::filesystem::path> Store::attachment_path(const ImageRecord& record, std::string_view role) {
  for (const Attachment& attachment : record.attachments) {
    if (attachment.role != role) continue;
    DELTAVM_TRY(verify_object(attachment.object_id, attachment.size_bytes));
    return object_path(attachment.object_id);
  }
  return make_error(ErrorCode::kNotFound, "image {} has no {} attachment", record.name, role);
}

Result<ImageRecord> Store::find(const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> record, catalog_.find(name));
  if (!record) return make_error(ErrorCode::kNotFound, "image {} is not in the store {}", name, directory_.string());
  return *record;
}

Result<std::vector<ImageRecord>> Store::list() { return catalog_.list(); }

Result<std::vector<ImageRecord>> Store::chain(const std::string& name) {
  std::vector<ImageRecord> records;
  DELTAVM_ASSIGN_OR_RETURN(ImageRecord record, find(name));
  records.push_back(record);
  while (records.back().parent) {
    if (records.size() > kMaxChainDepth) {
      return make_error(ErrorCode::kCorruption, "image {}: chain longer than {}: parent cycle in the catalog", name,
                        kMaxChainDepth);
    }
    DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> parent, catalog_.find(*records.back().parent));
    if (!parent) {
      return make_error(ErrorCode::kCorruption, "image {}: parent {} is missing from the catalog", records.back().name,
                        *records.back().parent);
    }
    records.push_back(*parent);
  }
  std::reverse(records.begin(), records.end());
  return records;
}

Result<Mapping> Store::get_image(const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kShared));
  return rebuild_image(name);
}

Result<Mapping> Store::rebuild_image(const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, chain(name));
  return rebuild_chain(records, records.size() - 1);
}

Result<Mapping> Store::rebuild_chain(const std::vector<ImageRecord>& records, size_t check_from) {
  // The images before check_from are held here: the deepest of them with a sealed flat file
  // (verified against its digest since it last changed) is the start, mapped privately, so
  // only the pages the later deltas write are copied. Else the chain from zeros.
  size_t start = 0;
  Mapping memory;
  for (size_t i = check_from; i-- > 0;) {
    DELTAVM_ASSIGN_OR_RETURN(bool sealed, flat_file_is_sealed(records[i].digest, records[i].image_size_bytes));
    if (!sealed) continue;
    DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(flat_file_path(records[i].digest), O_RDONLY | O_NOFOLLOW));
    DELTAVM_ASSIGN_OR_RETURN(memory, Mapping::map(fd.get(), records[i].image_size_bytes, PROT_READ | PROT_WRITE,
                                                  MAP_PRIVATE, 0, flat_file_path(records[i].digest).string()));
    start = i + 1;
    break;
  }
  if (start == 0) {
    DELTAVM_ASSIGN_OR_RETURN(memory, Mapping::map_anonymous(records.back().image_size_bytes));
  }
  std::optional<ImageDigest> previous_target;
  if (start > 0) previous_target = records[start - 1].digest;
  for (size_t i = start; i < records.size(); ++i) {
    const ImageRecord& record = records[i];
    DELTAVM_ASSIGN_OR_RETURN(Delta delta, read_delta(record));
    if (previous_target && delta.base_digest && *delta.base_digest != *previous_target) {
      return make_error(ErrorCode::kCorruption, "image {}: its delta applies to image {} but its parent is image {}",
                        record.name, delta.base_digest->hex(), previous_target->hex());
    }
    DELTAVM_TRY(apply_delta(delta, memory.writable_bytes()));
    previous_target = record.digest;
    if (i < check_from) continue;
    ImageDigest digest = digest_image(memory.bytes());
    if (digest != record.digest) {
      return make_error(ErrorCode::kCorruption, "image {}: rebuilt image has digest {}, its record says {}",
                        record.name, digest, record.digest);
    }
  }
  return memory;
}

namespace {

// The shape of a chain handed to import_chain: base first, each image the parent of the next,
// depths counting up, one size, names and roles the store accepts.
Status check_chain_shape(const std::vector<ImageRecord>& records) {
  if (records.empty()) return make_error(ErrorCode::kInvalidArgument, "an empty chain");
  if (records.size() > kMaxChainDepth) {
    return make_error(ErrorCode::kInvalidArgument, "a chain of {} images (at most {})", records.size(), kMaxChainDepth);
  }
  for (size_t i = 0; i < records.size(); ++i) {
    const ImageRecord& record = records[i];
    DELTAVM_TRY(check_name(record.name));
    DELTAVM_TRY(check_image_size(record.image_size_bytes, fmt::format("image {}", record.name)));
    std::optional<std::string> parent = i == 0 ? std::nullopt : std::optional(records[i - 1].name);
    if (record.parent != parent || record.chain_depth != i) {
      return make_error(ErrorCode::kInvalidArgument,
                        "image {}: parent {} at depth {}, but the chain puts it after {} at depth {}", record.name,
                        record.parent.value_or("(none)"), record.chain_depth, parent.value_or("(none)"), i);
    }
    if (record.image_size_bytes != records[0].image_size_bytes) {
      return make_error(ErrorCode::kInvalidArgument, "image {} is {} bytes but its chain's base is {} bytes",
                        record.name, record.image_size_bytes, records[0].image_size_bytes);
    }
  }
  return {};
}

}  // namespace

Result<ImportReport> Store::import_chain(const std::vector<ImageRecord>& records, const FetchObject& fetch,
                                         const std::string& origin) {
  DELTAVM_TRY(check_chain_shape(records));
  ImportReport report;
  // The images held here already: the chain's first ones, and the very images of the chain.
  // The chain to rebuild: the local records of the images held here (the same images, maybe
  // stored differently), then the new ones.
  std::vector<ImageRecord> rebuilt = records;
  auto held = [&](size_t i) -> Result<bool> {
    const ImageRecord& record = records[i];
    DELTAVM_ASSIGN_OR_RETURN(std::optional<ImageRecord> local, catalog_.find(record.name));
    if (!local) return false;
    if (local->digest != record.digest || local->parent != record.parent) {
      return make_error(ErrorCode::kConflict,
                        "image {} here is not the image of that name being imported (digest {} here, {} there): "
                        "remove one or rename",
                        record.name, local->digest, record.digest);
    }
    rebuilt[i] = *local;
    return true;
  };
  size_t first_new = records.size();
  for (size_t i = 0; i < records.size(); ++i) {
    DELTAVM_ASSIGN_OR_RETURN(bool here, held(i));
    if (here && first_new < i) {
      return make_error(ErrorCode::kCorruption, "image {} is here but its parent {} is not", records[i].name,
                        records[i - 1].name);
    }
    if (!here && first_new == records.size()) first_new = i;
    if (here) report.present.push_back(records[i].name);
  }
  if (first_new == records.size()) return report;

  // The objects the new images lack, fetched outside the lock (a transfer can be long); each
  // is checked against its id before it is written, and written whole or not at all.
  // Several at a time: each transfer waits on the network and on its fsync.
  auto fetch_start = std::chrono::steady_clock::now();
  struct Missing {
    ObjectId id;
    uint64_t size;
    std::string image;
  };
  std::vector<Missing> missing;
  for (size_t i = first_new; i < records.size(); ++i) {
    std::vector<std::pair<ObjectId, uint64_t>> objects = {{records[i].object_id, records[i].stored_size_bytes}};
    for (const Attachment& attachment : records[i].attachments) {
      objects.emplace_back(attachment.object_id, attachment.size_bytes);
    }
    for (const auto& object : objects) {
      bool listed = std::any_of(missing.begin(), missing.end(), [&](const Missing& m) { return m.id == object.first; });
      if (!listed && !verify_object(object.first, object.second)) {
        missing.push_back({object.first, object.second, records[i].name});
      }
    }
  }
  std::atomic<size_t> next{0};
  std::mutex failure_mutex;
  std::optional<Error> failure;
  auto fetch_some = [&] {
    for (size_t k; (k = next.fetch_add(1)) < missing.size();) {
      Status fetched = fetch_object(missing[k].id, missing[k].size, fetch);
      std::lock_guard guard(failure_mutex);
      if (!fetched && !failure) failure = fetched.error().with_context(fmt::format("image {}", missing[k].image));
      if (failure) return;
    }
  };
  std::vector<std::thread> fetchers;
  for (size_t t = 0; t < std::min<size_t>(kParallelFetches, missing.size()); ++t) fetchers.emplace_back(fetch_some);
  for (std::thread& fetcher : fetchers) fetcher.join();
  if (failure) return *failure;
  for (const Missing& m : missing) {
    ++report.objects_fetched;
    report.bytes_fetched += m.size;
  }
  report.fetch_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - fetch_start).count();

  // Under the exclusive lock (no gc can take the fetched objects meanwhile): every new image
  // rebuilt and checked against its digest, then all recorded.
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  auto verify_start = std::chrono::steady_clock::now();
  DELTAVM_TRY(rebuild_chain(rebuilt, first_new).status());
  report.verify_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - verify_start).count();
  for (size_t i = first_new; i < records.size(); ++i) {
    // Another process may have imported it meanwhile: the same image is fine.
    DELTAVM_ASSIGN_OR_RETURN(bool here, held(i));
    if (here) {
      report.present.push_back(records[i].name);
      continue;
    }
    std::optional<CachedImage> cached;
    if (!origin.empty()) cached = CachedImage{records[i].name, origin, now_unix()};
    DELTAVM_TRY(catalog_.insert(records[i], cached));
    report.added.push_back(records[i].name);
  }
  return report;
}

namespace {

constexpr std::string_view kCacheLimitSetting = "cache_limit_bytes";
constexpr int64_t kTouchGranularitySeconds = 60;

// The bytes of the objects that images in `cached` use and no other image does.
uint64_t bytes_only_cached_use(const std::vector<ImageRecord>& images, const std::set<std::string>& cached) {
  std::map<ObjectId, uint64_t> theirs;
  std::set<ObjectId> others;
  for (const ImageRecord& image : images) {
    bool is_cached = cached.contains(image.name);
    auto note = [&](const ObjectId& id, uint64_t size) {
      if (is_cached) {
        theirs[id] = size;
      } else {
        others.insert(id);
      }
    };
    note(image.object_id, image.stored_size_bytes);
    for (const Attachment& attachment : image.attachments) note(attachment.object_id, attachment.size_bytes);
  }
  uint64_t bytes = 0;
  for (const auto& [id, size] : theirs) {
    if (!others.contains(id)) bytes += size;
  }
  return bytes;
}

}  // namespace

Result<std::optional<uint64_t>> Store::cache_limit() {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<std::string> value, catalog_.setting(std::string(kCacheLimitSetting)));
  if (!value) return std::optional<uint64_t>();
  char* end = nullptr;
  uint64_t limit = std::strtoull(value->c_str(), &end, 10);
  if (value->empty() || end == nullptr || *end != '\0') {
    return make_error(ErrorCode::kCorruption, "catalog setting {}: {:?} is not a number of bytes", kCacheLimitSetting,
                      *value);
  }
  return std::optional<uint64_t>(limit);
}

Status Store::set_cache_limit(std::optional<uint64_t> limit_bytes) {
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  return catalog_.put_setting(std::string(kCacheLimitSetting),
                              limit_bytes ? std::optional<std::string>(std::to_string(*limit_bytes)) : std::nullopt);
}

Result<uint64_t> Store::cached_bytes() {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> images, catalog_.list());
  DELTAVM_ASSIGN_OR_RETURN(std::vector<CachedImage> cached, catalog_.list_cached());
  std::set<std::string> names;
  for (const CachedImage& image : cached) names.insert(image.name);
  return bytes_only_cached_use(images, names);
}

Status Store::touch(const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, chain(name));
  int64_t now = now_unix();
  for (const ImageRecord& record : records) {
    DELTAVM_TRY(catalog_.touch_cached(record.name, now, kTouchGranularitySeconds));
  }
  return {};
}

Result<EvictReport> Store::evict_cached(const std::set<std::string>& pinned) {
  EvictReport report;
  {
    DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
    DELTAVM_ASSIGN_OR_RETURN(report.limit_bytes, cache_limit());
    DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> images, catalog_.list());
    DELTAVM_ASSIGN_OR_RETURN(std::vector<CachedImage> cached, catalog_.list_cached());
    std::set<std::string> cached_names;
    for (const CachedImage& image : cached) cached_names.insert(image.name);
    report.cached_bytes_before = bytes_only_cached_use(images, cached_names);
    report.cached_bytes_after = report.cached_bytes_before;
    if (!report.limit_bytes || report.cached_bytes_before <= *report.limit_bytes) return report;

    // What is needed: every image made here, every pinned one, and all their ancestors.
    std::map<std::string, std::optional<std::string>> parent_of;
    for (const ImageRecord& image : images) parent_of[image.name] = image.parent;
    std::set<std::string> needed;
    auto need = [&](std::string name) {
      for (size_t steps = 0; needed.insert(name).second && steps <= kMaxChainDepth; ++steps) {
        auto found = parent_of.find(name);
        if (found == parent_of.end() || !found->second) break;
        name = *found->second;
      }
    };
    for (const ImageRecord& image : images) {
      if (!cached_names.contains(image.name) || pinned.contains(image.name)) need(image.name);
    }
    for (const std::string& name : pinned) {
      if (parent_of.contains(name)) need(name);
    }
    // Least recently used first; an image goes only once nothing stands on it.
    for (bool progress = true; progress && report.cached_bytes_after > *report.limit_bytes;) {
      progress = false;
      for (const CachedImage& candidate : cached) {
        if (!cached_names.contains(candidate.name) || needed.contains(candidate.name)) continue;
        bool has_children = std::any_of(parent_of.begin(), parent_of.end(), [&](const auto& entry) {
          return entry.second && *entry.second == candidate.name;
        });
        if (has_children) continue;
        DELTAVM_TRY(catalog_.remove(candidate.name));
        parent_of.erase(candidate.name);
        cached_names.erase(candidate.name);
        std::erase_if(images, [&](const ImageRecord& image) { return image.name == candidate.name; });
        report.evicted.push_back(candidate.name);
        report.cached_bytes_after = bytes_only_cached_use(images, cached_names);
        progress = true;
        break;
      }
    }
  }
  if (!report.evicted.empty()) {
    DELTAVM_ASSIGN_OR_RETURN(report.collected, gc());
  }
  return report;
}

Status Store::add_remote(const RemoteRecord& remote) {
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  return catalog_.insert_remote(remote);
}

Status Store::remove_remote(const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  return catalog_.remove_remote(name);
}

std::filesystem::path Store::flat_file_path(const ImageDigest& digest) const {
  return directory_ / "cache" / "flat" / (digest.hex() + ".ram");
}

namespace {

// What a seal records of the file at `path`, from one fstat.
Result<std::optional<FlatFileSeal>> stat_flat_file(const std::filesystem::path& path, const ImageDigest& digest) {
  Result<Fd> fd = open_file(path, O_RDONLY | O_NOFOLLOW);
  if (!fd) {
    std::error_code error;
    if (!std::filesystem::exists(path, error) && !error) return std::optional<FlatFileSeal>();
    return fd.error();
  }
  struct stat st {};
  if (::fstat(fd->get(), &st) != 0) return errno_error(fmt::format("stat {}", path.string()), errno);
  if (!S_ISREG(st.st_mode)) {
    return make_error(ErrorCode::kCorruption, "flat file {} is not a regular file", path.string());
  }
  auto nanoseconds = [](const timespec& time) { return static_cast<int64_t>(time.tv_sec) * 1000000000 + time.tv_nsec; };
  return std::optional<FlatFileSeal>(FlatFileSeal{digest, static_cast<uint64_t>(st.st_size),
                                                  static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
                                                  nanoseconds(st.st_mtim), nanoseconds(st.st_ctim)});
}

bool same_file_state(const FlatFileSeal& a, const FlatFileSeal& b) {
  return a.size_bytes == b.size_bytes && a.device == b.device && a.inode == b.inode && a.mtime_ns == b.mtime_ns &&
         a.ctime_ns == b.ctime_ns;
}

}  // namespace

Result<bool> Store::flat_file_is_sealed(const ImageDigest& digest, uint64_t size_bytes) {
  DELTAVM_ASSIGN_OR_RETURN(std::optional<FlatFileSeal> seal, catalog_.find_flat_file(digest));
  if (!seal || seal->size_bytes != size_bytes) return false;
  DELTAVM_ASSIGN_OR_RETURN(std::optional<FlatFileSeal> now, stat_flat_file(flat_file_path(digest), digest));
  return now && same_file_state(*seal, *now);
}

Status Store::make_flat_file(const ImageRecord& record) {
  std::filesystem::path path = flat_file_path(record.digest);
  std::error_code error;
  if (std::filesystem::exists(path, error)) {
    // Unsealed, or changed since it was sealed: its bytes decide. A file that still holds the
    // image is sealed again as it is (a copied store, a touched file); any other is replaced.
    Result<FileDigest> found = digest_file(path);
    if (!found || found->size_bytes != record.image_size_bytes || found->digest != record.digest) {
      if (int fault = injected_fault(DurableCall::kUnlink)) {
        return errno_error(fmt::format("remove damaged flat file {}", path.string()), fault);
      }
      if (::unlink(path.c_str()) != 0)
        return errno_error(fmt::format("remove damaged flat file {}", path.string()), errno);
    }
  }
  if (!std::filesystem::exists(path, error)) {
    std::filesystem::create_directories(path.parent_path(), error);
    if (error) return make_error(ErrorCode::kIo, "create {}: {}", path.parent_path().string(), error.message());
    // rebuild_image verifies every object of the chain and the rebuilt image's digest.
    DELTAVM_ASSIGN_OR_RETURN(Mapping image, rebuild_image(record.name));
    DELTAVM_ASSIGN_OR_RETURN(AtomicFileWriter writer, AtomicFileWriter::create(path, kObjectMode));
    DELTAVM_TRY(writer.append(image.bytes()));
    DELTAVM_TRY(writer.commit());
  }
  if (::chmod(path.c_str(), kObjectMode) != 0) return errno_error(fmt::format("chmod {}", path.string()), errno);
  DELTAVM_ASSIGN_OR_RETURN(std::optional<FlatFileSeal> seal, stat_flat_file(path, record.digest));
  if (!seal) return make_error(ErrorCode::kIo, "flat file {} vanished while it was made", path.string());
  // The kernel stamps changes with a coarse clock (a tick of a few milliseconds). Once that
  // clock has passed the file's change time, any later change stamps a later time, so the seal
  // cannot miss one made in the same tick as the file.
  for (;;) {
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME_COARSE, &now);
    if (static_cast<int64_t>(now.tv_sec) * 1000000000 + now.tv_nsec > seal->ctime_ns) break;
    ::usleep(1000);
  }
  return catalog_.put_flat_file(*seal);
}

Result<std::filesystem::path> Store::flat_file(const ImageRecord& record) {
  {
    DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kShared));
    DELTAVM_ASSIGN_OR_RETURN(bool sealed, flat_file_is_sealed(record.digest, record.image_size_bytes));
    if (sealed) return flat_file_path(record.digest);
  }
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  DELTAVM_ASSIGN_OR_RETURN(bool sealed, flat_file_is_sealed(record.digest, record.image_size_bytes));
  if (!sealed) DELTAVM_TRY(make_flat_file(record));
  return flat_file_path(record.digest);
}

Result<std::vector<std::string>> Store::children(const std::string& name) { return catalog_.children(name); }

Status Store::remove_image(const std::string& name) {
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  DELTAVM_ASSIGN_OR_RETURN(ImageRecord record, find(name));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<std::string> children, catalog_.children(name));
  if (!children.empty()) {
    return make_error(ErrorCode::kConflict, "image {} is the parent of {} other image(s), first {}", name,
                      children.size(), children.front());
  }
  return catalog_.remove(name);
}

namespace {

struct DiskFile {
  ImageDigest id;  // The object id, or the digest of a flat file's image.
  std::filesystem::path path;
  uint64_t size_bytes;
};

// Walks a directory of the store: the files `id_of` names go to `files`, every other file
// (temporaries, strays) to `others`. Nothing here throws: a file that vanishes or cannot be
// read ends the walk with an error naming it.
Status scan_files(const std::filesystem::path& directory,
                  const std::function<std::optional<ImageDigest>(const std::filesystem::path&)>& id_of,
                  std::vector<DiskFile>& files, std::vector<std::filesystem::path>& others) {
  std::error_code error;
  if (!std::filesystem::exists(directory, error)) return {};
  for (auto it = std::filesystem::recursive_directory_iterator(directory, error);
       !error && it != std::filesystem::recursive_directory_iterator(); it.increment(error)) {
    bool regular = it->is_regular_file(error);
    if (error) break;
    if (!regular) continue;
    if (std::optional<ImageDigest> id = id_of(it->path())) {
      uint64_t size = it->file_size(error);
      if (error) break;
      files.push_back({*id, it->path(), size});
    } else {
      others.push_back(it->path());
    }
  }
  if (error) return make_error(ErrorCode::kIo, "scan {}: {}", directory.string(), error.message());
  return {};
}

// DIR/objects/ab/abcd…: an object id in a shard named by its first two digits.
std::optional<ImageDigest> object_file_id(const std::filesystem::path& path) {
  std::string name = path.filename().string();
  if (path.parent_path().filename() != name.substr(0, 2)) return std::nullopt;
  return ImageDigest::from_hex(name);
}

// DIR/cache/flat/DIGEST.ram.
std::optional<ImageDigest> flat_file_digest(const std::filesystem::path& path) {
  std::string name = path.filename().string();
  if (path.extension() != ".ram") return std::nullopt;
  return ImageDigest::from_hex(name.substr(0, name.size() - 4));
}

Status remove_file(const std::filesystem::path& path) {
  if (int fault = injected_fault(DurableCall::kUnlink))
    return errno_error(fmt::format("unlink {}", path.string()), fault);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return errno_error(fmt::format("unlink {}", path.string()), errno);
  return {};
}

}  // namespace

Result<GcReport> Store::gc() {
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kExclusive));
  // Nothing is removed unless the catalog proves it unreferenced: a catalog SQLite does not
  // vouch for is no proof.
  DELTAVM_ASSIGN_OR_RETURN(std::vector<std::string> catalog_problems, catalog_.integrity_check(/*quick=*/true));
  if (!catalog_problems.empty()) {
    return make_error(ErrorCode::kCorruption, "store {}: the catalog fails SQLite's check ({}); gc removes nothing",
                      directory_.string(), catalog_problems.front());
  }
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, catalog_.list());
  std::set<ObjectId> referenced;
  std::set<ImageDigest> digests;
  for (const ImageRecord& record : records) {
    referenced.insert(record.object_id);
    digests.insert(record.digest);
    for (const Attachment& attachment : record.attachments) referenced.insert(attachment.object_id);
  }
  std::vector<DiskFile> objects, flat_files;
  std::vector<std::filesystem::path> temporaries;
  DELTAVM_TRY(scan_files(directory_ / "objects", object_file_id, objects, temporaries));
  DELTAVM_TRY(scan_files(directory_ / "cache" / "flat", flat_file_digest, flat_files, temporaries));
  GcReport report;
  for (const DiskFile& object : objects) {
    if (referenced.count(ObjectId{object.id})) continue;
    DELTAVM_TRY(remove_file(object.path));
    ++report.objects_removed;
    report.bytes_freed += object.size_bytes;
  }
  // A flat file stays if an image still uses it and its bytes are still that image's; any
  // other (unused, changed since sealed, or damaged) goes, and the next load makes it anew.
  for (const DiskFile& flat : flat_files) {
    if (digests.count(flat.id)) {
      DELTAVM_ASSIGN_OR_RETURN(std::optional<FlatFileSeal> seal, catalog_.find_flat_file(flat.id));
      DELTAVM_ASSIGN_OR_RETURN(std::optional<FlatFileSeal> now, stat_flat_file(flat.path, flat.id));
      Result<FileDigest> found = digest_file(flat.path);
      if (seal && now && same_file_state(*seal, *now) && found && found->digest == flat.id) continue;
    }
    DELTAVM_TRY(catalog_.remove_flat_file(flat.id));
    DELTAVM_TRY(remove_file(flat.path));
    ++report.flat_files_removed;
    report.bytes_freed += flat.size_bytes;
  }
  DELTAVM_ASSIGN_OR_RETURN(std::vector<FlatFileSeal> seals, catalog_.list_flat_files());
  for (const FlatFileSeal& seal : seals) {
    std::error_code error;
    if (!digests.count(seal.digest) || !std::filesystem::exists(flat_file_path(seal.digest), error)) {
      DELTAVM_TRY(catalog_.remove_flat_file(seal.digest));
    }
  }
  // Writers hold the exclusive lock while a temporary exists, so every temporary seen here is
  // the leftover of an interrupted writer.
  for (const std::filesystem::path& path : temporaries) {
    std::error_code error;
    uint64_t size = std::filesystem::file_size(path, error);
    DELTAVM_TRY(remove_file(path));
    ++report.temporaries_removed;
    if (!error) report.bytes_freed += size;
  }
  return report;
}

Result<FsckReport> Store::fsck() {
  DELTAVM_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(directory_, StoreLock::Mode::kShared));
  FsckReport report;
  DELTAVM_ASSIGN_OR_RETURN(std::vector<std::string> sqlite_problems, catalog_.integrity_check());
  for (const std::string& problem : sqlite_problems) report.problems.push_back("catalog: " + problem);
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> records, catalog_.list());

  std::map<std::string, const ImageRecord*> by_name;
  for (const ImageRecord& record : records) by_name[record.name] = &record;
  std::set<ObjectId> referenced;
  for (const ImageRecord& record : records) {
    ++report.images_checked;
    referenced.insert(record.object_id);
    for (const Attachment& attachment : record.attachments) {
      referenced.insert(attachment.object_id);
      Result<Mapping> bytes = map_object(attachment.object_id, attachment.size_bytes);
      if (!bytes)
        report.problems.push_back(
            fmt::format("image {}: attachment {}: {}", record.name, attachment.role, bytes.error().message));
    }
    if (record.parent) {
      auto parent = by_name.find(*record.parent);
      if (parent == by_name.end()) {
        report.problems.push_back(fmt::format("image {}: parent {} is missing", record.name, *record.parent));
      } else if (parent->second->chain_depth + 1 != record.chain_depth) {
        report.problems.push_back(fmt::format("image {}: chain depth {} but its parent's is {}", record.name,
                                              record.chain_depth, parent->second->chain_depth));
      } else if (parent->second->image_size_bytes != record.image_size_bytes) {
        report.problems.push_back(fmt::format("image {}: {} bytes but its parent is {} bytes", record.name,
                                              record.image_size_bytes, parent->second->image_size_bytes));
      }
    } else if (record.chain_depth != 0) {
      report.problems.push_back(fmt::format("image {}: a base with chain depth {}", record.name, record.chain_depth));
    }
    Result<Delta> delta = read_delta(record);
    if (!delta) {
      report.problems.push_back(fmt::format("image {}: {}", record.name, delta.error().message));
      continue;
    }
    if (delta->target_digest && *delta->target_digest != record.digest) {
      report.problems.push_back(fmt::format("image {}: object {} produces image {}, catalog says {}", record.name,
                                            record.object_id, *delta->target_digest, record.digest));
    }
    if (record.parent && delta->base_digest) {
      auto parent = by_name.find(*record.parent);
      if (parent != by_name.end() && *delta->base_digest != parent->second->digest) {
        report.problems.push_back(fmt::format("image {}: its delta applies to image {}, not to its parent {} ({})",
                                              record.name, delta->base_digest->hex(), *record.parent,
                                              parent->second->digest));
      }
    }
  }

  std::vector<DiskFile> objects, flat_files;
  std::vector<std::filesystem::path> temporaries;
  DELTAVM_TRY(scan_files(directory_ / "objects", object_file_id, objects, temporaries));
  DELTAVM_TRY(scan_files(directory_ / "cache" / "flat", flat_file_digest, flat_files, temporaries));
  for (const DiskFile& object : objects) {
    ++report.objects_checked;
    ObjectId id{object.id};
    if (referenced.count(id)) continue;  // Verified above through its image.
    report.unreferenced.push_back(id);
    Result<Mapping> bytes = map_object(id, object.size_bytes);
    if (!bytes) report.problems.push_back(bytes.error().message);
  }
  // Every flat file is verified whole: the seal shows changes through the file system, the
  // digest any change at all.
  std::set<ImageDigest> digests;
  for (const ImageRecord& record : records) digests.insert(record.digest);
  for (const DiskFile& flat : flat_files) {
    ++report.flat_files_checked;
    if (!digests.count(flat.id)) {
      report.unused_flat_files.push_back(flat.path.string());
      continue;
    }
    Result<FileDigest> found = digest_file(flat.path);
    if (!found) {
      report.problems.push_back(fmt::format("flat file {}: {}", flat.path.string(), found.error().message));
    } else if (found->digest != flat.id) {
      report.problems.push_back(fmt::format(
          "flat file {}: its bytes have digest {}, not the image's {}: the cached image is damaged (deltavm store "
          "gc removes it; the next load makes it anew from the verified chain)",
          flat.path.string(), found->digest, flat.id));
    }
  }
  for (const std::filesystem::path& path : temporaries) report.temporaries.push_back(path.string());
  return report;
}

}  // namespace deltavm
