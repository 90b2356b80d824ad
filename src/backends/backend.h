// The interface every backend implements (qemu now, kvm next): boot a machine, pause and
// capture it, restore a machine from captured state onto RAM the loader builds, stop it.
// Backends know nothing of the store: RAM comes to them as a file to map privately plus pages
// to write over it, and machine state as opaque bytes they produced themselves.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "backends/vm_directory.h"
#include "base/error.h"

namespace deltavm {

// The machine a template describes, as a backend needs it.
struct MachineSpec {
  std::filesystem::path kernel;
  std::filesystem::path initramfs;
  std::string command_line;  // Complete kernel command line.
  uint64_t memory_bytes = 0;
  uint32_t vcpus = 1;
  bool deterministic = true;  // Fixed guest clock start.
};

// One guest page to write over the base RAM before a restored VM starts.
struct PageWrite {
  uint64_t guest_physical_address;
  const uint8_t* bytes;  // kPageSize bytes.
};

// Writes pages into a VM's RAM before it runs; provided by the backend to the loader.
class GuestMemoryWriter {
 public:
  virtual ~GuestMemoryWriter() = default;
  virtual Status write_pages(std::span<const PageWrite> pages) = 0;
};

// The loader's part of a restore: writes whatever the chain changes over the base RAM.
using FillMemory = std::function<Status(GuestMemoryWriter&)>;

// Timings of a restore, for the benchmark and `deltavm run --json`.
struct RestoreTimings {
  double launch_ms = 0;  // Process start to control channel ready.
  double fill_ms = 0;    // Writing the chain's pages.
  double state_ms = 0;   // Loading the machine state.
};

// A paused VM's control connection, opened ahead of time so that resuming the VM later is a
// single exchange with its process (warm pools hold one per VM). While it is held, other
// clients of the VM's control socket wait: drop it before anything else talks to the VM.
class HeldControl {
 public:
  virtual ~HeldControl() = default;
  virtual Status resume() = 0;
};

// What Backend::capture_changes takes from a paused VM.
struct RamChanges {
  std::vector<uint64_t> pages;  // Indexes of the pages it may have changed since its load, ascending.
  // Checks the capture, `ram` with those pages written in, against the VM's whole RAM as it
  // was when captured (a page missed fails it: kCorruption), and gives the machine state.
  // Reads only what the capture took, so it runs after the VM was resumed.
  std::function<Result<std::vector<uint8_t>>(std::span<const uint8_t> ram)> check;
};

struct CaptureOptions {
  // For tests: leave out this many of the changed pages, as a faulty capture method would
  // (the check must then refuse the capture).
  uint64_t omit_pages_for_testing = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // One line on how this backend runs guests here, e.g. "qemu 7.2 with TCG: /dev/kvm is ...".
  virtual std::string describe() const = 0;

  // Boots `machine` with its RAM written through to `ram_file` (created by the backend), so
  // that after pause() the file holds the guest's RAM image exactly.
  virtual Status boot(const MachineSpec& machine, const std::filesystem::path& ram_file, const VmDirectory& vm) = 0;
  // Stops the guest's vCPUs; RAM and devices stay as they are.
  virtual Status pause(const VmDirectory& vm) = 0;
  // The machine state (vCPUs, devices, clocks) of a paused VM, without RAM.
  virtual Result<std::vector<uint8_t>> save_machine_state(const VmDirectory& vm) = 0;
  // Starts a VM from `machine_state` whose RAM is `base_ram_file` mapped privately (never
  // written) with `fill`'s pages over it. The VM runs when this returns, unless `leave_paused`:
  // then its state is loaded but no vCPU has run, until resume().
  virtual Result<RestoreTimings> restore(const MachineSpec& machine, const std::filesystem::path& base_ram_file,
                                         const FillMemory& fill, std::span<const uint8_t> machine_state,
                                         const VmDirectory& vm, bool leave_paused) = 0;
  // Whether restore() needs the machine's kernel and initramfs (QEMU's command line names them;
  // the kvm backend's VMM restores without them).
  virtual bool restore_needs_boot_files() const { return true; }
  virtual Status resume(const VmDirectory& vm) = 0;
  // A connection to paused `vm` held for one later resume. The default holds nothing and
  // connects at resume().
  virtual Result<std::unique_ptr<HeldControl>> hold_control(const VmDirectory& vm);
  // A snapshot of paused `vm`, which restore() started: writes every page the VM changed since
  // then into `ram`, which holds the image it was restored from (the base file with the
  // fill's pages over it), and returns those pages. The capture is exact by construction, and
  // RamChanges::check checks it against the VM's whole RAM as its process held it.
  virtual Result<RamChanges> capture_changes(const VmDirectory& vm, std::span<uint8_t> ram,
                                             const CaptureOptions& options) = 0;
  // Copies the VM's RAM from guest-physical address 0 into `out` (whose size must not exceed
  // the VM's memory). The VM should be paused for a consistent copy.
  virtual Status read_memory(const VmDirectory& vm, std::span<uint8_t> out) = 0;
  // How the VM's process ended ("exited with status 0"), if it has; std::nullopt while it runs.
  // A process this backend started is reaped here.
  virtual std::optional<std::string> ended(const VmDirectory& vm) = 0;
  // Ends the VM's process. Safe on a VM that has already exited.
  virtual Status stop(const VmDirectory& vm) = 0;
};

Result<std::unique_ptr<Backend>> make_backend(std::string_view name);

// The umask of every VM process: the sockets and files it creates (control, console, agent)
// are 0600, reachable by their owner alone.
inline constexpr mode_t kVmProcessUmask = 0177;

}  // namespace deltavm
