#include "store/s3_client.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <tinyxml2.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "base/file.h"

namespace deltavm {
namespace {

// What a reply body may hold when the caller did not ask for an object: errors, listings,
// multipart replies.
constexpr uint64_t kMaxControlReplyBytes = 16ull << 20;
constexpr size_t kMaxCredentialsFileBytes = 1 << 20;
// How often a GET into a file starts the kernel writing back what it received.
constexpr uint64_t kWritebackStride = 4ull << 20;
// Concurrent part uploads of one multipart upload.
constexpr unsigned kPartUploads = 4;

// RFC 3986's unreserved characters stay; every other byte is %XX. SigV4's canonical form,
// which libcurl 7.88 takes from the URL as it is: so the URL is built canonical.
std::string uri_encode(std::string_view text, bool keep_slash) {
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) != 0 || c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("%{:02X}", c);
    }
  }
  return out;
}

std::string env_or_empty(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : "";
}

std::string trim(std::string_view text) {
  size_t begin = text.find_first_not_of(" \t\r");
  if (begin == std::string_view::npos) return "";
  size_t end = text.find_last_not_of(" \t\r");
  return std::string(text.substr(begin, end - begin + 1));
}

struct Request {
  std::string method = "GET";
  std::string key;  // Empty: the bucket itself.
  std::vector<std::pair<std::string, std::string>> query;
  std::span<const uint8_t> body;
  uint64_t max_reply_bytes = kMaxControlReplyBytes;
  std::optional<std::pair<uint64_t, uint64_t>> range;  // Offset and length.
  uint8_t* range_out = nullptr;                        // Where the range's bytes go.
  int out_fd = -1;                                     // Where a 2xx answer's body goes, from offset 0 at every try.
};

struct Reply {
  long status = 0;
  std::string body;
  std::string etag;
  std::optional<uint64_t> content_length;
};

// The <Code> and <Message> of an S3 error body, or empty.
std::string s3_error_text(const std::string& body) {
  tinyxml2::XMLDocument document;
  if (document.Parse(body.data(), body.size()) != tinyxml2::XML_SUCCESS) return "";
  const tinyxml2::XMLElement* error = document.FirstChildElement("Error");
  if (error == nullptr) return "";
  const tinyxml2::XMLElement* code = error->FirstChildElement("Code");
  const tinyxml2::XMLElement* message = error->FirstChildElement("Message");
  std::string text = code != nullptr && code->GetText() != nullptr ? code->GetText() : "";
  if (message != nullptr && message->GetText() != nullptr) text += fmt::format(" ({})", message->GetText());
  return text.substr(0, 300);
}

bool retryable(CURLcode code) {
  switch (code) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM: return true;
    default: return false;
  }
}

bool retryable(long status) { return status >= 500 || status == 429; }

}  // namespace

std::string sha256_hex(std::span<const uint8_t> bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

Result<S3Credentials> S3Credentials::from_environment() {
  S3Credentials credentials{env_or_empty("AWS_ACCESS_KEY_ID"), env_or_empty("AWS_SECRET_ACCESS_KEY")};
  if (!credentials.access_key_id.empty() && !credentials.secret_access_key.empty()) return credentials;
  std::string path = env_or_empty("AWS_SHARED_CREDENTIALS_FILE");
  if (path.empty() && !env_or_empty("HOME").empty()) path = env_or_empty("HOME") + "/.aws/credentials";
  std::string profile = env_or_empty("AWS_PROFILE");
  if (profile.empty()) profile = "default";
  std::error_code size_error;
  uint64_t file_size = path.empty() ? 0 : std::filesystem::file_size(path, size_error);
  if (!size_error && file_size > kMaxCredentialsFileBytes) {
    return make_error(ErrorCode::kInvalidArgument, "{}: {} bytes, at most {}", path, file_size,
                      kMaxCredentialsFileBytes);
  }
  std::ifstream file(path);
  if (path.empty() || !file) {
    return make_error(ErrorCode::kInvalidArgument,
                      "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to {}",
                      path.empty() ? "~/.aws/credentials" : path);
  }
  std::string line, section;
  size_t read = 0;
  credentials = {};
  while (std::getline(file, line)) {
    read += line.size() + 1;
    if (read > kMaxCredentialsFileBytes) {
      return make_error(ErrorCode::kInvalidArgument, "{}: larger than {} bytes", path, kMaxCredentialsFileBytes);
    }
    std::string text = trim(line);
    if (text.empty() || text[0] == '#' || text[0] == ';') continue;
    if (text.front() == '[' && text.back() == ']') {
      section = trim(std::string_view(text).substr(1, text.size() - 2));
      continue;
    }
    size_t equals = text.find('=');
    if (section != profile || equals == std::string::npos) continue;
    std::string name = trim(std::string_view(text).substr(0, equals));
    std::string value = trim(std::string_view(text).substr(equals + 1));
    if (name == "aws_access_key_id") credentials.access_key_id = value;
    if (name == "aws_secret_access_key") credentials.secret_access_key = value;
  }
  if (credentials.access_key_id.empty() || credentials.secret_access_key.empty()) {
    return make_error(ErrorCode::kInvalidArgument, "{}: profile [{}] lacks aws_access_key_id or aws_secret_access_key",
                      path, profile);
  }
  return credentials;
}

struct S3Client::State {
  S3Bucket bucket;
  S3Credentials credentials;
  S3Options options;
  std::string sigv4;  // "aws:amz:REGION:s3"

  std::mutex mutex;
  std::vector<CURL*> idle;  // Handles between requests, their connections kept open.
  S3Counters counters;

  ~State() {
    for (CURL* handle : idle) curl_easy_cleanup(handle);
  }

  CURL* take_handle() {
    {
      std::lock_guard lock(mutex);
      if (!idle.empty()) {
        CURL* handle = idle.back();
        idle.pop_back();
        return handle;
      }
    }
    return curl_easy_init();
  }
  void return_handle(CURL* handle) {
    std::lock_guard lock(mutex);
    idle.push_back(handle);
  }

  std::string url(const Request& request) const {
    std::string url = fmt::format("{}/{}", bucket.endpoint, bucket.name);
    if (!request.key.empty()) url += "/" + uri_encode(request.key, /*keep_slash=*/true);
    std::vector<std::pair<std::string, std::string>> query = request.query;
    std::sort(query.begin(), query.end());
    for (size_t i = 0; i < query.size(); ++i) {
      url += fmt::format("{}{}={}", i == 0 ? "?" : "&", uri_encode(query[i].first, false),
                         uri_encode(query[i].second, false));
    }
    return url;
  }

  // One try. On a transport failure, the libcurl code and its text.
  Result<Reply> attempt(const Request& request, const std::string& payload_hash, CURLcode& transport) {
    struct Sink {
      Reply* reply;
      const Request* request;
      uint64_t received = 0;
      bool over_bound = false;
    };
    struct Source {
      std::span<const uint8_t> body;
      size_t offset = 0;
    };
    Reply reply;
    Sink sink{&reply, &request};
    Source source{request.body};
    CURL* handle = take_handle();
    if (handle == nullptr) return make_error(ErrorCode::kIo, "libcurl: cannot make a handle");
    curl_easy_reset(handle);
    std::string target = url(request);
    curl_slist* headers = nullptr;
    headers = curl_slist_append(headers, fmt::format("x-amz-content-sha256: {}", payload_hash).c_str());
    if (request.range) {
      headers = curl_slist_append(headers, fmt::format("Range: bytes={}-{}", request.range->first,
                                                       request.range->first + request.range->second - 1)
                                               .c_str());
    }
    char error_text[CURL_ERROR_SIZE] = {};
    curl_easy_setopt(handle, CURLOPT_URL, target.c_str());
    curl_easy_setopt(handle, CURLOPT_AWS_SIGV4, sigv4.c_str());
    curl_easy_setopt(handle, CURLOPT_USERNAME, credentials.access_key_id.c_str());
    curl_easy_setopt(handle, CURLOPT_PASSWORD, credentials.secret_access_key.c_str());
    curl_easy_setopt(handle, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, error_text);
    curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(handle, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(options.connect_timeout.count()));
    curl_easy_setopt(handle, CURLOPT_LOW_SPEED_LIMIT, 1024L);
    curl_easy_setopt(handle, CURLOPT_LOW_SPEED_TIME, static_cast<long>(options.stall_timeout.count()));
    curl_easy_setopt(handle, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(handle, CURLOPT_PATH_AS_IS, 1L);  // The key as it is, never squashed.
    curl_easy_setopt(handle, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(
        handle, CURLOPT_WRITEFUNCTION, +[](char* data, size_t, size_t count, void* user) -> size_t {
          auto* to = static_cast<Sink*>(user);
          // An object's bytes are bounded by what the caller expects; an error body by the
          // control bound.
          bool success = to->reply->status >= 200 && to->reply->status < 300;
          uint64_t bound = success ? to->request->max_reply_bytes : kMaxControlReplyBytes;
          if (to->received + count > bound) {
            to->over_bound = true;
            return 0;
          }
          if (to->request->range_out != nullptr && to->reply->status == 206) {
            std::copy_n(data, count, to->request->range_out + to->received);
          } else if (to->request->out_fd >= 0 && success) {
            for (size_t written = 0; written < count;) {
              ssize_t n = ::write(to->request->out_fd, data + written, count - written);
              if (n < 0 && errno == EINTR) continue;
              if (n <= 0) return 0;  // The transfer fails (CURLE_WRITE_ERROR), not retried.
              written += static_cast<size_t>(n);
            }
            // Start writing back every few MiB while the transfer goes on, so that the fsync
            // that makes the file durable has little left to wait for.
            uint64_t total = to->received + count;
            if (total / kWritebackStride != to->received / kWritebackStride) {
              uint64_t from = (to->received / kWritebackStride) * kWritebackStride;
              (void)::sync_file_range(to->request->out_fd, static_cast<off_t>(from), static_cast<off_t>(total - from),
                                      SYNC_FILE_RANGE_WRITE);
            }
          } else {
            to->reply->body.append(data, count);
          }
          to->received += count;
          return count;
        });
    curl_easy_setopt(handle, CURLOPT_HEADERDATA, &reply);
    curl_easy_setopt(
        handle, CURLOPT_HEADERFUNCTION, +[](char* data, size_t, size_t count, void* user) -> size_t {
          auto* to = static_cast<Reply*>(user);
          std::string_view line(data, count);
          if (line.starts_with("HTTP/")) {
            // The status line: the status is kept here so that the body callback knows it.
            size_t space = line.find(' ');
            if (space != std::string_view::npos) to->status = std::atol(std::string(line.substr(space + 1, 3)).c_str());
            to->etag.clear();
            return count;
          }
          size_t colon = line.find(':');
          if (colon == std::string_view::npos) return count;
          std::string name(line.substr(0, colon));
          std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
          std::string value = trim(line.substr(colon + 1));
          while (!value.empty() && (value.back() == '\n' || value.back() == '\r')) value.pop_back();
          if (name == "etag") to->etag = value;
          if (name == "content-length") to->content_length = std::strtoull(value.c_str(), nullptr, 10);
          return count;
        });
    if (request.method == "HEAD") {
      curl_easy_setopt(handle, CURLOPT_NOBODY, 1L);
    } else if (request.method == "PUT") {
      curl_easy_setopt(handle, CURLOPT_UPLOAD, 1L);
      curl_easy_setopt(handle, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
      curl_easy_setopt(handle, CURLOPT_READDATA, &source);
      curl_easy_setopt(
          handle, CURLOPT_READFUNCTION, +[](char* out, size_t size, size_t count, void* user) -> size_t {
            auto* from = static_cast<Source*>(user);
            size_t n = std::min(size * count, from->body.size() - from->offset);
            std::copy_n(from->body.data() + from->offset, n, out);
            from->offset += n;
            return n;
          });
    } else if (request.method == "POST") {
      curl_easy_setopt(handle, CURLOPT_POST, 1L);
      curl_easy_setopt(handle, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
      const void* fields = request.body.empty() ? static_cast<const void*>("") : request.body.data();
      curl_easy_setopt(handle, CURLOPT_POSTFIELDS, fields);
    } else if (request.method != "GET") {
      curl_easy_setopt(handle, CURLOPT_CUSTOMREQUEST, request.method.c_str());
    }
    transport = curl_easy_perform(handle);
    long status = 0;
    curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(headers);
    curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, nullptr);
    return_handle(handle);
    {
      std::lock_guard lock(mutex);
      ++counters.requests;
      counters.bytes_sent += source.offset + (request.method == "POST" ? request.body.size() : 0);
      counters.bytes_received += sink.received;
    }
    if (sink.over_bound) {
      transport = CURLE_OK;
      return make_error(ErrorCode::kCorruption, "{} {}: the reply is larger than the {} bytes expected", request.method,
                        target, request.max_reply_bytes);
    }
    if (transport != CURLE_OK) {
      return make_error(ErrorCode::kIo, "{} {}: {}", request.method, target,
                        error_text[0] != '\0' ? error_text : curl_easy_strerror(transport));
    }
    reply.status = status;
    if (request.range_out != nullptr && status == 206 && sink.received != request.range->second) {
      transport = CURLE_PARTIAL_FILE;
      return make_error(ErrorCode::kIo, "GET {}: {} bytes of a range of {}", target, sink.received,
                        request.range->second);
    }
    return reply;
  }

  // A request with retries: transport failures, 5xx and 429 are tried again after a backoff
  // (doubled every time, with jitter), up to options.attempts tries in all.
  Result<Reply> perform(const Request& request) {
    std::string payload_hash = sha256_hex(request.body);
    std::chrono::milliseconds backoff = options.first_backoff;
    thread_local std::minstd_rand jitter{std::random_device{}()};
    for (int attempt = 1;; ++attempt) {
      CURLcode transport = CURLE_OK;
      if (request.out_fd >= 0 && (::ftruncate(request.out_fd, 0) != 0 || ::lseek(request.out_fd, 0, SEEK_SET) != 0)) {
        return errno_error("truncate the file a GET writes", errno);
      }
      Result<Reply> reply = this->attempt(request, payload_hash, transport);
      bool again = reply ? retryable(reply->status) : retryable(transport);
      if (!again || attempt >= options.attempts) {
        if (!reply) {
          return attempt > 1 ? reply.error().with_context(fmt::format("after {} tries", attempt)) : reply.error();
        }
        if (retryable(reply->status)) {
          return make_error(ErrorCode::kIo, "{} {}: the store answered {} {} after {} tries", request.method,
                            url(request), reply->status, s3_error_text(reply->body), attempt);
        }
        return reply;
      }
      {
        std::lock_guard lock(mutex);
        ++counters.retries;
      }
      std::this_thread::sleep_for(backoff + std::chrono::milliseconds(jitter() % (backoff.count() / 2 + 1)));
      backoff *= 2;
    }
  }

  // An error for a reply that is not what the caller expected.
  Error reply_error(const Request& request, const Reply& reply) const {
    std::string what = s3_error_text(reply.body);
    std::string target = request.key.empty() ? fmt::format("bucket {}", bucket.name)
                                             : fmt::format("{} in bucket {}", request.key, bucket.name);
    if (reply.status == 404) {
      return make_error(ErrorCode::kNotFound, "{} {} at {}: not found{}", request.method, target, bucket.endpoint,
                        what.empty() ? "" : ": " + what);
    }
    if (reply.status == 403) {
      return make_error(ErrorCode::kInvalidArgument,
                        "{} {} at {}: access denied{} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                        request.method, target, bucket.endpoint, what.empty() ? "" : ": " + what);
    }
    return make_error(reply.status >= 500 ? ErrorCode::kIo : ErrorCode::kInvalidArgument, "{} {} at {}: HTTP {}{}",
                      request.method, target, bucket.endpoint, reply.status, what.empty() ? "" : ": " + what);
  }

  Result<Reply> expect(const Request& request, std::initializer_list<long> statuses) {
    DELTAVM_ASSIGN_OR_RETURN(Reply reply, perform(request));
    if (std::find(statuses.begin(), statuses.end(), reply.status) == statuses.end()) {
      return reply_error(request, reply);
    }
    return reply;
  }

  Status put_multipart(std::string_view key, std::span<const uint8_t> bytes, const std::function<void(uint64_t)>& sent);
};

S3Client::S3Client(std::unique_ptr<State> state) : state_(std::move(state)) {}
S3Client::S3Client(S3Client&&) noexcept = default;
S3Client& S3Client::operator=(S3Client&&) noexcept = default;
S3Client::~S3Client() = default;

Result<S3Client> S3Client::open(S3Bucket bucket, S3Credentials credentials, S3Options options) {
  static std::once_flag curl_initialized;
  std::call_once(curl_initialized, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (!bucket.endpoint.starts_with("http://") && !bucket.endpoint.starts_with("https://")) {
    return make_error(ErrorCode::kInvalidArgument, "endpoint {}: expected http://HOST[:PORT] or https://HOST[:PORT]",
                      bucket.endpoint);
  }
  while (bucket.endpoint.ends_with("/")) bucket.endpoint.pop_back();
  if (bucket.endpoint.find('/', bucket.endpoint.find("//") + 2) != std::string::npos) {
    return make_error(ErrorCode::kInvalidArgument, "endpoint {}: expected no path after the host", bucket.endpoint);
  }
  // S3's bucket naming rules: 3 to 63 of a-z, 0-9, '.', '-', starting and ending alphanumeric.
  const std::string& name = bucket.name;
  bool valid = name.size() >= 3 && name.size() <= 63 && std::isalnum(static_cast<unsigned char>(name.front())) &&
               std::isalnum(static_cast<unsigned char>(name.back())) &&
               std::all_of(name.begin(), name.end(), [](char c) {
                 return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-';
               });
  if (!valid) {
    return make_error(ErrorCode::kInvalidArgument,
                      "bucket {:?}: expected 3 to 63 of a-z, 0-9, '.' and '-', starting and ending with a letter "
                      "or digit",
                      name);
  }
  if (bucket.region.empty() || bucket.region.find(':') != std::string::npos) {
    return make_error(ErrorCode::kInvalidArgument, "region {:?}: expected a name such as us-east-1", bucket.region);
  }
  if (options.part_size < (5ull << 20) || options.multipart_threshold < options.part_size || options.attempts < 1) {
    return make_error(ErrorCode::kInvalidArgument, "S3 options: parts of at least 5 MiB and at least one try");
  }
  auto state = std::make_unique<State>();
  state->sigv4 = fmt::format("aws:amz:{}:s3", bucket.region);
  state->bucket = std::move(bucket);
  state->credentials = std::move(credentials);
  state->options = options;
  return S3Client(std::move(state));
}

const S3Bucket& S3Client::bucket() const { return state_->bucket; }

S3Counters S3Client::counters() const {
  std::lock_guard lock(state_->mutex);
  return state_->counters;
}

Status S3Client::create_bucket() {
  Request request{.method = "PUT"};
  DELTAVM_ASSIGN_OR_RETURN(Reply reply, state_->perform(request));
  if (reply.status == 200) return Status{};
  if (reply.status == 409 && s3_error_text(reply.body).starts_with("BucketAlreadyOwnedByYou")) return Status{};
  return state_->reply_error(request, reply);
}

Result<std::optional<uint64_t>> S3Client::head(std::string_view key) {
  Request request{.method = "HEAD", .key = std::string(key)};
  DELTAVM_ASSIGN_OR_RETURN(Reply reply, state_->expect(request, {200, 404}));
  if (reply.status == 404) return std::optional<uint64_t>();
  if (!reply.content_length) {
    return make_error(ErrorCode::kCorruption, "HEAD {}: the reply has no Content-Length", key);
  }
  return std::optional<uint64_t>(*reply.content_length);
}

Status S3Client::put(std::string_view key, std::span<const uint8_t> bytes,
                     const std::function<void(uint64_t sent)>& sent) {
  if (bytes.size() > state_->options.multipart_threshold) return state_->put_multipart(key, bytes, sent);
  DELTAVM_TRY(state_->expect({.method = "PUT", .key = std::string(key), .body = bytes}, {200}).status());
  if (sent) sent(bytes.size());
  return Status{};
}

Status S3Client::State::put_multipart(std::string_view key, std::span<const uint8_t> bytes,
                                      const std::function<void(uint64_t)>& sent) {
  Request initiate{.method = "POST", .key = std::string(key), .query = {{"uploads", ""}}};
  DELTAVM_ASSIGN_OR_RETURN(Reply reply, expect(initiate, {200}));
  tinyxml2::XMLDocument document;
  const tinyxml2::XMLElement* id_element = nullptr;
  if (document.Parse(reply.body.data(), reply.body.size()) == tinyxml2::XML_SUCCESS &&
      document.FirstChildElement("InitiateMultipartUploadResult") != nullptr) {
    id_element = document.FirstChildElement("InitiateMultipartUploadResult")->FirstChildElement("UploadId");
  }
  if (id_element == nullptr || id_element->GetText() == nullptr) {
    return make_error(ErrorCode::kCorruption, "POST {}?uploads: the reply names no UploadId", key);
  }
  std::string upload_id = id_element->GetText();

  uint64_t parts = (bytes.size() + options.part_size - 1) / options.part_size;
  std::vector<std::string> etags(parts);
  std::atomic<uint64_t> next{0}, done_bytes{0};
  std::mutex failure_mutex;
  std::optional<Error> failure;
  std::mutex progress_mutex;
  auto upload = [&] {
    for (uint64_t part; (part = next.fetch_add(1)) < parts;) {
      {
        std::lock_guard lock(failure_mutex);
        if (failure) return;
      }
      uint64_t offset = part * options.part_size;
      std::span<const uint8_t> piece = bytes.subspan(offset, std::min(options.part_size, bytes.size() - offset));
      Request request{.method = "PUT",
                      .key = std::string(key),
                      .query = {{"partNumber", std::to_string(part + 1)}, {"uploadId", upload_id}},
                      .body = piece};
      Result<Reply> put = expect(request, {200});
      if (put && put->etag.empty()) {
        put = make_error(ErrorCode::kCorruption, "PUT {} part {}: the reply has no ETag", key, part + 1);
      }
      if (!put) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = put.error();
        return;
      }
      etags[part] = put->etag;
      uint64_t total = done_bytes.fetch_add(piece.size()) + piece.size();
      if (sent) {
        std::lock_guard lock(progress_mutex);
        sent(total);
      }
    }
  };
  std::vector<std::thread> workers;
  for (unsigned i = 0; i < std::min<uint64_t>(kPartUploads, parts); ++i) workers.emplace_back(upload);
  for (std::thread& worker : workers) worker.join();

  auto abort = [&] {
    (void)perform({.method = "DELETE", .key = std::string(key), .query = {{"uploadId", upload_id}}});
  };
  if (failure) {
    abort();
    return *failure;
  }
  std::string body = "<CompleteMultipartUpload>";
  for (uint64_t part = 0; part < parts; ++part) {
    body += fmt::format("<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>", part + 1, etags[part]);
  }
  body += "</CompleteMultipartUpload>";
  Request complete{.method = "POST",
                   .key = std::string(key),
                   .query = {{"uploadId", upload_id}},
                   .body = std::span(reinterpret_cast<const uint8_t*>(body.data()), body.size())};
  Result<Reply> completed = expect(complete, {200});
  // S3 may answer 200 and put the error in the body.
  if (completed && !s3_error_text(completed->body).empty()) {
    completed = make_error(ErrorCode::kIo, "POST {}?uploadId: {}", key, s3_error_text(completed->body));
  }
  if (!completed) {
    abort();
    return completed.error();
  }
  return Status{};
}

Result<std::vector<uint8_t>> S3Client::get(std::string_view key, uint64_t max_bytes) {
  Request request{.key = std::string(key), .max_reply_bytes = max_bytes};
  Result<Reply> reply = state_->perform(request);
  if (!reply) return reply.error();
  if (reply->status != 200) {
    // The error body was bounded by max_bytes; an error larger than the object is unlikely,
    // and its text is only for the message.
    return state_->reply_error(request, *reply);
  }
  if (reply->content_length && *reply->content_length != reply->body.size()) {
    return make_error(ErrorCode::kIo, "GET {}: {} bytes of the {} announced", key, reply->body.size(),
                      *reply->content_length);
  }
  return std::vector<uint8_t>(reply->body.begin(), reply->body.end());
}

Result<uint64_t> S3Client::get_to_file(std::string_view key, const std::filesystem::path& path, uint64_t max_bytes) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (fd.get() < 0) return errno_error(fmt::format("create {}", path.string()), errno);
  Request request{.key = std::string(key), .max_reply_bytes = max_bytes, .out_fd = fd.get()};
  DELTAVM_ASSIGN_OR_RETURN(Reply reply, state_->perform(request));
  if (reply.status != 200) return state_->reply_error(request, reply);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error(fmt::format("stat {}", path.string()), errno);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (reply.content_length && *reply.content_length != size) {
    return make_error(ErrorCode::kIo, "GET {}: {} bytes of the {} announced", key, size, *reply.content_length);
  }
  return size;
}

Status S3Client::get_range(std::string_view key, uint64_t offset, std::span<uint8_t> out) {
  if (out.empty()) return Status{};
  // A 206 carries exactly out.size() bytes (a store that ignores the range and sends the
  // whole object is cut off at that bound, and refused).
  Request request{.key = std::string(key),
                  .max_reply_bytes = out.size(),
                  .range = std::make_pair(offset, out.size()),
                  .range_out = out.data()};
  return state_->expect(request, {206}).status();
}

Result<std::vector<std::pair<std::string, uint64_t>>> S3Client::list(std::string_view prefix) {
  std::vector<std::pair<std::string, uint64_t>> keys;
  std::string token;
  for (int page = 0;; ++page) {
    Request request{.query = {{"list-type", "2"}, {"prefix", std::string(prefix)}}};
    if (!token.empty()) request.query.emplace_back("continuation-token", token);
    DELTAVM_ASSIGN_OR_RETURN(Reply reply, state_->expect(request, {200}));
    tinyxml2::XMLDocument document;
    const tinyxml2::XMLElement* result = nullptr;
    if (document.Parse(reply.body.data(), reply.body.size()) == tinyxml2::XML_SUCCESS) {
      result = document.FirstChildElement("ListBucketResult");
    }
    if (result == nullptr) {
      return make_error(ErrorCode::kCorruption, "listing bucket {}: the reply is not a ListBucketResult",
                        state_->bucket.name);
    }
    for (const tinyxml2::XMLElement* item = result->FirstChildElement("Contents"); item != nullptr;
         item = item->NextSiblingElement("Contents")) {
      const tinyxml2::XMLElement* key = item->FirstChildElement("Key");
      const tinyxml2::XMLElement* size = item->FirstChildElement("Size");
      if (key == nullptr || key->GetText() == nullptr || size == nullptr || size->GetText() == nullptr) {
        return make_error(ErrorCode::kCorruption, "listing bucket {}: an entry without Key or Size",
                          state_->bucket.name);
      }
      keys.emplace_back(key->GetText(), std::strtoull(size->GetText(), nullptr, 10));
    }
    const tinyxml2::XMLElement* truncated = result->FirstChildElement("IsTruncated");
    const tinyxml2::XMLElement* next = result->FirstChildElement("NextContinuationToken");
    if (truncated == nullptr || truncated->GetText() == nullptr || std::string(truncated->GetText()) != "true") break;
    if (next == nullptr || next->GetText() == nullptr || page > 100000) {
      return make_error(ErrorCode::kCorruption, "listing bucket {}: truncated without a continuation token",
                        state_->bucket.name);
    }
    token = next->GetText();
  }
  return keys;
}

Status S3Client::remove(std::string_view key) {
  return state_->expect({.method = "DELETE", .key = std::string(key)}, {204, 200, 404}).status();
}

}  // namespace deltavm
