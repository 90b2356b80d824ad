#include "base/faults.h"

#include <unistd.h>

#include <atomic>

namespace deltavm {
namespace {

std::atomic<bool> armed{false};
std::atomic<uint64_t> calls{0};
std::atomic<uint64_t> fail_call{0};
std::atomic<int> fail_error{0};
std::atomic<bool> crash{false};

}  // namespace

void arm_faults(const FaultPlan& plan) {
  calls.store(0);
  fail_call.store(plan.fail_call);
  fail_error.store(plan.error);
  crash.store(plan.crash);
  armed.store(true);
}

void disarm_faults() { armed.store(false); }

uint64_t fault_calls_seen() { return calls.load(); }

int injected_fault(DurableCall) {
  if (!armed.load(std::memory_order_relaxed)) return 0;
  uint64_t index = calls.fetch_add(1) + 1;
  if (index != fail_call.load()) return 0;
  if (crash.load()) ::_exit(kCrashExitStatus);
  return fail_error.load();
}

}  // namespace deltavm
