// Instrumentation for the restore benchmark (bench/kvm_restore.cc), kept out of the machine:
// when a restored guest ran its first instruction (vCPU 0 single-stepped once) and when it
// first touched a port (the micro guest's first report). Times are measured from `origin`.
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "vmm/machine.h"

namespace deltavm::vmm {

class RestoreProbe {
 public:
  using Clock = std::chrono::steady_clock;

  RestoreProbe(Clock::time_point origin, bool step_first_instruction);

  // Hooks the probe into a machine about to be made with `options`.
  void attach(MachineOptions& options);
  // Before the machine first runs: arms the single step, if asked.
  Status arm(Machine& machine);
  // Waits until the guest's first port access, or its failure, or `timeout`.
  void wait_first_report(Machine& machine, std::chrono::milliseconds timeout);
  // Microseconds from the origin; -1 for what has not happened.
  double first_instruction_us() const;
  double first_report_us() const;

 private:
  struct Times {
    std::mutex mutex;
    std::condition_variable changed;
    Clock::time_point first_step{};
    Clock::time_point first_report{};
  };
  Clock::time_point origin_;
  bool step_first_instruction_;
  std::shared_ptr<Times> times_ = std::make_shared<Times>();
};

// The floor of any restore on this host: a bare VM with one page of code and one vCPU in real
// mode, from nothing to its first exit (an OUT). Microseconds.
Result<double> measure_floor(const KvmSystem& system);

}  // namespace deltavm::vmm
