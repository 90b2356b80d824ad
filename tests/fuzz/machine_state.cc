// libFuzzer target: the kvm machine-state decoder (src/vmm/machine_state.h), fed hostile
// state files. An odd first byte makes the rest a payload whose header (lengths and XXH3
// checksums) is made to agree, as a hostile writer would, so that the fuzzer reaches every
// field check; an even one feeds the rest as it is. Whatever the input, decoding refuses it or
// yields a state that encodes to the same bytes and decodes again.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/coding.h"
#include "vmm/machine_state.h"

namespace {

// The first 12 bytes of every state file: magic and version (docs/formats.md).
std::vector<uint8_t> header_start() {
  deltavm::vmm::MachineState empty;
  empty.vcpus.resize(1);
  std::vector<uint8_t> encoded = deltavm::vmm::encode_machine_state(empty);
  return {encoded.begin(), encoded.begin() + 12};
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::span<const uint8_t> rest(data + 1, size - 1);
  std::vector<uint8_t> bytes;
  if (data[0] & 1) {
    static const std::vector<uint8_t> kStart = header_start();
    bytes = kStart;
    deltavm::put_u64_le(bytes, rest.size());
    deltavm::put_u64_le(bytes, XXH3_64bits(rest.data(), rest.size()));
    deltavm::put_u64_le(bytes, XXH3_64bits(bytes.data(), bytes.size()));
    bytes.insert(bytes.end(), rest.begin(), rest.end());
  } else {
    bytes.assign(rest.begin(), rest.end());
  }
  deltavm::Result<deltavm::vmm::MachineState> state = deltavm::vmm::decode_machine_state(bytes, "fuzz input");
  if (!state) return 0;
  std::vector<uint8_t> again = deltavm::vmm::encode_machine_state(*state);
  if (again != bytes) __builtin_trap();
  if (!deltavm::vmm::decode_machine_state(again, "re-encoded")) __builtin_trap();
  return 0;
}
