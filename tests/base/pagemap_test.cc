// private_copies (base/pagemap.h) on a real private file mapping: exactly the pages written
// are reported, whether the process asking is the writer or another one.
#include "base/pagemap.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "base/file.h"
#include "base/page.h"

namespace deltavm {
namespace {

constexpr uint64_t kPages = 64;

class PrivateCopies : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = std::filesystem::path(::testing::TempDir()) / "pagemap_test.ram";
    std::vector<uint8_t> bytes(kPages * kPageSize, 0x5a);
    ASSERT_TRUE(write_file_atomic(path_, bytes));
    Result<Fd> fd = open_file(path_, O_RDONLY);
    ASSERT_TRUE(fd);
    void* data = ::mmap(nullptr, kPages * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd->get(), 0);
    ASSERT_NE(data, MAP_FAILED);
    ram_ = static_cast<uint8_t*>(data);
  }
  void TearDown() override {
    if (ram_ != nullptr) ::munmap(ram_, kPages * kPageSize);
    std::filesystem::remove(path_);
  }
  uint64_t address() const { return reinterpret_cast<uint64_t>(ram_); }

  std::filesystem::path path_;
  uint8_t* ram_ = nullptr;
};

TEST_F(PrivateCopies, AreExactlyThePagesWritten) {
  volatile uint8_t sum = 0;
  for (uint64_t page : {1, 2, 40}) sum = sum + ram_[page * kPageSize];  // Read: still the file's.
  for (uint64_t page : {0, 5, 9, 63}) ram_[page * kPageSize + 17] = 1;
  Result<std::vector<uint64_t>> copies = private_copies(::getpid(), address(), kPages);
  ASSERT_TRUE(copies) << copies.error().message;
  EXPECT_EQ(*copies, (std::vector<uint64_t>{0, 5, 9, 63}));
  // A sub-range is indexed from its own start.
  copies = private_copies(::getpid(), address() + 8 * kPageSize, 4);
  ASSERT_TRUE(copies);
  EXPECT_EQ(*copies, (std::vector<uint64_t>{1}));
}

TEST_F(PrivateCopies, OfAnotherProcess) {
  int ready[2], done[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(done), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    for (uint64_t page : {3, 33}) ram_[page * kPageSize] = 7;
    char byte = 0;
    (void)!::write(ready[1], &byte, 1);
    (void)!::read(done[0], &byte, 1);
    ::_exit(0);
  }
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  Result<std::vector<uint64_t>> copies = private_copies(pid, address(), kPages);
  (void)!::write(done[1], &byte, 1);
  ::waitpid(pid, nullptr, 0);
  ASSERT_TRUE(copies) << copies.error().message;
  EXPECT_EQ(*copies, (std::vector<uint64_t>{3, 33}));
  // The parent wrote nothing.
  copies = private_copies(::getpid(), address(), kPages);
  ASSERT_TRUE(copies);
  EXPECT_TRUE(copies->empty());
}

TEST_F(PrivateCopies, RefuseAnUnalignedAddressAndAMissingProcess) {
  EXPECT_FALSE(private_copies(::getpid(), address() + 1, 1));
  Result<std::vector<uint64_t>> gone = private_copies(999'999'999, address(), 1);
  ASSERT_FALSE(gone);
  EXPECT_NE(gone.error().message.find("/proc/999999999/pagemap"), std::string::npos) << gone.error().message;
}

}  // namespace
}  // namespace deltavm
