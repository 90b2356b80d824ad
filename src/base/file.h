// File descriptors, memory mappings and crash-safe file writes. Every raw fd and mmap of the
// project lives inside the RAII types of this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <sys/types.h>

#include "base/error.h"

namespace deltavm {

// Owns one file descriptor; closes it on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release();

 private:
  int fd_ = -1;
};

Result<Fd> open_file(const std::filesystem::path& path, int flags, int mode = 0644);

// Owns one mmap'ed range; unmaps it on destruction. An empty Mapping has no range.
class Mapping {
 public:
  Mapping() = default;
  Mapping(Mapping&& other) noexcept;
  Mapping& operator=(Mapping&& other) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping();

  // The whole file at `path`, read-only and private. A file of size 0 gives an empty Mapping.
  // `open_flags` are added to O_RDONLY (O_NOFOLLOW for a file someone else may have placed).
  static Result<Mapping> map_file_readonly(const std::filesystem::path& path, int open_flags = 0);
  // `size_bytes` of fresh zeroed anonymous memory, private to this process. The pages are
  // not touched: the kernel supplies each on first access.
  static Result<Mapping> map_anonymous(size_t size_bytes);
  // mmap(2) of `fd` with the given protection and flags; `what` names the mapping in errors.
  static Result<Mapping> map(int fd, size_t size_bytes, int protection, int flags, off_t offset, std::string_view what);

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  std::span<uint8_t> writable_bytes() { return {data_, size_}; }
  size_t size() const { return size_; }
  uint8_t* data() const { return data_; }

 private:
  Mapping(uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

Result<std::vector<uint8_t>> read_file(const std::filesystem::path& path);
// read_file for a file that may be hostile or damaged: refused, before anything is read, if it
// is larger than `most_bytes` (kInvalidArgument naming the file and both sizes), or is not a
// regular file. `open_flags` are added to O_RDONLY.
Result<std::vector<uint8_t>> read_file(const std::filesystem::path& path, uint64_t most_bytes, int open_flags = 0);

// Writes all of `bytes` at the current offset, retrying short writes and EINTR.
Status write_all(int fd, std::span<const uint8_t> bytes, const std::filesystem::path& path);

Status fsync_directory(const std::filesystem::path& directory);

// Writes a file so that it is either absent or complete under its final name, across crashes:
// the bytes go to a temporary name in the same directory, are fsync'ed, renamed over the final
// name, and the directory is fsync'ed. A writer destroyed before commit() removes its temporary
// and leaves any earlier file at the final name untouched.
class AtomicFileWriter {
 public:
  // The file gets `mode` from its creation (0444: nobody can open it for writing, ever).
  static Result<AtomicFileWriter> create(const std::filesystem::path& final_path, mode_t mode = 0644);
  AtomicFileWriter(AtomicFileWriter&&) noexcept = default;
  AtomicFileWriter& operator=(AtomicFileWriter&&) noexcept = default;
  ~AtomicFileWriter();

  Status append(std::span<const uint8_t> bytes);
  uint64_t size_bytes() const { return size_bytes_; }
  // Makes the file visible under its final name. REQUIRES: called at most once.
  Status commit();

 private:
  AtomicFileWriter(Fd fd, std::filesystem::path temporary, std::filesystem::path final_path)
      : fd_(std::move(fd)), temporary_(std::move(temporary)), final_(std::move(final_path)) {}
  Fd fd_;
  std::filesystem::path temporary_;
  std::filesystem::path final_;
  uint64_t size_bytes_ = 0;
  bool committed_ = false;
};

Status write_file_atomic(const std::filesystem::path& path, std::span<const uint8_t> bytes, mode_t mode = 0644);

// Writes a scratch file that lives as long as a running process needs it (a VM's machine state
// or overlay): created or truncated 0600, not fsync'ed, since nothing of it outlives a crash.
Status write_scratch_file(const std::filesystem::path& path, std::span<const uint8_t> bytes);

// Temporary names carry this marker, so that cleanup and fsck can recognise leftovers.
inline constexpr std::string_view kTemporaryMarker = ".tmp-";

}  // namespace deltavm
