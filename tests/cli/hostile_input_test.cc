// The deltavm command against a hostile or careless user: tiny crafted files, outputs that are
// inputs or devices, a lost catalog, a mistyped --store. Each case must end in a clear error
// (never a signal) and leave what is stored as it was.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <random>

#include "base/file.h"
#include "image/page.h"
#include "image/test_images.h"
#include "support/command.h"

namespace deltavm {
namespace {

using testing::CommandResult;
using testing::run_deltavm;

class HostileInput : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           (std::string("hostile_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    std::mt19937_64 random(5);
    a_ = testing::random_image(64, random);
    b_ = testing::mutate_image(a_, 0.3, random);
    ASSERT_TRUE(write_file_atomic(dir_ / "a.ram", a_));
    ASSERT_TRUE(write_file_atomic(dir_ / "b.ram", b_));
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
  std::vector<uint8_t> a_, b_;
};

// A clear error: exit status 1 or 2, no signal, a message on stderr.
void expect_clear_error(const CommandResult& result, const std::string& needle) {
  EXPECT_EQ(result.signal, 0) << "ended by signal " << result.signal << "; stderr: " << result.err;
  EXPECT_TRUE(result.status == 1 || result.status == 2) << "status " << result.status << "; stderr: " << result.err;
  EXPECT_NE(result.err.find(needle), std::string::npos) << result.err;
}

// The probe's tiny deltas: 176 bytes claiming every page of a 1 TiB image changed, and ~193
// bytes whose zstd frame claims 1 GiB or 64 GiB. Each is refused by every command that reads
// deltas, without a crash and without touching the memory the claims ask for.
TEST_F(HostileInput, TinyDeltasWithHugeClaimsAreRefusedCheaply) {
  struct Case {
    std::string name;
    std::vector<uint8_t> bytes;
    std::string expected;
  };
  std::vector<Case> cases;
  cases.push_back({"count.dvd", testing::craft_delta_file(kMaxImageSizeBytes, kMaxImageSizeBytes / kPageSize, {}, {}),
                   "edit_count"});
  for (uint64_t claimed : {1ull << 30, 64ull << 30}) {
    testing::CraftedSection edits{1, claimed, testing::zstd_frame_claiming(claimed, 1 << 17)};
    cases.push_back({fmt::format("claims-{}.dvd", claimed >> 30),
                     testing::craft_delta_file(kMaxImageSizeBytes, claimed / 1024, edits, {}), "cannot hold"});
  }
  for (const Case& c : cases) {
    ASSERT_LT(c.bytes.size(), 200u);
    ASSERT_TRUE(write_file_atomic(dir_ / c.name, c.bytes));
    for (const std::vector<std::string>& command :
         {std::vector<std::string>{"image", "verify", path(c.name)},
          {"image", "inspect", path(c.name)},
          {"image", "apply", path("a.ram"), path(c.name), "-o", path("out.ram")}}) {
      CommandResult result = run_deltavm(command);
      SCOPED_TRACE(c.name + " " + command[1]);
      expect_clear_error(result, c.expected);
      EXPECT_NE(result.err.find(c.name), std::string::npos) << result.err;
      EXPECT_LT(result.max_rss_kib, 64 * 1024) << "the claim was allocated";
    }
    EXPECT_FALSE(std::filesystem::exists(dir_ / "out.ram"));
  }
}

TEST_F(HostileInput, DiffRefusesToOverwriteItsOwnInput) {
  for (const std::vector<std::string>& command :
       {std::vector<std::string>{"image", "diff", path("a.ram"), path("b.ram"), "-o", path("a.ram")},
        {"image", "diff", path("a.ram"), path("b.ram"), "-o", path("b.ram")}}) {
    expect_clear_error(run_deltavm(command), "is the input");
  }
  // Another name for the same file is the same input.
  std::filesystem::create_hard_link(dir_ / "b.ram", dir_ / "b-link.ram");
  expect_clear_error(run_deltavm({"image", "diff", path("a.ram"), path("b.ram"), "-o", path("b-link.ram")}),
                     "is the input");
  ASSERT_EQ(run_deltavm({"image", "diff", path("a.ram"), path("b.ram"), "-o", path("ab.dvd")}).status, 0);
  expect_clear_error(run_deltavm({"image", "apply", path("a.ram"), path("ab.dvd"), "-o", path("ab.dvd")}),
                     "is the input");
  expect_clear_error(run_deltavm({"image", "apply", path("a.ram"), path("ab.dvd"), "-o", path("a.ram")}),
                     "is the input");
  EXPECT_EQ(*read_file(dir_ / "a.ram"), a_);
  EXPECT_EQ(*read_file(dir_ / "b.ram"), b_);
}

TEST_F(HostileInput, OutputOntoADeviceOrFifoIsRefusedAndTheNodeStays) {
  ASSERT_EQ(::mknod(path("null").c_str(), S_IFCHR | 0666, makedev(1, 3)), 0) << std::strerror(errno);
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0600), 0);
  ASSERT_EQ(run_deltavm({"store", "put", "a", path("a.ram"), "--store", path("store")}).status, 0);
  for (const char* node : {"null", "fifo"}) {
    SCOPED_TRACE(node);
    expect_clear_error(run_deltavm({"image", "diff", path("a.ram"), path("b.ram"), "-o", path(node)}),
                       "refusing to replace it");
    expect_clear_error(run_deltavm({"store", "get", "a", "-o", path(node), "--store", path("store")}),
                       "refusing to replace it");
  }
  struct stat st {};
  ASSERT_EQ(::stat(path("null").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  ASSERT_EQ(::stat(path("fifo").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
}

// A lost catalog: every command refuses the store, gc deletes nothing, and no command quietly
// starts a new catalog.
TEST_F(HostileInput, StoreWithoutItsCatalogIsRefusedByEveryCommand) {
  std::string store = path("store");
  ASSERT_EQ(run_deltavm({"store", "put", "a", path("a.ram"), "--store", store}).status, 0);
  ASSERT_EQ(run_deltavm({"store", "put", "b", path("b.ram"), "--parent", "a", "--store", store}).status, 0);
  auto count_objects = [&] {
    size_t count = 0;
    for (const auto& entry : std::filesystem::recursive_directory_iterator(dir_ / "store" / "objects")) {
      count += entry.is_regular_file() ? 1 : 0;
    }
    return count;
  };
  size_t objects = count_objects();
  ASSERT_GT(objects, 0u);
  for (const char* damage : {"deleted", "empty"}) {
    SCOPED_TRACE(damage);
    for (const char* file : {"catalog.sqlite-wal", "catalog.sqlite-shm"})
      std::filesystem::remove(dir_ / "store" / file);
    if (std::string(damage) == "deleted") {
      std::filesystem::remove(dir_ / "store" / "catalog.sqlite");
    } else {
      ASSERT_TRUE(write_file_atomic(dir_ / "store" / "catalog.sqlite", std::vector<uint8_t>()));
    }
    for (const std::vector<std::string>& command : {std::vector<std::string>{"store", "ls"},
                                                    {"store", "fsck"},
                                                    {"store", "gc"},
                                                    {"store", "verify", "a"},
                                                    {"template", "ls"},
                                                    {"store", "put", "c", path("a.ram")}}) {
      std::vector<std::string> arguments = command;
      arguments.insert(arguments.end(), {"--store", store});
      CommandResult result = run_deltavm(arguments);
      SCOPED_TRACE(command[0] + " " + command[1]);
      expect_clear_error(result, "catalog");
    }
    EXPECT_EQ(count_objects(), objects);
  }
}

TEST_F(HostileInput, MistypedStoreIsNotCreatedByReadCommands) {
  std::string typo = path("no-such-store");
  for (const std::vector<std::string>& command : {std::vector<std::string>{"store", "ls"},
                                                  {"store", "fsck"},
                                                  {"store", "gc"},
                                                  {"store", "verify", "a"},
                                                  {"store", "get", "a", "-o", path("x.ram")},
                                                  {"store", "rm", "a"},
                                                  {"template", "ls"},
                                                  {"run", "a"}}) {
    std::vector<std::string> arguments = command;
    arguments.insert(arguments.end(), {"--store", typo});
    SCOPED_TRACE(command[0] + " " + command[1]);
    expect_clear_error(run_deltavm(arguments), "no store at");
    EXPECT_FALSE(std::filesystem::exists(typo));
  }
}

// Paths the file system refuses (a name longer than 255 bytes, a loop of symbolic links) end
// `template build` with an error naming the field, never an uncaught exception.
TEST_F(HostileInput, SpecPathsTheFileSystemRefusesAreClearErrors) {
  std::string long_name(300, 'k');
  std::filesystem::create_symlink(dir_ / "loop-b", dir_ / "loop-a");
  std::filesystem::create_symlink(dir_ / "loop-a", dir_ / "loop-b");
  struct Case {
    std::string spec;
    std::string expected;
  };
  std::vector<Case> cases = {
      {fmt::format(R"({{"name": "x", "kernel": "{}"}})", (dir_ / long_name).string()), "field kernel"},
      {fmt::format(R"({{"name": "x", "kernel": "{}"}})", (dir_ / "loop-a").string()), "field kernel"},
      {fmt::format(R"({{"name": "x", "files": [{{"source": "{}", "destination": "/x"}}]}})",
                   (dir_ / "loop-a" / "x").string()),
       "field files[0].source"},
      {fmt::format(R"({{"name": "x", "files": [{{"source": "{}/{}", "destination": "/x"}}]}})", dir_.string(),
                   long_name),
       "field files[0].source"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    std::filesystem::path spec = dir_ / fmt::format("spec{}.json", i);
    ASSERT_TRUE(write_file_atomic(
        spec, std::span(reinterpret_cast<const uint8_t*>(cases[i].spec.data()), cases[i].spec.size())));
    SCOPED_TRACE(cases[i].spec);
    expect_clear_error(run_deltavm({"template", "build", spec.string(), "--store", path("store")}), cases[i].expected);
  }
  // The spec's own path.
  for (const std::filesystem::path& spec : {dir_ / long_name, dir_ / "loop-a"}) {
    testing::CommandResult result = run_deltavm({"template", "build", spec.string(), "--store", path("store")});
    EXPECT_EQ(result.signal, 0) << result.err;
    EXPECT_EQ(result.status, 2) << result.err;
  }
}

}  // namespace
}  // namespace deltavm
