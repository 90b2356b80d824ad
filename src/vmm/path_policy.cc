#include "vmm/path_policy.h"

#include <sys/stat.h>

namespace deltavm::vmm {
namespace {

Result<std::filesystem::path> canonical(const std::filesystem::path& path, std::string_view what) {
  std::error_code error;
  std::filesystem::path resolved = std::filesystem::canonical(path, error);
  if (error) return make_error(ErrorCode::kInvalidArgument, "{} {}: {}", what, path.string(), error.message());
  return resolved;
}

// True if `path` is `root` or lies below it (both canonical).
bool within(const std::filesystem::path& path, const std::filesystem::path& root) {
  std::string p = path.string(), r = root.string();
  if (p == r) return true;
  if (r != "/" && !r.empty()) r += '/';
  return p.compare(0, r.size(), r) == 0;
}

}  // namespace

Result<PathPolicy> PathPolicy::make(const std::filesystem::path& directory,
                                    const std::vector<std::filesystem::path>& read_only) {
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path root, canonical(directory, "VM directory"));
  std::vector<std::filesystem::path> readable;
  for (const std::filesystem::path& path : read_only) {
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path resolved, canonical(path, "read-only path"));
    readable.push_back(std::move(resolved));
  }
  return PathPolicy(std::move(root), std::move(readable));
}

Result<std::filesystem::path> PathPolicy::readable(const std::filesystem::path& path) const {
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path resolved, canonical(path, "file"));
  if (within(resolved, directory_)) return resolved;
  for (const std::filesystem::path& root : read_only_) {
    if (within(resolved, root)) return resolved;
  }
  return make_error(ErrorCode::kInvalidArgument,
                    "{} is outside this VM's directory {} and the files it may read; refused", path.string(),
                    directory_.string());
}

Result<std::filesystem::path> PathPolicy::writable(const std::filesystem::path& path) const {
  if (!path.has_filename() || path.filename() == "." || path.filename() == "..") {
    return make_error(ErrorCode::kInvalidArgument, "{} names no file to write", path.string());
  }
  std::filesystem::path parent = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path resolved, canonical(parent, "directory"));
  if (!within(resolved, directory_)) {
    return make_error(ErrorCode::kInvalidArgument, "{} is outside this VM's directory {}; refused to write it",
                      path.string(), directory_.string());
  }
  std::filesystem::path target = resolved / path.filename();
  struct stat st {};
  if (::lstat(target.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) {
    return make_error(ErrorCode::kInvalidArgument, "{} is a symbolic link; refused to write through it", path.string());
  }
  return target;
}

}  // namespace deltavm::vmm
