// libFuzzer target: the control protocol between the host and deltavm-vmm (src/vmm/protocol.h),
// one JSON line each way. The first byte picks the side: a request line as the VMM reads it,
// or a reply line as the host reads it. Whatever the line, decoding refuses it or yields a
// message that encodes to a line that decodes again and encodes the same.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "vmm/protocol.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::string_view line(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] & 1) {
    deltavm::Result<deltavm::vmm::Reply> reply = deltavm::vmm::decode_reply(line);
    if (!reply) return 0;
    std::string encoded = deltavm::vmm::encode_reply(reply);
    deltavm::Result<deltavm::vmm::Reply> again = deltavm::vmm::decode_reply(encoded);
    if (!again || deltavm::vmm::encode_reply(again) != encoded) __builtin_trap();
  } else {
    deltavm::Result<deltavm::vmm::Request> request = deltavm::vmm::decode_request(line);
    if (!request) return 0;
    std::string encoded = deltavm::vmm::encode_request(*request);
    deltavm::Result<deltavm::vmm::Request> again = deltavm::vmm::decode_request(encoded);
    if (!again || deltavm::vmm::encode_request(*again) != encoded) __builtin_trap();
  }
  return 0;
}
