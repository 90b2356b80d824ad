// Snapshots of running VMs on real QEMU and real Linux (templates/snapshot.h): what a VM did
// after its load lives on in the snapshot's clones, the VM runs on unchanged, and a capture
// that misses a page is refused.
#include <gtest/gtest.h>

#include <unistd.h>

#include <ctime>
#include <set>
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
  ASSERT_TRUE(exec(vm,
                   "head -c 2000000 /dev/urandom > /tmp/after-load; md5sum /tmp/after-load > /tmp/sum; "
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

TEST_F(Snapshots, PauseThenResumeKeepsProcessesOpenFilesAndCounters) {
  VmDirectory vm = start("counter");
  std::string id = vm.id();
  // A process holding a file open, and the template's counter.
  ASSERT_TRUE(exec(vm, "(exec 7>/tmp/held; echo first >&7; while true; do sleep 0.1; done) & echo $! > /tmp/holder"));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  int ticks_at_pause = std::stoi(*exec(vm, "cat /run/ticks"));
  Result<Snapshot> paused = pause_vm(id, *store_, *backend_, runtime());
  ASSERT_TRUE(paused) << paused.error().message;
  names_.push_back(paused->record.name);
  EXPECT_FALSE(VmDirectory::open(runtime(), id)) << "a paused VM has no process";
  Result<std::vector<PausedVm>> listed = paused_vms(*store_, runtime());
  ASSERT_TRUE(listed);
  EXPECT_EQ(std::count_if(listed->begin(), listed->end(), [&](const PausedVm& p) { return p.id == id; }), 1);

  Result<StartedVm> resumed = resume_paused_vm(id, *store_, *backend_, runtime());
  ASSERT_TRUE(resumed) << resumed.error().message;
  EXPECT_EQ(resumed->id, id);
  VmDirectory again = *VmDirectory::open(runtime(), id);
  EXPECT_EQ(*exec(again, "kill -0 $(cat /tmp/holder) && ls -l /proc/$(cat /tmp/holder)/fd/7 | grep -c /tmp/held"),
            "1\n");
  int ticks_after = std::stoi(*exec(again, "cat /run/ticks"));
  EXPECT_GE(ticks_after, ticks_at_pause);
  EXPECT_LE(ticks_after, ticks_at_pause + 3) << "the counter went on while the VM was paused";
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  EXPECT_GT(std::stoi(*exec(again, "cat /run/ticks")), ticks_after);

  // Paused again, it is stored against the same parent and its previous image goes.
  Result<Snapshot> second = pause_vm(id, *store_, *backend_, runtime());
  ASSERT_TRUE(second) << second.error().message;
  names_.push_back(second->record.name);
  EXPECT_EQ(second->record.parent, paused->record.parent);
  EXPECT_FALSE(store_->find(paused->record.name));
  ASSERT_TRUE(resume_paused_vm(id, *store_, *backend_, runtime()));
  started_.push_back(id);
  EXPECT_EQ(*exec(*VmDirectory::open(runtime(), id), "cat /tmp/held"), "first\n");
  // Stopped, the resumed VM's image goes with it.
  ASSERT_TRUE(stop_vm(id, *backend_, runtime()));
  ASSERT_TRUE(release_transient_template(*store_, runtime(), second->record.name, id));
  EXPECT_FALSE(store_->find(second->record.name));
}

TEST_F(Snapshots, ForksRunIndependentlyOfEachOtherAndOfTheOriginal) {
  VmDirectory vm = start("counter");
  ASSERT_TRUE(exec(vm, "echo before-fork > /tmp/shared"));
  Result<Fork> fork = fork_vm(vm.id(), 3, *store_, *backend_, runtime());
  ASSERT_TRUE(fork) << fork.error().message;
  for (const StartedVm& started : fork->vms) started_.push_back(started.id);
  names_.push_back(fork->snapshot.record.name);
  ASSERT_EQ(fork->vms.size(), 3u);
  std::vector<VmDirectory> forks;
  for (const StartedVm& started : fork->vms) forks.push_back(*VmDirectory::open(runtime(), started.id));
  for (size_t i = 0; i < forks.size(); ++i) {
    EXPECT_EQ(*exec(forks[i], "cat /tmp/shared"), "before-fork\n");
    ASSERT_TRUE(exec(forks[i], fmt::format("echo fork-{} > /tmp/shared", i)));
  }
  ASSERT_TRUE(exec(vm, "echo original > /tmp/shared"));
  for (size_t i = 0; i < forks.size(); ++i) EXPECT_EQ(*exec(forks[i], "cat /tmp/shared"), fmt::format("fork-{}\n", i));
  EXPECT_EQ(*exec(vm, "cat /tmp/shared"), "original\n");
  // The fork's image goes with the last VM loaded from it.
  for (const VmDirectory& one : forks) {
    ASSERT_TRUE(stop_vm(one.id(), *backend_, runtime()));
    ASSERT_TRUE(release_transient_template(*store_, runtime(), fork->snapshot.record.name, one.id()));
    bool last = &one == &forks.back();
    EXPECT_EQ(static_cast<bool>(store_->find(fork->snapshot.record.name)), !last);
  }
}

TEST_F(Snapshots, FiveForksEachHaveTheirOwnEntropyAndTheHostsClock) {
  VmDirectory vm = start("counter");
  Result<Fork> fork = fork_vm(vm.id(), 5, *store_, *backend_, runtime());
  ASSERT_TRUE(fork) << fork.error().message;
  for (const StartedVm& started : fork->vms) started_.push_back(started.id);
  names_.push_back(fork->snapshot.record.name);
  std::set<std::string> uuids;
  for (const StartedVm& started : fork->vms) {
    VmDirectory one = *VmDirectory::open(runtime(), started.id);
    EXPECT_GT(started.identity_ms, 0);
    std::string uuid = *exec(one, "cat /proc/sys/kernel/random/uuid");
    uuids.insert(uuid);
    // The template's clock is fixed at 2024-01-01 (deterministic profile): a fork runs on the host's.
    int64_t guest = std::stoll(*exec(one, "date +%s"));
    int64_t host = std::time(nullptr);
    EXPECT_LE(std::llabs(guest - host), 1) << "fork " << started.id << ": guest clock " << guest << ", host " << host;
  }
  EXPECT_EQ(uuids.size(), 5u) << "forks of one snapshot drew the same random numbers";
}

TEST_F(Snapshots, PastTheMaximumDepthASnapshotIsStoredAgainstAnAncestorWithTheLayersSquashed) {
  // counter is at depth 1: a limit of 2 lets one snapshot chain on it, and stores the next
  // one against counter, its delta holding both the first snapshot's changes and its own.
  VmDirectory vm = start("counter");
  ASSERT_TRUE(exec(vm, "echo first > /tmp/first"));
  std::string first = name("depth-first");
  ASSERT_TRUE(snapshot_vm(vm.id(), first, *store_, *backend_, runtime(), {.max_chain_depth = 2}));
  VmDirectory clone = start(first);
  ASSERT_TRUE(exec(clone, "echo second > /tmp/second"));
  std::string second = name("depth-second");
  Result<Snapshot> snapshot = snapshot_vm(clone.id(), second, *store_, *backend_, runtime(), {.max_chain_depth = 2});
  ASSERT_TRUE(snapshot) << snapshot.error().message;
  EXPECT_EQ(snapshot->record.parent, "counter");
  EXPECT_EQ(snapshot->record.chain_depth, 2u);
  EXPECT_EQ(snapshot->squashed_layers, 1u);
  VmDirectory grandchild = start(second);
  EXPECT_EQ(*exec(grandchild, "cat /tmp/first /tmp/second"), "first\nsecond\n");
  // Every image is exact (the store checks each against its digest).
  Result<FsckReport> fsck = store_->fsck();
  ASSERT_TRUE(fsck);
  EXPECT_TRUE(fsck->clean());
}

TEST_F(Snapshots, TwentyGenerationsOfSnapshotsStayWithinTheDefaultDepthAndKeepEveryChange) {
  std::string previous = "counter";
  for (int generation = 1; generation <= 20; ++generation) {
    VmDirectory vm = start(previous);
    ASSERT_TRUE(exec(vm, fmt::format("echo {} > /tmp/generation-{}", generation, generation)));
    std::string next = name(fmt::format("generation-{}", generation));
    Result<Snapshot> snapshot = snapshot_vm(vm.id(), next, *store_, *backend_, runtime(), {.stop = true});
    ASSERT_TRUE(snapshot) << "generation " << generation << ": " << snapshot.error().message;
    started_.pop_back();
    EXPECT_LE(snapshot->record.chain_depth, kDefaultMaxChainDepth);
    previous = next;
  }
  EXPECT_EQ(store_->find(previous)->chain_depth, kDefaultMaxChainDepth);
  VmDirectory last = start(previous);
  EXPECT_EQ(*exec(last, "cat /tmp/generation-1 /tmp/generation-7 /tmp/generation-8 /tmp/generation-20"),
            "1\n7\n8\n20\n");
}

TEST_F(Snapshots, RemovingATemplateOthersDependOnNeedsCascade) {
  VmDirectory vm = start("counter");
  std::string parent = name("cascade-parent");
  ASSERT_TRUE(snapshot_vm(vm.id(), parent, *store_, *backend_, runtime()));
  VmDirectory clone = start(parent);
  std::string child = name("cascade-child");
  ASSERT_TRUE(snapshot_vm(clone.id(), child, *store_, *backend_, runtime(), {.stop = true}));
  Result<std::vector<std::string>> refused = remove_template(*store_, runtime(), parent, false);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, ErrorCode::kConflict);
  EXPECT_NE(refused.error().message.find(child), std::string::npos) << refused.error().message;
  Result<std::vector<std::string>> removed = remove_template(*store_, runtime(), parent, true);
  ASSERT_TRUE(removed) << removed.error().message;
  EXPECT_EQ(*removed, (std::vector<std::string>{child, parent}));
  EXPECT_FALSE(store_->find(parent));
  EXPECT_TRUE(store_->find("counter"));
}

}  // namespace
}  // namespace deltavm
