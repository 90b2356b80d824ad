#include "vmm/restore_probe.h"

#include <sys/ioctl.h>

#include <cstring>

namespace deltavm::vmm {
namespace {

double microseconds_between(RestoreProbe::Clock::time_point from, RestoreProbe::Clock::time_point to) {
  if (to == RestoreProbe::Clock::time_point{}) return -1;
  return std::chrono::duration<double, std::micro>(to - from).count();
}

}  // namespace

RestoreProbe::RestoreProbe(Clock::time_point origin, bool step_first_instruction)
    : origin_(origin), step_first_instruction_(step_first_instruction) {}

void RestoreProbe::attach(MachineOptions& options) {
  std::shared_ptr<Times> times = times_;
  options.on_first_port_access = [times] {
    std::lock_guard lock(times->mutex);
    times->first_report = Clock::now();
    times->changed.notify_all();
  };
  options.on_debug_exit = [times](Vcpu& vcpu) {
    {
      std::lock_guard lock(times->mutex);
      if (times->first_step == Clock::time_point{}) times->first_step = Clock::now();
    }
    (void)vcpu.set_single_step(false);
  };
}

Status RestoreProbe::arm(Machine& machine) {
  if (!step_first_instruction_) return {};
  return machine.vcpu(0).set_single_step(true);
}

void RestoreProbe::wait_first_report(Machine& machine, std::chrono::milliseconds timeout) {
  Clock::time_point deadline = Clock::now() + timeout;
  std::unique_lock lock(times_->mutex);
  while (times_->first_report == Clock::time_point{} && Clock::now() < deadline) {
    lock.unlock();
    if (machine.status().state == RunState::kFailed) return;
    lock.lock();
    times_->changed.wait_for(lock, std::chrono::milliseconds(10));
  }
}

double RestoreProbe::first_instruction_us() const {
  std::lock_guard lock(times_->mutex);
  return microseconds_between(origin_, times_->first_step);
}

double RestoreProbe::first_report_us() const {
  std::lock_guard lock(times_->mutex);
  return microseconds_between(origin_, times_->first_report);
}

Result<double> measure_floor(const KvmSystem& system) {
  using Clock = RestoreProbe::Clock;
  Clock::time_point start = Clock::now();
  DELTAVM_ASSIGN_OR_RETURN(KvmVm vm, system.create_bare_vm());
  DELTAVM_ASSIGN_OR_RETURN(GuestMemory memory, GuestMemory::anonymous(1 << 16));
  static constexpr uint8_t kCode[] = {0xe6, 0x10, 0xf4};  // out 0x10, al; hlt
  std::memcpy(memory.bytes().data() + 0x1000, kCode, sizeof kCode);
  DELTAVM_TRY(vm.set_memory(0, 0, memory.bytes(), false));
  DELTAVM_ASSIGN_OR_RETURN(Vcpu vcpu, Vcpu::create(system, vm, 0));
  DELTAVM_ASSIGN_OR_RETURN(kvm_sregs sregs, vcpu.sregs());
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  DELTAVM_TRY(vcpu.set_sregs(sregs));
  kvm_regs regs{};
  regs.rip = 0x1000;
  regs.rflags = 0x2;
  DELTAVM_TRY(vcpu.set_regs(regs));
  if (::ioctl(vcpu.fd(), KVM_RUN, 0) < 0) return errno_error("KVM_RUN (floor)", errno);
  Clock::time_point exited = Clock::now();
  if (vcpu.run()->exit_reason != KVM_EXIT_IO || vcpu.run()->io.port != 0x10) {
    return make_error(ErrorCode::kIo, "floor guest: exit reason {}, expected an OUT to port 0x10",
                      vcpu.run()->exit_reason);
  }
  return microseconds_between(start, exited);
}

}  // namespace deltavm::vmm
