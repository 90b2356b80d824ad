#include "templates/snapshot.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <ctime>

#include "base/json_fields.h"
#include "base/page.h"

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// The template's whole image, mapped private and writable: the capture writes the VM's pages
// over it, and the flat file underneath stays as the store verified it.
Result<Mapping> map_image_for_capture(Store& store, const Template& loaded) {
  DELTAVM_ASSIGN_OR_RETURN(std::filesystem::path flat, store.flat_file(loaded.record()));
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(flat, O_RDONLY | O_CLOEXEC));
  return Mapping::map(fd.get(), loaded.machine.memory_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, 0, flat.string());
}

// The snapshot's metadata: its template's (machine, backend, spec), and where it came from.
Result<std::string> snapshot_metadata(const ImageRecord& parent, const std::string& vm_id) {
  nlohmann::json metadata = nlohmann::json::parse(parent.metadata, nullptr, false);
  if (metadata.is_discarded() || !metadata.is_object()) {
    return make_error(ErrorCode::kCorruption, "template {}: its metadata is not a JSON object", parent.name);
  }
  metadata["snapshot"] = {{"vm", vm_id}, {"template", parent.name}, {"taken_at_unix", std::time(nullptr)}};
  return dump_json(metadata);
}

}  // namespace

nlohmann::json snapshot_json(const Snapshot& snapshot) {
  return {{"template", snapshot.record.name},
          {"parent", snapshot.record.parent.value_or("")},
          {"vm", snapshot.vm_id},
          {"chain_depth", snapshot.record.chain_depth},
          {"changed_pages", snapshot.changed_pages},
          {"stored_size_bytes", snapshot.record.stored_size_bytes},
          {"prepare_ms", snapshot.prepare_ms},
          {"pause_ms", snapshot.pause_ms},
          {"check_ms", snapshot.check_ms},
          {"store_ms", snapshot.store_ms}};
}

Result<Snapshot> snapshot_vm(const std::string& id, const std::string& name, Store& store, Backend& backend,
                             const std::filesystem::path& runtime, const SnapshotOptions& options) {
  if (!valid_template_name(name)) {
    return make_error(ErrorCode::kInvalidArgument, "snapshot name {:?}: expected 1 to 64 letters, digits, '-', '_' or '.'",
                      name);
  }
  DELTAVM_ASSIGN_OR_RETURN(VmDirectory vm, VmDirectory::open(runtime, id));
  DELTAVM_ASSIGN_OR_RETURN(VmRecord record, vm.read_record());
  if (record.backend != backend.name()) {
    return make_error(ErrorCode::kInvalidArgument, "VM {} runs on the {} backend, not {}", id, record.backend,
                      backend.name());
  }
  if (!record.purpose.empty()) {
    return make_error(ErrorCode::kConflict, "VM {} is a {} VM; only a VM started for use can be snapshotted", id,
                      record.purpose);
  }
  if (store.find(name)) {
    return make_error(ErrorCode::kAlreadyExists, "template {} is already in the store", name);
  }
  Result<Template> loaded = load_template(store, record.template_name);
  if (!loaded) {
    return loaded.error().with_context(
        fmt::format("VM {} was loaded from template {}, which the snapshot is stored against", id,
                    record.template_name));
  }
  // A template removed and built again under the same name is another image: the VM's pages
  // are changes against the image it was loaded from, and no other.
  if (!record.image_digest.empty() && record.image_digest != loaded->record().digest.hex()) {
    return make_error(ErrorCode::kConflict,
                      "VM {} was loaded from template {} as image {}; the store's {} is now image {}", id,
                      record.template_name, record.image_digest, record.template_name,
                      loaded->record().digest.hex());
  }

  Snapshot snapshot;
  snapshot.vm_id = id;
  auto start = Clock::now();
  DELTAVM_ASSIGN_OR_RETURN(Mapping ram, map_image_for_capture(store, *loaded));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> kernel, store.read_attachment(loaded->record(), kKernelRole));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> initramfs, store.read_attachment(loaded->record(), kInitramfsRole));
  DELTAVM_ASSIGN_OR_RETURN(std::string metadata, snapshot_metadata(loaded->record(), id));
  snapshot.prepare_ms = elapsed_ms(start);

  start = Clock::now();
  DELTAVM_TRY(backend.pause(vm));
  Result<RamChanges> changes = backend.capture_changes(vm, ram.writable_bytes(), options.capture);
  // A capture that fails, or fails its check, leaves the VM running, whatever was asked:
  // nothing of it is lost. Without --stop the VM runs on before the check.
  if (!changes || !options.stop) {
    Status resumed = backend.resume(vm);
    snapshot.pause_ms = elapsed_ms(start);
    if (!changes) return changes.error().with_context(fmt::format("snapshot of VM {}", id));
    if (!resumed) return resumed.error().with_context(fmt::format("VM {} after its snapshot", id));
  }
  snapshot.changed_pages = changes->pages.size();
  auto check_start = Clock::now();
  Result<std::vector<uint8_t>> state = changes->check(ram.bytes());
  snapshot.check_ms = elapsed_ms(check_start);
  if (options.stop) {
    if (!state) {
      DELTAVM_TRY(backend.resume(vm));
    } else {
      DELTAVM_TRY(stop_vm(id, backend, runtime));
    }
    snapshot.pause_ms = elapsed_ms(start);
  }
  if (!state) return state.error().with_context(fmt::format("snapshot of VM {}", id));

  start = Clock::now();
  DirtyBitmap changed(loaded->machine.memory_bytes / kPageSize);
  for (uint64_t page : changes->pages) changed.set(page);
  PutOptions put;
  put.metadata = std::move(metadata);
  put.attachments = {{std::string(kMachineStateRole), *state},
                     {std::string(kKernelRole), kernel},
                     {std::string(kInitramfsRole), initramfs}};
  put.dirty = &changed;
  DELTAVM_ASSIGN_OR_RETURN(snapshot.record, store.put_image(name, ram.bytes(), loaded->name(), put));
  snapshot.store_ms = elapsed_ms(start);
  return snapshot;
}

}  // namespace deltavm
