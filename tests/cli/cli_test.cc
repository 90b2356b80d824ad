// The deltavm command as a user runs it: real files, real exit statuses, real output.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>

#include "base/file.h"
#include "image/delta_file.h"
#include "image/test_images.h"

namespace deltavm {
namespace {

struct CommandResult {
  int status;
  std::string out;
  std::string err;
};

CommandResult run(const std::string& arguments) {
  std::filesystem::path err_path = std::filesystem::path(::testing::TempDir()) / "cli_stderr";
  std::string command = std::string(DELTAVM_BINARY) + " " + arguments + " 2>" + err_path.string();
  FILE* pipe = ::popen(command.c_str(), "r");
  CommandResult result{-1, "", ""};
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) result.out.append(buffer, n);
  int status = ::pclose(pipe);
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream err(err_path);
  result.err.assign(std::istreambuf_iterator<char>(err), {});
  return result;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) / "cli_test";
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    std::mt19937_64 random(11);
    a_ = testing::random_image(64, random);
    b_ = testing::mutate_image(a_, 0.3, random);
    c_ = testing::mutate_image(b_, 0.3, random);
    ASSERT_TRUE(write_file_atomic(dir_ / "a.ram", a_));
    ASSERT_TRUE(write_file_atomic(dir_ / "b.ram", b_));
    ASSERT_TRUE(write_file_atomic(dir_ / "c.ram", c_));
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
  std::vector<uint8_t> a_, b_, c_;
};

TEST_F(Cli, DiffThenApplyAChainReproducesTheTarget) {
  ASSERT_EQ(run("image diff " + path("a.ram") + " " + path("b.ram") + " -o " + path("ab.dvd")).status, 0);
  ASSERT_EQ(run("image diff " + path("b.ram") + " " + path("c.ram") + " -o " + path("bc.dvd")).status, 0);
  CommandResult apply =
      run("image apply " + path("a.ram") + " " + path("ab.dvd") + " " + path("bc.dvd") + " -o " + path("out.ram"));
  ASSERT_EQ(apply.status, 0) << apply.err;
  EXPECT_EQ(*read_file(dir_ / "out.ram"), c_);
}

TEST_F(Cli, ApplyRefusesDeltasOutOfOrder) {
  ASSERT_EQ(run("image diff " + path("a.ram") + " " + path("b.ram") + " -o " + path("ab.dvd")).status, 0);
  ASSERT_EQ(run("image diff " + path("b.ram") + " " + path("c.ram") + " -o " + path("bc.dvd")).status, 0);
  CommandResult apply =
      run("image apply " + path("a.ram") + " " + path("bc.dvd") + " " + path("ab.dvd") + " -o " + path("out.ram"));
  EXPECT_NE(apply.status, 0);
  EXPECT_NE(apply.err.find("ab.dvd applies to image"), std::string::npos) << apply.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "out.ram"));
}

TEST_F(Cli, CorruptOrTruncatedDeltaIsRefusedAndNoOutputIsCreated) {
  ASSERT_EQ(run("image diff " + path("a.ram") + " " + path("b.ram") + " -o " + path("ab.dvd")).status, 0);
  std::vector<uint8_t> good = *read_file(dir_ / "ab.dvd");
  std::mt19937_64 random(12);
  std::uniform_int_distribution<size_t> position(0, good.size() - 1);
  for (int trial = 0; trial < 24; ++trial) {
    std::vector<uint8_t> bad = good;
    if (trial % 2 == 0)
      bad[position(random)] ^= 0x10;
    else
      bad.resize(position(random));
    ASSERT_TRUE(write_file_atomic(dir_ / "bad.dvd", bad));
    CommandResult apply = run("image apply " + path("a.ram") + " " + path("bad.dvd") + " -o " + path("out.ram"));
    EXPECT_EQ(apply.status, 1) << "trial " << trial;
    EXPECT_NE(apply.err.find("bad.dvd"), std::string::npos) << apply.err;
    EXPECT_NE(apply.err.find("corruption"), std::string::npos) << apply.err;
    EXPECT_FALSE(std::filesystem::exists(dir_ / "out.ram")) << "trial " << trial;
    CommandResult verify = run("image verify " + path("bad.dvd"));
    EXPECT_EQ(verify.status, 1);
  }
}

TEST_F(Cli, ApplyRefusesTheWrongBase) {
  ASSERT_EQ(run("image diff " + path("b.ram") + " " + path("c.ram") + " -o " + path("bc.dvd")).status, 0);
  CommandResult apply = run("image apply " + path("a.ram") + " " + path("bc.dvd") + " -o " + path("out.ram"));
  EXPECT_NE(apply.status, 0);
  EXPECT_NE(apply.err.find("a.ram is image"), std::string::npos) << apply.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "out.ram"));
}

TEST_F(Cli, InspectPrintsJsonForDeltasAndImages) {
  ASSERT_EQ(run("image diff " + path("a.ram") + " " + path("b.ram") + " -o " + path("ab.dvd")).status, 0);
  CommandResult inspect = run("--json image inspect " + path("ab.dvd"));
  ASSERT_EQ(inspect.status, 0);
  auto json = nlohmann::json::parse(inspect.out);
  EXPECT_EQ(json["kind"], "delta");
  EXPECT_EQ(json["image_size_bytes"], a_.size());
  CommandResult image = run("image inspect " + path("a.ram") + " --json");
  ASSERT_EQ(image.status, 0);
  EXPECT_EQ(nlohmann::json::parse(image.out)["pages"], 64);
}

TEST_F(Cli, DiffWithADirtyBitmap) {
  std::vector<uint8_t> bitmap(8, 0xFF);
  ASSERT_TRUE(write_file_atomic(dir_ / "dirty.bin", bitmap));
  ASSERT_EQ(run("image diff " + path("a.ram") + " " + path("b.ram") + " --dirty " + path("dirty.bin") + " -o " +
                path("ab.dvd"))
                .status,
            0);
  ASSERT_EQ(run("image apply " + path("a.ram") + " " + path("ab.dvd") + " -o " + path("out.ram")).status, 0);
  EXPECT_EQ(*read_file(dir_ / "out.ram"), b_);
  std::vector<uint8_t> short_bitmap(7, 0xFF);
  ASSERT_TRUE(write_file_atomic(dir_ / "short.bin", short_bitmap));
  CommandResult bad = run("image diff " + path("a.ram") + " " + path("b.ram") + " --dirty " + path("short.bin") +
                          " -o " + path("x.dvd"));
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("short.bin"), std::string::npos);
  EXPECT_NE(bad.err.find("expected 8 bytes"), std::string::npos) << bad.err;
}

TEST_F(Cli, StorePutLsGetFsckGc) {
  std::string store = "--store " + path("store");
  ASSERT_EQ(run(store + " store put a " + path("a.ram")).status, 0);
  CommandResult put = run(store + " store put b " + path("b.ram") + " --parent a");
  ASSERT_EQ(put.status, 0) << put.err;
  CommandResult ls = run(store + " --json store ls");
  ASSERT_EQ(ls.status, 0);
  auto images = nlohmann::json::parse(ls.out)["images"];
  ASSERT_EQ(images.size(), 2u);
  EXPECT_EQ(images[1]["parent"], "a");
  EXPECT_EQ(images[1]["chain_depth"], 1);
  ASSERT_EQ(run(store + " store get b -o " + path("b.out")).status, 0);
  EXPECT_EQ(*read_file(dir_ / "b.out"), b_);
  CommandResult fsck = run(store + " store fsck");
  EXPECT_EQ(fsck.status, 0);
  EXPECT_NE(fsck.out.find("clean"), std::string::npos);
  EXPECT_EQ(run(store + " store gc").status, 0);
}

TEST_F(Cli, FsckExitsNonZeroOnCorruption) {
  std::string store = "--store " + path("store");
  ASSERT_EQ(run(store + " store put a " + path("a.ram")).status, 0);
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir_ / "store" / "objects")) {
    if (!entry.is_regular_file()) continue;
    std::vector<uint8_t> bytes = *read_file(entry.path());
    bytes[100] ^= 1;
    ASSERT_TRUE(write_file_atomic(entry.path(), bytes));
  }
  CommandResult fsck = run(store + " store fsck");
  EXPECT_EQ(fsck.status, 1);
  EXPECT_NE(fsck.err.find("image a"), std::string::npos) << fsck.err;
  CommandResult get = run(store + " store get a -o " + path("a.out"));
  EXPECT_EQ(get.status, 1);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "a.out"));
}

TEST_F(Cli, MissingFileIsAUsageError) {
  CommandResult diff = run("image diff " + path("nope.ram") + " " + path("b.ram") + " -o " + path("x.dvd"));
  EXPECT_NE(diff.status, 0);
  EXPECT_NE(diff.err.find("nope.ram"), std::string::npos);
}

}  // namespace
}  // namespace deltavm
