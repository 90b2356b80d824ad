#include "backends/backend.h"

#include "backends/kvm/kvm_backend.h"
#include "backends/qemu/qemu_backend.h"

namespace deltavm {

Result<std::unique_ptr<Backend>> make_backend(std::string_view name) {
  if (name == "qemu") return make_qemu_backend();
  if (name == "kvm") return make_kvm_backend();
  return make_error(ErrorCode::kInvalidArgument, "unknown backend '{}' (available: qemu, kvm)", name);
}

}  // namespace deltavm
