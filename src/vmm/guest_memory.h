// Guest RAM of one kvm-backend VM and the three ways a restored VM gets it from a base image
// plus the pages a delta chain changes over it (the overlay):
//   eager:     fresh anonymous memory; every non-zero base page and every overlay page copied
//              in before the VM starts;
//   private:   the immutable base file mapped MAP_PRIVATE (pages come from the page cache on
//              first touch, copied on first write); only overlay pages written before start;
//   userfault: fresh anonymous memory registered with userfaultfd; a server thread answers each
//              first touch with the overlay's page, the base's page (UFFDIO_COPY) or the zero
//              page (UFFDIO_ZEROPAGE). Nothing is copied before start.
// The base file is never written through any of them.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "base/error.h"
#include "base/file.h"
#include "vmm/protocol.h"
#include "vmm/ram_overlay.h"

namespace deltavm::vmm {

// Counters of a userfault-served VM, read while it runs.
struct UserfaultStats {
  std::atomic<uint64_t> overlay_pages{0};
  std::atomic<uint64_t> base_pages{0};
  std::atomic<uint64_t> zero_pages{0};
};

class UserfaultServer;

class GuestMemory {
 public:
  GuestMemory();
  GuestMemory(GuestMemory&&) noexcept;
  GuestMemory& operator=(GuestMemory&&) noexcept;
  ~GuestMemory();

  // Fresh zeroed memory, for a boot that is not captured.
  static Result<GuestMemory> anonymous(uint64_t size_bytes);
  // Memory that lives in `file` (created, `size_bytes` long, mapped shared), so that the file
  // holds the guest's RAM image whenever the VM is paused. For capturing a boot.
  static Result<GuestMemory> shared_file(const std::filesystem::path& file, uint64_t size_bytes);
  // RAM of a restored VM: `base` (exactly `size_bytes` long) with `overlay` over it. The
  // userfault strategy serves faults through `userfault` (from create_userfaultfd).
  static Result<GuestMemory> load(MemoryStrategy strategy, const std::filesystem::path& base, RamOverlay overlay,
                                  uint64_t size_bytes, Fd userfault);
  // A userfaultfd that can serve KVM's faults, which come from the kernel: made at start-up,
  // while the VMM still runs as root, since an unprivileged process may not make one (unless
  // vm.unprivileged_userfaultfd is 1).
  static Result<Fd> create_userfaultfd();

  std::span<uint8_t> bytes() const { return {ram_.data(), ram_.size()}; }
  // The XXH3-128 (high, low) of the RAM as the guest sees it. A userfault load's pages not
  // served yet are read from where they would be served from, not faulted in. REQUIRES: no
  // vCPU runs.
  std::pair<uint64_t, uint64_t> digest() const;
  const UserfaultStats* userfault_stats() const;
  // Reports a failure to provide guest memory (a userfault that cannot be served), once. Memory
  // that cannot fail never calls it.
  void on_failure(std::function<void(std::string)> report);

 private:
  Mapping ram_;
  Mapping base_;  // Read-only view of the base for eager and userfault loads.
  std::unique_ptr<UserfaultServer> server_;
};

}  // namespace deltavm::vmm
