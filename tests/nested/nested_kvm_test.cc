// The nested harness (design.md §3): a Linux guest under QEMU TCG with -cpu max (emulated
// AMD-V) and the kit kernel's own KVM modules runs KVM guests itself. Built as an ordinary
// deltavm template, it is captured and loaded like any other, and /dev/kvm keeps working in
// the loaded clone. This is where the kvm backend is tested on hosts without /dev/kvm: the
// harness carries the static deltavm-vmm, the micro guest, the kvm test binary and the deltavm
// command (with the shared libraries it links), and runs them.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <regex>

#include "backends/agent_client.h"
#include "backends/qemu/qemu_backend.h"
#include "templates/initramfs.h"
#include "templates/kernel_image.h"
#include "templates/templates.h"

namespace deltavm {
namespace {

std::filesystem::path test_root() { return std::filesystem::path(::testing::TempDir()) / "deltavm_nested_test"; }
std::filesystem::path runtime() { return test_root() / "runtime"; }

// The shared libraries a dynamically linked binary loads, the dynamic loader included, as ldd
// resolves them on this host: the harness gets each at the same path.
std::vector<std::filesystem::path> shared_libraries(const std::filesystem::path& binary) {
  std::vector<std::filesystem::path> libraries;
  std::unique_ptr<FILE, int (*)(FILE*)> ldd(::popen(("ldd " + binary.string()).c_str(), "r"), ::pclose);
  if (!ldd) return libraries;
  std::string output;
  char buffer[4096];
  for (size_t count; (count = std::fread(buffer, 1, sizeof buffer, ldd.get())) > 0;) output.append(buffer, count);
  std::regex library(R"((?:=> )?(/\S+) \(0x)");
  for (std::sregex_iterator match(output.begin(), output.end(), library), end; match != end; ++match) {
    libraries.emplace_back((*match)[1].str());
  }
  return libraries;
}

class NestedKvm : public ::testing::Test {
 protected:
  void SetUp() override {
#ifdef DELTAVM_SANITIZE
    GTEST_SKIP() << "a sanitizer build: the harness runs static binaries, which sanitizers cannot be";
#endif
  }
  // One harness template for every test of this binary. ctest runs each test in a process of
  // its own: the first builds the template, the others reuse it unless its inputs changed
  // (the stamp holds the spec and the binaries' sizes and times).
  static void SetUpTestSuite() {
#ifdef DELTAVM_SANITIZE
    return;  // SetUp skips every test.
#endif
    Result<GuestKit> kit = GuestKit::locate();
    ASSERT_TRUE(kit) << kit.error().message;
    std::filesystem::path modules = kit->kernel.parent_path() / "modules";
    std::filesystem::path files = DELTAVM_NESTED_FILES;
    // deltavm's own guest initramfs, for the Linux guest the kvm backend boots in the harness.
    Result<TemplateSpec> guest_spec = parse_template_spec(R"({"name": "kvm-linux", "memory_mib": 256})", "kvm-linux");
    ASSERT_TRUE(guest_spec) << guest_spec.error().message;
    Result<std::vector<uint8_t>> guest_initramfs = build_initramfs(*guest_spec, *kit);
    ASSERT_TRUE(guest_initramfs) << guest_initramfs.error().message;
    std::filesystem::create_directories(test_root());
    std::filesystem::path guest_initramfs_file = test_root() / "kvm-linux.cpio";
    ASSERT_TRUE(write_file_atomic(guest_initramfs_file, *guest_initramfs));
    std::string spec_json = fmt::format(R"({{
      "name": "nested-kvm", "memory_mib": 1024,
      "files": [
        {{"source": "{0}/irqbypass.ko", "destination": "/lib/modules/irqbypass.ko"}},
        {{"source": "{0}/kvm.ko", "destination": "/lib/modules/kvm.ko"}},
        {{"source": "{0}/kvm-amd.ko", "destination": "/lib/modules/kvm-amd.ko"}},
        {{"source": "{1}/kvm-probe", "destination": "/bin/kvm-probe", "mode": "0755"}},
        {{"source": "{1}/deltavm-vmm", "destination": "/bin/deltavm-vmm", "mode": "0755"}},
        {{"source": "{1}/deltavm_kvm_tests", "destination": "/bin/deltavm_kvm_tests", "mode": "0755"}},
        {{"source": "{1}/micro-guest.bin", "destination": "/bin/micro-guest.bin"}},
        {{"source": "{2}", "destination": "/boot/vmlinuz"}},
        {{"source": "{3}", "destination": "/boot/initramfs.cpio"}},
        {{"source": "{1}/deltavm", "destination": "/bin/deltavm", "mode": "0755"}},
        {{"source": "{2}", "destination": "/kit/vmlinuz"}},
        {{"source": "{4}", "destination": "/kit/busybox", "mode": "0755"}},
        {{"source": "{5}", "destination": "/kit/deltavm-agent", "mode": "0755"}}],
      "setup": ["insmod /lib/modules/irqbypass.ko", "insmod /lib/modules/kvm.ko",
                "insmod /lib/modules/kvm-amd.ko", "test -c /dev/kvm"]}})",
                                        modules.string(), files.string(), kit->kernel.string(),
                                        guest_initramfs_file.string(), kit->busybox.string(), kit->agent.string());
    std::vector<std::filesystem::path> libraries = shared_libraries(files / "deltavm");
    ASSERT_FALSE(libraries.empty()) << "ldd found no libraries for " << (files / "deltavm").string();
    std::string library_entries;
    for (const std::filesystem::path& library : libraries) {
      library_entries +=
          fmt::format(R"(, {{"source": "{0}", "destination": "{0}", "mode": "0755"}})", library.string());
    }
    spec_json.insert(spec_json.find("],\n      \"setup\""), library_entries);
    std::string stamp = spec_json;
    for (const char* name : {"kvm-probe", "deltavm-vmm", "deltavm_kvm_tests", "micro-guest.bin", "deltavm"}) {
      std::filesystem::path path = files / name;
      stamp += fmt::format("{} {} {}\n", name, std::filesystem::file_size(path),
                           std::filesystem::last_write_time(path).time_since_epoch().count());
    }
    for (const std::filesystem::path& library : libraries) {
      stamp += fmt::format("{} {}\n", library.string(), std::filesystem::file_size(library));
    }
    stamp += fmt::format("initramfs {}\n", guest_initramfs->size());
    std::filesystem::path stamp_file = test_root() / "stamp";
    std::ifstream in(stamp_file);
    std::string found((std::istreambuf_iterator<char>(in)), {});
    bool reuse = found == stamp;
    if (!reuse) {
      std::filesystem::remove_all(test_root() / "store");
      std::filesystem::remove_all(runtime());
    }
    store_ = new Store(std::move(*Store::open_or_create(test_root() / "store", template_reference_kinds())));
    backend_ = make_qemu_backend().release();
    if (reuse && store_->find("nested-kvm")) return;
    Result<TemplateSpec> spec = parse_template_spec(spec_json, test_root() / "nested-kvm.json");
    ASSERT_TRUE(spec) << spec.error().message;
    Result<TemplateBuild> build = build_template(*spec, *store_, *backend_, runtime());
    ASSERT_TRUE(build) << build.error().message;
    std::ofstream(stamp_file) << stamp;
  }

  static void TearDownTestSuite() {
    delete store_;
    delete backend_;
  }

  // A clone of the harness, loaded from the store.
  VmDirectory start() {
    Result<StartedVm> vm = start_vm("nested-kvm", *store_, *backend_, runtime());
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

Store* NestedKvm::store_ = nullptr;
Backend* NestedKvm::backend_ = nullptr;

TEST_F(NestedKvm, LoadedHarnessGuestRunsKvmGuestCode) {
  VmDirectory directory = start();
  Result<ExecResult> probe = agent_exec(directory.agent_socket(), "/bin/kvm-probe", std::chrono::seconds(60));
  ASSERT_TRUE(probe) << probe.error().message;
  EXPECT_EQ(probe->exit_status, 0) << probe->stderr_bytes;
  EXPECT_EQ(probe->stdout_bytes, "api 12\nio port 0x10 value 0x42\nhlt\n");
}

// The kvm backend's whole suite (tests/kvm) on the harness's /dev/kvm: the micro guest captured
// mid-work, delta chain in a real store, restore under eager / private / userfault, dirty-log
// recapture, refusal of mismatched or corrupt machine states; and Debian's kernel booted to
// deltavm's /init.
TEST_F(NestedKvm, KvmBackendSuitePassesInsideHarness) {
  VmDirectory directory = start();
  Result<ExecResult> suite =
      agent_exec(directory.agent_socket(),
                 "DELTAVM_KVM_LINUX_KERNEL=/boot/vmlinuz DELTAVM_KVM_LINUX_INITRD=/boot/initramfs.cpio "
                 "/bin/deltavm_kvm_tests 2>&1",
                 std::chrono::minutes(15));
  ASSERT_TRUE(suite) << suite.error().message;
  EXPECT_EQ(suite->exit_status, 0) << suite->stdout_bytes;
  std::smatch passed;
  ASSERT_TRUE(std::regex_search(suite->stdout_bytes, passed, std::regex(R"(\[  PASSED  \] (\d+) tests?)")))
      << suite->stdout_bytes;
  EXPECT_EQ(passed[1], "15") << suite->stdout_bytes;
  EXPECT_EQ(suite->stdout_bytes.find("SKIPPED"), std::string::npos) << suite->stdout_bytes;
}

// The patent's flow on the kvm backend with Linux guests, inside the harness, through the
// command line: a base template and a child with setup are booted by deltavm-vmm, captured and
// stored as a chain; VMs loaded from the child (base + delta, userfault memory) and from the
// base alone (eager) answer commands, the child's with the child's state. Then a two-vCPU
// template, loaded (private memory) with both CPUs. Last, deltavm serve with a warm pool of the
// child on the kvm backend, used through the command line and the token-guarded TCP API.
TEST_F(NestedKvm, KvmBackendBuildsChainedLinuxTemplatesAndLoadsOneThatAnswers) {
  VmDirectory directory = start();
  const char* script = R"sh(set -e
export DELTAVM_KIT=/kit DELTAVM_AGENT=/kit/deltavm-agent DELTAVM_VMM=/bin/deltavm-vmm
export DELTAVM_STORE=/tmp/kvm-store DELTAVM_RUNTIME=/tmp/kvm-run
echo '{"name": "base", "memory_mib": 128, "ready_timeout_s": 600}' > /tmp/base.json
echo '{"name": "web", "parent": "base", "memory_mib": 128, "ready_timeout_s": 600,
       "setup": ["echo served-by-kvm > /tmp/page"]}' > /tmp/web.json
deltavm template build --backend kvm /tmp/base.json
deltavm template build --backend kvm /tmp/web.json
deltavm store ls
id=$(deltavm run web)
grep -l '^Name:.deltavm-vmm' /proc/[0-9]*/status 2>/dev/null | while read -r status; do
  grep -E '^(Uid|CapEff|Seccomp):' "$status" || true
done
deltavm exec --timeout 300 "$id" -- cat /tmp/page
deltavm exec --timeout 300 "$id" -- sh -c 'echo $((6 * 7))'
# Snapshots on the kvm backend: the dirty log since the load, checked against the VMM's digest
# of the whole RAM; then pause/resume under the same id, and forks with their own identity.
deltavm exec --timeout 300 "$id" -- sh -c 'echo after-load > /tmp/after; (while true; do sleep 1; done) >/dev/null 2>&1 & echo $! > /tmp/loop'
deltavm --json snapshot "$id" web-snap | grep -E '"(pause_ms|changed_pages|parent)"'
# A capture that misses a changed page is refused by the VMM's digest; nothing is stored.
if deltavm snapshot "$id" web-missed --omit-changed-pages-for-testing 1 2>/tmp/missed; then echo missed-stored; fi
grep -o 'a changed page was missed' /tmp/missed || cat /tmp/missed
echo "web-missed stored: $(deltavm template ls | grep -c web-missed)"
deltavm exec --timeout 300 "$id" -- echo original-runs-on
clone=$(deltavm run web-snap)
deltavm exec --timeout 300 "$clone" -- sh -c 'cat /tmp/after; kill -0 $(cat /tmp/loop) && echo loop-alive'
deltavm pause "$clone"
deltavm ps | grep paused
deltavm resume "$clone"
deltavm exec --timeout 300 "$clone" -- sh -c 'cat /tmp/after; kill -0 $(cat /tmp/loop) && echo resumed-alive'
deltavm fork "$id" --count 2 > /tmp/forks
for f in $(cat /tmp/forks); do deltavm exec --timeout 300 "$f" -- cat /proc/sys/kernel/random/uuid; done | sort -u | wc -l | sed 's/^/distinct uuids /'
deltavm stop --all
deltavm template rm web-snap
deltavm store gc
id=$(deltavm run web)
deltavm stop "$id"
id=$(deltavm run base --kvm-memory eager)
deltavm exec --timeout 300 "$id" -- echo base-answers
deltavm stop "$id"
echo '{"name": "pair", "memory_mib": 128, "vcpus": 2, "ready_timeout_s": 600}' > /tmp/pair.json
deltavm template build --backend kvm /tmp/pair.json
id=$(deltavm run pair --kvm-memory private)
deltavm exec --timeout 300 "$id" -- 'echo cpus $(grep -c ^processor /proc/cpuinfo)'
deltavm stop "$id"
# A hostile guest: a storm of port I/O, zeros written to and bytes read from every I/O port
# but the two UARTs' (the console and the agent ride on those), one byte a write.
id=$(deltavm run web)
deltavm exec --timeout 600 "$id" -- 'for range in 0:760 768:248 1024:64512; do
  dd if=/dev/zero of=/dev/port bs=1 seek=${range%:*} count=${range#*:} 2>/dev/null
  dd if=/dev/port of=/dev/null bs=1 skip=${range%:*} count=${range#*:} 2>/dev/null
done; echo storm-survived'
grep -l '^Name:.deltavm-vmm' /proc/[0-9]*/status 2>/dev/null | while read -r status; do
  grep '^VmHWM:' "$status" | sed 's/^/storm /' || true
done
deltavm exec --timeout 300 "$id" -- echo answers-after-storm
deltavm stop "$id"
# The service on the kvm backend: a warm pool of web, filled before the request; the command
# line goes through the service; TCP needs the token.
ip link set lo up
echo '{"pools": {"web": 1}}' > /tmp/serve.json
echo nested-harness-token-0123456789 > /tmp/token && chmod 600 /tmp/token
deltavm serve --config /tmp/serve.json --listen 127.0.0.1:8123 --token-file /tmp/token &
serve=$!
api() { wget -q -O - --header "Authorization: Bearer $(cat /tmp/token)" "http://127.0.0.1:8123$1"; }
for i in $(seq 1200); do api /v1/templates/web 2>/dev/null | grep -q '"ready":1' && break; sleep 0.5; done
api /v1/templates/web
wget -q -O - http://127.0.0.1:8123/v1/vms || echo no-token-refused
deltavm --json run web
id=$(deltavm ps | awk '$2 == "web" {print $1}')
deltavm exec --timeout 300 "$id" -- cat /tmp/page
api /metrics | grep '^deltavm_loads_total'
deltavm stop "$id"
kill -TERM $serve
wait $serve
echo service-stopped
)sh";
  Result<ExecResult> flow = agent_exec(directory.agent_socket(), script, std::chrono::minutes(20));
  ASSERT_TRUE(flow) << flow.error().message;
  EXPECT_EQ(flow->exit_status, 0) << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("served-by-kvm\n42\n"), std::string::npos)
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("base-answers\n"), std::string::npos) << flow->stdout_bytes << flow->stderr_bytes;
  // A snapshot of a kvm VM carries what the VM did after its load; pause/resume keeps it.
  EXPECT_TRUE(std::regex_search(flow->stdout_bytes, std::regex(R"("parent": "web")")))
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("a changed page was missed\nweb-missed stored: 0\n"), std::string::npos)
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("original-runs-on\nafter-load\nloop-alive\n"), std::string::npos)
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("after-load\nresumed-alive\n"), std::string::npos)
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("distinct uuids 2\n"), std::string::npos)
      << flow->stdout_bytes << flow->stderr_bytes;
  std::smatch pause;
  if (std::regex_search(flow->stdout_bytes, pause, std::regex(R"("pause_ms": ([0-9.]+))"))) {
    std::printf("kvm snapshot pause inside the harness: %s ms\n", pause[1].str().c_str());
  }
  // The port I/O storm: the guest and its VMM lived through it and the VMM stayed within the
  // memory its cgroup would give it (128 MiB of RAM + 256 MiB; the harness has no cgroups).
  EXPECT_NE(flow->stdout_bytes.find("storm-survived\n"), std::string::npos) << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("answers-after-storm\n"), std::string::npos)
      << flow->stdout_bytes << flow->stderr_bytes;
  std::smatch high_water;
  ASSERT_TRUE(std::regex_search(flow->stdout_bytes, high_water, std::regex(R"(storm VmHWM:\s+(\d+) kB)")))
      << flow->stdout_bytes;
  EXPECT_LT(std::stoull(high_water[1]), 384ull << 10) << "deltavm-vmm's peak resident memory after the storm, kB";
  std::printf("deltavm-vmm peak resident memory after the port I/O storm: %s kB\n", high_water[1].str().c_str());
  // The loaded VM's deltavm-vmm runs jailed: a uid of its own, no capabilities, its filter.
  EXPECT_TRUE(std::regex_search(flow->stdout_bytes, std::regex(R"(Uid:\s+([1-9]\d*)\s+\1\s+\1\s+\1\n)")))
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_TRUE(std::regex_search(flow->stdout_bytes, std::regex(R"(CapEff:\s+0+\n)")))
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_TRUE(std::regex_search(flow->stdout_bytes, std::regex(R"(Seccomp:\s+2\n)")))
      << flow->stdout_bytes << flow->stderr_bytes;
  // Two vCPUs (ACPI tables), captured with both online and loaded with both running.
  EXPECT_NE(flow->stdout_bytes.find("cpus 2\n"), std::string::npos) << flow->stdout_bytes << flow->stderr_bytes;
  // The service handed out its warm kvm VM, which answered with the child's state.
  EXPECT_NE(flow->stdout_bytes.find("no-token-refused"), std::string::npos) << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_TRUE(std::regex_search(flow->stdout_bytes, std::regex(R"("pooled": true)")))
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("served-by-kvm\ndeltavm_loads_total"), std::string::npos)
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_TRUE(std::regex_search(flow->stdout_bytes,
                                std::regex(R"(deltavm_loads_total\{[^}]*backend="kvm"[^}]*pooled="true"[^}]*\} 1)")))
      << flow->stdout_bytes << flow->stderr_bytes;
  EXPECT_NE(flow->stdout_bytes.find("service-stopped"), std::string::npos) << flow->stdout_bytes << flow->stderr_bytes;
}

}  // namespace
}  // namespace deltavm
