#include "backends/kvm/kvm_backend.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <unistd.h>

#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "backends/jail.h"
#include "backends/kvm/overlay_memory_writer.h"
#include "backends/kvm/vmm_client.h"
#include "backends/process.h"
#include "backends/vm_processes.h"
#include "base/file.h"
#include "base/page.h"
#include "base/subprocess.h"
#include "vmm/ram_overlay.h"

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kLaunchTimeout = std::chrono::seconds(30);
constexpr auto kRequestTimeout = std::chrono::seconds(120);
// Where deltavm-vmm finds the console log the host opened for it (the jail's uid lock is at
// kJailLockFd).
constexpr int kConsoleLogFd = 10;
// What a deltavm-vmm holds besides its guest's RAM: a kernel and initramfs read at a boot, a
// saved state, its threads' stacks.
constexpr uint64_t kVmmOverheadBytes = 256ull << 20;

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// What the kvm backend's Linux boot needs on the kernel command line besides the template's:
// i8042 reset for reboot, no PCI probing, the i8042 probe kept short, both UARTs.
constexpr std::string_view kBootArguments = " reboot=k pci=off i8042.noaux i8042.nomux i8042.dumbkbd 8250.nr_uarts=2";

// One request to VM `vm`'s VMM; errors carry the VM and the tail of its log.
template <typename ReplyType>
Result<ReplyType> call(const VmDirectory& vm, const vmm::Request& request) {
  Result<VmmClient> client = VmmClient::connect(vm.control_socket(), deadline_after(std::chrono::seconds(5)));
  if (!client) return client.error().with_context(fmt::format("VM {}", vm.id()));
  Result<ReplyType> reply = client->call<ReplyType>(request, kRequestTimeout);
  if (!reply) return reply.error().with_context(fmt::format("VM {} ({})", vm.id(), tail_of_log(vm.log_file())));
  return reply;
}

class KvmBackend : public Backend {
 public:
  explicit KvmBackend(vmm::MemoryStrategy strategy) : strategy_(strategy) {}

  std::string name() const override { return "kvm"; }
  std::string describe() const override {
    return fmt::format("deltavm-vmm ({}), restores with {} memory: {}", default_vmm_binary().string(),
                       vmm::memory_strategy_name(strategy_), describe_kvm_device());
  }

  Status boot(const MachineSpec& machine, const std::filesystem::path& ram_file, const VmDirectory& vm) override {
    // A booting VM exists only for the build that boots it: it dies with its owner.
    DELTAVM_TRY(launch(vm, machine, ram_file, {machine.kernel, machine.initramfs}, /*die_with_parent=*/true));
    vmm::BootLinuxRequest request;
    request.kernel = machine.kernel.string();
    request.initrd = machine.initramfs.string();
    request.command_line = machine.command_line + std::string(kBootArguments);
    request.memory_bytes = machine.memory_bytes;
    request.vcpus = machine.vcpus;
    request.ram_file = ram_file.string();
    return call<vmm::StatusReply>(vm, request).status();
  }

  Status pause(const VmDirectory& vm) override { return call<vmm::StatusReply>(vm, vmm::PauseRequest{}).status(); }

  Result<std::vector<uint8_t>> save_machine_state(const VmDirectory& vm) override {
    std::filesystem::path state = vm.process_directory() / "state.out";
    vmm::SaveRequest request;
    request.state = state.string();
    DELTAVM_TRY(call<vmm::SaveReply>(vm, request).status());
    DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, read_file(state, vmm::kMaxStateBytes, O_NOFOLLOW));
    std::error_code error;
    std::filesystem::remove(state, error);
    return bytes;
  }

  Result<RestoreTimings> restore(const MachineSpec& machine, const std::filesystem::path& base_ram_file,
                                 const FillMemory& fill, std::span<const uint8_t> machine_state, const VmDirectory& vm,
                                 bool leave_paused) override {
    RestoreTimings timings;
    Clock::time_point start = Clock::now();
    // The loader's pages go into an overlay file the VMM maps; then the VMM starts. Both files
    // live as long as the VM: nothing to keep across a crash, so no fsync.
    std::filesystem::path overlay_path = vm.path() / "overlay";
    DELTAVM_ASSIGN_OR_RETURN(vmm::RamOverlayWriter overlay, vmm::RamOverlayWriter::create(overlay_path));
    OverlayMemoryWriter writer(overlay);
    DELTAVM_TRY(fill(writer));
    DELTAVM_TRY(overlay.commit());
    std::filesystem::path state_path = vm.path() / "state";
    DELTAVM_TRY(write_scratch_file(state_path, machine_state));
    timings.fill_ms = elapsed_ms(start);

    start = Clock::now();
    DELTAVM_TRY(
        launch(vm, machine, base_ram_file, {base_ram_file, overlay_path, state_path}, /*die_with_parent=*/false));
    timings.launch_ms = elapsed_ms(start);
    start = Clock::now();
    vmm::RestoreRequest request;
    request.state = state_path.string();
    request.base = base_ram_file.string();
    request.overlay = overlay_path.string();
    request.strategy = strategy_;
    request.start.paused = leave_paused;
    // The guest's writes from its first instruction on are logged: a snapshot captures them.
    request.start.log_dirty = true;
    DELTAVM_TRY(call<vmm::StatusReply>(vm, request).status());
    timings.state_ms = elapsed_ms(start);
    return timings;
  }

  bool restore_needs_boot_files() const override { return false; }

  Status resume(const VmDirectory& vm) override { return call<vmm::StatusReply>(vm, vmm::ResumeRequest{}).status(); }

  Result<RamChanges> capture_changes(const VmDirectory& vm, std::span<uint8_t> ram,
                                     const CaptureOptions& options) override {
    std::filesystem::path state_path = vm.process_directory() / "state.out";
    std::filesystem::path changes_path = vm.process_directory() / "changes.out";
    vmm::SaveRequest request;
    request.state = state_path.string();
    request.changes = changes_path.string();
    request.digest = true;
    DELTAVM_ASSIGN_OR_RETURN(vmm::SaveReply reply, call<vmm::SaveReply>(vm, request));
    if (!reply.ram_digest) return make_error(ErrorCode::kIo, "VM {}: the VMM sent no RAM digest", vm.id());
    std::error_code error;
    // What the VM process wrote: read with O_NOFOLLOW and bounded, then checked to the byte.
    Result<std::vector<uint8_t>> state = read_file(state_path, vmm::kMaxStateBytes, O_NOFOLLOW);
    uint64_t pages = ram.size() / kPageSize;
    uint64_t bitmap_bytes = (pages + 7) / 8;
    Result<Mapping> changes = Mapping::map_file_readonly(changes_path, O_NOFOLLOW);
    std::filesystem::remove(state_path, error);
    std::filesystem::remove(changes_path, error);
    if (!state) return state.error();
    if (!changes) return changes.error();
    std::span<const uint8_t> bytes = changes->bytes();
    if (bytes.size() < bitmap_bytes || (bytes.size() - bitmap_bytes) % kPageSize != 0 ||
        bytes.size() > bitmap_bytes + ram.size()) {
      return make_error(ErrorCode::kCorruption, "VM {}: a changes file of {} bytes for {} pages of RAM", vm.id(),
                        bytes.size(), pages);
    }
    RamChanges captured;
    const uint8_t* page_bytes = bytes.data() + bitmap_bytes;
    uint64_t listed = (bytes.size() - bitmap_bytes) / kPageSize;
    std::vector<const uint8_t*> sources;
    for (uint64_t page = 0; page < pages; ++page) {
      if (((bytes[page / 8] >> (page % 8)) & 1) == 0) continue;
      if (captured.pages.size() == listed) {
        return make_error(ErrorCode::kCorruption, "VM {}: the changes file marks more pages than it holds", vm.id());
      }
      sources.push_back(page_bytes + captured.pages.size() * kPageSize);
      captured.pages.push_back(page);
    }
    if (captured.pages.size() != listed) {
      return make_error(ErrorCode::kCorruption, "VM {}: the changes file holds more pages than it marks", vm.id());
    }
    // For tests: the last pages that differ left out, as a capture that missed them would.
    for (size_t i = captured.pages.size(), left = options.omit_pages_for_testing; i > 0 && left > 0; --i) {
      const uint8_t* current = ram.data() + captured.pages[i - 1] * kPageSize;
      if (std::equal(sources[i - 1], sources[i - 1] + kPageSize, current)) continue;
      captured.pages.erase(captured.pages.begin() + static_cast<ptrdiff_t>(i - 1));
      sources.erase(sources.begin() + static_cast<ptrdiff_t>(i - 1));
      --left;
    }
    for (size_t i = 0; i < captured.pages.size(); ++i) {
      std::copy_n(sources[i], kPageSize, ram.data() + captured.pages[i] * kPageSize);
    }
    // The witness: the VMM's digest of the whole RAM, taken in the same pause.
    captured.check = [expected = *reply.ram_digest, state = std::move(*state),
                      id = vm.id()](std::span<const uint8_t> image) -> Result<std::vector<uint8_t>> {
      XXH128_hash_t hash = XXH3_128bits(image.data(), image.size());
      std::string actual = fmt::format("{:016x}{:016x}", hash.high64, hash.low64);
      if (actual != expected) {
        return make_error(ErrorCode::kCorruption,
                          "VM {}: the capture's digest {} differs from the VM's RAM's {}: a changed page was missed, "
                          "so the snapshot is refused",
                          id, actual, expected);
      }
      return state;
    };
    return captured;
  }

  Status read_memory(const VmDirectory& vm, std::span<uint8_t> out) override {
    std::filesystem::path ram = vm.process_directory() / "ram.out";
    vmm::SaveRequest request;
    request.ram = ram.string();
    DELTAVM_TRY(call<vmm::SaveReply>(vm, request).status());
    DELTAVM_ASSIGN_OR_RETURN(Mapping mapping, Mapping::map_file_readonly(ram, O_NOFOLLOW));
    if (out.size() > mapping.size()) {
      return make_error(ErrorCode::kInvalidArgument, "VM {} has {} bytes of RAM, {} asked", vm.id(), mapping.size(),
                        out.size());
    }
    std::copy_n(mapping.data(), out.size(), out.data());
    std::error_code error;
    std::filesystem::remove(ram, error);
    return {};
  }

  std::optional<std::string> ended(const VmDirectory& vm) override { return processes_.ended(vm); }

  Status stop(const VmDirectory& vm) override {
    return processes_.stop(vm, [&] {
      Result<VmmClient> client = VmmClient::connect(vm.control_socket(), deadline_after(std::chrono::seconds(2)));
      if (client) (void)client->call<vmm::QuitReply>(vmm::QuitRequest{}, std::chrono::seconds(2));
    });
  }

 private:
  // Starts the VM's deltavm-vmm, records it, and waits for its control socket. The VMM may
  // write only in the VM's process directory and read only there and in `read_only` files.
  Status launch(const VmDirectory& vm, const MachineSpec& machine, const std::filesystem::path& ram_file,
                const std::vector<std::filesystem::path>& read_only, bool die_with_parent) {
    SpawnOptions options;
    options.argv = {default_vmm_binary().string(), "--directory", vm.process_directory().string(), "--control",
                    vm.control_socket().string(),  "--console",   vm.console_socket().string(),    "--console-log-fd",
                    std::to_string(kConsoleLogFd), "--agent",     vm.agent_socket().string()};
    for (const std::filesystem::path& path : read_only)
      options.argv.insert(options.argv.end(), {"--read-only", path.string()});
    DELTAVM_ASSIGN_OR_RETURN(Fd console_log,
                             open_file(vm.console_log(), O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600));
    options.pass_fds.emplace_back(console_log.get(), kConsoleLogFd);
    options.log = vm.log_file();
    options.umask = kVmProcessUmask;
    options.die_with_parent = die_with_parent;
    // The uid stays claimed until the VMM holds its lock.
    DELTAVM_ASSIGN_OR_RETURN(std::optional<Jail> jail,
                             jail_vmm(vm, read_only, machine.memory_bytes, machine.vcpus, options));
    DELTAVM_TRY(processes_.launch(vm, options, "kvm", ram_file));
    Deadline deadline = deadline_after(kLaunchTimeout);
    for (;;) {
      Result<VmmClient> client =
          VmmClient::connect(vm.control_socket(), std::min(deadline, deadline_after(std::chrono::milliseconds(50))));
      if (client) return {};
      if (std::optional<std::string> exit = processes_.exit_of(vm.id())) {
        return make_error(ErrorCode::kIo, "deltavm-vmm {} at start: {}", *exit, tail_of_log(vm.log_file()));
      }
      if (Clock::now() >= deadline) return client.error().with_context("deltavm-vmm");
    }
  }

  // Jails the VMM about to start for `vm` (backends/jail.h) when the policy says so. It opens
  // what needs root (/dev/kvm, its sockets, a userfaultfd), then takes a root of its own with
  // only its process directory and `read_only` in it and becomes the jail uid
  // (vmm/jail_entry.h). The files of `read_only` that the host wrote into the VM's directory
  // become the jail uid's, so that it can read them; the rest must be readable by anyone (the
  // store's objects and the kit are). The uid stays claimed while the returned lock lives.
  Result<std::optional<Jail>> jail_vmm(const VmDirectory& vm, const std::vector<std::filesystem::path>& read_only,
                                       uint64_t memory_bytes, uint32_t vcpus, SpawnOptions& options) {
    if (!jail_policy_) return jail_policy_.error();
    if (!jail_policy_->enabled) return std::optional<Jail>();
    DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path root, jail_root(vm.runtime()));
    ResourceLimits limits = vm_process_limits(memory_bytes, vcpus, kVmmOverheadBytes);
    DELTAVM_ASSIGN_OR_RETURN(Jail jail, prepare_jail(vm.runtime(), *jail_policy_, vm.id(), limits, options));
    std::vector<std::filesystem::path> owned = {vm.process_directory()};
    for (const std::filesystem::path& path : read_only) {
      if (path.parent_path() == vm.path()) owned.push_back(path);
    }
    for (const std::filesystem::path& path : owned) {
      if (::lchown(path.c_str(), jail.uid.uid, jail.uid.uid) != 0)
        return errno_error(fmt::format("chown {}", path.string()), errno);
    }
    options.argv.insert(options.argv.end(), {"--jail-root", root.string(), "--jail-uid", std::to_string(jail.uid.uid)});
    // Mounting its root needs CAP_SYS_ADMIN, and a userfaultfd that serves KVM's (kernel-mode)
    // faults CAP_SYS_PTRACE; it loses both with the others before any guest code runs.
    *options.bounding_capabilities |= uint64_t{1} << CAP_SYS_ADMIN | uint64_t{1} << CAP_SYS_PTRACE;
    return std::optional<Jail>(std::move(jail));
  }

  VmProcesses processes_;  // The VMMs this backend started.
  vmm::MemoryStrategy strategy_;
  Result<JailPolicy> jail_policy_ = JailPolicy::from_environment();
};

}  // namespace

std::unique_ptr<Backend> make_kvm_backend() {
  vmm::MemoryStrategy strategy = vmm::MemoryStrategy::kUserfault;
  if (const char* configured = std::getenv("DELTAVM_KVM_MEMORY"); configured != nullptr && *configured) {
    if (Result<vmm::MemoryStrategy> parsed = vmm::parse_memory_strategy(configured)) strategy = *parsed;
  }
  return make_kvm_backend(strategy);
}

std::unique_ptr<Backend> make_kvm_backend(vmm::MemoryStrategy strategy) {
  return std::make_unique<KvmBackend>(strategy);
}

std::string describe_kvm_device() {
  // Only the VMM knows KVM: it says whether /dev/kvm can run its guests here.
  std::filesystem::path log = std::filesystem::path("/tmp") / fmt::format("deltavm-vmm-check-{}", ::getpid());
  SpawnOptions options;
  options.argv = {default_vmm_binary().string(), "--check"};
  options.log = log;
  Result<Subprocess> check = Subprocess::spawn(options);
  if (!check) return fmt::format("not usable: {}", check.error().message);
  Result<int> status = check->wait(deadline_after(std::chrono::seconds(10)));
  std::string said = tail_of_log(log);
  std::error_code error;
  std::filesystem::remove(log, error);
  if (!status) return fmt::format("not usable: {}", status.error().message);
  return said;
}

}  // namespace deltavm
