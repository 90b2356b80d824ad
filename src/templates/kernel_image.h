// The text inside a Linux bzImage: the decompressed kernel, which makes up much of every guest's
// RAM. Base images are compressed against it (store.h, "reference"), so the kernel a template
// already stores as an attachment is not stored a second time inside its image.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/error.h"
#include "store/store.h"

namespace deltavm {

inline constexpr const char* kKernelTextReferenceKind = "linux-kernel-text";

// Decompresses the payload of a bzImage (boot protocol 2.08+: payload_offset and
// payload_length in the setup header; LZ4 legacy or zstd payloads).
Result<std::vector<uint8_t>> linux_kernel_text(std::span<const uint8_t> bzimage);

// The compression reference kinds templates use (kKernelTextReferenceKind), for Store::open:
// a store holding template bases needs them to read those bases.
ReferenceKinds template_reference_kinds();

}  // namespace deltavm
