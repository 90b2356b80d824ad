// The embedded store: a directory of immutable, content-addressed objects plus a SQLite catalog.
// Every image is stored as a delta: a base as the delta from the all-zero image, any other as
// the delta from its parent. Objects are named by the XXH3-128 of their bytes and verified
// against that name whenever they are read.
//
// Layout:  DIR/catalog.sqlite              the catalog (catalog.h)
//          DIR/objects/ab/abcd…             one object per file, named by its hash
//          DIR/cache/flat/DIGEST.ram        whole images as flat files, for VMs to map
//          DIR/lock                         flock: readers shared, writers exclusive
//
// Crash safety: an object is written under a temporary name, fsync'ed and renamed, and only
// then recorded in the catalog, so a crash leaves at worst an unreferenced object (which gc
// removes) or a temporary (likewise); never a catalog entry without its complete object.
//
// Concurrency: every call may run at the same time as any other, from several threads of one
// process (sharing one Store) and from several processes (each with its own), on one store
// directory. Writers (put_image, remove_image, gc, making a flat file) take DIR/lock exclusive
// and readers (get_image, fsck, flat_file's seal check) shared, through an open file
// description of their own, so threads exclude each other as processes do; the catalog's
// SQLite connection is serialized, and lookups outside the lock (find, chain, list,
// read_delta, read_attachment) read one consistent SQLite snapshot each and verify every
// object they read, so a concurrent gc can only make them fail cleanly, never return wrong
// bytes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/file.h"
#include "image/delta.h"
#include "image/delta_file.h"
#include "store/catalog.h"

namespace deltavm {

// The store directory: --store DIR, else $DELTAVM_STORE, else ~/.local/share/deltavm.
std::filesystem::path default_store_directory();

struct FsckReport {
  uint64_t images_checked = 0;
  uint64_t objects_checked = 0;
  std::vector<std::string> problems;           // Corruption: the store is not sound.
  std::vector<ObjectId> unreferenced;          // Objects no image uses (gc removes them).
  std::vector<std::string> temporaries;        // Leftovers of interrupted writes (gc removes them).
  std::vector<std::string> unused_flat_files;  // Cached images no stored image is (gc removes them).
  uint64_t flat_files_checked = 0;
  bool clean() const { return problems.empty(); }
};

struct GcReport {
  uint64_t objects_removed = 0;
  uint64_t temporaries_removed = 0;
  uint64_t flat_files_removed = 0;
  uint64_t bytes_freed = 0;
};

// Turns an attachment's bytes into (part of) a compression reference, e.g. a compressed kernel
// into the kernel text it holds. The layers that know the formats hand their kinds to
// Store::open by name; the catalog only keeps the name. "raw" (the bytes as they are) is
// always there.
using ReferenceTransform = std::function<Result<std::vector<uint8_t>>(std::span<const uint8_t>)>;
using ReferenceKinds = std::map<std::string, ReferenceTransform, std::less<>>;

// How put_image encodes a delta: the caller's policy, not the store's.
struct DeltaEncoding {
  // Differing stretches of a page this close are stored as one run (DiffOptions).
  uint32_t merge_gap_bytes = 2;
  int compression_level = kDefaultDeltaCompressionLevel;
};

// What put_image stores beside the image itself.
struct PutOptions {
  // Compress the image's delta against these attachments, each through a reference kind:
  // {role, kind}. Whatever in the image repeats them is stored almost for free.
  std::vector<std::pair<std::string, std::string>> reference;
  // Opaque objects kept with the image under a role name (role -> bytes).
  std::vector<std::pair<std::string, std::span<const uint8_t>>> attachments;
  std::string metadata = "{}";  // JSON, kept as is.
  DeltaEncoding encoding;
  // With a parent: the pages that may differ from it (say, KVM's dirty log since the VM was
  // loaded from the parent); the others are taken as equal without being compared.
  const DirtyBitmap* dirty = nullptr;
  // Pages of the new image compared so far against its parent (or zeros), for progress.
  std::function<void(uint64_t pages_done, uint64_t pages_total)> progress;
};

// What import_chain did.
struct ImportReport {
  std::vector<std::string> added;    // Images recorded, base first.
  std::vector<std::string> present;  // Images that were here already.
  uint64_t objects_fetched = 0;
  uint64_t bytes_fetched = 0;
  double fetch_ms = 0;   // Fetching the objects (the transfers, their checks and fsyncs).
  double verify_ms = 0;  // Rebuilding the chain and checking the new images' digests.
};

// Writes the bytes of an object another store holds, by id and size, into the new file `into`
// (it may be written again from the start); import_chain verifies them.
using FetchObject = std::function<Status(const ObjectId& id, uint64_t size_bytes, const std::filesystem::path& into)>;

// What evict_cached did.
struct EvictReport {
  std::optional<uint64_t> limit_bytes;
  uint64_t cached_bytes_before = 0;  // Objects only fetched images use.
  uint64_t cached_bytes_after = 0;
  std::vector<std::string> evicted;  // Least recently used first.
  GcReport collected;
};

// How alike two images are: the fraction of sampled pages equal at the same address.
struct Similarity {
  std::string name;
  double fraction_equal = 0;
};

class Store {
 public:
  // Opens the existing store at `directory`. Refused with a clear error: no such directory, a
  // directory without a catalog, and a catalog that is missing (while objects exist), empty,
  // unreadable or not a deltavm catalog. Nothing is created.
  static Result<Store> open(const std::filesystem::path& directory, ReferenceKinds kinds = {});
  // Opens the store at `directory`, or creates an empty one there if the directory does not
  // exist or holds no data. A directory that holds objects but no catalog is refused, never
  // given a fresh catalog.
  static Result<Store> open_or_create(const std::filesystem::path& directory, ReferenceKinds kinds = {});

  const std::filesystem::path& directory() const { return directory_; }

  // Stores `image` under `name`: as a delta from `parent` when given (its content is rebuilt
  // and verified from the store first), else as a base.
  Result<ImageRecord> put_image(const std::string& name, std::span<const uint8_t> image,
                                const std::optional<std::string>& parent, const PutOptions& options = {});

  // The stored image most like `image` (same size, most sampled pages equal), if any.
  Result<std::optional<Similarity>> most_similar(std::span<const uint8_t> image);

  // The path of an attachment's object after verifying its bytes against its id. Objects are
  // immutable, so the path can be handed to another program to read.
  Result<std::filesystem::path> attachment_path(const ImageRecord& record, std::string_view role);
  Result<std::vector<uint8_t>> read_attachment(const ImageRecord& record, std::string_view role);

  // Reads, verifies and decodes the delta object of one image (the delta from its parent).
  Result<Delta> read_delta(const ImageRecord& record);
  // read_delta, shared: callers that want the same object while another holds it get that
  // decoded copy (concurrent loads of one chain hold it once, decoded once). Nothing is kept
  // once the last holder lets go.
  Result<std::shared_ptr<const Delta>> read_delta_shared(const ImageRecord& record);

  Result<ImageRecord> find(const std::string& name);
  Result<std::vector<ImageRecord>> list();
  // The records from the base to `name`, base first.
  Result<std::vector<ImageRecord>> chain(const std::string& name);

  // Rebuilds the whole image `name` into fresh memory: zeros, then every delta of its chain in
  // order. Every object is verified on the way and the result is checked against the image's
  // digest, so the returned memory is exactly the image that was stored.
  Result<Mapping> get_image(const std::string& name);

  // The whole image `record` as a flat raw file for a VM to map privately (never to write):
  // DIR/cache/flat/DIGEST.ram, read-only. Made on first use from the verified chain, under the
  // exclusive lock, and sealed in the catalog. Every later use checks the file against its
  // seal (identity, size and change times: one fstat); a file that no longer matches is
  // verified whole again and rebuilt if its bytes are wrong. So no caller is ever handed a
  // flat file whose bytes were not verified against the image's digest since they last changed.
  Result<std::filesystem::path> flat_file(const ImageRecord& record);
  std::filesystem::path flat_file_path(const ImageDigest& digest) const;

  // Adds a chain another store holds (records base first, each the parent of the next) to
  // this one. Images held here already must be the same images (name, parent and digest), else
  // the import is refused. The objects the new images lack are taken from `fetch` and checked
  // against their ids; then, under the exclusive lock, the chain is rebuilt and every new
  // image's digest checked before any is recorded. So an image is recorded only whole and
  // verified, and nothing that failed a check is ever referenced.
  // `origin` names the remote: the images added are recorded as cached (evict_cached).
  Result<ImportReport> import_chain(const std::vector<ImageRecord>& records, const FetchObject& fetch,
                                    const std::string& origin = "");

  // The local cache: images fetched from a remote may be evicted, least recently used first,
  // when the bytes only they use pass the limit and nothing here needs them: no image made here
  // stands on them, and none of `pinned` (the images running VMs and pools were loaded from,
  // which only the caller knows) is or stands on them. Their objects go at the gc that follows.
  Result<std::optional<uint64_t>> cache_limit();
  Status set_cache_limit(std::optional<uint64_t> limit_bytes);  // None: no limit.
  Result<EvictReport> evict_cached(const std::set<std::string>& pinned);
  Result<std::vector<CachedImage>> cached_images() { return catalog_.list_cached(); }
  // The bytes of the objects only cached images use.
  Result<uint64_t> cached_bytes();
  // Records a use of `name` and its chain (at most once a minute an image), for eviction order.
  Status touch(const std::string& name);
  // An object's bytes, mapped, after checking them against its id and size.
  Result<Mapping> read_object(const ObjectId& object_id, uint64_t size_bytes) {
    return map_object(object_id, size_bytes);
  }

  Result<std::vector<RemoteRecord>> remotes() { return catalog_.list_remotes(); }
  Status add_remote(const RemoteRecord& remote);
  Status remove_remote(const std::string& name);

  // The images stored against `name` (its children).
  Result<std::vector<std::string>> children(const std::string& name);

  // Removes an image with no children from the catalog; its object goes at the next gc.
  Status remove_image(const std::string& name);

  Result<GcReport> gc();
  Result<FsckReport> fsck();

  std::filesystem::path object_path(const ObjectId& object_id) const;

  // Forgets the compression reference kept for the next read (readers holding it keep it):
  // for long-lived processes, which would otherwise hold it between loads.
  void drop_reference_cache();

 private:
  Store(std::filesystem::path directory, Catalog catalog, ReferenceKinds kinds)
      : directory_(std::move(directory)), catalog_(std::move(catalog)), kinds_(std::move(kinds)) {}

  // Writes `bytes` as an object (if no object with that hash exists yet); returns its id.
  Result<ObjectId> put_object(std::span<const uint8_t> bytes);
  // Fetches object `id` through `fetch` into a temporary file beside its final name, checks its
  // bytes against the id and size, and makes it the object, durably.
  Status fetch_object(const ObjectId& id, uint64_t size_bytes, const FetchObject& fetch);
  // Creates the directory of `object_path`'s shard if needed, durably.
  Status make_shard(const std::filesystem::path& object_path);
  // The object mapped read-only, after checking its bytes against its id and expected size.
  Result<Mapping> map_object(const ObjectId& object_id, uint64_t expected_size);
  Status verify_object(const ObjectId& object_id, uint64_t expected_size);
  // The compression reference of `record` (empty if it has none), kept for the next call.
  Result<std::shared_ptr<const std::vector<uint8_t>>> reference_of(const ImageRecord& record);
  // get_image without taking the lock. REQUIRES: the caller holds the store lock.
  Result<Mapping> rebuild_image(const std::string& name);
  // The image of records.back(), rebuilt from the chain `records` (base first); the digest of
  // every image from records[check_from] on is checked. REQUIRES: the store lock.
  Result<Mapping> rebuild_chain(const std::vector<ImageRecord>& records, size_t check_from);
  // True if the flat file of `digest` exists and matches its seal. REQUIRES: the store lock.
  Result<bool> flat_file_is_sealed(const ImageDigest& digest, uint64_t size_bytes);
  // Verifies an unsealed flat file whole, or writes it anew, then seals it. REQUIRES: the
  // exclusive lock.
  Status make_flat_file(const ImageRecord& record);

  std::filesystem::path directory_;
  Catalog catalog_;
  ReferenceKinds kinds_;
  // The last compression reference built, kept for the next image that uses it.
  struct ReferenceCache {
    std::mutex mutex;
    std::string key;
    std::shared_ptr<const std::vector<uint8_t>> bytes;
  };
  std::unique_ptr<ReferenceCache> reference_cache_ = std::make_unique<ReferenceCache>();
  // The deltas read_delta_shared has handed out and someone still holds, by object id; a
  // decode in progress holds its entry's lock, so a second caller waits for it.
  struct SharedDeltas {
    struct Entry {
      std::weak_ptr<const Delta> delta;
      std::shared_ptr<std::mutex> decoding = std::make_shared<std::mutex>();
    };
    std::mutex mutex;
    std::map<std::string, Entry> entries;
  };
  std::unique_ptr<SharedDeltas> shared_deltas_ = std::make_unique<SharedDeltas>();
};

// An flock on DIR/lock held for the life of the object.
class StoreLock {
 public:
  enum class Mode { kShared, kExclusive };
  static Result<StoreLock> acquire(const std::filesystem::path& directory, Mode mode);

 private:
  explicit StoreLock(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

}  // namespace deltavm
