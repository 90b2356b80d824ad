#include "base/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <random>

#include "base/faults.h"

namespace deltavm {

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.release();
  }
  return *this;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

int Fd::release() {
  int fd = fd_;
  fd_ = -1;
  return fd;
}

Result<Fd> open_file(const std::filesystem::path& path, int flags, int mode) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) return errno_error(fmt::format("open {}", path.string()), errno);
  return Fd(fd);
}

Mapping::Mapping(Mapping&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

Mapping::~Mapping() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

Result<Mapping> Mapping::map_file_readonly(const std::filesystem::path& path, int open_flags) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_RDONLY | open_flags));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error(fmt::format("stat {}", path.string()), errno);
  if (!S_ISREG(st.st_mode)) {
    return make_error(ErrorCode::kInvalidArgument, "{}: not a regular file", path.string());
  }
  if (st.st_size == 0) return Mapping();
  void* data = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (data == MAP_FAILED) return errno_error(fmt::format("mmap {}", path.string()), errno);
  return Mapping(static_cast<uint8_t*>(data), static_cast<size_t>(st.st_size));
}

Result<Mapping> Mapping::map_anonymous(size_t size_bytes) {
  if (size_bytes == 0) return Mapping();
  void* data = ::mmap(nullptr, size_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) return errno_error(fmt::format("mmap {} anonymous bytes", size_bytes), errno);
  return Mapping(static_cast<uint8_t*>(data), size_bytes);
}

Result<Mapping> Mapping::map(int fd, size_t size_bytes, int protection, int flags, off_t offset,
                             std::string_view what) {
  if (size_bytes == 0) return Mapping();
  void* data = ::mmap(nullptr, size_bytes, protection, flags, fd, offset);
  if (data == MAP_FAILED) return errno_error(fmt::format("mmap {} ({} bytes)", what, size_bytes), errno);
  return Mapping(static_cast<uint8_t*>(data), size_bytes);
}

Result<std::vector<uint8_t>> read_file(const std::filesystem::path& path) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_RDONLY));
  std::vector<uint8_t> bytes;
  uint8_t buffer[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd.get(), buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(fmt::format("read {}", path.string()), errno);
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), buffer, buffer + n);
  }
  return bytes;
}

Result<std::vector<uint8_t>> read_file(const std::filesystem::path& path, uint64_t most_bytes, int open_flags) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_RDONLY | open_flags));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error(fmt::format("stat {}", path.string()), errno);
  if (!S_ISREG(st.st_mode)) {
    return make_error(ErrorCode::kInvalidArgument, "{}: not a regular file", path.string());
  }
  if (static_cast<uint64_t>(st.st_size) > most_bytes) {
    return make_error(ErrorCode::kInvalidArgument, "{} is {} bytes, more than the {} allowed", path.string(),
                      st.st_size, most_bytes);
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::read(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(fmt::format("read {}", path.string()), errno);
    if (n == 0) break;  // Shrunk meanwhile: what is there.
    done += static_cast<size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

Status write_all(int fd, std::span<const uint8_t> bytes, const std::filesystem::path& path) {
  while (!bytes.empty()) {
    if (int fault = injected_fault(DurableCall::kWrite))
      return errno_error(fmt::format("write {}", path.string()), fault);
    ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(fmt::format("write {}", path.string()), errno);
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  return {};
}

Status fsync_directory(const std::filesystem::path& directory) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(directory, O_RDONLY | O_DIRECTORY));
  if (int fault = injected_fault(DurableCall::kFsync))
    return errno_error(fmt::format("fsync {}", directory.string()), fault);
  if (::fsync(fd.get()) != 0) return errno_error(fmt::format("fsync {}", directory.string()), errno);
  return {};
}

Result<AtomicFileWriter> AtomicFileWriter::create(const std::filesystem::path& final_path, mode_t mode) {
  static thread_local std::mt19937_64 random{std::random_device{}()};
  std::filesystem::path temporary = final_path;
  temporary += fmt::format("{}{}-{:016x}", kTemporaryMarker, ::getpid(), random());
  if (int fault = injected_fault(DurableCall::kCreate))
    return errno_error(fmt::format("create {}", temporary.string()), fault);
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(temporary, O_WRONLY | O_CREAT | O_EXCL, mode));
  return AtomicFileWriter(std::move(fd), std::move(temporary), final_path);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (!committed_ && !temporary_.empty()) ::unlink(temporary_.c_str());
}

Status AtomicFileWriter::append(std::span<const uint8_t> bytes) {
  DELTAVM_TRY(write_all(fd_.get(), bytes, temporary_));
  size_bytes_ += bytes.size();
  return {};
}

Status AtomicFileWriter::commit() {
  if (int fault = injected_fault(DurableCall::kFsync))
    return errno_error(fmt::format("fsync {}", temporary_.string()), fault);
  if (::fsync(fd_.get()) != 0) return errno_error(fmt::format("fsync {}", temporary_.string()), errno);
  fd_ = Fd();
  if (int fault = injected_fault(DurableCall::kRename)) {
    return errno_error(fmt::format("rename {} to {}", temporary_.string(), final_.string()), fault);
  }
  if (::rename(temporary_.c_str(), final_.c_str()) != 0) {
    return errno_error(fmt::format("rename {} to {}", temporary_.string(), final_.string()), errno);
  }
  committed_ = true;
  std::filesystem::path directory = final_.parent_path();
  return fsync_directory(directory.empty() ? std::filesystem::path(".") : directory);
}

Status write_scratch_file(const std::filesystem::path& path, std::span<const uint8_t> bytes) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0600));
  return write_all(fd.get(), bytes, path);
}

Status write_file_atomic(const std::filesystem::path& path, std::span<const uint8_t> bytes, mode_t mode) {
  DELTAVM_ASSIGN_OR_RETURN(AtomicFileWriter writer, AtomicFileWriter::create(path, mode));
  DELTAVM_TRY(writer.append(bytes));
  return writer.commit();
}

}  // namespace deltavm
