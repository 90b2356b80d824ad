// A client for the S3 API over libcurl. Requests are signed with AWS SigV4 by libcurl
// (CURLOPT_AWS_SIGV4) and carry the payload's SHA-256; URLs are path-style
// (ENDPOINT/BUCKET/KEY), which every S3-compatible store answers. Connections are kept and
// reused (one libcurl handle per concurrent request, returned to a pool); a request that meets
// a 5xx, a 429, a timeout or a dropped connection is retried with exponential backoff; every
// answer's length is bounded before it is kept.
//
// Credentials never come from the command line or the catalog: from the environment
// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a credentials file, and they never appear in an
// error message.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.h"

namespace deltavm {

struct S3Credentials {
  std::string access_key_id;
  std::string secret_access_key;

  // AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY if both are set; else the profile
  // $AWS_PROFILE (or "default") of the credentials file $AWS_SHARED_CREDENTIALS_FILE (or
  // ~/.aws/credentials).
  static Result<S3Credentials> from_environment();
};

struct S3Options {
  int attempts = 5;                              // Tries of one request, the first included.
  std::chrono::milliseconds first_backoff{100};  // Doubled after every failed try.
  std::chrono::milliseconds connect_timeout{3000};
  // A transfer that moves fewer than 1024 bytes a second for this long is cut and retried.
  std::chrono::seconds stall_timeout{20};
  // Objects larger than this are uploaded in parts of part_size bytes (S3: at least 5 MiB).
  uint64_t multipart_threshold = 64ull << 20;
  uint64_t part_size = 16ull << 20;
};

// One bucket on one endpoint.
struct S3Bucket {
  std::string endpoint;  // http://HOST:PORT or https://HOST:PORT, no path.
  std::string region = "us-east-1";
  std::string name;
};

// What the client did, for progress and benchmarks.
struct S3Counters {
  uint64_t requests = 0;
  uint64_t retries = 0;
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
};

class S3Client {
 public:
  // Checks the endpoint's form and the bucket's name; contacts nobody.
  static Result<S3Client> open(S3Bucket bucket, S3Credentials credentials, S3Options options = {});
  S3Client(S3Client&&) noexcept;
  S3Client& operator=(S3Client&&) noexcept;
  ~S3Client();

  const S3Bucket& bucket() const;

  // Creates the bucket; one that exists and is ours already is not an error.
  Status create_bucket();
  // The object's size, or none if there is no such key.
  Result<std::optional<uint64_t>> head(std::string_view key);
  // Stores `bytes` under `key`: one PUT, or a multipart upload past the threshold (aborted if a
  // part fails for good, so no parts are left behind). `sent` is told the bytes sent so far.
  Status put(std::string_view key, std::span<const uint8_t> bytes,
             const std::function<void(uint64_t sent)>& sent = nullptr);
  // The whole object; refused without reading it if it is larger than `max_bytes`.
  Result<std::vector<uint8_t>> get(std::string_view key, uint64_t max_bytes);
  // The whole object into the file `path` (created 0600, or truncated and rewritten by every
  // try); refused, with the file left short, if it is larger than `max_bytes`. Returns its size.
  Result<uint64_t> get_to_file(std::string_view key, const std::filesystem::path& path, uint64_t max_bytes);
  // `length` bytes of the object from `offset` (a ranged GET), into `out`.
  Status get_range(std::string_view key, uint64_t offset, std::span<uint8_t> out);
  // Every key under `prefix` (ListObjectsV2, page by page), with its size.
  Result<std::vector<std::pair<std::string, uint64_t>>> list(std::string_view prefix);
  Status remove(std::string_view key);

  S3Counters counters() const;

 private:
  struct State;
  explicit S3Client(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

// The bytes' SHA-256 as 64 hex digits.
std::string sha256_hex(std::span<const uint8_t> bytes);

}  // namespace deltavm
