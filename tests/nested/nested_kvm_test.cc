// The nested harness (design.md §3): a Linux guest under QEMU TCG with -cpu max (emulated
// AMD-V) and the kit kernel's own KVM modules runs KVM guests itself. Built as an ordinary
// deltavm template, it is captured and loaded like any other, and /dev/kvm keeps working in
// the loaded clone. This is where the kvm backend's Linux path is tested.
#include <gtest/gtest.h>

#include "backends/agent_client.h"
#include "backends/qemu/qemu_backend.h"
#include "templates/initramfs.h"
#include "templates/templates.h"

namespace deltavm {
namespace {

TEST(NestedKvm, LoadedHarnessGuestRunsKvmGuestCode) {
  std::filesystem::path root = std::filesystem::path(::testing::TempDir()) / "deltavm_nested_test";
  std::filesystem::remove_all(root);
  Result<GuestKit> kit = GuestKit::locate();
  ASSERT_TRUE(kit) << kit.error().message;
  std::filesystem::path modules = kit->kernel.parent_path() / "modules";
  std::string spec_json = fmt::format(R"({{
    "name": "nested-kvm", "memory_mib": 256,
    "files": [
      {{"source": "{0}/irqbypass.ko", "destination": "/lib/modules/irqbypass.ko"}},
      {{"source": "{0}/kvm.ko", "destination": "/lib/modules/kvm.ko"}},
      {{"source": "{0}/kvm-amd.ko", "destination": "/lib/modules/kvm-amd.ko"}},
      {{"source": "{1}", "destination": "/bin/kvm-probe", "mode": "0755"}}],
    "setup": ["insmod /lib/modules/irqbypass.ko", "insmod /lib/modules/kvm.ko",
              "insmod /lib/modules/kvm-amd.ko", "test -c /dev/kvm"]}})",
                                      modules.string(), DELTAVM_NESTED_KVM_PROBE);
  Result<TemplateSpec> spec = parse_template_spec(spec_json, root / "nested-kvm.json");
  ASSERT_TRUE(spec) << spec.error().message;
  Result<Store> store = Store::open(root / "store");
  ASSERT_TRUE(store);
  std::unique_ptr<Backend> backend = make_qemu_backend();
  Result<TemplateBuild> build = build_template(*spec, *store, *backend, root / "runtime");
  ASSERT_TRUE(build) << build.error().message;

  Result<StartedVm> vm = start_vm("nested-kvm", *store, *backend, root / "runtime", RamStrategy::kBasePlusDeltas);
  ASSERT_TRUE(vm) << vm.error().message;
  Result<VmDirectory> directory = VmDirectory::open(root / "runtime", vm->id);
  ASSERT_TRUE(directory);
  Result<ExecResult> probe = agent_exec(directory->agent_socket(), "/bin/kvm-probe", std::chrono::seconds(60));
  ASSERT_TRUE(probe) << probe.error().message;
  EXPECT_EQ(probe->exit_status, 0) << probe->stderr_bytes;
  EXPECT_EQ(probe->stdout_bytes, "api 12\nio port 0x10 value 0x42\nhlt\n");
  EXPECT_TRUE(stop_vm(vm->id, *backend, root / "runtime"));
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace deltavm
