// Linux on the kvm backend's VMM: Debian's cloud bzImage and deltavm's own guest initramfs
// booted through the 64-bit boot protocol with one vCPU, the console on the emulated ttyS0,
// until the guest's /init announces readiness. Needs /dev/kvm and the two files, named by
// DELTAVM_KVM_LINUX_KERNEL and DELTAVM_KVM_LINUX_INITRD (tests/nested passes them in).
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <thread>

#include "backends/kvm/vmm_client.h"
#include "vmm/kvm.h"

namespace deltavm::vmm {
namespace {

std::filesystem::path vmm_binary() {
  std::filesystem::path binary = default_vmm_binary();
  return std::filesystem::exists(binary) ? binary : std::filesystem::path(DELTAVM_VMM_BIN);
}

TEST(KvmLinux, BootsDebianCloudKernelToTheGuestInit) {
  const char* kernel = std::getenv("DELTAVM_KVM_LINUX_KERNEL");
  const char* initrd = std::getenv("DELTAVM_KVM_LINUX_INITRD");
  if (std::optional<std::string> why = kvm_unusable_reason()) GTEST_SKIP() << *why;
  if (kernel == nullptr || initrd == nullptr) {
    GTEST_SKIP() << "needs DELTAVM_KVM_LINUX_KERNEL and DELTAVM_KVM_LINUX_INITRD (tests/nested sets them)";
  }
  std::filesystem::path directory = std::filesystem::path(::testing::TempDir()) / "deltavm_kvm_linux";
  Result<VmmProcess> vmm = VmmProcess::launch(vmm_binary(), directory, {kernel, initrd});
  ASSERT_TRUE(vmm) << vmm.error().message;
  BootLinuxRequest request;
  request.kernel = kernel;
  request.initrd = initrd;
  request.memory_bytes = 256u << 20;
  request.command_line =
      "console=ttyS0 reboot=k panic=-1 pci=off nokaslr i8042.noaux i8042.nomux i8042.dumbkbd 8250.nr_uarts=2 quiet";
  Result<StatusReply> booted = vmm->call<StatusReply>(request);
  ASSERT_TRUE(booted) << booted.error().message;
  std::string console;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  while (std::chrono::steady_clock::now() < deadline) {
    Result<SerialOutputReply> output = vmm->call<SerialOutputReply>(SerialOutputRequest{0});
    ASSERT_TRUE(output) << output.error().message;
    console = output->text;
    if (console.find("DELTAVM-READY") != std::string::npos) break;
    Result<StatusReply> status = vmm->call<StatusReply>(StatusRequest{});
    ASSERT_TRUE(status) << status.error().message;
    ASSERT_NE(status->state, RunState::kFailed) << status->failure << "\nconsole:\n" << console;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_NE(console.find("DELTAVM-READY"), std::string::npos) << "console:\n" << console;
  std::filesystem::remove_all(directory);
}

}  // namespace
}  // namespace deltavm::vmm
