// The loader's side of a kvm restore: every page the chain writes goes into the RAM overlay the
// VMM maps (vmm/ram_overlay.h).
#pragma once

#include "backends/backend.h"
#include "base/page.h"
#include "vmm/ram_overlay.h"

namespace deltavm {

class OverlayMemoryWriter : public GuestMemoryWriter {
 public:
  explicit OverlayMemoryWriter(vmm::RamOverlayWriter& overlay) : overlay_(overlay) {}
  Status write_pages(std::span<const PageWrite> pages) override {
    for (const PageWrite& page : pages) {
      if (page.guest_physical_address % kPageSize != 0) {
        return make_error(ErrorCode::kInvalidArgument, "page write at {:#x} is not page aligned",
                          page.guest_physical_address);
      }
      DELTAVM_TRY(overlay_.write_page(page.guest_physical_address / kPageSize, page.bytes));
    }
    return {};
  }

 private:
  vmm::RamOverlayWriter& overlay_;
};

}  // namespace deltavm
