#include "store/remote.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <mutex>
#include <thread>

#include "base/json_fields.h"
#include "base/progress.h"

namespace deltavm {
namespace {

constexpr std::string_view kManifestFormat = "deltavm-manifest";
// Concurrent object uploads of one push.
constexpr unsigned kParallelTransfers = 4;
// Bounds on what a manifest may hold, checked before anything is kept.
constexpr uint64_t kMaxPageSampleBytes = 1 << 20;
constexpr uint64_t kMaxMetadataBytes = 1 << 20;
constexpr size_t kMaxAttachments = 64;
// What one object of a pull may hold: a pull keeps an object in memory while it checks it, so
// a manifest may not claim more than an image's delta can take (the image itself and zstd's
// worst case) or than any attachment needs (a kernel, an initramfs, a machine state).
constexpr uint64_t kMaxDeltaOverheadBytes = 64ull << 20;
constexpr uint64_t kMaxAttachmentBytes = 1ull << 30;

std::string hex_of(std::span<const uint8_t> bytes) {
  std::string hex;
  hex.reserve(bytes.size() * 2);
  for (uint8_t byte : bytes) hex += fmt::format("{:02x}", byte);
  return hex;
}

std::optional<std::vector<uint8_t>> bytes_of_hex(std::string_view hex) {
  if (hex.size() % 2 != 0) return std::nullopt;
  std::vector<uint8_t> bytes(hex.size() / 2);
  for (size_t i = 0; i < bytes.size(); ++i) {
    unsigned value = 0;
    for (char c : hex.substr(i * 2, 2)) {
      value <<= 4;
      if (c >= '0' && c <= '9')
        value |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f')
        value |= static_cast<unsigned>(c - 'a' + 10);
      else
        return std::nullopt;
    }
    bytes[i] = static_cast<uint8_t>(value);
  }
  return bytes;
}

// An image name as a key's last part: no '/', so a name is one key and never a path.
Status check_remote_name(std::string_view name) {
  if (name.find('/') != std::string_view::npos || name.empty() || name.front() == '.') {
    return make_error(ErrorCode::kInvalidArgument,
                      "image name {:?}: a name with '/' or a leading '.' cannot be kept on a remote", name);
  }
  return {};
}

nlohmann::json record_json(const ImageRecord& record) {
  nlohmann::json attachments = nlohmann::json::array();
  for (const Attachment& attachment : record.attachments) {
    attachments.push_back(
        {{"role", attachment.role}, {"object", attachment.object_id.hex()}, {"size_bytes", attachment.size_bytes}});
  }
  return {{"name", record.name},
          {"parent", record.parent ? nlohmann::json(*record.parent) : nlohmann::json(nullptr)},
          {"chain_depth", record.chain_depth},
          {"object", record.object_id.hex()},
          {"stored_size_bytes", record.stored_size_bytes},
          {"image_size_bytes", record.image_size_bytes},
          {"digest", record.digest.hex()},
          {"created_at_unix", record.created_at_unix},
          {"metadata", record.metadata},
          {"page_sample", hex_of(record.page_sample)},
          {"reference", record.reference},
          {"attachments", attachments}};
}

Result<ObjectId> object_id_field(JsonFields& fields, std::string_view field, const std::string& where) {
  std::string hex;
  DELTAVM_TRY(fields.text(field, hex, /*required=*/true));
  std::optional<ObjectId> id = ObjectId::from_hex(hex);
  if (!id)
    return make_error(ErrorCode::kCorruption, "{}: {} {:?} is not 32 hex digits", where, field, hex.substr(0, 64));
  return *id;
}

Result<ImageRecord> record_of_json(const nlohmann::json& value, const std::string& where) {
  if (!value.is_object()) return make_error(ErrorCode::kCorruption, "{}: expected an object", where);
  JsonFields fields(value, where, ErrorCode::kCorruption);
  ImageRecord record;
  DELTAVM_TRY(fields.text("name", record.name, true));
  const nlohmann::json* parent = fields.value("parent");
  if (parent == nullptr || !(parent->is_null() || parent->is_string())) {
    return make_error(ErrorCode::kCorruption, "{}: parent: expected a name or null", where);
  }
  if (parent->is_string()) record.parent = parent->get<std::string>();
  uint64_t depth = 0;
  DELTAVM_TRY(fields.unsigned_integer("chain_depth", depth, true, UINT32_MAX));
  record.chain_depth = static_cast<uint32_t>(depth);
  DELTAVM_ASSIGN_OR_RETURN(record.object_id, object_id_field(fields, "object", where));
  DELTAVM_TRY(fields.unsigned_integer("image_size_bytes", record.image_size_bytes, true, kMaxImageSizeBytes));
  DELTAVM_TRY(fields.unsigned_integer("stored_size_bytes", record.stored_size_bytes, true,
                                      record.image_size_bytes + kMaxDeltaOverheadBytes));
  std::string digest;
  DELTAVM_TRY(fields.text("digest", digest, true));
  std::optional<ImageDigest> parsed_digest = ImageDigest::from_hex(digest);
  if (!parsed_digest) return make_error(ErrorCode::kCorruption, "{}: digest is not 32 hex digits", where);
  record.digest = *parsed_digest;
  DELTAVM_TRY(fields.integer("created_at_unix", record.created_at_unix, true));
  DELTAVM_TRY(fields.text("metadata", record.metadata, true));
  if (record.metadata.size() > kMaxMetadataBytes || !nlohmann::json::accept(record.metadata)) {
    return make_error(ErrorCode::kCorruption, "{}: metadata is not a JSON text of at most {} bytes", where,
                      kMaxMetadataBytes);
  }
  std::string sample;
  DELTAVM_TRY(fields.text("page_sample", sample, true));
  std::optional<std::vector<uint8_t>> sample_bytes = bytes_of_hex(sample);
  if (!sample_bytes || sample_bytes->size() > kMaxPageSampleBytes) {
    return make_error(ErrorCode::kCorruption, "{}: page_sample is not hex of at most {} bytes", where,
                      kMaxPageSampleBytes);
  }
  record.page_sample = std::move(*sample_bytes);
  DELTAVM_TRY(fields.text("reference", record.reference, true));
  const nlohmann::json* attachments = fields.value("attachments");
  if (attachments == nullptr || !attachments->is_array() || attachments->size() > kMaxAttachments) {
    return make_error(ErrorCode::kCorruption, "{}: attachments: expected an array of at most {}", where,
                      kMaxAttachments);
  }
  for (size_t i = 0; i < attachments->size(); ++i) {
    std::string at = fmt::format("{} attachment {}", where, i);
    const nlohmann::json& item = (*attachments)[i];
    if (!item.is_object()) return make_error(ErrorCode::kCorruption, "{}: expected an object", at);
    JsonFields attachment_fields(item, at, ErrorCode::kCorruption);
    Attachment attachment;
    DELTAVM_TRY(attachment_fields.text("role", attachment.role, true));
    DELTAVM_ASSIGN_OR_RETURN(attachment.object_id, object_id_field(attachment_fields, "object", at));
    DELTAVM_TRY(attachment_fields.unsigned_integer("size_bytes", attachment.size_bytes, true, kMaxAttachmentBytes));
    DELTAVM_TRY(attachment_fields.no_other_fields());
    for (const Attachment& earlier : record.attachments) {
      if (earlier.role == attachment.role) {
        return make_error(ErrorCode::kCorruption, "{}: role {:?} appears twice", at, attachment.role);
      }
    }
    record.attachments.push_back(std::move(attachment));
  }
  DELTAVM_TRY(fields.no_other_fields());
  return record;
}

}  // namespace

Result<RemoteUrl> RemoteUrl::parse(std::string_view url) {
  if (!url.starts_with("s3://")) {
    return make_error(ErrorCode::kInvalidArgument, "remote URL {:?}: expected s3://BUCKET[/PREFIX]", url);
  }
  std::string_view rest = url.substr(5);
  size_t slash = rest.find('/');
  RemoteUrl parsed{std::string(rest.substr(0, slash)), ""};
  if (slash != std::string_view::npos) {
    std::string_view prefix = rest.substr(slash + 1);
    while (prefix.ends_with("/")) prefix.remove_suffix(1);
    for (char c : prefix) {
      bool allowed = std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_' || c == '.' || c == '/';
      if (!allowed) {
        return make_error(ErrorCode::kInvalidArgument,
                          "remote URL {:?}: the prefix may hold letters, digits, - _ . and /", url);
      }
    }
    if (prefix.starts_with("/") || prefix.find("//") != std::string_view::npos ||
        prefix.find("..") != std::string_view::npos) {
      return make_error(ErrorCode::kInvalidArgument, "remote URL {:?}: an empty or '..' part in the prefix", url);
    }
    parsed.prefix = std::string(prefix);
  }
  if (parsed.bucket.empty()) return make_error(ErrorCode::kInvalidArgument, "remote URL {:?}: no bucket", url);
  return parsed;
}

Result<RemoteRecord> make_remote_record(const std::string& name, const std::string& url, const std::string& endpoint,
                                        const std::string& region) {
  bool valid_name = !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_' || c == '.';
  });
  if (!valid_name) {
    return make_error(ErrorCode::kInvalidArgument, "remote name {:?}: 1 to 64 of letters, digits, - _ .", name);
  }
  DELTAVM_ASSIGN_OR_RETURN(RemoteUrl parsed, RemoteUrl::parse(url));
  // The client checks the endpoint and the bucket's name the way it will use them.
  DELTAVM_TRY(S3Client::open({.endpoint = endpoint, .region = region, .name = parsed.bucket}, {}).status());
  std::string trimmed = endpoint;
  while (trimmed.ends_with("/")) trimmed.pop_back();
  return RemoteRecord{name, url, trimmed, region};
}

std::string encode_manifest(const std::vector<ImageRecord>& chain) {
  nlohmann::json images = nlohmann::json::array();
  for (const ImageRecord& record : chain) images.push_back(record_json(record));
  nlohmann::json manifest = {
      {"format", kManifestFormat}, {"version", kManifestVersion}, {"template", chain.back().name}, {"images", images}};
  std::string body = dump_json(manifest);
  manifest["checksum"] = ObjectId::of({reinterpret_cast<const uint8_t*>(body.data()), body.size()}).hex();
  return dump_json(manifest, 1) + "\n";
}

Result<std::vector<ImageRecord>> decode_manifest(std::span<const uint8_t> bytes, std::string_view name) {
  std::string where = fmt::format("manifest of {}", name);
  if (bytes.size() > kMaxManifestBytes) {
    return make_error(ErrorCode::kCorruption, "{}: {} bytes, at most {}", where, bytes.size(), kMaxManifestBytes);
  }
  nlohmann::json manifest = nlohmann::json::parse(bytes.begin(), bytes.end(), nullptr, /*allow_exceptions=*/false);
  if (!manifest.is_object()) return make_error(ErrorCode::kCorruption, "{}: not a JSON object", where);
  JsonFields fields(manifest, where, ErrorCode::kCorruption);
  std::string format, image, checksum;
  uint64_t version = 0;
  DELTAVM_TRY(fields.text("format", format, true));
  if (format != kManifestFormat) {
    return make_error(ErrorCode::kCorruption, "{}: format {:?}, expected {:?}", where, format.substr(0, 64),
                      kManifestFormat);
  }
  DELTAVM_TRY(fields.unsigned_integer("version", version, true));
  if (version != kManifestVersion) {
    return make_error(version > kManifestVersion ? ErrorCode::kUnsupported : ErrorCode::kCorruption,
                      "{}: version {}, this build reads version {}", where, version, kManifestVersion);
  }
  DELTAVM_TRY(fields.text("checksum", checksum, true));
  nlohmann::json body = manifest;
  body.erase("checksum");
  std::string text = dump_json(body);
  std::string actual = ObjectId::of({reinterpret_cast<const uint8_t*>(text.data()), text.size()}).hex();
  if (actual != checksum) {
    return make_error(ErrorCode::kCorruption, "{}: checksum {} but its contents hash to {}: damaged", where,
                      checksum.substr(0, 64), actual);
  }
  DELTAVM_TRY(fields.text("template", image, true));
  if (image != name) {
    return make_error(ErrorCode::kCorruption, "{}: it is the manifest of {:?}", where, image.substr(0, 200));
  }
  const nlohmann::json* images = fields.value("images");
  if (images == nullptr || !images->is_array() || images->empty()) {
    return make_error(ErrorCode::kCorruption, "{}: images: expected a non-empty array", where);
  }
  DELTAVM_TRY(fields.no_other_fields());
  std::vector<ImageRecord> chain;
  for (size_t i = 0; i < images->size(); ++i) {
    DELTAVM_ASSIGN_OR_RETURN(ImageRecord record, record_of_json((*images)[i], fmt::format("{} image {}", where, i)));
    chain.push_back(std::move(record));
  }
  if (chain.back().name != name) {
    return make_error(ErrorCode::kCorruption, "{}: its chain ends in {:?}", where, chain.back().name.substr(0, 200));
  }
  return chain;
}

Result<Remote> Remote::open(const RemoteRecord& record, const S3Credentials& credentials, S3Options options) {
  DELTAVM_ASSIGN_OR_RETURN(RemoteUrl url, RemoteUrl::parse(record.url));
  DELTAVM_ASSIGN_OR_RETURN(
      S3Client client,
      S3Client::open({.endpoint = record.endpoint, .region = record.region, .name = url.bucket}, credentials, options));
  return Remote(record, std::move(url), std::move(client));
}

std::string Remote::object_key(const ObjectId& id) const {
  std::string hex = id.hex();
  return url_.key(fmt::format("objects/{}/{}", hex.substr(0, 2), hex));
}

std::string Remote::manifest_key(const std::string& name) const {
  return url_.key(fmt::format("templates/{}.json", name));
}

Result<PushReport> Remote::push(Store& store, const std::string& name, bool progress) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> chain, store.chain(name));
  for (const ImageRecord& record : chain) DELTAVM_TRY(check_remote_name(record.name));
  DELTAVM_TRY(client_.create_bucket());
  // Every object of the chain, once.
  std::vector<std::pair<ObjectId, uint64_t>> objects;
  auto add = [&](const ObjectId& id, uint64_t size) {
    for (const auto& [known, _] : objects) {
      if (known == id) return;
    }
    objects.emplace_back(id, size);
  };
  uint64_t total = 0;
  for (const ImageRecord& record : chain) {
    add(record.object_id, record.stored_size_bytes);
    for (const Attachment& attachment : record.attachments) add(attachment.object_id, attachment.size_bytes);
  }
  for (const auto& [_, size] : objects) total += size;

  PushReport report;
  Progress shown(fmt::format("push {}", name), total, progress);
  std::mutex mutex;
  std::optional<Error> failure;
  std::atomic<size_t> next{0};
  uint64_t done = 0;
  auto transfer = [&] {
    for (size_t i; (i = next.fetch_add(1)) < objects.size();) {
      const auto& [id, size] = objects[i];
      std::string key = object_key(id);
      Result<std::optional<uint64_t>> there = client_.head(key);
      Status sent;
      bool skipped = there && *there && **there == size;
      if (!there) {
        sent = there.error();
      } else if (!skipped) {
        // The local bytes are checked against their id before they leave.
        Result<Mapping> bytes = store.read_object(id, size);
        sent = bytes ? client_.put(key, bytes->bytes()) : Status(bytes.error());
      }
      std::lock_guard lock(mutex);
      if (!sent) {
        if (!failure) failure = sent.error();
        return;
      }
      (skipped ? report.objects_present : report.objects_sent) += 1;
      if (!skipped) report.bytes_sent += size;
      done += size;
      shown.update(done);
      if (failure) return;
    }
  };
  std::vector<std::thread> workers;
  for (unsigned i = 0; i < std::min<size_t>(kParallelTransfers, objects.size()); ++i) workers.emplace_back(transfer);
  for (std::thread& worker : workers) worker.join();
  if (failure) return failure->with_context(fmt::format("push {}", name));

  // The manifests last, base first: one names only objects that are there.
  for (size_t i = 0; i < chain.size(); ++i) {
    std::vector<ImageRecord> prefix(chain.begin(), chain.begin() + static_cast<ptrdiff_t>(i + 1));
    std::string manifest = encode_manifest(prefix);
    DELTAVM_TRY(
        client_.put(manifest_key(chain[i].name), {reinterpret_cast<const uint8_t*>(manifest.data()), manifest.size()}));
    report.manifests.push_back(chain[i].name);
  }
  return report;
}

Result<PullReport> Remote::pull(Store& store, const std::string& name, bool progress) {
  DELTAVM_TRY(check_remote_name(name));
  PullReport report;
  Result<std::vector<uint8_t>> manifest = client_.get(manifest_key(name), kMaxManifestBytes);
  if (!manifest && manifest.error().code == ErrorCode::kNotFound) {
    return make_error(ErrorCode::kNotFound, "remote {} ({}) has no image {}", record_.name, record_.url, name);
  }
  if (!manifest) return manifest.error();
  report.manifest_bytes = manifest->size();
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> chain, decode_manifest(*manifest, name));
  uint64_t total = 0;
  for (const ImageRecord& record : chain) {
    total += record.stored_size_bytes;
    for (const Attachment& attachment : record.attachments) total += attachment.size_bytes;
  }
  Progress shown(fmt::format("pull {}", name), total, progress);
  uint64_t done = 0;
  std::mutex progress_mutex;  // The store fetches several objects at once.
  Result<ImportReport> imported = store.import_chain(
      chain,
      [&](const ObjectId& id, uint64_t size, const std::filesystem::path& into) -> Status {
        Result<uint64_t> fetched = client_.get_to_file(object_key(id), into, size);
        if (!fetched && fetched.error().code == ErrorCode::kNotFound) {
          return make_error(ErrorCode::kCorruption, "the manifest names object {}, which the remote lacks", id);
        }
        if (fetched) {
          std::lock_guard lock(progress_mutex);
          shown.update(done += size);
        }
        return fetched.status();
      },
      record_.name);
  if (!imported) return imported.error().with_context(fmt::format("pull {} from {}", name, record_.name));
  report.import = std::move(*imported);
  return report;
}

Result<std::vector<std::string>> Remote::images() {
  std::string prefix = url_.key("templates/");
  DELTAVM_ASSIGN_OR_RETURN(auto keys, client_.list(prefix));
  std::vector<std::string> names;
  for (const auto& [key, _] : keys) {
    if (key.size() > prefix.size() + 5 && key.ends_with(".json")) {
      names.push_back(key.substr(prefix.size(), key.size() - prefix.size() - 5));
    }
  }
  return names;
}

Result<RemoteRecord> choose_remote(Store& store, const std::optional<std::string>& name) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<RemoteRecord> remotes, store.remotes());
  if (name) {
    for (const RemoteRecord& remote : remotes) {
      if (remote.name == *name) return remote;
    }
    return make_error(ErrorCode::kNotFound, "no remote named {} (deltavm remote ls)", *name);
  }
  if (remotes.size() == 1) return remotes[0];
  if (remotes.empty()) {
    return make_error(ErrorCode::kNotFound,
                      "the store has no remote (deltavm remote add NAME s3://BUCKET --endpoint URL)");
  }
  return make_error(ErrorCode::kInvalidArgument, "the store has {} remotes: name one with --remote", remotes.size());
}

Result<std::optional<PullReport>> pull_if_missing(Store& store, const std::string& name, bool progress) {
  Result<ImageRecord> local = store.find(name);
  if (local) return std::optional<PullReport>();
  if (local.error().code != ErrorCode::kNotFound) return local.error();
  DELTAVM_ASSIGN_OR_RETURN(std::vector<RemoteRecord> remotes, store.remotes());
  if (remotes.empty()) return local.error();
  DELTAVM_ASSIGN_OR_RETURN(S3Credentials credentials, S3Credentials::from_environment());
  std::vector<std::string> tried;
  for (const RemoteRecord& record : remotes) {
    DELTAVM_ASSIGN_OR_RETURN(Remote remote, Remote::open(record, credentials));
    Result<PullReport> pulled = remote.pull(store, name, progress);
    if (pulled) return std::optional<PullReport>(std::move(*pulled));
    if (pulled.error().code != ErrorCode::kNotFound) return pulled.error();
    tried.push_back(record.name);
  }
  return make_error(ErrorCode::kNotFound, "image {} is neither in the store nor on its remotes ({})", name,
                    fmt::join(tried, ", "));
}

}  // namespace deltavm
