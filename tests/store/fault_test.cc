// Every durable call the store and its catalog make (base/faults.h: creates, writes, fsyncs,
// renames, unlinks, and SQLite's writes, syncs, truncates and deletes) is failed in turn with
// EIO, with ENOSPC, and as a crash, during each writing operation. After each: the store opens,
// fsck calls it clean, every image stored before is intact, what the operation acknowledged is
// there, and the operation then succeeds. And the same for a real full disk (a small tmpfs).
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <functional>

#include "base/faults.h"
#include "image/test_images.h"
#include "store/store.h"

namespace deltavm {
namespace {

constexpr uint64_t kPages = 64;

std::vector<uint8_t> image_of(uint64_t seed) {
  std::mt19937_64 random(seed);
  return testing::random_image(kPages, random);
}

std::vector<uint8_t> child_of(const std::vector<uint8_t>& parent, uint64_t seed) {
  std::mt19937_64 random(seed);
  return testing::mutate_image(parent, 0.2, random);
}

const std::vector<uint8_t> kBase = image_of(1);
const std::vector<uint8_t> kWeb = child_of(kBase, 2);
const std::vector<uint8_t> kWorker = child_of(kWeb, 3);
const std::vector<uint8_t> kOld = image_of(4);

// A writing operation, and what it means that it was acknowledged.
struct Operation {
  std::string name;
  std::function<Status(Store&)> run;
  std::function<void(Store&)> expect_done;  // Holds once the operation was acknowledged.
  // Whether its effect shows (an operation cut short may have taken effect all the same), for
  // one that cannot simply be run again: a put of the same name, a remove.
  std::function<bool(Store&)> took_effect = [](Store&) { return false; };
};

void expect_image(Store& store, const std::string& name, const std::vector<uint8_t>& expected,
                  const std::string& where) {
  Result<Mapping> image = store.get_image(name);
  ASSERT_TRUE(image) << where << ": " << name << ": " << image.error().message;
  ASSERT_EQ(image->size(), expected.size()) << where << ": " << name;
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), image->bytes().begin())) << where << ": " << name;
}

std::vector<Operation> operations() {
  return {
      {"put a child", [](Store& store) { return store.put_image("worker", kWorker, "web").status(); },
       [](Store& store) { expect_image(store, "worker", kWorker, "acknowledged put"); },
       [](Store& store) { return static_cast<bool>(store.find("worker")); }},
      {"put a base", [](Store& store) { return store.put_image("other", image_of(5), std::nullopt).status(); },
       [](Store& store) { expect_image(store, "other", image_of(5), "acknowledged put"); },
       [](Store& store) { return static_cast<bool>(store.find("other")); }},
      {"make a flat file",
       [](Store& store) -> Status {
         DELTAVM_ASSIGN_OR_RETURN(ImageRecord web, store.find("web"));
         return store.flat_file(web).status();
       },
       [](Store& store) {
         Result<ImageRecord> web = store.find("web");
         ASSERT_TRUE(web);
         Result<Mapping> flat = Mapping::map_file_readonly(store.flat_file_path(web->digest));
         ASSERT_TRUE(flat) << flat.error().message;
         EXPECT_TRUE(std::equal(kWeb.begin(), kWeb.end(), flat->bytes().begin()));
       }},
      {"remove", [](Store& store) { return store.remove_image("web"); },
       [](Store& store) { EXPECT_FALSE(store.find("web")) << "acknowledged remove: web is still there"; },
       [](Store& store) { return !store.find("web"); }},
      {"gc", [](Store& store) { return store.gc().status(); },
       [](Store& store) {
         Result<FsckReport> report = store.fsck();
         ASSERT_TRUE(report);
         EXPECT_TRUE(report->unreferenced.empty()) << "acknowledged gc left unreferenced objects";
         EXPECT_TRUE(report->unused_flat_files.empty()) << "acknowledged gc left an unused flat file";
       }},
  };
}

class StoreFaults : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::path(::testing::TempDir()) / "store_faults";
    std::filesystem::remove_all(root_);
    // The state before each operation: base <- web, and "old" removed with its flat file left
    // (garbage for gc: an object, a flat file and its seal in the catalog).
    Result<Store> store = Store::open_or_create(root_ / "before");
    ASSERT_TRUE(store) << store.error().message;
    ASSERT_TRUE(store->put_image("base", kBase, std::nullopt));
    ASSERT_TRUE(store->put_image("web", kWeb, "base"));
    Result<ImageRecord> old = store->put_image("old", kOld, std::nullopt);
    ASSERT_TRUE(old);
    ASSERT_TRUE(store->flat_file(*old));
    ASSERT_TRUE(store->remove_image("old"));
  }
  void TearDown() override {
    disarm_faults();
    std::filesystem::remove_all(root_);
  }

  std::filesystem::path fresh_copy() {
    std::filesystem::path copy = root_ / "work";
    std::filesystem::remove_all(copy);
    std::filesystem::copy(root_ / "before", copy, std::filesystem::copy_options::recursive);
    return copy;
  }

  // Runs `operation` on a fresh copy under `plan`: in this process, or for a crash in a child
  // that the plan ends. Returns whether the operation was acknowledged.
  bool run_under(const Operation& operation, const FaultPlan& plan) {
    std::filesystem::path directory = fresh_copy();
    if (plan.crash) {
      pid_t pid = ::fork();
      if (pid == 0) {
        Result<Store> store = Store::open(directory);
        if (!store) ::_exit(2);
        arm_faults(plan);
        ::_exit(operation.run(*store) ? 0 : 1);
      }
      int status = 0;
      ::waitpid(pid, &status, 0);
      EXPECT_TRUE(WIFEXITED(status)) << operation.name;
      EXPECT_NE(WEXITSTATUS(status), 2) << operation.name << ": the store did not open";
      return WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    Result<Store> store = Store::open(directory);
    EXPECT_TRUE(store) << store.error().message;
    if (!store) return false;
    arm_faults(plan);
    Status done = operation.run(*store);
    disarm_faults();
    return done.ok();
  }

  // What must hold after any fault: the store opens, fsck is clean, the images from before are
  // intact (web only if not removed), what was acknowledged is there, and the operation, run
  // again without faults unless it took effect, succeeds.
  void check_after(const Operation& operation, bool acknowledged, const std::string& where) {
    Result<Store> store = Store::open(root_ / "work");
    ASSERT_TRUE(store) << where << ": " << store.error().message;
    Result<FsckReport> report = store->fsck();
    ASSERT_TRUE(report) << where << ": " << report.error().message;
    EXPECT_TRUE(report->clean()) << where << ": " << report->problems.front();
    expect_image(*store, "base", kBase, where);
    if (store->find("web")) expect_image(*store, "web", kWeb, where);
    EXPECT_TRUE(operation.name == "remove" || store->find("web")) << where << ": web is lost";
    if (acknowledged) operation.expect_done(*store);
    if (operation.took_effect(*store)) {
      operation.expect_done(*store);
      return;
    }
    Status again = operation.run(*store);
    EXPECT_TRUE(again) << where << ": run again: " << again.error().message;
    operation.expect_done(*store);
  }

  std::filesystem::path root_;
};

TEST_F(StoreFaults, EveryDurableCallFailedInTurnLeavesACleanStoreAndLosesNothingAcknowledged) {
  struct Mode {
    const char* name;
    int error;
    bool crash;
  };
  const Mode modes[] = {{"EIO", EIO, false}, {"ENOSPC", ENOSPC, false}, {"crash", 0, true}};
  uint64_t faults = 0;
  for (const Operation& operation : operations()) {
    // How many durable calls the operation makes, counted on a run that fails none.
    ASSERT_TRUE(run_under(operation, FaultPlan{})) << operation.name;
    uint64_t calls = fault_calls_seen();
    EXPECT_GT(calls, 0u) << operation.name << " makes no durable call through the seam";
    std::printf("%s: %lu durable calls, each failed with EIO, with ENOSPC and by a crash\n", operation.name.c_str(),
                static_cast<unsigned long>(calls));
    for (const Mode& mode : modes) {
      for (uint64_t n = 1; n <= calls; ++n) {
        std::string where = fmt::format("{}, {} at durable call {} of {}", operation.name, mode.name, n, calls);
        bool acknowledged = run_under(operation, FaultPlan{n, mode.error, mode.crash});
        ASSERT_NO_FATAL_FAILURE(check_after(operation, acknowledged, where));
        ++faults;
      }
    }
  }
  ::testing::Test::RecordProperty("faults_injected", static_cast<int>(faults));
  std::printf("%lu faults injected\n", static_cast<unsigned long>(faults));
}

// A real full disk: a 1 MiB tmpfs filled by puts. The put that does not fit fails naming the
// lack of space; everything acknowledged before it is intact, fsck is clean, and once an image
// is removed and gc has run, puts succeed again.
TEST(StoreFullDisk, PutsUntilFullLeaveACleanStoreThatRecovers) {
  if (::geteuid() != 0) GTEST_SKIP() << "mounting a small tmpfs needs root";
  std::filesystem::path mount_point = std::filesystem::path(::testing::TempDir()) / "store_full_disk";
  std::filesystem::create_directories(mount_point);
  ASSERT_EQ(::mount("deltavm-test", mount_point.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=1m"), 0)
      << std::strerror(errno);
  std::shared_ptr<void> unmount(nullptr, [&](void*) { ::umount2(mount_point.c_str(), MNT_DETACH); });
  std::filesystem::path directory = mount_point / "store";
  std::vector<std::string> acknowledged;
  std::string failure;
  {
    Result<Store> store = Store::open_or_create(directory);
    ASSERT_TRUE(store) << store.error().message;
    for (uint64_t n = 0; n < 64 && failure.empty(); ++n) {
      // Random pages do not compress: each base takes its 256 KiB.
      std::string name = fmt::format("image-{}", n);
      Result<ImageRecord> put = store->put_image(name, image_of(100 + n), std::nullopt);
      if (put) {
        acknowledged.push_back(name);
      } else {
        failure = put.error().message;
      }
    }
  }
  ASSERT_FALSE(failure.empty()) << "1 MiB never filled";
  EXPECT_NE(failure.find("No space left on device"), std::string::npos) << failure;
  ASSERT_FALSE(acknowledged.empty());

  Result<Store> store = Store::open(directory);
  ASSERT_TRUE(store) << store.error().message;
  Result<FsckReport> report = store->fsck();
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_TRUE(report->clean()) << report->problems.front();
  for (size_t i = 0; i < acknowledged.size(); ++i) expect_image(*store, acknowledged[i], image_of(100 + i), "full");
  ASSERT_TRUE(store->remove_image(acknowledged.front()));
  Result<GcReport> gc = store->gc();
  ASSERT_TRUE(gc) << gc.error().message;
  Result<ImageRecord> again = store->put_image("after-gc", image_of(99), std::nullopt);
  EXPECT_TRUE(again) << again.error().message;
}

}  // namespace
}  // namespace deltavm
