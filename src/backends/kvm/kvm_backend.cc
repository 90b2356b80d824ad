#include "backends/kvm/kvm_backend.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "backends/kvm/guest_memory.h"
#include "backends/kvm/kvm.h"
#include "backends/kvm/ram_overlay.h"
#include "backends/kvm/vmm_client.h"
#include "backends/process.h"
#include "backends/vm_processes.h"
#include "base/file.h"
#include "base/subprocess.h"

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;
constexpr auto kLaunchTimeout = std::chrono::seconds(30);
constexpr auto kRequestTimeout = std::chrono::seconds(120);

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// What the kvm backend's Linux boot needs on the kernel command line besides the template's:
// i8042 reset for reboot, no PCI probing, the i8042 probe kept short, both UARTs.
constexpr std::string_view kBootArguments =
    " reboot=k pci=off i8042.noaux i8042.nomux i8042.dumbkbd 8250.nr_uarts=2";

Result<kvm::VmmClient> connect(const VmDirectory& vm) {
  Result<kvm::VmmClient> client = kvm::VmmClient::connect(vm.control_socket(), deadline_after(std::chrono::seconds(5)));
  if (!client) return client.error().with_context(fmt::format("VM {}", vm.id()));
  return client;
}

Result<json> request(const VmDirectory& vm, const json& body) {
  DELTAVM_ASSIGN_OR_RETURN(kvm::VmmClient client, connect(vm));
  Result<json> answer = client.request(body, kRequestTimeout);
  if (!answer) return answer.error().with_context(fmt::format("VM {} ({})", vm.id(), tail_of_log(vm.log_file())));
  return answer;
}

class KvmBackend : public Backend {
 public:
  explicit KvmBackend(kvm::MemoryStrategy strategy) : strategy_(strategy) {}

  std::string name() const override { return "kvm"; }
  std::string describe() const override {
    return fmt::format("deltavm-vmm ({}), restores with {} memory: {}", kvm::default_vmm_binary().string(),
                       kvm::memory_strategy_name(strategy_), describe_kvm_device());
  }

  Status boot(const MachineSpec& machine, const std::filesystem::path& ram_file, const VmDirectory& vm) override {
    // A booting VM exists only for the build that boots it: it dies with its owner.
    DELTAVM_TRY(launch(vm, ram_file, {machine.kernel, machine.initramfs}, /*die_with_parent=*/true));
    DELTAVM_TRY(request(vm, {{"op", "boot_linux"},
                             {"kernel", machine.kernel.string()},
                             {"initrd", machine.initramfs.string()},
                             {"command_line", machine.command_line + std::string(kBootArguments)},
                             {"memory_bytes", machine.memory_bytes},
                             {"vcpus", machine.vcpus},
                             {"ram_file", ram_file.string()}}));
    return {};
  }

  Status pause(const VmDirectory& vm) override {
    DELTAVM_TRY(request(vm, {{"op", "pause"}}));
    return {};
  }

  Result<std::vector<uint8_t>> save_machine_state(const VmDirectory& vm) override {
    std::filesystem::path state = vm.path() / "state.out";
    DELTAVM_TRY(request(vm, {{"op", "save"}, {"state", state.string()}}));
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(state));
    std::error_code error;
    std::filesystem::remove(state, error);
    return bytes;
  }

  Result<RestoreTimings> restore(const MachineSpec& machine, const std::filesystem::path& base_ram_file,
                                 const FillMemory& fill, std::span<const uint8_t> machine_state, const VmDirectory& vm,
                                 bool leave_paused) override {
    (void)machine;
    RestoreTimings timings;
    Clock::time_point start = Clock::now();
    // The loader's pages go into an overlay file the VMM maps; then the VMM starts.
    std::filesystem::path overlay_path = vm.path() / "overlay";
    DELTAVM_ASSIGN_OR_RETURN(kvm::RamOverlayWriter overlay, kvm::RamOverlayWriter::create(overlay_path));
    kvm::OverlayMemoryWriter writer(overlay);
    DELTAVM_TRY(fill(writer));
    DELTAVM_TRY(overlay.commit());
    std::filesystem::path state_path = vm.path() / "state";
    DELTAVM_TRY(write_file_atomic(state_path, machine_state));
    timings.fill_ms = elapsed_ms(start);

    start = Clock::now();
    DELTAVM_TRY(launch(vm, base_ram_file, {base_ram_file}, /*die_with_parent=*/false));
    timings.launch_ms = elapsed_ms(start);
    start = Clock::now();
    DELTAVM_TRY(request(vm, {{"op", "restore"},
                             {"state", state_path.string()},
                             {"base", base_ram_file.string()},
                             {"overlay", overlay_path.string()},
                             {"strategy", kvm::memory_strategy_name(strategy_)},
                             {"paused", leave_paused}}));
    timings.state_ms = elapsed_ms(start);
    return timings;
  }

  Status resume(const VmDirectory& vm) override {
    DELTAVM_TRY(request(vm, {{"op", "resume"}}));
    return {};
  }

  Status read_memory(const VmDirectory& vm, std::span<uint8_t> out) override {
    std::filesystem::path ram = vm.path() / "ram.out";
    DELTAVM_TRY(request(vm, {{"op", "save"}, {"ram", ram.string()}}));
    DELTAVM_ASSIGN_OR_RETURN(Mapping mapping, Mapping::map_file_readonly(ram));
    if (out.size() > mapping.size()) {
      return make_error(ErrorCode::kInvalidArgument, "VM {} has {} bytes of RAM, {} asked", vm.id(), mapping.size(),
                        out.size());
    }
    std::copy_n(mapping.data(), out.size(), out.data());
    std::error_code error;
    std::filesystem::remove(ram, error);
    return {};
  }

  Status stop(const VmDirectory& vm) override {
    return processes_.stop(vm, [&] {
      Result<kvm::VmmClient> client = kvm::VmmClient::connect(vm.control_socket(), deadline_after(std::chrono::seconds(2)));
      if (client) (void)client->request({{"op", "quit"}}, std::chrono::seconds(2));
    });
  }

 private:
  // Starts the VM's deltavm-vmm, records it, and waits for its control socket. The VMM may
  // write only inside the VM's directory and read only there and in `read_only` files.
  Status launch(const VmDirectory& vm, const std::filesystem::path& ram_file,
                const std::vector<std::filesystem::path>& read_only, bool die_with_parent) {
    SpawnOptions options;
    options.argv = {kvm::default_vmm_binary().string(), "--directory", vm.path().string(), "--control",
                    vm.control_socket().string(), "--console", vm.console_socket().string(), "--agent",
                    vm.agent_socket().string()};
    for (const std::filesystem::path& path : read_only) options.argv.insert(options.argv.end(), {"--read-only", path.string()});
    options.log = vm.log_file();
    options.umask = kVmProcessUmask;
    options.die_with_parent = die_with_parent;
    DELTAVM_TRY(processes_.launch(vm, options, "kvm", ram_file));
    Deadline deadline = deadline_after(kLaunchTimeout);
    for (;;) {
      Result<kvm::VmmClient> client =
          kvm::VmmClient::connect(vm.control_socket(), std::min(deadline, deadline_after(std::chrono::milliseconds(50))));
      if (client) return {};
      if (std::optional<std::string> ended = processes_.exit_of(vm.id())) {
        return make_error(ErrorCode::kIo, "deltavm-vmm {} at start: {}", *ended, tail_of_log(vm.log_file()));
      }
      if (Clock::now() >= deadline) return client.error().with_context("deltavm-vmm");
    }
  }

  VmProcesses processes_;  // The VMMs this backend started.
  kvm::MemoryStrategy strategy_;
};

}  // namespace

std::unique_ptr<Backend> make_kvm_backend() {
  kvm::MemoryStrategy strategy = kvm::MemoryStrategy::kUserfault;
  if (const char* configured = std::getenv("DELTAVM_KVM_MEMORY"); configured != nullptr && *configured) {
    if (Result<kvm::MemoryStrategy> parsed = kvm::parse_memory_strategy(configured)) strategy = *parsed;
  }
  return make_kvm_backend(strategy);
}

std::unique_ptr<Backend> make_kvm_backend(kvm::MemoryStrategy strategy) { return std::make_unique<KvmBackend>(strategy); }

std::string describe_kvm_device() {
  if (std::optional<std::string> why = kvm::kvm_unusable_reason()) return fmt::format("not usable: {}", *why);
  Result<kvm::KvmSystem> system = kvm::KvmSystem::open();
  if (!system) return fmt::format("not usable: {}", system.error().message);
  return "/dev/kvm ready";
}

}  // namespace deltavm
