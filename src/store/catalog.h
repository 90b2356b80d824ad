// The store's catalog: one SQLite database listing every image, its parent, the object that
// holds its delta, and its sizes and digest. SQLite in WAL mode with synchronous=FULL makes
// each change atomic and durable once the call returns.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "image/page.h"

struct sqlite3;

namespace deltavm {

// The name of a stored object: the XXH3-128 of its bytes, as 32 hex digits on disk.
struct ObjectId {
  ImageDigest hash;

  auto operator<=>(const ObjectId&) const = default;
  std::string hex() const { return hash.hex(); }
  static std::optional<ObjectId> from_hex(std::string_view hex);
  static ObjectId of(std::span<const uint8_t> bytes);
};

// A named object stored with an image, opaque to the store (a VM's machine state, the
// initramfs it booted from). Kept and verified like the image's own delta.
struct Attachment {
  std::string role;
  ObjectId object_id;
  uint64_t size_bytes = 0;
};

struct ImageRecord {
  std::string name;
  std::optional<std::string> parent;  // None for a base image.
  uint32_t chain_depth = 0;           // Number of deltas between the base and this image.
  ObjectId object_id;                 // The object holding the delta from the parent.
  uint64_t image_size_bytes = 0;      // The size of the whole image.
  uint64_t stored_size_bytes = 0;     // The size of its object.
  ImageDigest digest;                 // Of the whole image.
  int64_t created_at_unix = 0;
  std::string metadata = "{}";       // JSON owned by the caller; the store keeps it as is.
  std::vector<uint8_t> page_sample;  // Hashes of sampled pages, for finding similar images.
  // What the image's delta is compressed against: "role:kind,role:kind", each an attachment
  // transformed by a registered reference kind (store.h), concatenated. Empty: nothing.
  std::string reference;
  std::vector<Attachment> attachments;
};

// What the store recorded of a flat file in its cache when it verified the file's bytes: the
// file's identity and the times the kernel sets on every change. A file that still matches
// was not written, replaced or truncated since; a file that does not is verified again.
struct FlatFileSeal {
  ImageDigest digest;  // The image the file holds.
  uint64_t size_bytes = 0;
  uint64_t device = 0;
  uint64_t inode = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
};

// An image fetched from a remote: the store may evict it when nothing here needs it
// (Store::evict_cached).
struct CachedImage {
  std::string name;
  std::string remote;
  int64_t last_used_unix = 0;
};

// A remote the store pushes to and pulls from (store/remote.h): where, never credentials.
struct RemoteRecord {
  std::string name;
  std::string url;  // s3://BUCKET[/PREFIX]
  std::string endpoint;
  std::string region;
};

class Catalog {
 public:
  // Opens an existing catalog. A missing, empty or unreadable file, or one that is not a
  // deltavm catalog, is refused: a catalog is never recreated in place of a lost one.
  static Result<Catalog> open(const std::filesystem::path& path);
  // Creates a new, empty catalog at `path`, which must not exist: built under a temporary name
  // and renamed into place, so that `path` either does not exist or holds a whole catalog.
  static Status create(const std::filesystem::path& path);
  Catalog(Catalog&&) noexcept;
  Catalog& operator=(Catalog&&) noexcept;
  ~Catalog();

  Result<std::optional<ImageRecord>> find(const std::string& name);
  Result<std::vector<ImageRecord>> list();
  // Inserts the record and its attachments, and `cached` if given, in one transaction.
  Status insert(const ImageRecord& record, const std::optional<CachedImage>& cached = std::nullopt);
  Status remove(const std::string& name);
  Result<std::vector<std::string>> children(const std::string& name);
  // SQLite's own consistency check: an empty list means the database is sound. `quick` skips
  // the index checks.
  Result<std::vector<std::string>> integrity_check(bool quick = false);

  Result<std::optional<FlatFileSeal>> find_flat_file(const ImageDigest& digest);
  Result<std::vector<FlatFileSeal>> list_flat_files();
  Status put_flat_file(const FlatFileSeal& seal);
  Status remove_flat_file(const ImageDigest& digest);

  // Least recently used first.
  Result<std::vector<CachedImage>> list_cached();
  // Sets the image's last use to `now_unix` unless it was set within `granularity_s`.
  Status touch_cached(const std::string& name, int64_t now_unix, int64_t granularity_s);
  Result<std::optional<std::string>> setting(const std::string& key);
  Status put_setting(const std::string& key, const std::optional<std::string>& value);  // None: remove.

  Result<std::vector<RemoteRecord>> list_remotes();
  Status insert_remote(const RemoteRecord& remote);  // kAlreadyExists for a name in use.
  Status remove_remote(const std::string& name);     // kNotFound for an unknown name.

 private:
  explicit Catalog(sqlite3* db) : db_(db) {}
  Status load_attachments(ImageRecord& record);
  Status insert_rows(const ImageRecord& record);
  sqlite3* db_ = nullptr;
};

}  // namespace deltavm

template <>
struct fmt::formatter<deltavm::ObjectId> : fmt::formatter<std::string_view> {
  auto format(const deltavm::ObjectId& id, fmt::format_context& context) const {
    return fmt::formatter<std::string_view>::format(id.hex(), context);
  }
};
