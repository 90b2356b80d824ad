#include "backends/backend.h"

#include "backends/kvm/kvm_backend.h"
#include "backends/qemu/qemu_backend.h"

namespace deltavm {
namespace {

class ConnectAtResume : public HeldControl {
 public:
  ConnectAtResume(Backend& backend, VmDirectory vm) : backend_(backend), vm_(std::move(vm)) {}
  Status resume() override { return backend_.resume(vm_); }

 private:
  Backend& backend_;
  VmDirectory vm_;
};

}  // namespace

Result<std::unique_ptr<HeldControl>> Backend::hold_control(const VmDirectory& vm) {
  return std::unique_ptr<HeldControl>(std::make_unique<ConnectAtResume>(*this, vm));
}

Result<std::unique_ptr<Backend>> make_backend(std::string_view name) {
  if (name == "qemu") return make_qemu_backend();
  if (name == "kvm") return make_kvm_backend();
  return make_error(ErrorCode::kInvalidArgument, "unknown backend '{}' (available: qemu, kvm)", name);
}

}  // namespace deltavm
