#include "vmm/machine.h"

#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>

#include <cstring>

#include "base/coding.h"
#include "base/page.h"
#include "vmm/linux_boot.h"

namespace deltavm::vmm {
namespace {

// The signal that kicks a vCPU thread out of KVM_RUN. Its handler does nothing; installed
// without SA_RESTART so that KVM_RUN returns EINTR.
int kick_signal() { return SIGRTMIN + 1; }

void install_kick_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_handler = [](int) {};
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;
    sigaction(kick_signal(), &action, nullptr);
  });
}

constexpr uint64_t kWorkAddress = 16ull << 20;
constexpr uint64_t kMaxMemoryBytes = 3ull << 30;  // Below the 32-bit MMIO hole: one slot.

}  // namespace

Machine::~Machine() {
  memory_.on_failure(nullptr);  // No report may reach a machine being destroyed.
  {
    std::lock_guard lock(mutex_);
    quit_ = true;
    request_pause_locked();
  }
  changed_.notify_all();
  for (std::thread& thread : threads_) thread.join();
}

Result<std::unique_ptr<Machine>> Machine::create(const KvmSystem& system, GuestMemory memory, GuestKind kind,
                                                 uint32_t vcpus, MachineOptions options) {
  uint64_t size = memory.bytes().size();
  if (size % kPageSize != 0 || size < (32ull << 20) || size > kMaxMemoryBytes) {
    return make_error(ErrorCode::kInvalidArgument,
                      "guest RAM of {} bytes: expected a multiple of 4 KiB from 32 MiB to 3 GiB", size);
  }
  install_kick_handler();
  DELTAVM_ASSIGN_OR_RETURN(KvmVm vm, system.create_vm());
  DELTAVM_TRY(vm.set_memory(0, 0, memory.bytes(), options.log_dirty));
  std::unique_ptr<Machine> machine(new Machine(std::move(vm), std::move(memory), kind, std::move(options)));
  // A guest page that cannot be provided fails the machine rather than leaving a vCPU waiting.
  machine->memory_.on_failure([raw = machine.get()](std::string reason) { raw->fail(std::move(reason)); });
  DELTAVM_ASSIGN_OR_RETURN(machine->msr_indices_, system.msr_index_list());
  machine->cpu_vendor_ = host_cpu_vendor();
  for (uint32_t i = 0; i < vcpus; ++i) {
    DELTAVM_ASSIGN_OR_RETURN(Vcpu vcpu, Vcpu::create(system, machine->vm_, i));
    machine->vcpus_.push_back(std::move(vcpu));
  }
  return machine;
}

Result<std::unique_ptr<Machine>> Machine::boot_micro(const KvmSystem& system, GuestMemory memory,
                                                     std::span<const uint8_t> program,
                                                     const MicroGuestParameters& parameters,
                                                     const MachineOptions& options) {
  DELTAVM_TRY(check_micro_program(program, "micro guest program"));
  uint64_t size = memory.bytes().size();
  if (parameters.work_address < kWorkAddress || parameters.work_bytes % kPageSize != 0 ||
      parameters.work_address + parameters.work_bytes > size) {
    return make_error(ErrorCode::kInvalidArgument,
                      "micro guest work area [{:#x}, +{:#x}) is not inside RAM above 16 MiB", parameters.work_address,
                      parameters.work_bytes);
  }
  DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Machine> machine,
                           create(system, std::move(memory), GuestKind::kMicro, 1, options));
  std::span<uint8_t> ram = machine->memory();
  write_boot_tables(ram, /*user_accessible=*/true);
  std::memcpy(ram.data() + kProgramAddress, program.data(), program.size());
  std::memcpy(ram.data() + kBootParamsAddress, &parameters, sizeof parameters);
  DELTAVM_ASSIGN_OR_RETURN(std::vector<kvm_cpuid_entry2> supported, system.supported_cpuid());
  DELTAVM_TRY(configure_long_mode_vcpu(machine->vcpus_[0], normalize_cpuid(supported, 0, 1), kProgramAddress, 0,
                                       kBootParamsAddress));
  DELTAVM_TRY(machine->attach_devices({}));
  machine->start_vcpu_threads();
  return machine;
}

Result<std::unique_ptr<Machine>> Machine::boot_linux(const KvmSystem& system, GuestMemory memory,
                                                     std::span<const uint8_t> kernel, std::span<const uint8_t> initrd,
                                                     std::string_view command_line, uint32_t vcpus,
                                                     SerialOutput serial_output, const MachineOptions& options) {
  if (vcpus == 0 || vcpus > 64) {
    return make_error(ErrorCode::kInvalidArgument, "{} vCPUs asked, expected 1 to 64", vcpus);
  }
  DELTAVM_ASSIGN_OR_RETURN(std::unique_ptr<Machine> machine,
                           create(system, std::move(memory), GuestKind::kLinux, vcpus, options));
  DELTAVM_ASSIGN_OR_RETURN(LinuxBootInfo boot,
                           load_linux(machine->memory(), kernel, initrd, command_line, "kernel", vcpus));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<kvm_cpuid_entry2> supported, system.supported_cpuid());
  DELTAVM_TRY(configure_long_mode_vcpu(machine->vcpus_[0], normalize_cpuid(supported, 0, vcpus), boot.entry,
                                       boot.boot_params, 0));
  for (uint32_t i = 1; i < vcpus; ++i) {
    DELTAVM_TRY(configure_vcpu(machine->vcpus_[i], normalize_cpuid(supported, i, vcpus)));
  }
  DELTAVM_TRY(machine->attach_devices(std::move(serial_output)));
  machine->start_vcpu_threads();
  return machine;
}

Status Machine::attach_devices(SerialOutput serial_output) {
  if (kind_ == GuestKind::kMicro) {
    micro_guest_ = std::make_unique<MicroGuestDevice>([this] { request_pause(); }, [this] { finish(); });
    return bus_.add(MicroGuestDevice::kFirstPort, MicroGuestDevice::kPortCount, *micro_guest_, "micro guest reports");
  }
  if (!serial_output) serial_output = [](int, uint8_t) {};
  static constexpr uint16_t kBase[2] = {0x3f8, 0x2f8};
  static constexpr uint32_t kIrq[2] = {4, 3};
  for (int port = 0; port < 2; ++port) {
    serial_[port] = std::make_unique<SerialPortDevice>(
        kBase[port], [this, irq = kIrq[port]](bool level) { (void)vm_.set_irq_line(irq, level); },
        [serial_output, port](uint8_t byte) { serial_output(port, byte); });
    DELTAVM_TRY(bus_.add(kBase[port], SerialPortDevice::kPortCount, *serial_[port], fmt::format("ttyS{}", port)));
  }
  // i8042 pulse of the reset line: how `reboot=k` restarts; the VM ends.
  reset_ = std::make_unique<ResetPortDevice>([this] { fail("guest reset itself (i8042 reset)"); });
  return bus_.add(ResetPortDevice::kPort, 1, *reset_, "i8042 reset");
}

void Machine::start_vcpu_threads() {
  for (Vcpu& vcpu : vcpus_) threads_.emplace_back([this, &vcpu] { run_vcpu(vcpu); });
}

size_t Machine::serial_input(int port, std::span<const uint8_t> bytes) {
  if (port < 0 || port > 1 || !serial_[port]) return 0;
  return serial_[port]->receive(bytes);
}

Result<std::unique_ptr<Machine>> Machine::restore(const KvmSystem& system, GuestMemory memory,
                                                  const MachineState& state, const MachineOptions& options,
                                                  SerialOutput serial_output) {
  if (state.cpu_vendor != host_cpu_vendor()) {
    return check_host_compatibility(state, host_cpu_vendor(), state.tsc_khz, memory.bytes().size()).error();
  }
  uint64_t memory_bytes = memory.bytes().size();
  DELTAVM_ASSIGN_OR_RETURN(
      std::unique_ptr<Machine> machine,
      create(system, std::move(memory), state.kind, static_cast<uint32_t>(state.vcpus.size()), options));
  DELTAVM_ASSIGN_OR_RETURN(uint32_t host_tsc_khz, machine->vcpus_[0].tsc_khz());
  DELTAVM_TRY(check_host_compatibility(state, machine->cpu_vendor_, host_tsc_khz, memory_bytes));
  // Ordering (Firecracker's restore, brief §3.4): every vCPU exists before any state is set;
  // vCPU state, then the VM's (PIT, clock, irqchips), then the devices, so that nothing a
  // device raises is overwritten by the irqchip state.
  for (size_t i = 0; i < state.vcpus.size(); ++i) {
    Status restored = machine->vcpus_[i].restore_state(state.vcpus[i]);
    if (!restored) return restored.error().with_context(fmt::format("restoring vCPU {}", i));
  }
  DELTAVM_TRY(machine->vm_.restore_state(state.vm));
  DELTAVM_TRY(machine->attach_devices(std::move(serial_output)));
  DELTAVM_TRY(machine->decode_devices(state.devices));
  machine->start_vcpu_threads();
  return machine;
}

Status Machine::resume() {
  std::lock_guard lock(mutex_);
  if (state_ == RunState::kFailed) return make_error(ErrorCode::kInvalidArgument, "machine failed: {}", failure_);
  if (state_ == RunState::kDone) return make_error(ErrorCode::kInvalidArgument, "the guest has finished");
  run_requested_ = true;
  state_ = RunState::kRunning;
  changed_.notify_all();
  return {};
}

void Machine::request_pause() {
  std::lock_guard lock(mutex_);
  request_pause_locked();
  changed_.notify_all();
}

void Machine::finish() {
  std::lock_guard lock(mutex_);
  if (state_ == RunState::kRunning) state_ = RunState::kDone;
  request_pause_locked();
  changed_.notify_all();
}

void Machine::request_pause_locked() {
  run_requested_ = false;
  for (size_t i = 0; i < vcpus_.size(); ++i) {
    vcpus_[i].run()->immediate_exit = 1;
    if (i < threads_.size()) pthread_kill(threads_[i].native_handle(), kick_signal());
  }
}

Status Machine::pause() {
  std::unique_lock lock(mutex_);
  request_pause_locked();
  changed_.wait(lock, [&] { return parked_ == threads_.size(); });
  if (state_ == RunState::kRunning) state_ = RunState::kPaused;
  // Tell a kvmclock guest it was paused, so that its soft-lockup watchdog does not fire on
  // resume (Firecracker does the same). EINVAL when the guest never enabled kvmclock.
  for (Vcpu& vcpu : vcpus_) (void)::ioctl(vcpu.fd(), KVM_KVMCLOCK_CTRL, 0);
  return {};
}

MachineStatus Machine::wait(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  changed_.wait_for(lock, timeout, [&] { return !run_requested_ && parked_ == threads_.size(); });
  if (!run_requested_ && parked_ == threads_.size() && state_ == RunState::kRunning) state_ = RunState::kPaused;
  return MachineStatus{state_, failure_};
}

MachineStatus Machine::status() const {
  std::lock_guard lock(mutex_);
  return MachineStatus{state_, failure_};
}

void Machine::fail(std::string reason) {
  std::lock_guard lock(mutex_);
  if (state_ != RunState::kFailed) {
    state_ = RunState::kFailed;
    failure_ = std::move(reason);
  }
  request_pause_locked();
  changed_.notify_all();
}

void Machine::run_vcpu(Vcpu& vcpu) {
  kvm_run* run = vcpu.run();
  bool exit_pending = false;  // The last KVM_RUN returned an exit that KVM completes on re-entry.
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      if (!run_requested_ || quit_) {
        if (exit_pending && !quit_) {
          // Re-enter once with immediate_exit set: KVM completes the pending port access
          // and returns EINTR at once, so the saved state is consistent (api.rst, KVM_RUN).
          run->immediate_exit = 1;
          lock.unlock();
          ::ioctl(vcpu.fd(), KVM_RUN, 0);
          lock.lock();
          exit_pending = false;
        }
        ++parked_;
        changed_.notify_all();
        changed_.wait(lock, [&] { return run_requested_ || quit_; });
        --parked_;
        if (quit_) return;
        run->immediate_exit = 0;
      }
    }
    int result = ::ioctl(vcpu.fd(), KVM_RUN, 0);
    if (result < 0) {
      exit_pending = false;
      if (errno == EINTR || errno == EAGAIN) continue;  // Kicked, or an AP not started yet.
      fail(fmt::format("vCPU {}: KVM_RUN: {}", vcpu.index(), std::strerror(errno)));
      continue;
    }
    exit_pending = true;
    switch (run->exit_reason) {
      case KVM_EXIT_IO: handle_io(vcpu); break;
      case KVM_EXIT_DEBUG:
        if (options_.on_debug_exit) {
          options_.on_debug_exit(vcpu);
        } else {
          fail(fmt::format("vCPU {}: unexpected debug exit", vcpu.index()));
        }
        break;
      case KVM_EXIT_HLT:
        fail(fmt::format("vCPU {}: guest halted with interrupts the VMM cannot deliver", vcpu.index()));
        break;
      case KVM_EXIT_SHUTDOWN:
        fail(fmt::format("vCPU {}: guest shut down (triple fault) at rip {:#x}", vcpu.index(),
                         vcpu.regs() ? vcpu.regs()->rip : 0));
        break;
      case KVM_EXIT_FAIL_ENTRY:
        fail(fmt::format("vCPU {}: KVM_EXIT_FAIL_ENTRY, hardware reason {:#x}", vcpu.index(),
                         run->fail_entry.hardware_entry_failure_reason));
        break;
      case KVM_EXIT_INTERNAL_ERROR:
        fail(fmt::format("vCPU {}: KVM_EXIT_INTERNAL_ERROR, suberror {}", vcpu.index(), run->internal.suberror));
        break;
      default: fail(fmt::format("vCPU {}: unexpected exit reason {}", vcpu.index(), run->exit_reason)); break;
    }
  }
}

void Machine::handle_io(Vcpu& vcpu) {
  if (!port_accessed_.exchange(true) && options_.on_first_port_access) options_.on_first_port_access();
  const kvm_run* run = vcpu.run();
  std::span<uint8_t> data = vcpu.io_data();
  if (run->io.direction == KVM_EXIT_IO_IN) {
    bus_.read(run->io.port, data);
  } else {
    bus_.write(run->io.port, data);
  }
}

Result<MachineState> Machine::save_state() {
  std::lock_guard lock(mutex_);
  if (run_requested_ || parked_ != threads_.size()) {
    return make_error(ErrorCode::kInvalidArgument, "machine state can only be saved while the machine is paused");
  }
  MachineState state;
  state.cpu_vendor = cpu_vendor_;
  state.memory_bytes = memory_.bytes().size();
  state.kind = kind_;
  for (const Vcpu& vcpu : vcpus_) {
    Result<VcpuState> saved = vcpu.save_state(msr_indices_);
    if (!saved) return saved.error().with_context(fmt::format("saving vCPU {}", vcpu.index()));
    state.vcpus.push_back(std::move(saved).value());
  }
  state.tsc_khz = state.vcpus[0].tsc_khz;
  DELTAVM_ASSIGN_OR_RETURN(state.vm, vm_.save_state());
  state.devices = encode_devices();
  return state;
}

Result<std::vector<uint64_t>> Machine::take_dirty_log() {
  if (!options_.log_dirty) {
    return make_error(ErrorCode::kInvalidArgument, "dirty-page logging is off for this machine");
  }
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint64_t> log, vm_.take_dirty_log(0, memory_.bytes().size() / kPageSize));
  dirty_since_start_.resize(log.size(), 0);
  for (size_t i = 0; i < log.size(); ++i) dirty_since_start_[i] |= log[i];
  return log;
}

Result<std::vector<uint64_t>> Machine::dirty_since_start() {
  DELTAVM_TRY(take_dirty_log().status());
  return dirty_since_start_;
}

// The devices' state, in machine state format version 1's encoding: a Linux guest's two UARTs
// (each a u32 length and its bytes), or the micro guest's 32-byte report.
std::vector<uint8_t> Machine::encode_devices() const {
  if (micro_guest_) return micro_guest_->save();
  std::vector<uint8_t> out;
  for (const auto& serial : serial_) {
    std::vector<uint8_t> state = serial->save();
    put_u32_le(out, static_cast<uint32_t>(state.size()));
    out.insert(out.end(), state.begin(), state.end());
  }
  return out;
}

Status Machine::decode_devices(std::span<const uint8_t> bytes) {
  if (micro_guest_) {
    DELTAVM_TRY(micro_guest_->restore(bytes));
    if (micro_guest_->report().done) state_ = RunState::kDone;
    return {};
  }
  ByteReader reader(bytes);
  for (auto& serial : serial_) {
    auto length = reader.take(4);
    auto state = length ? reader.take(get_u32_le(length->data())) : std::nullopt;
    if (!state) return make_error(ErrorCode::kCorruption, "device state: serial port state truncated");
    DELTAVM_TRY(serial->restore(*state));
  }
  if (!reader.at_end()) {
    return make_error(ErrorCode::kCorruption, "device state: {} bytes after the serial ports", reader.remaining());
  }
  return {};
}

}  // namespace deltavm::vmm
