// The kvm backend's VMM (deltavm-vmm) on /dev/kvm with the project's micro guest: captured in
// the middle of its work, stored as a delta chain in a real store, restored in a fresh VMM
// process under each memory strategy, and required to end with the same checksum as a run
// that was never interrupted (and as the host's own model of the workload). Bad machine
// states are refused before any vCPU runs.
//
// This binary is linked statically: where /dev/kvm is missing (this project's CI machines),
// tests/nested runs it inside the nested harness, a Linux guest with its own /dev/kvm.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "backends/kvm/overlay_memory_writer.h"
#include "backends/kvm/vmm_client.h"
#include "base/page.h"
#include "loader/loader.h"
#include "store/store.h"
#include "support/proc_status.h"
#include "vmm/guest_memory.h"
#include "vmm/kvm.h"
#include "vmm/machine_state.h"
#include "vmm/ram_overlay.h"

namespace deltavm::vmm {
namespace {

constexpr uint64_t kMemoryBytes = 64ull << 20;
constexpr uint64_t kWorkBytes = 48ull << 20;
constexpr uint64_t kPasses = 6;
constexpr uint64_t kSeed = 7;
constexpr auto kRunTimeout = std::chrono::minutes(5);

std::filesystem::path beside_executable(const char* name) {
  return std::filesystem::read_symlink("/proc/self/exe").parent_path() / name;
}

std::filesystem::path micro_guest_program() {
  const char* configured = std::getenv("DELTAVM_MICRO_GUEST");
  if (configured != nullptr && *configured) return configured;
  std::filesystem::path beside = beside_executable("micro-guest.bin");
  return std::filesystem::exists(beside) ? beside : std::filesystem::path(DELTAVM_MICRO_GUEST_BIN);
}

std::filesystem::path vmm_binary() {
  std::filesystem::path binary = default_vmm_binary();
  return std::filesystem::exists(binary) ? binary : std::filesystem::path(DELTAVM_VMM_BIN);
}

// The host's model of guest/micro/workload.c: the checksum an uninterrupted run must report.
uint64_t reference_checksum() {
  std::vector<uint64_t> words(kWorkBytes / 8, 0);
  uint64_t state = kSeed | 1;
  uint64_t pages = page_count(kWorkBytes);
  for (uint64_t pass = 0; pass < kPasses; ++pass) {
    for (uint64_t page = 0; page < pages; ++page) {
      uint64_t h = (page + 1) * 0x9e3779b97f4a7c15ull ^ (pass + 1) * 0xc2b2ae3d27d4eb4full;
      if (((h >> 29) & 3) != 0) continue;
      for (uint64_t i = 0; i < 512; ++i) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        uint64_t& word = words[page * 512 + i];
        word = word * 6364136223846793005ull + state;
      }
    }
  }
  uint64_t checksum = 0;
  for (uint64_t word : words) checksum = (checksum ^ word) * 0x100000001b3ull;
  return checksum;
}

std::string hex(uint64_t value) { return fmt::format("{:016x}", value); }

// Removes a test's directory when the test ends: the harness's /tmp is a small tmpfs.
struct ScopedDirectory {
  std::filesystem::path path;
  ~ScopedDirectory() {
    std::error_code error;
    std::filesystem::remove_all(path, error);
  }
};

// What every test's VMM may read besides its own directory: the micro guest and the files the
// tests prepare under the chain's root (the store's flat files among them).
std::vector<std::filesystem::path> readable_inputs();

BootMicroRequest boot_request(const std::filesystem::path& ram_file) {
  BootMicroRequest request;
  request.program = micro_guest_program().string();
  request.memory_bytes = kMemoryBytes;
  request.work_bytes = kWorkBytes;
  request.passes = kPasses;
  request.seed = kSeed;
  request.heartbeat_bytes = 1 << 20;
  request.ram_file = ram_file.string();
  request.start.log_dirty = true;
  request.start.pause_at_checkpoint = 1;
  return request;
}

// A status reply in one line, for failure messages.
std::string describe(const StatusReply& status) {
  MicroGuestReport micro = status.micro.value_or(MicroGuestReport{});
  return fmt::format("state {} ({}), checkpoint {}, done {} ({}), checksum {:016x}", run_state_name(status.state),
                     status.failure, micro.checkpoint, micro.done, micro.done_status, micro.checksum);
}

uint64_t checkpoint_of(const StatusReply& status) { return status.micro ? status.micro->checkpoint : 0; }

// Everything the tests share: a store holding a chain c1 <- c2 <- c3 of captures of one micro
// guest at checkpoints 1, 2 and 3 (each with its machine state attached), and the checksum of
// the workload.
struct Chain {
  std::filesystem::path root;
  std::optional<Store> store;
  uint64_t expected_checksum = 0;
  uint64_t dirty_pages_c3 = 0;
};

Chain* chain = nullptr;
bool chain_ready = false;  // Set once the environment built the whole chain.

std::vector<std::filesystem::path> readable_inputs() { return {micro_guest_program(), chain->root}; }

// Builds the chain once for the whole binary (both test suites use it).
class ChainEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    if (kvm_unusable_reason()) return;
    chain = new Chain;
    chain->root = std::filesystem::path(::testing::TempDir()) / "deltavm_kvm_test";
    std::filesystem::remove_all(chain->root);
    std::filesystem::create_directories(chain->root);
    chain->expected_checksum = reference_checksum();
    Result<Store> store = Store::open_or_create(chain->root / "store");
    ASSERT_TRUE(store) << store.error().message;
    chain->store.emplace(std::move(store).value());

    Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), chain->root / "capture", readable_inputs());
    ASSERT_TRUE(vmm) << vmm.error().message;
    std::filesystem::path ram = chain->root / "capture" / "ram";
    Result<StatusReply> booted = vmm->call<StatusReply>(boot_request(ram));
    ASSERT_TRUE(booted) << booted.error().message;
    std::optional<std::string> parent;
    for (uint64_t checkpoint = 1; checkpoint <= 3; ++checkpoint) {
      Result<StatusReply> status = vmm->call<StatusReply>(WaitRequest{}, kRunTimeout);
      ASSERT_TRUE(status) << status.error().message;
      ASSERT_EQ(status->state, RunState::kPaused) << describe(*status);
      ASSERT_EQ(checkpoint_of(*status), checkpoint) << describe(*status);
      std::filesystem::path state = chain->root / "capture" / fmt::format("state{}", checkpoint);
      std::filesystem::path dirty = chain->root / "capture" / fmt::format("dirty{}", checkpoint);
      Result<SaveReply> saved = vmm->call<SaveReply>(SaveRequest{state.string(), dirty.string(), std::nullopt});
      ASSERT_TRUE(saved) << saved.error().message;
      if (checkpoint == 3) chain->dirty_pages_c3 = saved->dirty_pages.value_or(0);

      Result<Mapping> image = Mapping::map_file_readonly(ram);
      ASSERT_TRUE(image);
      Result<std::vector<uint8_t>> state_bytes = read_file(state);
      ASSERT_TRUE(state_bytes);
      Result<DirtyBitmap> bitmap = DirtyBitmap::read_file(dirty, page_count(kMemoryBytes));
      ASSERT_TRUE(bitmap) << bitmap.error().message;
      PutOptions options;
      options.attachments = {{"machine-state", *state_bytes}};
      options.dirty = parent ? &*bitmap : nullptr;
      std::string name = fmt::format("c{}", checkpoint);
      Result<ImageRecord> record = chain->store->put_image(name, image->bytes(), parent, options);
      ASSERT_TRUE(record) << record.error().message;
      parent = name;
      if (checkpoint < 3) {
        Result<StatusReply> resumed = vmm->call<StatusReply>(ResumeRequest{checkpoint + 1});
        ASSERT_TRUE(resumed) << resumed.error().message;
      }
    }
    std::filesystem::remove_all(chain->root / "capture");  // The captures live in the store now.
    chain_ready = true;
  }

  void TearDown() override {
    if (chain == nullptr) return;
    std::filesystem::remove_all(chain->root);
    delete chain;
    chain = nullptr;
  }
};

[[maybe_unused]] const ::testing::Environment* const chain_environment =
    ::testing::AddGlobalTestEnvironment(new ChainEnvironment);

class KvmMicroGuest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::optional<std::string> why = kvm_unusable_reason()) {
      GTEST_SKIP() << *why << "; tests/nested runs this suite inside the nested harness";
    }
    ASSERT_TRUE(chain_ready) << "capturing the chain c1 <- c2 <- c3 failed (see the environment's failure above)";
  }
};

// What a restore needs besides the VMM: the base flat file, the overlay the chain writes over
// it and the machine state file.
struct RestoreFiles {
  std::filesystem::path base;
  std::filesystem::path overlay;
  std::filesystem::path state;
};

Result<RestoreFiles> prepare_restore(const std::string& image, const std::filesystem::path& directory) {
  std::filesystem::create_directories(directory);
  Loader loader(*chain->store);
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> images, chain->store->chain(image));
  DELTAVM_ASSIGN_OR_RETURN(PreparedRam prepared, loader.prepare(images, RamStrategy::kBasePlusDeltas));
  RestoreFiles files{prepared.flat_file(), directory / "overlay", directory / "state"};
  DELTAVM_ASSIGN_OR_RETURN(RamOverlayWriter overlay, RamOverlayWriter::create(files.overlay));
  OverlayMemoryWriter writer(overlay);
  DELTAVM_TRY(prepared.fill(writer));
  DELTAVM_TRY(overlay.commit());
  DELTAVM_ASSIGN_OR_RETURN(ImageRecord record, chain->store->find(image));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> state, chain->store->read_attachment(record, "machine-state"));
  DELTAVM_TRY(write_scratch_file(files.state, state));
  return files;
}

RestoreRequest restore_request(const RestoreFiles& files, MemoryStrategy strategy) {
  RestoreRequest request;
  request.state = files.state.string();
  request.base = files.base.string();
  request.overlay = files.overlay.string();
  request.strategy = strategy;
  return request;
}

// Whoever can send the VMM requests must not make it read or write files outside its VM's
// directory and the inputs it was started with.
TEST_F(KvmMicroGuest, VmmRefusesPathsOutsideItsDirectory) {
  std::filesystem::path directory = chain->root / "confined";
  ScopedDirectory cleanup{directory};
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), directory, {micro_guest_program()});
  ASSERT_TRUE(vmm) << vmm.error().message;
  BootMicroRequest reads_elsewhere = boot_request(directory / "ram");
  reads_elsewhere.program = "/etc/hostname";
  Result<StatusReply> refused = vmm->call<StatusReply>(reads_elsewhere);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, ErrorCode::kInvalidArgument);
  EXPECT_NE(refused.error().message.find("request field 'program'"), std::string::npos) << refused.error().message;
  Result<StatusReply> refused_write = vmm->call<StatusReply>(boot_request(chain->root / "ram-outside"));
  ASSERT_FALSE(refused_write);
  EXPECT_NE(refused_write.error().message.find("outside this VM's directory"), std::string::npos)
      << refused_write.error().message;
  EXPECT_FALSE(std::filesystem::exists(chain->root / "ram-outside"));
  // Inside its directory, it boots and saves; a save outside is refused.
  ASSERT_TRUE(vmm->call<StatusReply>(boot_request(directory / "ram")));
  ASSERT_TRUE(vmm->call<StatusReply>(WaitRequest{}, kRunTimeout));
  SaveRequest elsewhere;
  elsewhere.state = (chain->root / "state-outside").string();
  ASSERT_FALSE(vmm->call<SaveReply>(elsewhere));
  EXPECT_FALSE(std::filesystem::exists(chain->root / "state-outside"));
  SaveRequest inside;
  inside.state = (directory / "state").string();
  EXPECT_TRUE(vmm->call<SaveReply>(inside));
}

// Once it serves requests, the VMM runs under its system-call filter (vmm/seccomp_filter.h),
// and a whole boot -> run -> save -> restore under it works: the filter allows what the run
// loop needs.
TEST_F(KvmMicroGuest, VmmServesUnderItsSeccompFilter) {
  std::filesystem::path directory = chain->root / "filtered";
  ScopedDirectory cleanup{directory};
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), directory, {micro_guest_program()});
  ASSERT_TRUE(vmm) << vmm.error().message;
  ASSERT_TRUE(vmm->call<StatusReply>(boot_request(directory / "ram")));
  ASSERT_TRUE(vmm->call<StatusReply>(WaitRequest{}, kRunTimeout));
  EXPECT_EQ(testing::status_field(vmm->pid(), "Seccomp"), "2");
  EXPECT_EQ(testing::status_field(vmm->pid(), "NoNewPrivs"), "1");
  SaveRequest save;
  save.state = (directory / "state").string();
  EXPECT_TRUE(vmm->call<SaveReply>(save));
}

TEST_F(KvmMicroGuest, UninterruptedRunMatchesHostModel) {
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), chain->root / "uninterrupted", readable_inputs());
  ASSERT_TRUE(vmm) << vmm.error().message;
  ScopedDirectory cleanup{chain->root / "uninterrupted"};
  BootMicroRequest request = boot_request(chain->root / "uninterrupted" / "ram");
  request.start.pause_at_checkpoint.reset();
  request.ram_file.reset();
  ASSERT_TRUE(vmm->call<StatusReply>(request));
  Result<StatusReply> status = vmm->call<StatusReply>(WaitRequest{}, kRunTimeout);
  ASSERT_TRUE(status) << status.error().message;
  ASSERT_TRUE(status->micro);
  EXPECT_EQ(status->state, RunState::kDone) << describe(*status);
  EXPECT_EQ(status->micro->done_status, 0u);
  EXPECT_EQ(status->micro->checkpoint, kPasses);
  EXPECT_EQ(hex(status->micro->checksum), hex(chain->expected_checksum));
}

class KvmMicroGuestStrategy : public KvmMicroGuest, public ::testing::WithParamInterface<MemoryStrategy> {};

TEST_P(KvmMicroGuestStrategy, RestoredFromDeltaChainEndsWithUninterruptedChecksum) {
  std::filesystem::path directory = chain->root / fmt::format("restore-{}", memory_strategy_name(GetParam()));
  ScopedDirectory cleanup{directory};
  Result<RestoreFiles> files = prepare_restore("c3", directory);
  ASSERT_TRUE(files) << files.error().message;
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), directory, readable_inputs());
  ASSERT_TRUE(vmm) << vmm.error().message;
  Result<StatusReply> restored = vmm->call<StatusReply>(restore_request(*files, GetParam()));
  ASSERT_TRUE(restored) << restored.error().message;
  Result<StatusReply> status = vmm->call<StatusReply>(WaitRequest{}, kRunTimeout);
  ASSERT_TRUE(status) << status.error().message;
  ASSERT_TRUE(status->micro);
  EXPECT_EQ(status->state, RunState::kDone) << describe(*status);
  EXPECT_EQ(status->micro->checkpoint, kPasses);
  EXPECT_EQ(hex(status->micro->checksum), hex(chain->expected_checksum));
  if (GetParam() == MemoryStrategy::kUserfault) {
    // Every kind of page was served on first touch: changed by the chain, from the base, zero.
    ASSERT_TRUE(status->userfault);
    EXPECT_GT(status->userfault->overlay_pages, 0u);
    EXPECT_GT(status->userfault->base_pages, 0u);
    EXPECT_GT(status->userfault->zero_pages, 0u);
  }
}

// What a snapshot takes from the VMM: the pages written since the restore, and a digest of the
// whole RAM read without faulting in what a lazy load has not served. Applied over the image
// the VM was restored from, the pages give exactly the RAM the VM has (checked against a full
// copy taken afterwards), and the digest is that RAM's.
TEST_P(KvmMicroGuestStrategy, ChangesSinceTheRestoreAndTheRamDigestAreExact) {
  std::filesystem::path directory = chain->root / fmt::format("changes-{}", memory_strategy_name(GetParam()));
  ScopedDirectory cleanup{directory};
  Result<RestoreFiles> files = prepare_restore("c3", directory);
  ASSERT_TRUE(files) << files.error().message;
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), directory, readable_inputs());
  ASSERT_TRUE(vmm) << vmm.error().message;
  RestoreRequest request = restore_request(*files, GetParam());
  request.start.log_dirty = true;
  request.start.pause_at_checkpoint = 4;
  ASSERT_TRUE(vmm->call<StatusReply>(request));
  Result<StatusReply> status = vmm->call<StatusReply>(WaitRequest{}, kRunTimeout);
  ASSERT_TRUE(status) << status.error().message;
  ASSERT_EQ(checkpoint_of(*status), 4u) << describe(*status);
  // An earlier take of the dirty log does not hide its pages from the changes since the start.
  std::filesystem::path dirty = directory / "dirty", changes = directory / "changes", ram = directory / "ram";
  ASSERT_TRUE(vmm->call<SaveReply>(SaveRequest{.dirty = dirty.string()}));
  Result<SaveReply> saved = vmm->call<SaveReply>(SaveRequest{.changes = changes.string(), .digest = true});
  ASSERT_TRUE(saved) << saved.error().message;
  ASSERT_TRUE(saved->ram_digest && saved->changed_pages);
  ASSERT_TRUE(vmm->call<SaveReply>(SaveRequest{.ram = ram.string()}));

  Result<Mapping> actual = Mapping::map_file_readonly(ram);
  Result<Mapping> expected = chain->store->get_image("c3");
  Result<Mapping> captured = Mapping::map_anonymous(kMemoryBytes);
  Result<Mapping> listed = Mapping::map_file_readonly(changes);
  ASSERT_TRUE(actual && expected && captured && listed);
  std::copy_n(expected->data(), kMemoryBytes, captured->data());
  uint64_t pages = page_count(kMemoryBytes), bitmap_bytes = (pages + 7) / 8, next = 0;
  ASSERT_EQ(listed->size(), bitmap_bytes + *saved->changed_pages * kPageSize);
  for (uint64_t page = 0; page < pages; ++page) {
    if (((listed->data()[page / 8] >> (page % 8)) & 1) == 0) continue;
    std::copy_n(listed->data() + bitmap_bytes + next++ * kPageSize, kPageSize, captured->data() + page * kPageSize);
  }
  EXPECT_EQ(next, *saved->changed_pages);
  EXPECT_TRUE(std::equal(actual->data(), actual->data() + kMemoryBytes, captured->data()))
      << "the pages written since the restore, over the restored image, are not the VM's RAM";
  EXPECT_EQ(*saved->ram_digest, digest_image(actual->bytes()).hex());
}

INSTANTIATE_TEST_SUITE_P(Strategies, KvmMicroGuestStrategy,
                         ::testing::Values(MemoryStrategy::kEager, MemoryStrategy::kPrivate,
                                           MemoryStrategy::kUserfault),
                         [](const auto& info) { return std::string(memory_strategy_name(info.param)); });

TEST_F(KvmMicroGuest, DirtyLogCaptureOfRestoredVmStoresOnlyWhatChanged) {
  std::filesystem::path directory = chain->root / "recapture";
  ScopedDirectory cleanup{directory};
  Result<RestoreFiles> files = prepare_restore("c3", directory);
  ASSERT_TRUE(files) << files.error().message;
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), directory, readable_inputs());
  ASSERT_TRUE(vmm) << vmm.error().message;
  RestoreRequest request = restore_request(*files, MemoryStrategy::kUserfault);
  request.start.log_dirty = true;
  request.start.pause_at_checkpoint = 4;
  ASSERT_TRUE(vmm->call<StatusReply>(request));
  Result<StatusReply> status = vmm->call<StatusReply>(WaitRequest{}, kRunTimeout);
  ASSERT_TRUE(status) << status.error().message;
  ASSERT_EQ(checkpoint_of(*status), 4u) << describe(*status);
  std::filesystem::path ram = directory / "ram4", dirty = directory / "dirty4", state = directory / "state4";
  Result<SaveReply> saved = vmm->call<SaveReply>(SaveRequest{state.string(), dirty.string(), ram.string()});
  ASSERT_TRUE(saved) << saved.error().message;
  // One pass writes about a quarter of the work area: the log holds that, not all of RAM.
  uint64_t dirty_pages = saved->dirty_pages.value_or(0);
  EXPECT_GT(dirty_pages, page_count(kWorkBytes) / 8);
  EXPECT_LT(dirty_pages, page_count(kWorkBytes) / 2);

  Result<Mapping> image = Mapping::map_file_readonly(ram);
  ASSERT_TRUE(image);
  Result<DirtyBitmap> bitmap = DirtyBitmap::read_file(dirty, page_count(kMemoryBytes));
  ASSERT_TRUE(bitmap);
  Result<std::vector<uint8_t>> state_bytes = read_file(state);
  ASSERT_TRUE(state_bytes);
  PutOptions options;
  options.attachments = {{"machine-state", *state_bytes}};
  options.dirty = &*bitmap;
  Result<ImageRecord> record = chain->store->put_image("c4", image->bytes(), std::string("c3"), options);
  ASSERT_TRUE(record) << record.error().message;
  EXPECT_EQ(record->chain_depth, 3u);

  // And the capture is exact: c4 (depth 3) loads and finishes like the uninterrupted run.
  Result<RestoreFiles> again = prepare_restore("c4", directory / "again");
  ASSERT_TRUE(again) << again.error().message;
  Result<VmmProcess> second = VmmProcess::launch(vmm_binary(), directory / "again", readable_inputs());
  ASSERT_TRUE(second);
  ASSERT_TRUE(second->call<StatusReply>(restore_request(*again, MemoryStrategy::kPrivate)));
  Result<StatusReply> final_status = second->call<StatusReply>(WaitRequest{}, kRunTimeout);
  ASSERT_TRUE(final_status);
  ASSERT_TRUE(final_status->micro);
  EXPECT_EQ(final_status->state, RunState::kDone) << describe(*final_status);
  EXPECT_EQ(hex(final_status->micro->checksum), hex(chain->expected_checksum));
}

// Restores `state` (a modified copy of c3's) and expects a refusal naming `expected`, with no
// machine created.
void expect_refused(const RestoreFiles& files, const std::filesystem::path& directory, std::string_view expected) {
  ScopedDirectory cleanup{directory};
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), directory, readable_inputs());
  ASSERT_TRUE(vmm) << vmm.error().message;
  Result<StatusReply> restored = vmm->call<StatusReply>(restore_request(files, MemoryStrategy::kPrivate));
  ASSERT_FALSE(restored) << describe(*restored);
  EXPECT_NE(restored.error().message.find(expected), std::string::npos) << restored.error().message;
  Result<StatusReply> status = vmm->call<StatusReply>(StatusRequest{});
  ASSERT_FALSE(status);
  EXPECT_NE(status.error().message.find("no machine"), std::string::npos) << status.error().message;
}

Result<RestoreFiles> files_with_state(const std::string& name, const std::function<void(MachineState&)>& change) {
  std::filesystem::path directory = chain->root / name;
  DELTAVM_ASSIGN_OR_RETURN(RestoreFiles files, prepare_restore("c3", directory));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(files.state));
  DELTAVM_ASSIGN_OR_RETURN(MachineState state, decode_machine_state(bytes, files.state.string()));
  change(state);
  DELTAVM_TRY(write_file_atomic(files.state, encode_machine_state(state)));
  return files;
}

TEST_F(KvmMicroGuest, RefusesStateFromAnotherCpuVendor) {
  Result<RestoreFiles> files = files_with_state("vendor", [](MachineState& state) {
    state.cpu_vendor = state.cpu_vendor == "AuthenticAMD" ? "GenuineIntel" : "AuthenticAMD";
  });
  ASSERT_TRUE(files) << files.error().message;
  expect_refused(*files, chain->root / "vendor", "CPU");
}

TEST_F(KvmMicroGuest, RefusesStateWithAnotherTscFrequency) {
  Result<RestoreFiles> files =
      files_with_state("tsc", [](MachineState& state) { state.tsc_khz += state.tsc_khz / 100; });
  ASSERT_TRUE(files) << files.error().message;
  expect_refused(*files, chain->root / "tsc", "TSC");
}

TEST_F(KvmMicroGuest, RefusesStateForAnotherMemorySize) {
  Result<RestoreFiles> files = files_with_state("memory", [](MachineState& state) { state.memory_bytes *= 2; });
  ASSERT_TRUE(files) << files.error().message;
  expect_refused(*files, chain->root / "memory", "bytes");
}

TEST_F(KvmMicroGuest, RefusesCorruptStateFile) {
  Result<RestoreFiles> files = files_with_state("corrupt", [](MachineState&) {});
  ASSERT_TRUE(files) << files.error().message;
  Result<std::vector<uint8_t>> bytes = read_file(files->state);
  ASSERT_TRUE(bytes);
  (*bytes)[bytes->size() / 2] ^= 0x40;
  ASSERT_TRUE(write_file_atomic(files->state, *bytes));
  expect_refused(*files, chain->root / "corrupt", "checksum");
}

}  // namespace
}  // namespace deltavm::vmm
