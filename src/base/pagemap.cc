#include "base/pagemap.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>

#include "base/file.h"
#include "base/page.h"

namespace deltavm {
namespace {

constexpr uint64_t kPresent = uint64_t{1} << 63;
constexpr uint64_t kSwapped = uint64_t{1} << 62;
constexpr uint64_t kFileOrSharedAnonymous = uint64_t{1} << 61;
constexpr uint64_t kEntriesPerRead = 1 << 16;

}  // namespace

Result<std::vector<uint64_t>> private_copies(pid_t pid, uint64_t address, uint64_t pages) {
  if (address % kPageSize != 0)
    return make_error(ErrorCode::kInvalidArgument, "address {:#x} is not page-aligned", address);
  std::string path = fmt::format("/proc/{}/pagemap", pid);
  DELTAVM_ASSIGN_OR_RETURN(Fd pagemap, open_file(path, O_RDONLY | O_CLOEXEC));
  std::vector<uint64_t> copies;
  std::vector<uint64_t> entries(kEntriesPerRead);
  for (uint64_t first = 0; first < pages; first += kEntriesPerRead) {
    uint64_t count = std::min(kEntriesPerRead, pages - first);
    off_t offset = static_cast<off_t>((address / kPageSize + first) * sizeof(uint64_t));
    size_t want = count * sizeof(uint64_t);
    ssize_t got = ::pread(pagemap.get(), entries.data(), want, offset);
    if (got != static_cast<ssize_t>(want)) {
      return errno_error(fmt::format("read {} at page {:#x}", path, address / kPageSize + first),
                         got < 0 ? errno : EIO);
    }
    for (uint64_t i = 0; i < count; ++i) {
      uint64_t entry = entries[i];
      bool copied = (entry & kPresent) != 0 && (entry & kFileOrSharedAnonymous) == 0;
      if (copied || (entry & kSwapped) != 0) copies.push_back(first + i);
    }
  }
  return copies;
}

}  // namespace deltavm
