// libFuzzer target: the delta file decoder and apply (docs/formats.md), fed hostile bytes.
// Whatever the input, decoding either refuses it with an error or yields a delta whose edits
// all lie inside its image, which then applies to memory of that size and encodes again.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "image/delta.h"
#include "image/delta_file.h"

namespace {

// Images up to this size are applied; larger ones (valid, but slow to zero per input) are
// decoded only.
constexpr uint64_t kMaxAppliedImageBytes = 4 << 20;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> bytes(data, size);
  (void)deltavm::inspect_delta(bytes, "fuzz input");
  (void)deltavm::delta_reference(bytes, "fuzz input");
  deltavm::Result<deltavm::Delta> delta = deltavm::decode_delta(bytes, "fuzz input");
  if (!delta || delta->image_size_bytes > kMaxAppliedImageBytes) return 0;
  std::vector<uint8_t> memory(delta->image_size_bytes);
  if (!deltavm::apply_delta(*delta, memory)) __builtin_trap();  // A decoded delta must apply.
  std::vector<uint8_t> again = deltavm::encode_delta(*delta, 1);
  if (!deltavm::decode_delta(again, "re-encoded")) __builtin_trap();
  return 0;
}
