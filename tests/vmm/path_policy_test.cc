// Which files deltavm-vmm may touch (host-only: the policy needs no /dev/kvm).
#include "vmm/path_policy.h"

#include <gtest/gtest.h>

#include <fstream>

namespace deltavm::vmm {
namespace {

class Paths : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::path(::testing::TempDir()) / "path_policy_test";
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_ / "vm");
    std::filesystem::create_directories(root_ / "store");
    std::filesystem::create_directories(root_ / "vm-other");
    std::ofstream(root_ / "store" / "base.ram") << "x";
    std::ofstream(root_ / "kernel") << "x";
    std::ofstream(root_ / "secret") << "x";
    Result<PathPolicy> policy = PathPolicy::make(root_ / "vm", {root_ / "store", root_ / "kernel"});
    ASSERT_TRUE(policy) << policy.error().message;
    policy_.emplace(*policy);
  }
  std::filesystem::path root_;
  std::optional<PathPolicy> policy_;
};

TEST_F(Paths, ReadsOnlyInsideItsDirectoryAndItsReadOnlyEntries) {
  EXPECT_TRUE(policy_->readable(root_ / "store" / "base.ram"));
  EXPECT_TRUE(policy_->readable(root_ / "kernel"));
  std::ofstream(root_ / "vm" / "state") << "x";
  EXPECT_TRUE(policy_->readable(root_ / "vm" / "state"));
  for (const std::filesystem::path& path :
       {root_ / "secret", std::filesystem::path("/etc/passwd"), root_ / "vm" / ".." / "secret", root_ / "vm-other"}) {
    Result<std::filesystem::path> allowed = policy_->readable(path);
    ASSERT_FALSE(allowed) << path;
    EXPECT_NE(allowed.error().message.find("outside this VM's directory"), std::string::npos)
        << allowed.error().message;
  }
}

TEST_F(Paths, SymbolicLinksAreFollowedBeforeTheCheck) {
  std::filesystem::create_symlink(root_ / "secret", root_ / "vm" / "innocent");
  EXPECT_FALSE(policy_->readable(root_ / "vm" / "innocent"));
  Result<std::filesystem::path> write = policy_->writable(root_ / "vm" / "innocent");
  ASSERT_FALSE(write);
  EXPECT_NE(write.error().message.find("symbolic link"), std::string::npos);
  std::filesystem::create_directory_symlink(root_ / "store", root_ / "vm" / "escape");
  EXPECT_FALSE(policy_->writable(root_ / "vm" / "escape" / "new-file"));
}

TEST_F(Paths, WritesOnlyInsideItsDirectory) {
  EXPECT_TRUE(policy_->writable(root_ / "vm" / "ram"));
  EXPECT_FALSE(policy_->writable(root_ / "store" / "base.ram")) << "a read-only entry is not writable";
  EXPECT_FALSE(policy_->writable(root_ / "vm-other" / "x")) << "a sibling sharing the directory's name as a prefix";
  EXPECT_FALSE(policy_->writable("/tmp/x"));
  EXPECT_FALSE(policy_->writable(root_ / "vm" / ".."));
}

}  // namespace
}  // namespace deltavm::vmm
