// One running VM of the kvm backend: the KVM VM, its RAM, one thread per vCPU with an exit
// loop, and the devices on its I/O ports. A machine is either booted or restored from a
// MachineState; either way it starts paused, and can be paused, captured and resumed.
#pragma once

#include <atomic>
#include <functional>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "backends/kvm/guest_memory.h"
#include "backends/kvm/kvm.h"
#include "backends/kvm/machine_state.h"
#include "backends/kvm/uart.h"
#include "backends/kvm/x86_boot.h"
#include "base/error.h"

namespace deltavm::kvm {

// What the micro guest has reported over its ports (guest/micro/workload.c).
struct MicroGuestReport {
  uint64_t checkpoint = 0;  // Passes completed.
  uint64_t heartbeats = 0;
  bool done = false;
  uint32_t done_status = 0;
  uint64_t checksum = 0;  // Valid when done.
};

enum class MachineRunState { kPaused, kRunning, kDone, kFailed };
std::string_view machine_run_state_name(MachineRunState state);

struct MachineStatus {
  MachineRunState state = MachineRunState::kPaused;
  std::string failure;  // Why the machine failed, when it did.
  MicroGuestReport micro;
};

// Steady-clock instants of a machine's life, for the restore benchmark.
struct MachineTimeline {
  std::chrono::steady_clock::time_point started;       // First resume().
  std::chrono::steady_clock::time_point first_step;    // Single-stepped first instruction done.
  std::chrono::steady_clock::time_point first_report;  // First port write of the guest.
};

struct MachineOptions {
  bool log_dirty = false;  // KVM dirty-page logging on the RAM slot, for delta captures.
  // Stop with a single-step exit after the first guest instruction (timed in the timeline).
  bool step_first_instruction = false;
};

class Machine {
 public:
  ~Machine();
  Machine(const Machine&) = delete;
  Machine& operator=(const Machine&) = delete;

  // A new micro guest: `program` loaded at 1 MiB, `parameters` at 0x7000, one vCPU entering
  // long mode at the program's start.
  static Result<std::unique_ptr<Machine>> boot_micro(const KvmSystem& system, GuestMemory memory,
                                                     std::span<const uint8_t> program,
                                                     const MicroGuestParameters& parameters,
                                                     const MachineOptions& options);
  // A Linux guest booted through the 64-bit boot protocol with `vcpus` vCPUs (with more than
  // one, ACPI tables describe them; with one, the kernel runs in virtual-wire mode). Bytes the
  // guest writes to ttyS0 and ttyS1 go to `serial_output(port, byte)`.
  using SerialOutput = std::function<void(int port, uint8_t byte)>;
  static Result<std::unique_ptr<Machine>> boot_linux(const KvmSystem& system, GuestMemory memory,
                                                     std::span<const uint8_t> kernel, std::span<const uint8_t> initrd,
                                                     std::string_view command_line, uint32_t vcpus,
                                                     SerialOutput serial_output, const MachineOptions& options);
  // Bytes for the guest's serial port `port` (0 or 1); returns how many it took.
  size_t serial_input(int port, std::span<const uint8_t> bytes);

  // A machine whose state comes from `state` and whose RAM is `memory`, as captured. Refuses
  // a state this host cannot run before creating anything.
  // Linux guests' serial output goes to `serial_output`, as for boot_linux.
  static Result<std::unique_ptr<Machine>> restore(const KvmSystem& system, GuestMemory memory,
                                                  const MachineState& state, const MachineOptions& options,
                                                  SerialOutput serial_output = {});

  // Runs the vCPUs; a paused machine continues where it stopped.
  Status resume();
  // Stops every vCPU at an instruction boundary with its last exit completed, so that its
  // state can be read. Returns once all are parked.
  Status pause();
  // Makes the vCPUs park themselves right after the guest reports checkpoint `checkpoint`.
  void pause_at_checkpoint(uint64_t checkpoint);
  // Waits until the machine is not running (paused, done or failed) or until `timeout`.
  MachineStatus wait(std::chrono::milliseconds timeout);
  MachineStatus status() const;
  // Waits until the guest's first port access since the machine was created (or until it
  // fails, or `timeout`); returns whether it happened.
  bool wait_first_report(std::chrono::milliseconds timeout);
  const MachineTimeline& timeline() const { return timeline_; }

  // REQUIRES: the machine is paused (or done).
  Result<MachineState> save_state();
  // Pages the guest wrote since the previous call (or since the machine was created), as a
  // little-endian bitmap with one bit per page. REQUIRES: options.log_dirty.
  Result<std::vector<uint64_t>> take_dirty_log();
  std::span<uint8_t> memory() const { return memory_.bytes(); }
  const GuestMemory& guest_memory() const { return memory_; }

 private:
  Machine(KvmVm vm, GuestMemory memory, GuestKind kind, MachineOptions options)
      : vm_(std::move(vm)), memory_(std::move(memory)), kind_(kind), options_(options) {}
  static Result<std::unique_ptr<Machine>> create(const KvmSystem& system, GuestMemory memory, GuestKind kind,
                                                 uint32_t vcpus, const MachineOptions& options);
  void run_vcpu(Vcpu& vcpu);
  // Handles one port access (an i8042 reset fails the machine).
  void handle_io(Vcpu& vcpu);
  void request_pause_locked();
  void fail(std::string reason);
  void create_serial_ports(SerialOutput serial_output);
  std::vector<uint8_t> encode_devices() const;
  Status decode_devices(std::span<const uint8_t> bytes);

  KvmVm vm_;
  GuestMemory memory_;
  GuestKind kind_;
  MachineOptions options_;
  std::vector<uint32_t> msr_indices_;
  std::string cpu_vendor_;
  std::vector<Vcpu> vcpus_;
  std::vector<std::thread> threads_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  bool run_requested_ = false;  // The vCPUs should run (as opposed to park).
  bool quit_ = false;
  size_t parked_ = 0;           // vCPU threads currently parked.
  MachineRunState state_ = MachineRunState::kPaused;
  std::string failure_;
  MicroGuestReport micro_;
  std::optional<uint64_t> pause_at_checkpoint_;
  MachineTimeline timeline_;
  std::atomic<bool> reported_{false};
  std::unique_ptr<Uart> serial_[2];  // ttyS0 (0x3f8, IRQ 4) and ttyS1 (0x2f8, IRQ 3); Linux only.
  std::mutex serial_mutex_;
};

}  // namespace deltavm::kvm
