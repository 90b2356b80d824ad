#include "store/catalog.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/faults.h"
#include "base/file.h"
#include "store/sqlite_vfs.h"

namespace deltavm {
namespace {

// 1: images, attachments. 2: flat_files (seals of the flat-file cache). 3: remotes.
// 4: cached_images (images fetched from a remote), settings.
constexpr int kSchemaVersion = 4;

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS images (
  name              TEXT PRIMARY KEY,
  parent            TEXT REFERENCES images(name),
  chain_depth       INTEGER NOT NULL CHECK (chain_depth >= 0),
  object_id         TEXT NOT NULL,
  image_size_bytes  INTEGER NOT NULL CHECK (image_size_bytes >= 0),
  stored_size_bytes INTEGER NOT NULL CHECK (stored_size_bytes >= 0),
  digest            TEXT NOT NULL,
  created_at_unix   INTEGER NOT NULL,
  metadata          TEXT NOT NULL DEFAULT '{}',
  page_sample       BLOB NOT NULL DEFAULT x'',
  reference         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS images_by_parent ON images(parent);
CREATE TABLE IF NOT EXISTS attachments (
  image      TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
  role       TEXT NOT NULL,
  object_id  TEXT NOT NULL,
  size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
  PRIMARY KEY (image, role)
);
)sql";

constexpr const char* kFlatFilesSchema = R"sql(
CREATE TABLE IF NOT EXISTS flat_files (
  digest     TEXT PRIMARY KEY,
  size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
  device     INTEGER NOT NULL,
  inode      INTEGER NOT NULL,
  mtime_ns   INTEGER NOT NULL,
  ctime_ns   INTEGER NOT NULL
);
)sql";

// Images fetched from a remote, which the store may evict, and the store's settings.
constexpr const char* kCacheSchema = R"sql(
CREATE TABLE IF NOT EXISTS cached_images (
  name           TEXT PRIMARY KEY REFERENCES images(name) ON DELETE CASCADE,
  remote         TEXT NOT NULL,
  last_used_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
)sql";

// Where the store pushes and pulls; never credentials.
constexpr const char* kRemotesSchema = R"sql(
CREATE TABLE IF NOT EXISTS remotes (
  name     TEXT PRIMARY KEY,
  url      TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  region   TEXT NOT NULL
);
)sql";

// Owns one prepared statement.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) : db_(db) {
    if (sqlite3_prepare_v2(db, sql, -1, &statement_, nullptr) != SQLITE_OK) statement_ = nullptr;
  }
  ~Statement() { sqlite3_finalize(statement_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  bool ok() const { return statement_ != nullptr; }
  sqlite3_stmt* get() { return statement_; }
  void bind(int index, const std::string& text) {
    sqlite3_bind_text(statement_, index, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
  }
  void bind(int index, int64_t value) { sqlite3_bind_int64(statement_, index, value); }
  void bind_null(int index) { sqlite3_bind_null(statement_, index); }
  void bind_blob(int index, const std::vector<uint8_t>& bytes) {
    sqlite3_bind_blob(statement_, index, bytes.data(), static_cast<int>(bytes.size()), SQLITE_TRANSIENT);
  }
  std::vector<uint8_t> blob(int column) {
    const auto* data = static_cast<const uint8_t*>(sqlite3_column_blob(statement_, column));
    int size = sqlite3_column_bytes(statement_, column);
    return data == nullptr ? std::vector<uint8_t>() : std::vector<uint8_t>(data, data + size);
  }
  // SQLITE_ROW, SQLITE_DONE or an error code.
  int step() { return sqlite3_step(statement_); }
  std::string text(int column) {
    const unsigned char* value = sqlite3_column_text(statement_, column);
    return value == nullptr ? std::string() : reinterpret_cast<const char*>(value);
  }
  int64_t integer(int column) { return sqlite3_column_int64(statement_, column); }
  bool is_null(int column) { return sqlite3_column_type(statement_, column) == SQLITE_NULL; }

 private:
  sqlite3* db_;
  sqlite3_stmt* statement_ = nullptr;
};

// SQLite's message for the last failure on `db`, with the system's reason when a system call
// failed (a full disk says "No space left on device").
std::string sqlite_reason(sqlite3* db, const char* message) {
  int code = sqlite3_errcode(db);
  int system = sqlite3_system_errno(db);
  // The unix VFS turns ENOSPC into SQLITE_FULL without always leaving it behind (and the
  // catalog sets no page limit, the other cause of SQLITE_FULL).
  if (code == SQLITE_FULL && system == 0) system = ENOSPC;
  std::string text = message != nullptr ? message : sqlite3_errmsg(db);
  if ((code == SQLITE_FULL || code == SQLITE_IOERR || code == SQLITE_CANTOPEN) && system != 0) {
    text += fmt::format(" ({})", std::strerror(system));
  }
  return text;
}

Error sqlite_error(sqlite3* db, std::string_view what) {
  return make_error(ErrorCode::kIo, "catalog: {}: {}", what, sqlite_reason(db, nullptr));
}

Status execute(sqlite3* db, const char* sql) {
  char* message = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &message) != SQLITE_OK) {
    Error error = make_error(ErrorCode::kIo, "catalog: {}", sqlite_reason(db, message));
    sqlite3_free(message);
    return error;
  }
  return {};
}

constexpr const char* kSelectColumns =
    "SELECT name, parent, chain_depth, object_id, image_size_bytes, stored_size_bytes, digest, "
    "created_at_unix, metadata, page_sample, reference FROM images";

// A digest column: 32 hex digits, or the catalog is damaged.
Result<ImageDigest> digest_column(Statement& statement, int column, std::string_view what) {
  std::string text = statement.text(column);
  std::optional<ImageDigest> digest = ImageDigest::from_hex(text);
  if (!digest) return make_error(ErrorCode::kCorruption, "catalog: {} is {:?}, not 32 hex digits", what, text);
  return *digest;
}

Result<ImageRecord> read_record(Statement& statement) {
  ImageRecord record;
  record.name = statement.text(0);
  if (!statement.is_null(1)) record.parent = statement.text(1);
  record.chain_depth = static_cast<uint32_t>(statement.integer(2));
  DELTAVM_ASSIGN_OR_RETURN(record.object_id.hash,
                           digest_column(statement, 3, fmt::format("the object id of image {}", record.name)));
  record.image_size_bytes = static_cast<uint64_t>(statement.integer(4));
  record.stored_size_bytes = static_cast<uint64_t>(statement.integer(5));
  DELTAVM_ASSIGN_OR_RETURN(record.digest,
                           digest_column(statement, 6, fmt::format("the digest of image {}", record.name)));
  record.created_at_unix = statement.integer(7);
  record.metadata = statement.text(8);
  record.page_sample = statement.blob(9);
  record.reference = statement.text(10);
  return record;
}

}  // namespace

Result<Catalog> Catalog::open(const std::filesystem::path& path) {
  std::error_code error;
  uint64_t size = std::filesystem::file_size(path, error);
  if (error) {
    return make_error(error == std::errc::no_such_file_or_directory ? ErrorCode::kNotFound : ErrorCode::kIo,
                      "catalog {}: {}", path.string(), error.message());
  }
  if (size == 0) {
    return make_error(ErrorCode::kCorruption,
                      "catalog {} is empty (0 bytes): the store's catalog was lost or truncated", path.string());
  }
  sqlite3* db = nullptr;
  // Serialized: one connection may be used from several threads (store.h, "Concurrency").
  int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, catalog_vfs_name());
  Catalog catalog(db);  // Closes db on every return below.
  if (rc != SQLITE_OK) return sqlite_error(db, fmt::format("open {}", path.string()));
  sqlite3_busy_timeout(db, 30000);
  Status pragmas = execute(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;");
  if (!pragmas) {
    return make_error(ErrorCode::kCorruption, "catalog {} is unreadable: {}", path.string(), pragmas.error().message);
  }
  Statement version(db, "PRAGMA user_version");
  if (!version.ok() || version.step() != SQLITE_ROW) return sqlite_error(db, "read user_version");
  int64_t found = version.integer(0);
  if (found > kSchemaVersion) {
    return make_error(ErrorCode::kUnsupported, "catalog {}: schema version {}, this build knows {}", path.string(),
                      found, kSchemaVersion);
  }
  if (found < 1) {
    return make_error(ErrorCode::kCorruption,
                      "catalog {} is an SQLite database but not a deltavm catalog (schema version {})", path.string(),
                      found);
  }
  if (found < kSchemaVersion) {  // Version 1 gains the flat-file seals, 1 and 2 the remotes.
    DELTAVM_TRY(execute(db, "BEGIN IMMEDIATE"));
    Status migrated = execute(db, kFlatFilesSchema);
    if (migrated) migrated = execute(db, kRemotesSchema);
    if (migrated) migrated = execute(db, kCacheSchema);
    if (migrated) migrated = execute(db, fmt::format("PRAGMA user_version = {}", kSchemaVersion).c_str());
    if (!migrated) {
      (void)execute(db, "ROLLBACK");
      return migrated.error();
    }
    DELTAVM_TRY(execute(db, "COMMIT"));
  }
  return catalog;
}

Status Catalog::create(const std::filesystem::path& path) {
  std::filesystem::path temporary = path;
  temporary += fmt::format("{}{}", kTemporaryMarker, ::getpid());
  ::unlink(temporary.c_str());
  {
    sqlite3* db = nullptr;
    int rc = sqlite3_open_v2(temporary.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, catalog_vfs_name());
    Catalog catalog(db);
    if (rc != SQLITE_OK) return sqlite_error(db, fmt::format("create {}", temporary.string()));
    // A rollback journal while the file has its temporary name: nothing is left beside it.
    DELTAVM_TRY(execute(db, "PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;"));
    DELTAVM_TRY(execute(db, "BEGIN IMMEDIATE"));
    DELTAVM_TRY(execute(db, kSchema));
    DELTAVM_TRY(execute(db, kFlatFilesSchema));
    DELTAVM_TRY(execute(db, kRemotesSchema));
    DELTAVM_TRY(execute(db, kCacheSchema));
    DELTAVM_TRY(execute(db, fmt::format("PRAGMA user_version = {}", kSchemaVersion).c_str()));
    DELTAVM_TRY(execute(db, "COMMIT"));
  }
  {
    DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(temporary, O_RDONLY));
    if (int fault = injected_fault(DurableCall::kFsync))
      return errno_error(fmt::format("fsync {}", temporary.string()), fault);
    if (::fsync(fd.get()) != 0) return errno_error(fmt::format("fsync {}", temporary.string()), errno);
  }
  // link(2) fails if `path` exists: a catalog that appeared meanwhile is never replaced.
  int linked = injected_fault(DurableCall::kRename);
  if (linked == 0 && ::link(temporary.c_str(), path.c_str()) != 0) linked = errno;
  if (linked != 0) {
    int saved = linked;
    ::unlink(temporary.c_str());
    return errno_error(fmt::format("create catalog {}", path.string()), saved);
  }
  ::unlink(temporary.c_str());
  return fsync_directory(path.parent_path());
}

Catalog::Catalog(Catalog&& other) noexcept : db_(other.db_) { other.db_ = nullptr; }

Catalog& Catalog::operator=(Catalog&& other) noexcept {
  if (this != &other) {
    sqlite3_close(db_);
    db_ = other.db_;
    other.db_ = nullptr;
  }
  return *this;
}

Catalog::~Catalog() { sqlite3_close(db_); }

Result<std::optional<ImageRecord>> Catalog::find(const std::string& name) {
  Statement statement(db_, fmt::format("{} WHERE name = ?1", kSelectColumns).c_str());
  if (!statement.ok()) return sqlite_error(db_, "prepare find");
  statement.bind(1, name);
  int rc = statement.step();
  if (rc == SQLITE_DONE) return std::optional<ImageRecord>();
  if (rc != SQLITE_ROW) return sqlite_error(db_, fmt::format("find image {}", name));
  DELTAVM_ASSIGN_OR_RETURN(ImageRecord record, read_record(statement));
  DELTAVM_TRY(load_attachments(record));
  return std::optional<ImageRecord>(std::move(record));
}

Status Catalog::load_attachments(ImageRecord& record) {
  Statement statement(db_, "SELECT role, object_id, size_bytes FROM attachments WHERE image = ?1 ORDER BY role");
  if (!statement.ok()) return sqlite_error(db_, "prepare attachments");
  statement.bind(1, record.name);
  int rc;
  while ((rc = statement.step()) == SQLITE_ROW) {
    Attachment attachment{statement.text(0), {}, static_cast<uint64_t>(statement.integer(2))};
    DELTAVM_ASSIGN_OR_RETURN(
        attachment.object_id.hash,
        digest_column(statement, 1,
                      fmt::format("the object of image {}'s {} attachment", record.name, attachment.role)));
    record.attachments.push_back(std::move(attachment));
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, fmt::format("attachments of {}", record.name));
  return {};
}

Result<std::vector<ImageRecord>> Catalog::list() {
  Statement statement(db_, fmt::format("{} ORDER BY created_at_unix, name", kSelectColumns).c_str());
  if (!statement.ok()) return sqlite_error(db_, "prepare list");
  std::vector<ImageRecord> records;
  int rc;
  while ((rc = statement.step()) == SQLITE_ROW) {
    DELTAVM_ASSIGN_OR_RETURN(ImageRecord record, read_record(statement));
    records.push_back(std::move(record));
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, "list images");
  for (ImageRecord& record : records) DELTAVM_TRY(load_attachments(record));
  return records;
}

Status Catalog::insert(const ImageRecord& record, const std::optional<CachedImage>& cached) {
  DELTAVM_TRY(execute(db_, "BEGIN IMMEDIATE"));
  Status status = insert_rows(record);
  if (status && cached) {
    Statement statement(db_, "INSERT INTO cached_images (name, remote, last_used_unix) VALUES (?1, ?2, ?3)");
    if (!statement.ok()) {
      status = sqlite_error(db_, "prepare insert cached image");
    } else {
      statement.bind(1, cached->name);
      statement.bind(2, cached->remote);
      statement.bind(3, cached->last_used_unix);
      if (statement.step() != SQLITE_DONE) status = sqlite_error(db_, fmt::format("record {} as cached", cached->name));
    }
  }
  if (!status) {
    (void)execute(db_, "ROLLBACK");
    return status;
  }
  return execute(db_, "COMMIT");
}

Status Catalog::insert_rows(const ImageRecord& record) {
  Statement statement(db_,
                      "INSERT INTO images (name, parent, chain_depth, object_id, image_size_bytes, "
                      "stored_size_bytes, digest, created_at_unix, metadata, page_sample, reference) "
                      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)");
  if (!statement.ok()) return sqlite_error(db_, "prepare insert");
  statement.bind(1, record.name);
  if (record.parent)
    statement.bind(2, *record.parent);
  else
    statement.bind_null(2);
  statement.bind(3, static_cast<int64_t>(record.chain_depth));
  statement.bind(4, record.object_id.hex());
  statement.bind(5, static_cast<int64_t>(record.image_size_bytes));
  statement.bind(6, static_cast<int64_t>(record.stored_size_bytes));
  statement.bind(7, record.digest.hex());
  statement.bind(8, record.created_at_unix);
  statement.bind(9, record.metadata);
  statement.bind_blob(10, record.page_sample);
  statement.bind(11, record.reference);
  int rc = statement.step();
  if (rc == SQLITE_CONSTRAINT) {
    return make_error(ErrorCode::kAlreadyExists, "catalog: image {} already exists", record.name);
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, fmt::format("insert image {}", record.name));
  for (const Attachment& attachment : record.attachments) {
    Statement insert(db_, "INSERT INTO attachments (image, role, object_id, size_bytes) VALUES (?1, ?2, ?3, ?4)");
    if (!insert.ok()) return sqlite_error(db_, "prepare insert attachment");
    insert.bind(1, record.name);
    insert.bind(2, attachment.role);
    insert.bind(3, attachment.object_id.hex());
    insert.bind(4, static_cast<int64_t>(attachment.size_bytes));
    if (insert.step() != SQLITE_DONE) {
      return sqlite_error(db_, fmt::format("insert attachment {} of {}", attachment.role, record.name));
    }
  }
  return {};
}

Status Catalog::remove(const std::string& name) {
  Statement statement(db_, "DELETE FROM images WHERE name = ?1");
  if (!statement.ok()) return sqlite_error(db_, "prepare remove");
  statement.bind(1, name);
  if (statement.step() != SQLITE_DONE) return sqlite_error(db_, fmt::format("remove image {}", name));
  return {};
}

Result<std::vector<std::string>> Catalog::children(const std::string& name) {
  Statement statement(db_, "SELECT name FROM images WHERE parent = ?1 ORDER BY name");
  if (!statement.ok()) return sqlite_error(db_, "prepare children");
  statement.bind(1, name);
  std::vector<std::string> names;
  int rc;
  while ((rc = statement.step()) == SQLITE_ROW) names.push_back(statement.text(0));
  if (rc != SQLITE_DONE) return sqlite_error(db_, fmt::format("children of {}", name));
  return names;
}

Result<std::vector<std::string>> Catalog::integrity_check(bool quick) {
  Statement statement(db_, quick ? "PRAGMA quick_check" : "PRAGMA integrity_check");
  if (!statement.ok()) return sqlite_error(db_, "prepare integrity_check");
  std::vector<std::string> problems;
  int rc;
  while ((rc = statement.step()) == SQLITE_ROW) {
    std::string line = statement.text(0);
    if (line != "ok") problems.push_back(line);
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, "integrity_check");
  return problems;
}

namespace {

Result<FlatFileSeal> read_seal(Statement& statement) {
  FlatFileSeal seal;
  DELTAVM_ASSIGN_OR_RETURN(seal.digest, digest_column(statement, 0, "a flat file's digest"));
  seal.size_bytes = static_cast<uint64_t>(statement.integer(1));
  seal.device = static_cast<uint64_t>(statement.integer(2));
  seal.inode = static_cast<uint64_t>(statement.integer(3));
  seal.mtime_ns = statement.integer(4);
  seal.ctime_ns = statement.integer(5);
  return seal;
}

constexpr const char* kSelectSeal = "SELECT digest, size_bytes, device, inode, mtime_ns, ctime_ns FROM flat_files";

}  // namespace

Result<std::optional<FlatFileSeal>> Catalog::find_flat_file(const ImageDigest& digest) {
  Statement statement(db_, fmt::format("{} WHERE digest = ?1", kSelectSeal).c_str());
  if (!statement.ok()) return sqlite_error(db_, "prepare find flat file");
  statement.bind(1, digest.hex());
  int rc = statement.step();
  if (rc == SQLITE_DONE) return std::optional<FlatFileSeal>();
  if (rc != SQLITE_ROW) return sqlite_error(db_, fmt::format("find flat file {}", digest));
  DELTAVM_ASSIGN_OR_RETURN(FlatFileSeal seal, read_seal(statement));
  return std::optional<FlatFileSeal>(seal);
}

Result<std::vector<FlatFileSeal>> Catalog::list_flat_files() {
  Statement statement(db_, fmt::format("{} ORDER BY digest", kSelectSeal).c_str());
  if (!statement.ok()) return sqlite_error(db_, "prepare list flat files");
  std::vector<FlatFileSeal> seals;
  int rc;
  while ((rc = statement.step()) == SQLITE_ROW) {
    DELTAVM_ASSIGN_OR_RETURN(FlatFileSeal seal, read_seal(statement));
    seals.push_back(seal);
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, "list flat files");
  return seals;
}

Status Catalog::put_flat_file(const FlatFileSeal& seal) {
  Statement statement(db_,
                      "INSERT OR REPLACE INTO flat_files (digest, size_bytes, device, inode, mtime_ns, ctime_ns) "
                      "VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
  if (!statement.ok()) return sqlite_error(db_, "prepare seal flat file");
  statement.bind(1, seal.digest.hex());
  statement.bind(2, static_cast<int64_t>(seal.size_bytes));
  statement.bind(3, static_cast<int64_t>(seal.device));
  statement.bind(4, static_cast<int64_t>(seal.inode));
  statement.bind(5, seal.mtime_ns);
  statement.bind(6, seal.ctime_ns);
  if (statement.step() != SQLITE_DONE) return sqlite_error(db_, fmt::format("seal flat file {}", seal.digest));
  return {};
}

Status Catalog::remove_flat_file(const ImageDigest& digest) {
  Statement statement(db_, "DELETE FROM flat_files WHERE digest = ?1");
  if (!statement.ok()) return sqlite_error(db_, "prepare remove flat file");
  statement.bind(1, digest.hex());
  if (statement.step() != SQLITE_DONE) return sqlite_error(db_, fmt::format("remove flat file {}", digest));
  return {};
}

Result<std::vector<CachedImage>> Catalog::list_cached() {
  Statement statement(db_, "SELECT name, remote, last_used_unix FROM cached_images ORDER BY last_used_unix, name");
  if (!statement.ok()) return sqlite_error(db_, "prepare list cached images");
  std::vector<CachedImage> cached;
  int rc;
  while ((rc = statement.step()) == SQLITE_ROW) {
    cached.push_back({statement.text(0), statement.text(1), statement.integer(2)});
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, "list cached images");
  return cached;
}

Status Catalog::touch_cached(const std::string& name, int64_t now_unix, int64_t granularity_s) {
  Statement statement(db_, "UPDATE cached_images SET last_used_unix = ?2 WHERE name = ?1 AND last_used_unix < ?3");
  if (!statement.ok()) return sqlite_error(db_, "prepare touch cached image");
  statement.bind(1, name);
  statement.bind(2, now_unix);
  statement.bind(3, now_unix - granularity_s);
  if (statement.step() != SQLITE_DONE) return sqlite_error(db_, fmt::format("touch cached image {}", name));
  return {};
}

Result<std::optional<std::string>> Catalog::setting(const std::string& key) {
  Statement statement(db_, "SELECT value FROM settings WHERE key = ?1");
  if (!statement.ok()) return sqlite_error(db_, "prepare setting");
  statement.bind(1, key);
  int rc = statement.step();
  if (rc == SQLITE_DONE) return std::optional<std::string>();
  if (rc != SQLITE_ROW) return sqlite_error(db_, fmt::format("setting {}", key));
  return std::optional<std::string>(statement.text(0));
}

Status Catalog::put_setting(const std::string& key, const std::optional<std::string>& value) {
  Statement statement(db_, value ? "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)"
                                 : "DELETE FROM settings WHERE key = ?1");
  if (!statement.ok()) return sqlite_error(db_, "prepare put setting");
  statement.bind(1, key);
  if (value) statement.bind(2, *value);
  if (statement.step() != SQLITE_DONE) return sqlite_error(db_, fmt::format("put setting {}", key));
  return {};
}

Result<std::vector<RemoteRecord>> Catalog::list_remotes() {
  Statement statement(db_, "SELECT name, url, endpoint, region FROM remotes ORDER BY name");
  if (!statement.ok()) return sqlite_error(db_, "prepare list remotes");
  std::vector<RemoteRecord> remotes;
  int rc;
  while ((rc = statement.step()) == SQLITE_ROW) {
    remotes.push_back({statement.text(0), statement.text(1), statement.text(2), statement.text(3)});
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, "list remotes");
  return remotes;
}

Status Catalog::insert_remote(const RemoteRecord& remote) {
  Statement statement(db_, "INSERT INTO remotes (name, url, endpoint, region) VALUES (?1, ?2, ?3, ?4)");
  if (!statement.ok()) return sqlite_error(db_, "prepare add remote");
  statement.bind(1, remote.name);
  statement.bind(2, remote.url);
  statement.bind(3, remote.endpoint);
  statement.bind(4, remote.region);
  int rc = statement.step();
  if (rc == SQLITE_CONSTRAINT) {
    return make_error(ErrorCode::kAlreadyExists, "a remote named {} exists already", remote.name);
  }
  if (rc != SQLITE_DONE) return sqlite_error(db_, fmt::format("add remote {}", remote.name));
  return {};
}

Status Catalog::remove_remote(const std::string& name) {
  Statement statement(db_, "DELETE FROM remotes WHERE name = ?1");
  if (!statement.ok()) return sqlite_error(db_, "prepare remove remote");
  statement.bind(1, name);
  if (statement.step() != SQLITE_DONE) return sqlite_error(db_, fmt::format("remove remote {}", name));
  if (sqlite3_changes(db_) == 0) return make_error(ErrorCode::kNotFound, "no remote named {}", name);
  return {};
}

std::optional<ObjectId> ObjectId::from_hex(std::string_view hex) {
  std::optional<ImageDigest> hash = ImageDigest::from_hex(hex);
  if (!hash) return std::nullopt;
  return ObjectId{*hash};
}

ObjectId ObjectId::of(std::span<const uint8_t> bytes) { return ObjectId{digest_image(bytes)}; }

}  // namespace deltavm
