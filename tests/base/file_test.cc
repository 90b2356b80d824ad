#include "base/file.h"

#include <gtest/gtest.h>

namespace deltavm {
namespace {

std::filesystem::path fresh_directory(const std::string& name) {
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / name;
  std::filesystem::remove_all(directory);
  std::filesystem::create_directories(directory);
  return directory;
}

TEST(AtomicFileWriter, FileAppearsOnlyOnCommit) {
  auto directory = fresh_directory("atomic_commit");
  auto path = directory / "out";
  {
    Result<AtomicFileWriter> writer = AtomicFileWriter::create(path);
    ASSERT_TRUE(writer);
    std::vector<uint8_t> bytes(1000, 7);
    ASSERT_TRUE(writer->append(bytes));
    EXPECT_FALSE(std::filesystem::exists(path));
    ASSERT_TRUE(writer->commit());
  }
  EXPECT_EQ(std::filesystem::file_size(path), 1000u);
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(directory), {}), 1);
}

TEST(AtomicFileWriter, AbandonedWriterLeavesNothingAndKeepsTheOldFile) {
  auto directory = fresh_directory("atomic_abandon");
  auto path = directory / "out";
  std::vector<uint8_t> old_bytes = {1, 2, 3};
  ASSERT_TRUE(write_file_atomic(path, old_bytes));
  {
    Result<AtomicFileWriter> writer = AtomicFileWriter::create(path);
    ASSERT_TRUE(writer);
    std::vector<uint8_t> bytes(50, 9);
    ASSERT_TRUE(writer->append(bytes));
  }
  EXPECT_EQ(*read_file(path), old_bytes);
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(directory), {}), 1);
}

TEST(Mapping, MapsAFileReadOnlyAndRefusesAMissingOne) {
  auto directory = fresh_directory("mapping");
  std::vector<uint8_t> bytes(8192, 5);
  ASSERT_TRUE(write_file_atomic(directory / "f", bytes));
  Result<Mapping> mapping = Mapping::map_file_readonly(directory / "f");
  ASSERT_TRUE(mapping);
  EXPECT_EQ(mapping->size(), 8192u);
  EXPECT_EQ(mapping->bytes()[8191], 5);
  Result<Mapping> missing = Mapping::map_file_readonly(directory / "nope");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);
  EXPECT_NE(missing.error().message.find("nope"), std::string::npos);
}

}  // namespace
}  // namespace deltavm
