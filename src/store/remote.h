// Remotes: a store's images in an S3 bucket, shared between hosts. A host runs an image it
// never built by fetching only the objects it lacks; every object is checked against its id
// and every image against its digest before it is recorded (Store::import_chain).
//
// Layout under s3://BUCKET[/PREFIX]/:
//   objects/ab/abcd…      the store's objects, by id: the same bytes as DIR/objects/ab/abcd…
//   templates/NAME.json   one manifest per image: its chain, base first (docs/formats.md)
//
// Objects are immutable and named by their content, so an upload never replaces different
// bytes, and a manifest is written only after every object it names is there.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "store/s3_client.h"
#include "store/store.h"

namespace deltavm {

constexpr uint32_t kManifestVersion = 1;
// A manifest larger than this is refused unread.
constexpr uint64_t kMaxManifestBytes = 16ull << 20;

// s3://BUCKET[/PREFIX]: the prefix without leading or trailing slashes.
struct RemoteUrl {
  std::string bucket;
  std::string prefix;
  static Result<RemoteUrl> parse(std::string_view url);
  std::string key(std::string_view path) const {
    return prefix.empty() ? std::string(path) : prefix + "/" + std::string(path);
  }
};

// A remote's record, checked (name, URL, endpoint), for `remote add`.
Result<RemoteRecord> make_remote_record(const std::string& name, const std::string& url, const std::string& endpoint,
                                        const std::string& region);

// The manifest of the image `chain.back()` (its chain, base first), and back. decode_manifest
// checks the format, version, checksum and every field, and that the chain ends in `name`.
std::string encode_manifest(const std::vector<ImageRecord>& chain);
Result<std::vector<ImageRecord>> decode_manifest(std::span<const uint8_t> bytes, std::string_view name);

struct PushReport {
  std::vector<std::string> manifests;  // The images whose manifests were written.
  uint64_t objects_sent = 0;
  uint64_t objects_present = 0;  // On the remote already: not sent.
  uint64_t bytes_sent = 0;
};

struct PullReport {
  ImportReport import;
  uint64_t manifest_bytes = 0;
};

class Remote {
 public:
  static Result<Remote> open(const RemoteRecord& record, const S3Credentials& credentials, S3Options options = {});

  const RemoteRecord& record() const { return record_; }
  S3Client& client() { return client_; }

  // Sends the objects of `name`'s chain the remote lacks, then a manifest for every image of
  // the chain. `progress`: a line on a terminal for long transfers.
  Result<PushReport> push(Store& store, const std::string& name, bool progress = false);
  // Fetches `name`'s manifest and the objects of its chain this store lacks, and records the
  // images (verified) in the store.
  Result<PullReport> pull(Store& store, const std::string& name, bool progress = false);
  // The names of the images the remote has manifests for.
  Result<std::vector<std::string>> images();

 private:
  Remote(RemoteRecord record, RemoteUrl url, S3Client client)
      : record_(std::move(record)), url_(std::move(url)), client_(std::move(client)) {}
  std::string object_key(const ObjectId& id) const;
  std::string manifest_key(const std::string& name) const;

  RemoteRecord record_;
  RemoteUrl url_;
  S3Client client_;
};

// The remote a command means: `name` if given, else the store's only one.
Result<RemoteRecord> choose_remote(Store& store, const std::optional<std::string>& name);

// `name` from the store; if the store lacks it, pulled from the first of the store's remotes
// that has it (credentials from the environment). None if no pull was needed.
Result<std::optional<PullReport>> pull_if_missing(Store& store, const std::string& name, bool progress = false);

}  // namespace deltavm
