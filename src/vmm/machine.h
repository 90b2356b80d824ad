// One running VM of the kvm backend: the KVM VM, its RAM, one thread per vCPU with an exit
// loop, and the devices on its I/O ports. A machine is either booted or restored from a
// MachineState; either way it starts paused, and can be paused, captured and resumed.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "vmm/guest_memory.h"
#include "vmm/io_bus.h"
#include "vmm/kvm.h"
#include "vmm/machine_state.h"
#include "vmm/micro_guest_device.h"
#include "vmm/pc_devices.h"
#include "vmm/protocol.h"
#include "vmm/x86_boot.h"

namespace deltavm::vmm {

struct MachineStatus {
  RunState state = RunState::kPaused;
  std::string failure;  // Why the machine failed, when it did.
};

struct MachineOptions {
  bool log_dirty = false;  // KVM dirty-page logging on the RAM slot, for delta captures.
  // Instrumentation hooks (the restore benchmark's probes use them; vmm/restore_probe.h):
  // called on the guest's first port access, and on a KVM_EXIT_DEBUG (a single step), which
  // otherwise fails the machine.
  std::function<void()> on_first_port_access;
  std::function<void(Vcpu& vcpu)> on_debug_exit;
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
  // The micro guest's report device, or nullptr for a Linux guest.
  MicroGuestDevice* micro_guest() const { return micro_guest_.get(); }

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
  // Asks the vCPUs to park without waiting for them (from a device, on a vCPU thread).
  void request_pause();
  // The guest has finished (the micro guest's done report): the machine is done and parks.
  void finish();
  // Waits until the machine is not running (paused, done or failed) or until `timeout`.
  MachineStatus wait(std::chrono::milliseconds timeout);
  MachineStatus status() const;
  // A vCPU, for instrumentation that must touch it before the machine first runs.
  // REQUIRES: index < the machine's vCPU count.
  Vcpu& vcpu(size_t index) { return vcpus_[index]; }

  // REQUIRES: the machine is paused (or done).
  Result<MachineState> save_state();
  // Pages the guest wrote since the previous call (or since the machine was created), as a
  // little-endian bitmap with one bit per page. REQUIRES: options.log_dirty.
  Result<std::vector<uint64_t>> take_dirty_log();
  // Pages the guest wrote since the machine was created: every take_dirty_log so far, and the
  // log since, together. REQUIRES: options.log_dirty.
  Result<std::vector<uint64_t>> dirty_since_start();
  std::span<uint8_t> memory() const { return memory_.bytes(); }
  const GuestMemory& guest_memory() const { return memory_; }

 private:
  Machine(KvmVm vm, GuestMemory memory, GuestKind kind, MachineOptions options)
      : vm_(std::move(vm)), memory_(std::move(memory)), kind_(kind), options_(std::move(options)) {}
  static Result<std::unique_ptr<Machine>> create(const KvmSystem& system, GuestMemory memory, GuestKind kind,
                                                 uint32_t vcpus, MachineOptions options);
  // The devices of the machine's kind on its port-I/O bus.
  Status attach_devices(SerialOutput serial_output);
  void start_vcpu_threads();
  void run_vcpu(Vcpu& vcpu);
  void handle_io(Vcpu& vcpu);
  void request_pause_locked();
  void fail(std::string reason);
  std::vector<uint8_t> encode_devices() const;
  Status decode_devices(std::span<const uint8_t> bytes);

  KvmVm vm_;
  GuestMemory memory_;
  GuestKind kind_;
  MachineOptions options_;
  std::vector<uint64_t> dirty_since_start_;  // What take_dirty_log has returned, together.
  std::vector<uint32_t> msr_indices_;
  std::string cpu_vendor_;
  std::vector<Vcpu> vcpus_;
  std::vector<std::thread> threads_;

  IoBus bus_;
  std::unique_ptr<SerialPortDevice> serial_[2];  // ttyS0 (0x3f8, IRQ 4), ttyS1 (0x2f8, IRQ 3); Linux.
  std::unique_ptr<ResetPortDevice> reset_;       // Linux.
  std::unique_ptr<MicroGuestDevice> micro_guest_;
  std::atomic<bool> port_accessed_{false};

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  bool run_requested_ = false;  // The vCPUs should run (as opposed to park).
  bool quit_ = false;
  size_t parked_ = 0;  // vCPU threads currently parked.
  RunState state_ = RunState::kPaused;
  std::string failure_;
};

}  // namespace deltavm::vmm
