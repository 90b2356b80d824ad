// Snapshots of running VMs on real QEMU and real Linux (templates/snapshot.h): what a VM did
// after its load lives on in the snapshot's clones, the VM runs on unchanged, and a capture
// that misses a page is refused.
#include <gtest/gtest.h>

#include <unistd.h>

#include <thread>

#include "backends/agent_client.h"
#include "support/guest_templates.h"
#include "templates/snapshot.h"
#include "templates/templates.h"

namespace deltavm {
namespace {

std::filesystem::path runtime() {
  return std::filesystem::path(::testing::TempDir()) / "deltavm_guest_templates" / "snapshot-runtime";
}

Result<std::string> exec(const VmDirectory& vm, const std::string& command) {
  DELTAVM_ASSIGN_OR_RETURN(ExecResult result, agent_exec(vm.agent_socket(), command, std::chrono::seconds(30)));
  if (result.exit_status != 0) {
    return make_error(ErrorCode::kIo, "{}: exit {}: {}", command, result.exit_status, result.stderr_bytes);
  }
  return result.stdout_bytes;
}

class Snapshots : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    Result<testing::GuestTemplates> templates = testing::guest_templates();
    ASSERT_TRUE(templates) << templates.error().message;
    store_ = templates->store;
    backend_ = templates->backend;
  }

  VmDirectory start(const std::string& name) {
    Result<StartedVm> vm = start_vm(name, *store_, *backend_, runtime());
    EXPECT_TRUE(vm) << vm.error().message;
    if (!vm) return *VmDirectory::create(runtime());
    started_.push_back(vm->id);
    return *VmDirectory::open(runtime(), vm->id);
  }
  // A template name of this test's own, removed when it ends.
  std::string name(const std::string& stem) {
    std::string unique = fmt::format("{}-{}", stem, ::getpid());
    names_.insert(names_.begin(), unique);  // Children first at removal.
    return unique;
  }
  void TearDown() override {
    for (const std::string& id : started_) (void)stop_vm(id, *backend_, runtime());
    for (const std::string& stored : names_) (void)store_->remove_image(stored);
  }

  static Store* store_;
  static Backend* backend_;
  std::vector<std::string> started_;
  std::vector<std::string> names_;
};

Store* Snapshots::store_ = nullptr;
Backend* Snapshots::backend_ = nullptr;

TEST_F(Snapshots, FilesAndProcessesMadeAfterTheLoadLiveInTheClonesAndTheVmRunsOn) {
  VmDirectory vm = start("counter");
  ASSERT_TRUE(exec(vm, "head -c 2000000 /dev/urandom > /tmp/after-load; md5sum /tmp/after-load > /tmp/sum; "
                       "(while true; do sleep 0.1; done) & echo $! > /tmp/pid"));
  std::string sum = *exec(vm, "cat /tmp/sum");
  std::string snapshot_name = name("snap");
  Result<Snapshot> snapshot = snapshot_vm(vm.id(), snapshot_name, *store_, *backend_, runtime());
  ASSERT_TRUE(snapshot) << snapshot.error().message;
  EXPECT_EQ(snapshot->record.parent, "counter");
  EXPECT_EQ(snapshot->record.chain_depth, store_->find("counter")->chain_depth + 1);
  EXPECT_GT(snapshot->changed_pages, 2000000 / kPageSize);
  EXPECT_LT(snapshot->record.stored_size_bytes, snapshot->record.image_size_bytes / 10);

  // The original runs on: its counter moves, and what a clone does is not seen in it.
  std::string ticks = *exec(vm, "cat /run/ticks");
  VmDirectory clone = start(snapshot_name);
  EXPECT_EQ(*exec(clone, "md5sum /tmp/after-load"), sum);
  EXPECT_EQ(*exec(clone, "kill -0 $(cat /tmp/pid) && echo alive"), "alive\n");
  ASSERT_TRUE(exec(clone, "echo clone > /tmp/clone-only"));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_NE(*exec(vm, "cat /run/ticks"), ticks);
  EXPECT_EQ(*exec(vm, "test -e /tmp/clone-only || echo absent"), "absent\n");
  EXPECT_EQ(*exec(vm, "md5sum /tmp/after-load"), sum);
}

TEST_F(Snapshots, ASnapshotOfASnapshotsCloneChainsOnIt) {
  VmDirectory vm = start("counter");
  ASSERT_TRUE(exec(vm, "echo one > /tmp/one"));
  std::string first = name("first");
  ASSERT_TRUE(snapshot_vm(vm.id(), first, *store_, *backend_, runtime()));
  VmDirectory clone = start(first);
  ASSERT_TRUE(exec(clone, "echo two > /tmp/two"));
  std::string second = name("second");
  Result<Snapshot> snapshot = snapshot_vm(clone.id(), second, *store_, *backend_, runtime(), {.stop = true});
  ASSERT_TRUE(snapshot) << snapshot.error().message;
  EXPECT_EQ(snapshot->record.parent, first);
  // --stop: the VM is gone.
  EXPECT_FALSE(VmDirectory::open(runtime(), clone.id()));
  VmDirectory grandchild = start(second);
  EXPECT_EQ(*exec(grandchild, "cat /tmp/one /tmp/two"), "one\ntwo\n");
}

TEST_F(Snapshots, ACaptureThatMissesAPageIsRefusedAndTheVmRunsOn) {
  VmDirectory vm = start("counter");
  ASSERT_TRUE(exec(vm, "head -c 100000 /dev/urandom > /tmp/random"));
  std::string refused = name("incomplete");
  SnapshotOptions options;
  options.stop = true;
  options.capture.omit_pages_for_testing = 1;
  Result<Snapshot> snapshot = snapshot_vm(vm.id(), refused, *store_, *backend_, runtime(), options);
  ASSERT_FALSE(snapshot);
  EXPECT_EQ(snapshot.error().code, ErrorCode::kCorruption);
  EXPECT_NE(snapshot.error().message.find("missed"), std::string::npos) << snapshot.error().message;
  EXPECT_FALSE(store_->find(refused));
  // Although --stop was asked, the VM runs on: nothing of it is lost.
  EXPECT_TRUE(exec(vm, "cat /tmp/random > /dev/null"));
  Result<FsckReport> fsck = store_->fsck();
  ASSERT_TRUE(fsck);
  EXPECT_TRUE(fsck->clean());
}

TEST_F(Snapshots, AVmWhoseTemplateWasReplacedCannotBeSnapshotted) {
  VmDirectory vm = start("counter");
  Result<VmRecord> record = vm.read_record();
  ASSERT_TRUE(record);
  record->image_digest = std::string(32, '0');
  ASSERT_TRUE(vm.write_record(*record));
  Result<Snapshot> snapshot = snapshot_vm(vm.id(), name("replaced"), *store_, *backend_, runtime());
  ASSERT_FALSE(snapshot);
  EXPECT_EQ(snapshot.error().code, ErrorCode::kConflict);
  EXPECT_TRUE(exec(vm, "true"));
}

}  // namespace
}  // namespace deltavm
