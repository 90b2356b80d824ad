// The patent flow on real QEMU and real Linux: templates are booted, captured and stored as a
// chain, and new VMs are loaded from the chain and checked for equivalence.
#include <gtest/gtest.h>

#include <sys/file.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "backends/agent_client.h"
#include "backends/cgroups.h"
#include "backends/qemu/qemu_backend.h"
#include "base/file.h"
#include "support/guest_templates.h"
#include "support/proc_status.h"
#include "templates/initramfs.h"
#include "templates/kernel_image.h"
#include "templates/templates.h"

namespace deltavm {
namespace {

std::filesystem::path test_root() { return std::filesystem::path(::testing::TempDir()) / "deltavm_guest_templates"; }

TemplateSpec parse(const std::string& json) { return testing::parse_spec(json, test_root() / "spec.json"); }

std::string exec_output(const VmDirectory& vm, const std::string& command) {
  Result<ExecResult> result = agent_exec(vm.agent_socket(), command, std::chrono::seconds(30));
  EXPECT_TRUE(result) << result.error().message;
  if (!result) return "";
  EXPECT_EQ(result->exit_status, 0) << command << ": " << result->stderr_bytes;
  return result->stdout_bytes;
}

class TemplateVms : public ::testing::Test {
 protected:
  // The shared store (support/guest_templates.h): base, and counter chained on it.
  static void SetUpTestSuite() {
    Result<testing::GuestTemplates> templates = testing::guest_templates();
    ASSERT_TRUE(templates) << templates.error().message;
    store_ = templates->store;
    backend_ = templates->backend;
  }
  static std::filesystem::path runtime() { return test_root() / "runtime"; }

  VmDirectory start(const std::string& name, bool paused = false) {
    Result<StartedVm> vm = start_vm(name, *store_, *backend_, runtime(), {.leave_paused = paused});
    EXPECT_TRUE(vm) << vm.error().message;
    started_.push_back(vm->id);
    return *VmDirectory::open(runtime(), vm->id);
  }
  void TearDown() override {
    for (const std::string& id : started_) (void)stop_vm(id, *backend_, runtime());
  }

  static Store* store_;
  static Backend* backend_;
  std::vector<std::string> started_;
};

Store* TemplateVms::store_ = nullptr;
Backend* TemplateVms::backend_ = nullptr;

TEST_F(TemplateVms, ChainIsStoredAgainstTheParent) {
  Result<std::vector<ImageRecord>> chain = store_->chain("counter");
  ASSERT_TRUE(chain);
  ASSERT_EQ(chain->size(), 2u);
  EXPECT_EQ((*chain)[0].name, "base");
  EXPECT_LT((*chain)[1].stored_size_bytes, (*chain)[1].image_size_bytes / 20);
}

TEST_F(TemplateVms, LoadedRamBeforeStartIsTheCapturedImage) {
  VmDirectory vm = start("counter", /*paused=*/true);
  Result<Mapping> expected = store_->get_image("counter");
  ASSERT_TRUE(expected);
  Result<Mapping> actual = Mapping::map_anonymous(expected->size());
  ASSERT_TRUE(actual);
  Status read = backend_->read_memory(vm, actual->writable_bytes());
  ASSERT_TRUE(read) << read.error().message;
  size_t differing_pages = 0;
  for (size_t offset = 0; offset < expected->size(); offset += 4096) {
    if (std::memcmp(expected->bytes().data() + offset, actual->bytes().data() + offset, 4096) != 0) ++differing_pages;
  }
  EXPECT_EQ(differing_pages, 0u);
  ASSERT_TRUE(backend_->resume(vm));
  EXPECT_EQ(exec_output(vm, "cat /tmp/marker"), "made-before-capture\n");
}

// The VM process `pid` is in cgroups of its own, `name` (backends/cgroups.h) with the
// counter template's limits (128 MiB of RAM + QEMU's 1 GiB, 1 vCPU + 1, 512 tasks), on whichever
// cgroup version the host has; a host with neither says so in doctor, and is skipped here.
void expect_cgroup_limits(pid_t pid, const std::string& name) {
  if (describe_cgroups().starts_with("no per-VM limit")) return;
  std::ifstream file(fmt::format("/proc/{}/cgroup", pid));
  std::map<std::string, std::string> paths;  // Controller ("" for v2) -> cgroup path.
  for (std::string line; std::getline(file, line);) {
    size_t first = line.find(':'), second = line.find(':', first + 1);
    std::stringstream controllers(line.substr(first + 1, second - first - 1));
    std::string path = line.substr(second + 1);
    if (controllers.str().empty()) paths[""] = path;
    for (std::string controller; std::getline(controllers, controller, ',');) paths[controller] = path;
  }
  std::string own = "/deltavm/" + name;
  auto limit = [](const std::filesystem::path& path) {
    std::ifstream in(path);
    std::string value;
    std::getline(in, value);
    return value;
  };
  uint64_t memory = (128ull << 20) + (1ull << 30);
  if (paths[""] == own) {  // cgroup v2.
    std::filesystem::path directory = std::filesystem::path("/sys/fs/cgroup") / own.substr(1);
    EXPECT_EQ(limit(directory / "memory.max"), std::to_string(memory));
    EXPECT_EQ(limit(directory / "cpu.max"), "200000 100000");
    EXPECT_EQ(limit(directory / "pids.max"), "512");
    return;
  }
  for (const char* controller : {"memory", "cpu", "pids"}) EXPECT_EQ(paths[controller], own) << controller;
  std::filesystem::path v1 = "/sys/fs/cgroup";
  EXPECT_EQ(limit(v1 / "memory" / own.substr(1) / "memory.limit_in_bytes"), std::to_string(memory));
  EXPECT_EQ(limit(v1 / "cpu" / own.substr(1) / "cpu.cfs_quota_us"), "200000");
  EXPECT_EQ(limit(v1 / "pids" / own.substr(1) / "pids.max"), "512");
}

TEST_F(TemplateVms, VmProcessesAreJailedEachInAUidOfItsOwn) {
  if (::geteuid() != 0) GTEST_SKIP() << "jailing needs root";
  std::vector<VmDirectory> vms = {start("counter"), start("counter")};
  std::set<std::string> uids;
  std::filesystem::path lock;
  for (const VmDirectory& vm : vms) {
    Result<VmRecord> record = vm.read_record();
    ASSERT_TRUE(record && record->process);
    pid_t pid = record->process->pid;
    std::string uid = testing::status_field(pid, "Uid");
    std::string first = uid.substr(0, uid.find('\t'));
    EXPECT_EQ(uid, fmt::format("{0}\t{0}\t{0}\t{0}", first)) << "real, effective, saved and file uids";
    EXPECT_GE(std::stoul(first), 2'000'000u);
    EXPECT_LT(std::stoul(first), 2'065'536u);
    EXPECT_EQ(testing::status_field(pid, "Gid"), uid);
    uids.insert(first);
    for (const char* set : {"CapInh", "CapPrm", "CapEff", "CapAmb"}) {
      EXPECT_EQ(testing::status_field(pid, set), "0000000000000000") << set;
    }
    EXPECT_EQ(testing::status_field(pid, "NoNewPrivs"), "1");
    EXPECT_EQ(testing::status_field(pid, "Seccomp"), "2");
    for (const char* ns : {"pid", "net", "ipc", "mnt"}) {
      EXPECT_NE(std::filesystem::read_symlink(fmt::format("/proc/{}/ns/{}", pid, ns)),
                std::filesystem::read_symlink(fmt::format("/proc/self/ns/{}", ns)))
          << ns;
    }
    EXPECT_EQ(std::filesystem::read_symlink(fmt::format("/proc/{}/root", pid)), runtime() / "jail" / "root");
    expect_cgroup_limits(pid, vm_cgroup_name(runtime(), vm.id()));
    EXPECT_EQ(exec_output(vm, "cat /tmp/marker"), "made-before-capture\n");
    lock = runtime() / "jail" / (first + ".lock");
  }
  EXPECT_EQ(uids.size(), 2u) << "two VMs share a uid";
  // The uid is held while its VM runs, and free once it stops.
  Result<Fd> held = open_file(lock, O_RDWR);
  ASSERT_TRUE(held);
  EXPECT_NE(::flock(held->get(), LOCK_EX | LOCK_NB), 0);
  ASSERT_TRUE(stop_vm(vms[1].id(), *backend_, runtime()));
  EXPECT_EQ(::flock(held->get(), LOCK_EX | LOCK_NB), 0);
  // Its cgroups went with it.
  for (const char* controller : {"memory", "cpu", "pids", ""}) {
    std::filesystem::path directory =
        std::filesystem::path("/sys/fs/cgroup") / controller / "deltavm" / vm_cgroup_name(runtime(), vms[1].id());
    EXPECT_FALSE(std::filesystem::exists(directory)) << directory;
  }
}

TEST_F(TemplateVms, FilesProcessesAndCounterSurviveTheLoad) {
  VmDirectory vm = start("counter");
  EXPECT_EQ(exec_output(vm, "cat /tmp/marker"), "made-before-capture\n");
  EXPECT_EQ(exec_output(vm, "cat /etc/hostname 2>/dev/null || hostname"), "deltavm\n");
  int first = std::stoi(exec_output(vm, "cat /run/ticks"));
  EXPECT_GE(first, 5);  // Setup slept 1 s at 5 ticks a second before capture.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  int second = std::stoi(exec_output(vm, "cat /run/ticks"));
  EXPECT_GT(second, first);
}

TEST_F(TemplateVms, CommandLineRunsExecsAndStopsAVm) {
  std::string deltavm =
      std::string(DELTAVM_BINARY) + " --store " + (test_root() / "store").string() + " --runtime " + runtime().string();
  auto run = [](const std::string& command) {
    std::string output;
    FILE* pipe = ::popen(command.c_str(), "r");
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) output.append(buffer, n);
    int status = ::pclose(pipe);
    return std::pair<int, std::string>(WEXITSTATUS(status), output);
  };
  auto [run_status, id_line] = run(deltavm + " run counter");
  ASSERT_EQ(run_status, 0);
  std::string id = id_line.substr(0, id_line.find('\n'));
  started_.push_back(id);
  auto [exec_status, exec_output] = run(deltavm + " exec " + id + " -- 'cat /tmp/marker; exit 7'");
  EXPECT_EQ(exec_status, 7);
  EXPECT_EQ(exec_output, "made-before-capture\n");
  auto [console_status, console_output] = run("echo 'echo console-$((40+2))' | " + deltavm + " console " + id);
  EXPECT_EQ(console_status, 0);
  EXPECT_NE(console_output.find("console-42"), std::string::npos) << console_output;
  auto [ps_status, ps_output] = run(deltavm + " ps");
  EXPECT_NE(ps_output.find(id), std::string::npos);
  EXPECT_EQ(run(deltavm + " stop " + id).first, 0);
  started_.clear();
  EXPECT_EQ(run(deltavm + " ps").second.find(id), std::string::npos);
  EXPECT_NE(run(deltavm + " exec " + id + " -- true 2>&1").second.find("no VM " + id), std::string::npos);
}

TEST_F(TemplateVms, FiveClonesRunIndependentlyAndLeaveTheStoreUnchanged) {
  Result<ImageRecord> before = store_->find("counter");
  ASSERT_TRUE(before);
  std::vector<VmDirectory> clones;
  for (int i = 0; i < 5; ++i) clones.push_back(start("counter"));
  exec_output(clones[0], "echo only-in-clone-0 > /tmp/private");
  for (int i = 0; i < 5; ++i) {
    Result<ExecResult> result = agent_exec(clones[i].agent_socket(), "cat /tmp/private", std::chrono::seconds(30));
    ASSERT_TRUE(result) << result.error().message;
    if (i == 0) {
      EXPECT_EQ(result->stdout_bytes, "only-in-clone-0\n");
    } else {
      EXPECT_NE(result->exit_status, 0) << "clone " << i << " sees clone 0's file";
    }
    EXPECT_EQ(exec_output(clones[i], "cat /tmp/marker"), "made-before-capture\n");
  }
  for (const VmDirectory& clone : clones) ASSERT_TRUE(stop_vm(clone.id(), *backend_, runtime()));
  started_.clear();
  Result<Mapping> after = store_->get_image("counter");  // Verifies every object and the digest.
  ASSERT_TRUE(after) << after.error().message;
  Result<std::vector<ImageRecord>> chain = store_->chain("counter");
  ASSERT_TRUE(chain);
  // The file the clones mapped, read as it is (Store::flat_file would repair it).
  Result<Mapping> base = Mapping::map_file_readonly(store_->flat_file_path(chain->front().digest));
  ASSERT_TRUE(base);
  EXPECT_EQ(digest_image(base->bytes()), chain->front().digest) << "a clone wrote into the base file";
  Result<FsckReport> fsck = store_->fsck();
  ASSERT_TRUE(fsck);
  EXPECT_TRUE(fsck->clean());
}

// A failed build must leave the store as it was and no VM behind.
void expect_store_unchanged(Store& store, size_t images_before) {
  Result<std::vector<ImageRecord>> records = store.list();
  ASSERT_TRUE(records);
  EXPECT_EQ(records->size(), images_before);
}

size_t vm_count() {
  Result<std::vector<VmDirectory>> vms = VmDirectory::list(test_root() / "runtime");
  return vms ? vms->size() : 0;
}

TEST_F(TemplateVms, GuestThatNeverBecomesReadyIsAClearErrorAndStoresNothing) {
  size_t before = store_->list()->size();
  size_t vms_before = vm_count();
  Result<TemplateBuild> build =
      build_template(parse(R"({"name": "stuck", "memory_mib": 128, "ready_timeout_s": 8, "setup": ["sleep 1000"]})"),
                     *store_, *backend_, runtime());
  ASSERT_FALSE(build);
  EXPECT_NE(build.error().message.find("not ready after 8 s"), std::string::npos) << build.error().message;
  expect_store_unchanged(*store_, before);
  EXPECT_EQ(vm_count(), vms_before);
}

TEST_F(TemplateVms, FailingSetupCommandIsAClearErrorAndStoresNothing) {
  size_t before = store_->list()->size();
  Result<TemplateBuild> build =
      build_template(parse(R"({"name": "broken", "memory_mib": 128, "setup": ["echo about to fail", "false"]})"),
                     *store_, *backend_, runtime());
  ASSERT_FALSE(build);
  EXPECT_NE(build.error().message.find("setup command failed"), std::string::npos) << build.error().message;
  EXPECT_NE(build.error().message.find("about to fail"), std::string::npos) << build.error().message;
  expect_store_unchanged(*store_, before);
}

TEST_F(TemplateVms, MissingParentIsRefusedBeforeBooting) {
  size_t before = store_->list()->size();
  Result<TemplateBuild> build =
      build_template(parse(R"({"name": "orphan", "parent": "nope"})"), *store_, *backend_, runtime());
  ASSERT_FALSE(build);
  EXPECT_NE(build.error().message.find("parent template nope"), std::string::npos);
  expect_store_unchanged(*store_, before);
}

TEST(KernelImage, TextOfTheKitKernelAndRefusalOfOtherFiles) {
  Result<GuestKit> kit = GuestKit::locate();
  ASSERT_TRUE(kit) << kit.error().message;
  Result<std::vector<uint8_t>> bzimage = read_file(kit->kernel);
  ASSERT_TRUE(bzimage);
  Result<std::vector<uint8_t>> text = linux_kernel_text(*bzimage);
  ASSERT_TRUE(text) << text.error().message;
  EXPECT_GT(text->size(), 2 * bzimage->size());  // Decompressed.
  std::vector<uint8_t> not_a_kernel(4096, 0x90);
  Result<std::vector<uint8_t>> refused = linux_kernel_text(not_a_kernel);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("HdrS"), std::string::npos);
  std::vector<uint8_t> cut(bzimage->begin(), bzimage->begin() + 8192);
  EXPECT_FALSE(linux_kernel_text(cut));
}

TEST_F(TemplateVms, BaseIsCompressedAgainstItsKernel) {
  Result<ImageRecord> base = store_->find("base");
  ASSERT_TRUE(base);
  EXPECT_EQ(base->reference, "kernel:linux-kernel-text,initramfs:raw");
}

TEST(TemplateSpecs, BadFieldsAreNamed) {
  std::filesystem::path origin = "specs/x.json";
  auto error_of = [&](const std::string& json) {
    Result<TemplateSpec> spec = parse_template_spec(json, origin);
    EXPECT_FALSE(spec);
    return spec ? std::string() : spec.error().message;
  };
  EXPECT_EQ(error_of(R"({"name": "a", "memory_mib": "lots"})"),
            "template spec specs/x.json: field memory_mib: expected an integer from 32 to 3072, found \"lots\"");
  EXPECT_NE(error_of(R"({"memory_mib": 64})").find("field name is required"), std::string::npos);
  EXPECT_NE(error_of(R"({"name": "a", "memroy_mib": 64})").find("unknown field memroy_mib"), std::string::npos);
  EXPECT_NE(error_of(R"({"name": "a b"})").find("field name"), std::string::npos);
  EXPECT_NE(error_of(R"({"name": "a", "setup": ["ok", 3]})").find("field setup[1]"), std::string::npos);
  EXPECT_NE(error_of(R"({"name": "a", "kernel": "no/such/vmlinuz"})").find("no/such/vmlinuz does not exist"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"name": "a", "files": [{"source": "x", "destination": "/x"}]})").find("does not exist"),
            std::string::npos);
  EXPECT_NE(error_of("{not json").find("not valid JSON"), std::string::npos);
  // A mode with a NUL in it was read up to the NUL and taken.
  EXPECT_NE(error_of(R"({"name": "a", "files": [{"source": "/etc/passwd", "destination": "/x", "mode": "07\u00009"}]})")
                .find("files[0].mode"),
            std::string::npos);
}

}  // namespace
}  // namespace deltavm
