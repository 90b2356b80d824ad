// Builds a guest's initramfs (a newc cpio archive) from a template spec and the guest kit:
// busybox, the command agent, deltavm's /init, the setup commands and the spec's files.
// The archive is deterministic: the same inputs give the same bytes (fixed mtimes, inode
// numbers and order), so that independent builds boot into alike memory.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "base/error.h"
#include "templates/spec.h"

namespace deltavm {

// What every guest is built from: the kernel and the two programs of every initramfs.
struct GuestKit {
  std::filesystem::path kernel;   // Debian's cloud bzImage.
  std::filesystem::path busybox;  // busybox-static.
  std::filesystem::path agent;    // deltavm-agent, statically linked.

  // $DELTAVM_KIT (a directory with vmlinuz and busybox), else the kit scripts/guest-kit.sh
  // fetches into the source tree's .cache/kit; the agent from $DELTAVM_AGENT, else the build's.
  static Result<GuestKit> locate();
};

// The /init every guest runs (guest/init.sh, compiled in).
extern const char* const kGuestInit;

Result<std::vector<uint8_t>> build_initramfs(const TemplateSpec& spec, const GuestKit& kit);

}  // namespace deltavm
