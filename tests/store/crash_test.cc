// A writer killed with SIGKILL at random points must leave a store that fsck reports clean,
// with every listed image complete and exact, and no partial object visible.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "image/test_images.h"
#include "store/store.h"

namespace deltavm {
namespace {

constexpr uint64_t kPages = 512;  // 2 MiB images: each put takes long enough to be interrupted.

// The image the writer stores as "image-N": reproducible in the checking process.
std::vector<uint8_t> image_for(uint64_t n) {
  std::mt19937_64 random(1000 + n / 4);
  std::vector<uint8_t> image = testing::random_image(kPages, random);
  for (uint64_t step = 0; step < n % 4; ++step) image = testing::mutate_image(image, 0.1, random);
  return image;
}

// Child: stores image-N for N = first, first + 1, ... until killed; every fourth starts a new
// base, the others chain on the previous image.
[[noreturn]] void run_writer(const std::filesystem::path& directory, uint64_t first) {
  Result<Store> store = Store::open_or_create(directory);
  if (!store) _exit(2);
  for (uint64_t n = first;; ++n) {
    std::optional<std::string> parent;
    if (n % 4 != 0) parent = "image-" + std::to_string(n - 1);
    if (parent && !store->find(*parent)) parent.reset();
    std::vector<uint8_t> image = image_for(n);
    if (!store->put_image("image-" + std::to_string(n), image, parent)) _exit(3);
  }
}

TEST(StoreCrash, WriterKilledAtRandomPointsLeavesACleanStore) {
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / "crash_store";
  std::filesystem::remove_all(directory);
  std::mt19937_64 random(7);
  // Kill points spread over the first few puts of each writer: opening the store, diffing,
  // writing, fsync, rename, catalog commit. The last round runs long enough to complete
  // several images whatever this machine's fsync costs.
  std::uniform_int_distribution<int> delay_us(0, 250000);
  constexpr int kRounds = 16;
  uint64_t next = 0;
  uint64_t total_images = 0;
  for (int round = 0; round < kRounds; ++round) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) run_writer(directory, next);
    int delay = round == kRounds - 1 ? 1500000 : delay_us(random);
    std::this_thread::sleep_for(std::chrono::microseconds(delay));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "writer exited on its own with status " << WEXITSTATUS(status);

    Result<Store> store = Store::open_or_create(directory);
    ASSERT_TRUE(store) << store.error().message;
    Result<FsckReport> report = store->fsck();
    ASSERT_TRUE(report) << report.error().message;
    EXPECT_TRUE(report->clean()) << "round " << round << ": " << report->problems.front();
    Result<std::vector<ImageRecord>> records = store->list();
    ASSERT_TRUE(records);
    // fsck has re-verified every object; rebuild and compare the images this round's writer
    // added (earlier ones were compared in their own round).
    uint64_t round_start = next;
    for (const ImageRecord& record : *records) {
      uint64_t n = std::stoull(record.name.substr(6));
      if (n < round_start) continue;
      Result<Mapping> image = store->get_image(record.name);
      ASSERT_TRUE(image) << record.name << ": " << image.error().message;
      std::vector<uint8_t> expected = image_for(n);
      ASSERT_TRUE(std::equal(expected.begin(), expected.end(), image->bytes().begin())) << record.name;
      next = std::max(next, n + 1);
    }
    // Start each round's writer past whatever the killed one may have half-written.
    next += 1;
    total_images = records->size();
    Result<GcReport> gc = store->gc();
    ASSERT_TRUE(gc);
  }
  EXPECT_GT(total_images, 0u) << "no writer ever completed an image: the kills came too early";
  std::filesystem::remove_all(directory);
}

}  // namespace
}  // namespace deltavm
