// The processes and directories behind VMs, against real QEMU: a reused pid is never
// signalled, a killed build leaves no VM behind, the runtime is private whatever the umask and
// refused when someone else could reach it, paths reach QEMU without a shell, and a damaged
// record or a damaged cached image never harms a VM.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <thread>

#include "backends/agent_client.h"
#include "base/file.h"
#include "base/subprocess.h"
#include "support/command.h"
#include "support/guest_templates.h"

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uid_t kNobody = 65534;

class VmProcesses : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::GuestTemplates> templates = testing::guest_templates();
    ASSERT_TRUE(templates) << templates.error().message;
    templates_ = *templates;
    runtime_ =
        templates_.root / ("runtime-" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    std::error_code error;
    std::filesystem::remove_all(runtime_, error);
  }
  void TearDown() override {
    (void)testing::run_deltavm(cli({"stop", "--all"}));
    std::error_code error;
    std::filesystem::remove_all(runtime_, error);
  }
  std::vector<std::string> cli(std::vector<std::string> arguments) const {
    arguments.insert(arguments.begin(),
                     {"--store", (templates_.root / "store").string(), "--runtime", runtime_.string()});
    return arguments;
  }
  std::string run_vm() {
    testing::CommandResult run = testing::run_deltavm(cli({"run", "base"}));
    EXPECT_EQ(run.status, 0) << run.err;
    return run.out.substr(0, run.out.find('\n'));
  }
  VmRecord record_of(const std::string& id) {
    Result<VmDirectory> vm = VmDirectory::open(runtime_, id);
    EXPECT_TRUE(vm);
    Result<VmRecord> record = vm->read_record();
    EXPECT_TRUE(record) << record.error().message;
    return record ? *record : VmRecord{};
  }

  void end_build_mid_boot(int signal);

  testing::GuestTemplates templates_;
  std::filesystem::path runtime_;
};

// vm.json names a pid whose process has changed since (the VM died, the pid was reused): stop
// must not signal it.
TEST_F(VmProcesses, StopNeverSignalsAProcessThatReusedTheVmsPid) {
  std::string id = run_vm();
  Result<VmDirectory> vm = VmDirectory::open(runtime_, id);
  ASSERT_TRUE(vm);
  VmRecord record = record_of(id);
  ASSERT_TRUE(record.process);
  SpawnOptions options;
  options.argv = {"sleep", "60"};
  Result<Subprocess> stranger = Subprocess::spawn(options);
  ASSERT_TRUE(stranger) << stranger.error().message;
  stranger->kill_on_destroy();
  // The VM's process is gone; its pid now belongs to the stranger (forged: same pid, the VM's
  // start time, as after a reuse).
  ASSERT_TRUE(terminate_process(*record.process, std::chrono::seconds(5)));
  ProcessIdentity dead_vm = *record.process;
  record.process = ProcessIdentity{stranger->pid(), dead_vm.start_time};
  ASSERT_TRUE(vm->write_record(record));
  testing::CommandResult stop = testing::run_deltavm(cli({"stop", id}));
  EXPECT_EQ(stop.status, 0) << stop.err;
  Result<std::optional<int>> exited = stranger->poll_exit();
  ASSERT_TRUE(exited);
  EXPECT_FALSE(exited->has_value()) << "stop killed a process that only had the VM's old pid";
}

// Ending `template build` mid-boot leaves no QEMU running and, once the next command looks, no
// directory and RAM file behind. SIGTERM takes the build's QEMU along at once; after SIGKILL
// (which a jailed QEMU's parent-death signal does not survive) the next command ends it.
void VmProcesses::end_build_mid_boot(int signal) {
  std::filesystem::path spec = runtime_.parent_path() / "slow-build.json";
  std::ofstream(spec) << R"({"name": "never-stored", "memory_mib": 128, "setup": ["sleep 600"]})";
  SpawnOptions options;
  options.argv = {DELTAVM_BINARY, "--store",         (templates_.root / "store").string(),
                  "--runtime",    runtime_.string(), "template",
                  "build",        spec.string()};
  Result<Subprocess> build = Subprocess::spawn(options);
  ASSERT_TRUE(build) << build.error().message;
  build->kill_on_destroy();
  // Wait until the build's QEMU runs.
  std::optional<ProcessIdentity> qemu;
  std::string id;
  for (auto deadline = Clock::now() + std::chrono::seconds(60); Clock::now() < deadline && !qemu;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    Result<std::vector<VmDirectory>> vms = VmDirectory::list(runtime_);
    if (!vms || vms->empty()) continue;
    Result<VmRecord> record = vms->front().read_record();
    if (record && record->process && process_running(*record->process)) {
      qemu = record->process;
      id = vms->front().id();
    }
  }
  ASSERT_TRUE(qemu) << "the build never started its VM";
  ASSERT_TRUE(build->send_signal(signal));
  ASSERT_TRUE(build->wait(deadline_after(std::chrono::seconds(10))));
  auto wait_until_gone = [&] {
    for (auto deadline = Clock::now() + std::chrono::seconds(10); Clock::now() < deadline;) {
      if (!process_running(*qemu)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  };
  if (signal != SIGKILL) EXPECT_TRUE(wait_until_gone()) << "the build's QEMU outlived the build";
  testing::CommandResult ps = testing::run_deltavm(cli({"ps"}));
  EXPECT_EQ(ps.status, 0) << ps.err;
  EXPECT_TRUE(wait_until_gone()) << "the build's QEMU outlived the next command";
  EXPECT_FALSE(std::filesystem::exists(runtime_ / "vms" / id)) << "the build's directory and RAM file stayed";
  EXPECT_FALSE(templates_.store->find("never-stored"));
}

TEST_F(VmProcesses, TerminatedTemplateBuildTakesItsVmAlong) { end_build_mid_boot(SIGTERM); }

TEST_F(VmProcesses, KilledTemplateBuildLeavesNoVmBehind) { end_build_mid_boot(SIGKILL); }

// Connects to `socket` as the user nobody; returns errno (0 if it connected).
int connect_as_nobody(const std::filesystem::path& socket) {
  pid_t child = ::fork();
  if (child == 0) {
    if (::setgid(kNobody) != 0 || ::setuid(kNobody) != 0) ::_exit(200);
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, socket.c_str(), sizeof address.sun_path - 1);
    ::_exit(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 ? 0 : errno);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_F(VmProcesses, RuntimeIsPrivateWhateverTheUmask) {
  testing::CommandOptions options;
  options.umask = 0;
  testing::CommandResult run = testing::run_deltavm(cli({"run", "base"}), options);
  ASSERT_EQ(run.status, 0) << run.err;
  std::string id = run.out.substr(0, run.out.find('\n'));
  std::filesystem::path directory = runtime_ / "vms" / id;
  auto mode_of = [](const std::filesystem::path& path) {
    struct stat st {};
    EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
    return st.st_mode & 07777;
  };
  EXPECT_EQ(mode_of(runtime_), 0700u);
  EXPECT_EQ(mode_of(runtime_ / "vms"), 0700u);
  EXPECT_EQ(mode_of(directory), 0700u);
  for (const char* name : {"control.sock", "console.sock", "agent.sock", "vm.json", "vm.log"}) {
    EXPECT_EQ(mode_of(directory / name), 0600u) << name;
  }
  EXPECT_EQ(connect_as_nobody(directory / "control.sock"), EACCES);
}

// The non-root default runtime /tmp/deltavm-UID lives in a directory everyone can write: one
// that another user made, or that others can write, is refused.
TEST_F(VmProcesses, SharedTmpRuntimeIsRefusedUnlessPrivate) {
  // A copy of the (static) binary that nobody can run, wherever the build tree is.
  std::filesystem::path bin = std::filesystem::path("/tmp") / fmt::format("deltavm-test-bin-{}", ::getpid());
  std::filesystem::create_directories(bin);
  ::chmod(bin.c_str(), 0755);
  std::filesystem::copy_file(DELTAVM_BINARY, bin / "deltavm", std::filesystem::copy_options::overwrite_existing);
  ::chmod((bin / "deltavm").c_str(), 0755);
  std::filesystem::path runtime = fmt::format("/tmp/deltavm-{}", kNobody);
  std::filesystem::remove_all(runtime);
  testing::CommandOptions options;
  options.uid = kNobody;
  options.environment = {"DELTAVM_RUNTIME=", "XDG_RUNTIME_DIR=", "HOME=/tmp"};
  auto ps = [&] { return testing::run_command({(bin / "deltavm").string(), "ps"}, options); };

  ASSERT_EQ(::mkdir(runtime.c_str(), 0777), 0);
  ::chmod(runtime.c_str(), 0777);  // Root's, and open to all.
  testing::CommandResult foreign = ps();
  EXPECT_EQ(foreign.status, 2) << foreign.err;
  EXPECT_NE(foreign.err.find("owned by uid 0"), std::string::npos) << foreign.err;

  ASSERT_EQ(::chown(runtime.c_str(), kNobody, kNobody), 0);  // Nobody's, but others may write.
  testing::CommandResult writable = ps();
  EXPECT_EQ(writable.status, 2) << writable.err;
  EXPECT_NE(writable.err.find("writable by group or others"), std::string::npos) << writable.err;

  ::chmod(runtime.c_str(), 0700);
  testing::CommandResult private_runtime = ps();
  EXPECT_EQ(private_runtime.status, 0) << private_runtime.err;
  std::filesystem::remove_all(runtime);
  std::filesystem::remove_all(bin);
}

// A runtime path with a shell's and QEMU's special characters: every path reaches QEMU
// through argv, quoted for its option syntax, or as an fd; nothing runs a shell.
TEST_F(VmProcesses, PathsWithShellAndQemuMetacharactersRunNoCommand) {
  std::filesystem::path marker = fmt::format("/tmp/deltavm-injected-{}", ::getpid());
  std::filesystem::remove(marker);
  std::filesystem::path top = templates_.root / "run x,y;touch ";
  runtime_ = top / fmt::format("{};z", marker.relative_path().string()) / "r";
  std::string id = run_vm();
  ASSERT_FALSE(id.empty());
  testing::CommandResult exec = testing::run_deltavm(cli({"exec", id, "--", "echo answered"}));
  EXPECT_EQ(exec.status, 0) << exec.err;
  EXPECT_EQ(exec.out, "answered\n");
  EXPECT_FALSE(std::filesystem::exists(marker)) << "a path ran a shell command";
  EXPECT_EQ(testing::run_deltavm(cli({"stop", id})).status, 0);
  std::filesystem::remove_all(top);
}

TEST_F(VmProcesses, DamagedVmRecordsDoNotStopPsOrStopAll) {
  std::string id = run_vm();
  ASSERT_TRUE(prepare_runtime_directory(runtime_));
  for (const auto& [bad_id, text] : {std::pair{"0000bad1", R"({"id": "0000bad1", "backend": 5, "process": "x"})"},
                                     std::pair{"0000bad2", "not json at all {{{"}}) {
    std::filesystem::create_directories(runtime_ / "vms" / bad_id);
    std::ofstream(runtime_ / "vms" / bad_id / "vm.json") << text;
  }
  testing::CommandResult ps = testing::run_deltavm(cli({"ps"}));
  EXPECT_EQ(ps.signal, 0);
  EXPECT_EQ(ps.status, 0) << ps.err;
  for (const std::string& shown : {id, std::string("0000bad1"), std::string("0000bad2")}) {
    EXPECT_NE(ps.out.find(shown), std::string::npos) << ps.out;
  }
  testing::CommandResult stop = testing::run_deltavm(cli({"stop", "--all"}));
  EXPECT_EQ(stop.signal, 0);
  EXPECT_EQ(stop.status, 1) << stop.err;
  EXPECT_NE(stop.out.find("stopped " + id), std::string::npos) << stop.out;
  EXPECT_NE(stop.err.find("0000bad1"), std::string::npos) << stop.err;
  EXPECT_FALSE(std::filesystem::exists(runtime_ / "vms" / id));
  EXPECT_TRUE(std::filesystem::exists(runtime_ / "vms" / "0000bad1")) << "an unidentified VM's directory was removed";
}

// Four bytes changed in the cached flat file a clone maps: the change is caught before any VM
// runs on it, and the clone's RAM is the stored image exactly.
TEST_F(VmProcesses, DamagedFlatFileNeverReachesAClone) {
  Store& store = *templates_.store;
  Result<std::vector<ImageRecord>> chain = store.chain("counter");
  ASSERT_TRUE(chain);
  Result<std::filesystem::path> flat = store.flat_file(chain->front());
  ASSERT_TRUE(flat) << flat.error().message;
  {
    Result<Fd> fd = open_file(*flat, O_WRONLY);
    ASSERT_TRUE(fd);
    const uint8_t bytes[4] = {1, 2, 3, 4};
    ASSERT_EQ(::pwrite(fd->get(), bytes, 4, 40 << 20), 4);
  }
  Result<FsckReport> fsck = store.fsck();
  ASSERT_TRUE(fsck);
  EXPECT_FALSE(fsck->clean());
  Result<StartedVm> vm = start_vm("counter", store, *templates_.backend, runtime_, {.leave_paused = true});
  ASSERT_TRUE(vm) << vm.error().message;
  Result<VmDirectory> directory = VmDirectory::open(runtime_, vm->id);
  ASSERT_TRUE(directory);
  Result<Mapping> expected = store.get_image("counter");
  ASSERT_TRUE(expected);
  Result<Mapping> actual = Mapping::map_anonymous(expected->size());
  ASSERT_TRUE(actual);
  ASSERT_TRUE(templates_.backend->read_memory(*directory, actual->writable_bytes()));
  EXPECT_EQ(std::memcmp(expected->bytes().data(), actual->bytes().data(), expected->size()), 0)
      << "the clone runs on the damaged bytes";
  EXPECT_TRUE(stop_vm(vm->id, *templates_.backend, runtime_));
  Result<FsckReport> after = store.fsck();
  ASSERT_TRUE(after);
  EXPECT_TRUE(after->clean());
}

// A runtime whose VMs' socket paths would not fit a Unix socket address is refused by name,
// before anything is made (QEMU would fail later with its own words).
TEST(VmRuntime, RuntimeTooLongForSocketPathsIsRefusedByName) {
  std::filesystem::path runtime = std::filesystem::path(::testing::TempDir()) / std::string(90, 'r');
  Result<VmDirectory> vm = VmDirectory::create(runtime);
  ASSERT_FALSE(vm);
  EXPECT_NE(vm.error().message.find("Unix socket address"), std::string::npos) << vm.error().message;
  EXPECT_NE(vm.error().message.find(runtime.string()), std::string::npos) << vm.error().message;
  EXPECT_FALSE(std::filesystem::exists(runtime));
}

}  // namespace
}  // namespace deltavm
