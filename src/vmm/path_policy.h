// Which files a deltavm-vmm may touch. A VMM serves requests that name files (a kernel to
// boot, a state to save, a base to map); whoever can send requests must not be able to make
// it read or write anything else. It writes only inside its VM's directory, and reads only
// there and in the files and directories it was started with (the kernel, the base image).
#pragma once

#include <filesystem>
#include <vector>

#include "base/error.h"

namespace deltavm::vmm {

class PathPolicy {
 public:
  // `directory` must exist; `read_only` entries that do not exist are refused.
  static Result<PathPolicy> make(const std::filesystem::path& directory,
                                 const std::vector<std::filesystem::path>& read_only);

  // The path to read `path` at (symbolic links resolved), if it lies in the VM's directory or
  // in a read-only entry (the entry itself, or below it); else an error naming it.
  Result<std::filesystem::path> readable(const std::filesystem::path& path) const;
  // The path to write `path` at, if its directory is the VM's directory or below it and the
  // file is not a symbolic link; else an error naming it.
  Result<std::filesystem::path> writable(const std::filesystem::path& path) const;

  const std::filesystem::path& directory() const { return directory_; }
  const std::vector<std::filesystem::path>& read_only() const { return read_only_; }

 private:
  PathPolicy(std::filesystem::path directory, std::vector<std::filesystem::path> read_only)
      : directory_(std::move(directory)), read_only_(std::move(read_only)) {}
  std::filesystem::path directory_;               // Canonical.
  std::vector<std::filesystem::path> read_only_;  // Canonical.
};

}  // namespace deltavm::vmm
