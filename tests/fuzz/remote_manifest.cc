// libFuzzer target: the remote manifest decoder (src/store/remote.h), fed what a hostile or
// damaged object store could serve as templates/worker.json. An even first byte hands the rest
// over as it is (the checksum refuses nearly all of it); an odd one parses the rest as JSON
// and puts the right checksum in, so that every field check is reached. Whatever the bytes,
// decoding refuses them or yields a chain ending in "worker" whose manifest decodes to the
// same chain again.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "base/json_fields.h"
#include "store/remote.h"

namespace {

bool same(const deltavm::ImageRecord& a, const deltavm::ImageRecord& b) {
  if (a.attachments.size() != b.attachments.size()) return false;
  for (size_t i = 0; i < a.attachments.size(); ++i) {
    const deltavm::Attachment &x = a.attachments[i], &y = b.attachments[i];
    if (x.role != y.role || x.object_id != y.object_id || x.size_bytes != y.size_bytes) return false;
  }
  return a.name == b.name && a.parent == b.parent && a.chain_depth == b.chain_depth && a.object_id == b.object_id &&
         a.stored_size_bytes == b.stored_size_bytes && a.image_size_bytes == b.image_size_bytes &&
         a.digest == b.digest && a.created_at_unix == b.created_at_unix && a.metadata == b.metadata &&
         a.page_sample == b.page_sample && a.reference == b.reference;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  if ((data[0] & 1) != 0) {
    nlohmann::json manifest = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
    if (manifest.is_object()) {
      manifest.erase("checksum");
      std::string body = deltavm::dump_json(manifest);
      manifest["checksum"] = deltavm::ObjectId::of({reinterpret_cast<const uint8_t*>(body.data()), body.size()}).hex();
      bytes = deltavm::dump_json(manifest);
    }
  }
  deltavm::Result<std::vector<deltavm::ImageRecord>> chain =
      deltavm::decode_manifest({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, "worker");
  if (!chain) return 0;
  if (chain->empty() || chain->back().name != "worker") __builtin_trap();
  for (const deltavm::ImageRecord& record : *chain) {
    if (record.page_sample.size() > (1u << 20) || record.metadata.size() > (1u << 20) ||
        record.attachments.size() > 64) {
      __builtin_trap();
    }
  }
  std::string again = deltavm::encode_manifest(*chain);
  deltavm::Result<std::vector<deltavm::ImageRecord>> decoded =
      deltavm::decode_manifest({reinterpret_cast<const uint8_t*>(again.data()), again.size()}, "worker");
  if (!decoded || decoded->size() != chain->size()) __builtin_trap();
  for (size_t i = 0; i < chain->size(); ++i) {
    if (!same((*chain)[i], (*decoded)[i])) __builtin_trap();
  }
  return 0;
}
